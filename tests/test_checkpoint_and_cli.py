"""The tiny SD1 checkpoint against the real key lists, the core/host boundary, and the command
line's answers to good and bad input."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures_path import parse_shape, read_tsv
from lora_train_ext.core.models.clip import build_clip_text
from lora_train_ext.core.models.tiny import checkpoint_state_dict

ROOT = Path(__file__).resolve().parents[1]


def _fixture(*names: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for name in names:
        for row in read_tsv("checkpoint_keys", name):
            out[row[0]] = parse_shape(row[1] if len(row) > 1 else "")
    return out


def test_tiny_sd1_checkpoint_has_exactly_the_real_keys(sd1_bundle):
    keys = set(checkpoint_state_dict(sd1_bundle))
    real = _fixture("sd15_unet.tsv", "sd15_vae.tsv", "sd15_te.tsv")
    assert len(real) == 686 + 248 + 196
    assert keys == set(real)


def test_real_width_text_encoder_shapes_match():
    te = build_clip_text("sd1", "real", device="meta")
    real = _fixture("sd15_te.tsv")
    prefix = "cond_stage_model.transformer."
    shapes = {prefix + k: tuple(v.shape) for k, v in te.state_dict().items()
              if not k.endswith("position_ids")}
    assert shapes == real


def test_core_imports_no_host_or_ui_code():
    banned = {"modules", "gradio", "ldm", "sgm", "fastapi", "starlette"}
    offenders = []
    for path in (ROOT / "lora_train_ext" / "core").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in banned]
    assert not offenders, offenders


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lora_train_ext", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=300)


@pytest.mark.parametrize("args, field", [
    (["demo", "--rank", "0"], "--rank"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "ten"], "--steps"),
    (["demo", "--lr", "-1"], "--lr"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--dataset", "/nonexistent/folder"], "--dataset"),
    (["inspect", "/nonexistent/file.safetensors"], "file"),
    (["nosuchcommand"], "command"),
])
def test_bad_input_exits_2_with_one_line(args, field):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert field in lines[0]
    assert "Traceback" not in proc.stderr


def test_unwritable_out_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("demo", "--out", str(blocker / "sub"), "--steps", "1")
    assert proc.returncode == 2
    assert "--out" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_rejects_a_non_lora_file(tmp_path, sd1_bundle):
    from lora_train_ext.core.models.tiny import write_checkpoint

    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a tensor file")
    proc = run_cli("inspect", str(text))
    assert proc.returncode == 2 and "not a safetensors file" in proc.stderr
    ckpt = write_checkpoint(sd1_bundle, str(tmp_path / "base.safetensors"))
    proc = run_cli("inspect", ckpt)
    assert proc.returncode == 2 and "not a LoRA file" in proc.stderr


def test_demo_end_to_end_and_inspect(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path), "--steps", "8", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("lora_path", "base_path", "steps", "final_loss", "seconds"):
        assert key in result
    assert result["steps"] == 8
    assert result["roundtrip_exact"] is True
    assert result["merged_modules"] == 264
    assert result["merge_max_abs_diff"] < 1e-4
    assert os.path.isfile(result["lora_path"]) and os.path.isfile(result["base_path"])
    assert "8/8" in proc.stderr  # the progress bar went to stderr

    proc = run_cli("inspect", result["lora_path"], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["arch"] == "sd1" and report["algorithm"] == "lora"
    assert report["ranks"] == [8] and report["alphas"] == [8.0]
    assert report["modules"] == {"unet": 192, "te": 72}
    assert report["unknown_module_count"] == 0
    assert report["loaders"]["webui"] == "yes" and report["loaders"]["diffusers"] == "yes"
    text = run_cli("inspect", result["lora_path"]).stdout
    assert "arch:       sd1" in text and "unet 192" in text


def test_merged_checkpoint_differs_only_in_adapted_weights(tmp_path):
    from safetensors.torch import load_file

    proc = run_cli("demo", "--out", str(tmp_path), "--steps", "3", "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    base = load_file(result["base_path"])
    merged = load_file(result["merged_path"])
    assert base.keys() == merged.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    assert len(changed) == 264
