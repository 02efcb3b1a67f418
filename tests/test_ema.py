"""EMA of the adapter's weights: the average's math, its own file beside the raw one (snapshots
too, pruned together), metadata. Exact resume with EMA is in test_resume.py."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import small_run_config

from lora_train_ext.core.ema import AdapterEMA
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.run_files import ema_path
from lora_train_ext.core.trainer import train


class Toy(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=dtype))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


@pytest.mark.parametrize("on_cpu", [False, True])
def test_ema_after_k_steps_is_the_closed_form(on_cpu):
    """Start step 2: the copy follows the weights for steps 1 and 2, then averages; after step k
    ema = d^(k-2) w_2 + (1 - d) sum_{i=3..k} d^(k-i) w_i."""
    toy, d, start, k = Toy(), 0.8, 2, 9
    ema = AdapterEMA(toy, d, start_step=start, on_cpu=on_cpu)
    assert set(ema.shadow) == {"w"}  # only what is trained
    g = torch.Generator().manual_seed(0)
    weights = {}
    for step in range(1, k + 1):
        w = torch.randn(3, generator=g, dtype=torch.float64)
        weights[step] = w
        with torch.no_grad():
            toy.w.copy_(w)
        ema.update(step)
        if step <= start:
            assert torch.equal(ema.shadow["w"], toy.w.detach())
    expected = d ** (k - start) * weights[start] + (1 - d) * sum(
        d ** (k - i) * weights[i] for i in range(start + 1, k + 1))
    torch.testing.assert_close(ema.shadow["w"].double(), expected, rtol=1e-6, atol=1e-7)
    assert ema.shadow["w"].dtype == torch.float32 and ema.shadow["w"].device.type == "cpu"


def test_ema_is_kept_in_fp32_and_applied_then_given_back_exactly():
    toy = Toy(torch.bfloat16)
    ema = AdapterEMA(toy, 0.999)
    with torch.no_grad():
        toy.w.copy_(torch.tensor([1.0, 2.0, 3.0]))
    ema.update(1)
    # 0.001 * 1.0: far below bf16's resolution near 1, kept by the fp32 copy
    assert ema.shadow["w"][0].item() == pytest.approx(0.001, rel=1e-4)
    raw = toy.w.detach().clone()
    with ema.applied():
        assert torch.equal(toy.w.detach(), ema.shadow["w"].to(torch.bfloat16))
    assert torch.equal(toy.w.detach(), raw)
    state = ema.state_dict()
    other = AdapterEMA(Toy(torch.bfloat16), 0.999)
    other.load_state_dict(state)
    assert torch.equal(other.shadow["w"], ema.shadow["w"])


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("sd1", "tiny", seed=0)


def test_ema_file_beside_the_raw_one_with_snapshots(bundle, demo_dataset, tmp_path):
    cfg = small_run_config(tmp_path, demo_dataset, 6, lr=1e-2, batch_size=2, train__ema=True,
                           train__ema_decay=0.9, train__ema_start_step=1,
                           save__save_every_steps=2, save__keep_last=1)
    result = train(bundle, cfg)
    assert result.ema_path == ema_path(result.path) == str(tmp_path / "demo_lora-ema.safetensors")
    raw, raw_meta = load_lora(result.path)
    avg, avg_meta = load_lora(result.ema_path)
    assert raw.keys() == avg.keys()
    ups = [k for k in raw if "lora_up" in k]
    assert any(not torch.equal(raw[k], avg[k]) for k in ups)  # it is an average, not a copy
    assert all(torch.equal(raw[k], avg[k]) for k in raw if k.endswith(".alpha"))
    # the same metadata, plus ss_ema (the hashes describe each file's own tensors, and
    # ss_output_name is the file's own name, as for snapshots)
    assert avg_meta.pop("ss_ema") == "decay 0.9, from step 1"
    assert "ss_ema" not in raw_meta
    assert avg_meta["ss_output_name"] == "demo_lora-ema"
    differ = {k for k in raw_meta if raw_meta[k] != avg_meta.get(k)}
    assert differ <= {"ss_output_name", "sshs_model_hash", "sshs_legacy_hash",
                      "modelspec.hash_sha256"}, differ
    assert set(raw_meta) == set(avg_meta)
    # snapshots at steps 2 and 4, the last one kept: with its EMA twin, the older pair deleted
    assert [os.path.basename(p) for p in result.snapshots] == ["demo_lora-step00000004.safetensors"]
    assert os.path.isfile(tmp_path / "demo_lora-step00000004-ema.safetensors")
    assert os.path.isfile(tmp_path / "demo_lora-step00000004-ema.json")
    assert not os.path.exists(tmp_path / "demo_lora-step00000002-ema.safetensors")
    assert not os.path.exists(tmp_path / "demo_lora-step00000002-ema.json")
    with safe_open(str(tmp_path / "demo_lora-step00000004-ema.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "4"


def test_ema_changes_nothing_of_the_raw_weights(bundle, demo_dataset, tmp_path):
    plain = train(bundle, small_run_config(tmp_path / "a", demo_dataset, 3, lr=1e-2,
                                           batch_size=2))
    with_ema = train(bundle, small_run_config(tmp_path / "b", demo_dataset, 3, lr=1e-2,
                                              batch_size=2, train__ema=True, train__ema_on_cpu=True))
    a, b = load_lora(plain.path)[0], load_lora(with_ema.path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.ema_path == "" and not os.path.exists(ema_path(plain.path))
