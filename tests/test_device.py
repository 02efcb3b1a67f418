"""Defaults follow the device (core/device.py): bf16 autocast where the device runs it fast, fp16
on GPUs without bf16, fp32 on CPUs whose bf16 is no faster; a preflight warning when the chosen
train.dtype will be slow. The capabilities are monkeypatched: no test depends on this machine's
CPU or on timings."""

from __future__ import annotations

import types

import pytest
import torch

from lora_train_ext.core import device as D
from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.preflight import preflight


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    monkeypatch.delenv(D.ENV_OVERRIDE, raising=False)
    D.cpu_bf16.cache_clear()
    yield
    D.cpu_bf16.cache_clear()


def _cpu(monkeypatch, flags, ratio=None):
    """A CPU whose flags say `flags` (True / False / None) and whose probe measures `ratio`."""
    monkeypatch.setattr(D, "cpu_bf16_flags", lambda: flags)
    calls = []

    def measure(rounds: int = 7):
        calls.append(rounds)
        if ratio is None:
            raise AssertionError("not measured when the flags settle it")
        return ratio
    monkeypatch.setattr(D, "_measure_cpu_bf16", measure)
    D.cpu_bf16.cache_clear()
    return calls


def test_cpu_without_bf16_instructions_prefers_fp32_and_is_slow_for_bf16(monkeypatch):
    calls = _cpu(monkeypatch, flags=False)
    assert D.preferred_dtype("cpu") == "fp32"
    message = D.dtype_is_slow("cpu", "bf16")
    assert message.startswith("train.dtype bf16 on this CPU")
    assert "no bf16 instructions" in message and message.endswith("choose fp32")
    assert D.dtype_is_slow("cpu", "fp32") == ""
    assert calls == []  # the flags settled it: nothing timed


@pytest.mark.parametrize("ratio, preferred, slow", [
    (0.4, "bf16", False),   # AMX-like: bf16 much faster -> the default
    (0.95, "fp32", False),  # flags say bf16, no faster: fp32 (same speed, more precision), no warning
    (5.0, "fp32", True),    # flags say bf16 and it is 5x slower: warn
])
def test_cpu_with_bf16_flags_is_decided_by_the_probe(monkeypatch, ratio, preferred, slow):
    calls = _cpu(monkeypatch, flags=True, ratio=ratio)
    assert D.preferred_dtype("cpu") == preferred
    message = D.dtype_is_slow("cpu", "bf16")
    assert bool(message) is slow
    if slow:
        assert f"~{ratio:.1f}x slower than fp32" in message and "measured slow" in message
    D.preferred_dtype(torch.device("cpu"))
    assert len(calls) == 1  # once per process


def test_unknown_flags_are_measured(monkeypatch):
    calls = _cpu(monkeypatch, flags=None, ratio=3.0)
    assert D.dtype_is_slow("cpu", "bf16")
    assert calls


@pytest.mark.parametrize("value, preferred, slow", [("1", "bf16", False), ("0", "fp32", True)])
def test_environment_override_skips_detection(monkeypatch, value, preferred, slow):
    calls = _cpu(monkeypatch, flags=None, ratio=None)
    monkeypatch.setattr(D, "cpu_bf16_flags", lambda: pytest.fail("flags read despite override"))
    monkeypatch.setenv(D.ENV_OVERRIDE, value)
    D.cpu_bf16.cache_clear()
    assert D.preferred_dtype("cpu") == preferred
    assert bool(D.dtype_is_slow("cpu", "bf16")) is slow
    assert calls == []


@pytest.mark.parametrize("bf16, preferred", [(True, "bf16"), (False, "fp16")])
def test_gpu_default_and_warning(monkeypatch, bf16, preferred):
    monkeypatch.setattr(D, "cuda_bf16", lambda device: bf16)
    assert D.preferred_dtype("cuda") == preferred
    assert bool(D.dtype_is_slow("cuda", "bf16")) is (not bf16)
    assert D.dtype_is_slow("cuda", "fp16") == ""


def test_flags_from_cpuinfo_when_torch_has_no_probe(monkeypatch):
    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace())  # no _is_*_supported probes
    monkeypatch.setattr(D, "_cpuinfo_flags", lambda: {"avx2", "avx512f"})
    assert D.cpu_bf16_flags() is False
    monkeypatch.setattr(D, "_cpuinfo_flags", lambda: {"avx512f", "avx512_bf16"})
    assert D.cpu_bf16_flags() is True
    monkeypatch.setattr(D, "_cpuinfo_flags", lambda: {"fp", "asimd", "bf16"})  # Arm
    assert D.cpu_bf16_flags() is True
    monkeypatch.setattr(D, "_cpuinfo_flags", lambda: None)
    assert D.cpu_bf16_flags() is None


def test_probe_runs_and_gives_a_ratio():
    """The real probe (no timing asserted): a positive ratio, threads as they were."""
    threads = torch.get_num_threads()
    ratio = D._measure_cpu_bf16(rounds=1)
    assert ratio > 0
    assert torch.get_num_threads() == threads


def _cfg(dtype: str) -> RunConfig:
    cfg = RunConfig()
    cfg.train.dtype = dtype
    return cfg


def test_preflight_warns_for_slow_bf16_on_this_cpu(monkeypatch, tmp_path):
    _cpu(monkeypatch, flags=False)
    cfg = _cfg("bf16")
    cfg.save.output_dir = str(tmp_path)
    out = preflight(cfg, arch="sd1", device="cpu", dataset=False)
    assert out.ok, out.problems  # a warning, not an error
    assert any(w.startswith("train.dtype bf16 on this CPU") for w in out.warnings)
    cfg.train.dtype = "fp32"
    assert not any("train.dtype" in w for w in preflight(cfg, arch="sd1", device="cpu",
                                                         dataset=False).warnings)
    # no device given (nothing known about it): no warning
    cfg.train.dtype = "bf16"
    assert not any("train.dtype" in w for w in preflight(cfg, arch="sd1",
                                                         dataset=False).warnings)


def test_preflight_quiet_where_bf16_is_fast(monkeypatch, tmp_path):
    _cpu(monkeypatch, flags=True, ratio=0.5)
    cfg = _cfg("bf16")
    cfg.save.output_dir = str(tmp_path)
    assert not any("train.dtype" in w for w in preflight(cfg, arch="sd1", device="cpu",
                                                         dataset=False).warnings)


def test_trainer_shows_the_warning_before_the_run(monkeypatch, tmp_path, sd1_bundle,
                                                  demo_dataset):
    from conftest import small_run_config
    from lora_train_ext.core.trainer import train

    _cpu(monkeypatch, flags=False)
    cfg = small_run_config(tmp_path, demo_dataset, steps=1, lr=1e-3, batch_size=1,
                           train__dtype="bf16")
    result = train(sd1_bundle, cfg)
    assert any(w.startswith("train.dtype bf16 on this CPU") for w in result.warnings)


def _fake_webui_model(dtype: torch.dtype):
    param = torch.zeros(1, dtype=dtype)
    diffusion_model = types.SimpleNamespace(parameters=lambda: iter([param]))
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=diffusion_model))


def test_hosts_offer_the_device_default(monkeypatch, tmp_path):
    from lora_train_ext.host.standalone import StandaloneHost
    from lora_train_ext.host.webui import WebUIHost

    _cpu(monkeypatch, flags=True, ratio=0.5)
    assert WebUIHost._default_dtype(_fake_webui_model(torch.float32)) == "bf16"
    assert StandaloneHost(str(tmp_path)).model_info().default_dtype == "bf16"
    _cpu(monkeypatch, flags=False)
    assert WebUIHost._default_dtype(_fake_webui_model(torch.float32)) == "fp32"
    assert StandaloneHost(str(tmp_path)).model_info().default_dtype == "fp32"
    # a half-precision model on the CPU trains in bf16 only (check_config refuses fp32)
    assert WebUIHost._default_dtype(_fake_webui_model(torch.float16)) == "bf16"
