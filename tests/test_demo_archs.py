"""`demo --arch sd1|sd2|sdxl [--prediction epsilon|v] --algo ...` and `inspect` on what it writes:
arch, algorithm and module counts for SD2 and SDXL files; the arch read from each metadata style
(kohya's `ss_base_model_version` / `ss_v2`, Stability's `modelspec.architecture`, none)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import state_sha256
from lora_train_ext import cli
from lora_train_ext.core.config import NetworkConfig
from lora_train_ext.core.inspect import describe
from lora_train_ext.core.lora_file import LoraInfo, load_lora, save_lora
from lora_train_ext.core.merge import merge_lora_into_checkpoint
from lora_train_ext.core.models.tiny import build_bundle, write_checkpoint
from lora_train_ext.core.networks import build_network
from lora_train_ext.demo import _merge_check, run_demo

SUMMARY_KEYS = {"lora_path", "base_path", "merged_path", "steps", "total_steps", "stopped",
                "state_dir", "optimizer", "scheduler", "first_loss", "final_loss", "lr",
                "warnings", "snapshots", "history_path", "samples", "sample_seconds", "modules",
                "file_bytes", "roundtrip_exact", "merged_modules", "merge_max_abs_diff", "seconds"}


def _demo(capsys, *args: str) -> dict:
    code = cli.main(["demo", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _inspect(capsys, path: str) -> dict:
    assert cli.main(["inspect", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_sd2_loha_then_inspect(tmp_path, capsys):
    result = _demo(capsys, "--arch", "sd2", "--algo", "loha", "--out", str(tmp_path),
                   "--steps", "2", "--batch-size", "1")
    assert set(result) == SUMMARY_KEYS  # the same summary as the SD1 default
    assert result["modules"] == {"unet": 192, "te": 138}
    assert result["roundtrip_exact"] is True
    assert result["merged_modules"] == 192 + 138
    assert result["merge_max_abs_diff"] < 1e-4
    _, meta = load_lora(result["lora_path"])
    assert meta["ss_v2"] == "True" and meta["ss_v_parameterization"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lycoris-loha"
    assert "SD2-shaped" in meta["ss_training_comment"]
    report = _inspect(capsys, result["lora_path"])
    assert (report["arch"], report["algorithm"]) == ("sd2", "loha")
    assert report["modules"] == {"unet": 192, "te": 138} and report["ranks"] == [8]
    assert report["unknown_module_count"] == 0 and report["loaders"]["webui"] == "yes"


def test_demo_sdxl_ia3_v_prediction_then_inspect(tmp_path, capsys):
    result = _demo(capsys, "--arch", "sdxl", "--algo", "ia3", "--prediction", "v",
                   "--out", str(tmp_path), "--steps", "1", "--batch-size", "1")
    # IA3: attn1 / attn2 to_k, to_v and ff.net.2 of 70 transformer blocks; k, v, fc2 per TE layer
    assert result["modules"] == {"unet": 350, "te1": 36, "te2": 96}
    assert result["roundtrip_exact"] is True and result["merge_max_abs_diff"] < 1e-4
    _, meta = load_lora(result["lora_path"])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_v_parameterization"] == "True"
    report = _inspect(capsys, result["lora_path"])
    assert (report["arch"], report["algorithm"]) == ("sdxl", "ia3")
    assert report["modules"] == {"unet": 350, "te1": 36, "te2": 96}
    assert report["unknown_module_count"] == 0


def test_run_demo_keeps_the_arch_through_resume(tmp_path):
    """--stop-after then --resume: config.json carries arch, prediction and algo."""
    first = run_demo(str(tmp_path), steps=2, seed=0, rank=2, batch_size=1, arch="sd2",
                     prediction="epsilon", algo="lokr", stop_after=1)
    assert first["stopped"] and first["state_dir"]
    from lora_train_ext.core.config import RunConfig

    cfg = RunConfig.read(os.path.join(first["state_dir"], "config.json"))
    assert (cfg.model.arch, cfg.model.prediction, cfg.network.algo) == ("sd2", "epsilon", "lokr")
    second = run_demo(cfg=cfg, resume_dir=first["state_dir"])
    assert second["steps"] == 2 and not second["stopped"]
    _, meta = load_lora(second["lora_path"])
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lycoris-lokr"
    assert second["modules"] == {"unet": 192, "te": 138}


@pytest.mark.parametrize("args, flag", [
    (["--arch", "sd3"], "--arch"),
    (["--prediction", "x0"], "--prediction"),
    (["--algo", "glora"], "--algo"),
])
def test_bad_arch_prediction_algo_exit_2(args, flag, capsys):
    assert cli.main(["demo", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_flags_set_the_run_config():
    args = cli.build_parser().parse_args(["demo", "--arch", "SDXL", "--prediction", "v",
                                          "--algo", "dora"])
    cfg, given, _ = cli.demo_run_config(args)
    assert (cfg.model.arch, cfg.model.prediction, cfg.network.algo) == ("sdxl", "v", "dora")
    assert {"model.arch", "model.prediction", "network.algo"} <= given
    default, _, _ = cli.demo_run_config(cli.build_parser().parse_args(["demo"]))
    assert (default.model.arch, default.model.prediction, default.network.algo) == \
        ("sd1", "auto", "lora")


def test_resume_refuses_a_new_arch(tmp_path, capsys):
    assert cli.main(["demo", "--resume", str(tmp_path), "--arch", "sd2"]) == 2
    assert "--arch" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_merge_check_restores_the_bundle_exactly(arch, tmp_path):
    bundle = build_bundle(arch, "tiny", seed=0)
    network = build_network(bundle.trainable_roots(), arch, NetworkConfig(rank=2, alpha=2.0),
                            seed=1)
    with torch.no_grad():
        for key, value in network.state_dict().items():
            if "up" in key:
                value.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    before = state_sha256(*bundle.base_modules())
    base = write_checkpoint(bundle, str(tmp_path / "base.safetensors"))
    lora = str(tmp_path / "l.safetensors")
    save_lora(network.kohya_state_dict(), LoraInfo(arch=arch, rank=2, alpha=2.0), lora,
              save_dtype="fp32", sidecar=False)
    merged = str(tmp_path / "merged.safetensors")
    merge_lora_into_checkpoint(base, [(lora, 1.0)], merged, arch=arch)
    assert _merge_check(bundle, network, merged, seed=0) < 1e-4
    assert state_sha256(*bundle.base_modules()) == before


# -- inspect: the arch from each metadata style ---------------------------------------------------

@pytest.fixture(scope="module")
def sd2_tensors():
    bundle = build_bundle("sd2", "tiny", seed=0)
    network = build_network(bundle.trainable_roots(), "sd2", NetworkConfig(rank=2, alpha=1.0),
                            seed=0)
    return {k: v.detach().contiguous() for k, v in network.kohya_state_dict().items()}


@pytest.mark.parametrize("meta, arch", [
    ({"ss_base_model_version": "sd_v2", "ss_v2": "True"}, "sd2"),
    ({"ss_v2": "True"}, "sd2"),  # older kohya files: no ss_base_model_version
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
    ({}, "sd2"),  # no metadata: the 23 text-encoder layers tell
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),  # trust stated metadata
])
def test_inspect_reads_sd2_from_metadata(meta, arch, sd2_tensors, tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file(sd2_tensors, path, metadata=meta or None)
    report = describe(path)
    assert report["arch"] == arch
    assert report["algorithm"] == "lora" and report["module_count"] == 192 + 138
    assert report["modules"] == {"unet": 192, "te": 138}
    if arch == "sd2":
        assert report["unknown_module_count"] == 0
    else:
        assert report["unknown_module_count"] > 0  # SD2 names checked against SDXL's modules
