"""The file tools on the tiny SD1 model (fp32): streaming checkpoint merge, LoRA + LoRA merge,
extract, resize; their command lines (exit codes, one-line errors, nothing written on error);
and inspect's per-loader table."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_train_ext import cli
from lora_train_ext.core import keys
from lora_train_ext.core.config import NetworkConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.extract import extract_lora
from lora_train_ext.core.inspect import describe
from lora_train_ext.core.lora_file import LoraInfo, data_section_sha256, load_lora, save_lora
from lora_train_ext.core.lowrank import full_delta
from lora_train_ext.core.merge import (LoraSpec, MergeMismatch, group_modules, merge_checkpoint,
                                       merge_loras, module_delta, parse_lora_spec)
from lora_train_ext.core.models.tiny import build_bundle, checkpoint_state_dict, write_checkpoint
from lora_train_ext.core.networks import build_network
from lora_train_ext.core.resize import parse_dynamic, resize_lora
from lora_train_ext.core.stream_io import SafetensorsReader, file_sha256

ROOT = Path(__file__).resolve().parents[1]


# -- fixtures: one tiny SD1 checkpoint and a few adapter files ------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    bundle = build_bundle("sd1", "tiny", seed=0)
    roots = bundle.trainable_roots()
    out = {"dir": d, "base": write_checkpoint(bundle, str(d / "base.safetensors"))}

    def make(name, cfg, arch="sd1", model_roots=roots, seed=1, meta=True):
        net = build_network(model_roots, arch, cfg, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for a in net:
                for pname, p in a.named_parameters():
                    if pname == "dora_scale":
                        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                    elif torch.count_nonzero(p) == 0:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        path = str(d / f"{name}.safetensors")
        info = LoraInfo(arch=arch, algo=cfg.algo, rank=cfg.rank, alpha=cfg.alpha,
                        conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha)
        save_lora(net.kohya_state_dict(), info, path, save_dtype="fp32", sidecar=False)
        if not meta:
            save_file(load_file(path), path)
        out[name] = path

    make("a", NetworkConfig(rank=4, alpha=2.0))
    make("b", NetworkConfig(algo="locon", rank=3, alpha=3.0, conv_rank=2, conv_alpha=1.0), seed=2)
    make("loha", NetworkConfig(algo="loha", rank=2, alpha=1.0, conv_rank=2, conv_alpha=2.0,
                               block_filter="MID"), seed=3)
    make("ia3", NetworkConfig(algo="ia3", block_filter="MID", train_on="unet"), seed=4)
    make("dora", NetworkConfig(algo="dora", rank=2, alpha=2.0, block_filter="MID",
                               train_on="unet"), seed=5)
    sd2 = build_bundle("sd2", "tiny", seed=0)
    make("sd2", NetworkConfig(rank=2, alpha=2.0), arch="sd2", model_roots=sd2.trainable_roots())
    make("sd2_nometa", NetworkConfig(rank=2, alpha=2.0), arch="sd2",
         model_roots=sd2.trainable_roots(), meta=False)
    vae = build_bundle("sd1", "tiny", seed=5).vae.state_dict()
    save_file({k: v.contiguous() for k, v in vae.items()}, str(d / "vae.safetensors"))
    out["vae"] = str(d / "vae.safetensors")
    return out


def _deltas(path: str, arch: str = "sd1") -> dict[str, torch.Tensor]:
    """kohya name -> fp32 full delta (strength 1) of every module of a file."""
    tensors, _ = load_lora(path)
    return {name: full_delta(parts, name, arch) for name, parts in group_modules(tensors).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _targets(path: str) -> dict[str, str]:
    """kohya name -> the checkpoint key it changes (SD1: one key per module)."""
    tensors, _ = load_lora(path)
    return {n: keys.kohya_to_checkpoint(n, "sd1")[0][0] for n in group_modules(tensors)}


def run_main(*args: str, capsys) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- merge into a checkpoint ----------------------------------------------------------------------

def test_merge_changes_exactly_the_targeted_tensors(files, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    report = merge_checkpoint(files["base"], [LoraSpec(files["a"], 0.7), LoraSpec(files["b"], -0.4)],
                              out)
    base, merged = load_file(files["base"]), load_file(out)
    assert base.keys() == merged.keys()
    targeted = set(_targets(files["a"]).values()) | set(_targets(files["b"]).values())
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == targeted and report.changed_tensors == len(targeted)
    assert all(base[k].dtype == merged[k].dtype for k in base)
    # the merged values are base + sum of strength x delta, per module
    da, db = _deltas(files["a"]), _deltas(files["b"])
    for name, key in {**_targets(files["a"]), **_targets(files["b"])}.items():
        expected = base[key] + 0.7 * da.get(name, 0) - 0.4 * db.get(name, 0)
        assert torch.allclose(merged[key], expected, atol=1e-5, rtol=0), name
    # metadata: sources, strengths and hashes
    with SafetensorsReader(out) as r:
        recipe = json.loads(r.metadata["lora_train_ext.merge"])
    assert recipe["base"]["sha256"] == file_sha256(files["base"]) == report.base_sha256
    assert [(s["file"], s["strength"]) for s in recipe["loras"]] == \
        [("a.safetensors", 0.7), ("b.safetensors", -0.4)]
    assert recipe["loras"][0]["sha256"] == data_section_sha256(files["a"])
    assert report.bytes_written == os.path.getsize(out)


def test_merge_at_strength_then_extract_recovers_the_delta(files, tmp_path):
    """merge a at s, extract at full rank: s x a's delta per module (relative error < 1e-3).
    The text encoder is merged at TE factor 0, so it is identical and the extract skips it."""
    s = 0.6
    merged = str(tmp_path / "merged.safetensors")
    spec = parse_lora_spec(f"{files['a']}:{s}:0:1")
    assert (spec.strength, spec.te, spec.unet) == (s, 0.0, 1.0)
    merge_checkpoint(files["base"], [spec], merged)
    out = str(tmp_path / "extracted.safetensors")
    report = extract_lora(files["base"], merged, out, rank=4096, save_dtype="fp32")
    assert report.skipped_parts == ["te"] and "text encoder te identical" in report.notes()[0]
    assert report.kept_energy > 1 - 1e-6
    got = _deltas(out)
    want = {n: d * s for n, d in _deltas(files["a"]).items() if n.startswith("lora_unet_")}
    assert got.keys() == want.keys()
    num = sum(float((got[n] - want[n]).norm() ** 2) for n in want) ** 0.5
    den = sum(float(want[n].norm() ** 2) for n in want) ** 0.5
    assert num / den < 1e-3
    assert max(_rel(got[n], want[n]) for n in want) < 1e-3
    # an ordinary kohya LoRA with full metadata
    info = describe(out)
    assert info["arch"] == "sd1" and info["algorithm"] == "lora"
    assert info["unknown_module_count"] == 0 and info["modules"] == {"unet": len(want)}
    meta = info["metadata"]
    assert meta["ss_network_module"] == "networks.lora" and meta["sshs_model_hash"]
    assert json.loads(meta["lora_train_ext.extract"])["skipped_parts"] == ["te"]
    # low rank: fewer singular values, the reported energy is what the file keeps
    low = str(tmp_path / "low.safetensors")
    report = extract_lora(files["base"], merged, low, rank=2, save_dtype="fp32")
    got = _deltas(low)
    kept = sum(float(got[n].norm() ** 2) for n in got) / sum(float(want[n].norm() ** 2) for n in got)
    assert abs(kept - report.kept_energy) < 1e-4 and report.kept_energy < 0.999


def test_merge_refuses_a_lora_of_another_arch(files, tmp_path):
    out = tmp_path / "m.safetensors"
    for name in ("sd2", "sd2_nometa"):
        with pytest.raises(MergeMismatch) as e:
            merge_checkpoint(files["base"], [LoraSpec(files["a"]), LoraSpec(files[name])], str(out))
        assert e.value.modules and all(m.startswith("lora_") for m in e.value.modules)
        assert "do not fit the sd1 checkpoint" in str(e.value)
        assert ("is an sd2 LoRA" in str(e.value)) == (name == "sd2")
        assert not out.exists() and not list(tmp_path.iterdir())


def test_merge_vae_and_precision(files, tmp_path):
    out = str(tmp_path / "m.safetensors")
    report = merge_checkpoint(files["base"], [LoraSpec(files["a"])], out, precision="fp16",
                              vae=files["vae"])
    base, merged, vae = load_file(files["base"]), load_file(out), load_file(files["vae"])
    targeted = set(_targets(files["a"]).values())
    differ = [k for k, v in vae.items() if not torch.equal(v, base["first_stage_model." + k])]
    assert report.vae_tensors == len(differ) > 0  # norms start at 1 / 0 in both
    for k, t in merged.items():
        assert t.dtype == torch.float16
        if k.startswith("first_stage_model."):
            assert torch.equal(t, vae[k[len("first_stage_model."):]].half())
        elif k not in targeted:
            assert torch.equal(t, base[k].half()), k
    with SafetensorsReader(out) as r:
        assert json.loads(r.metadata["lora_train_ext.merge"])["vae"]["sha256"] == \
            file_sha256(files["vae"])


def test_merge_reads_ckpt_only_when_allowed(files, tmp_path, capsys):
    ckpt = str(tmp_path / "base.ckpt")
    torch.save({"state_dict": load_file(files["base"])}, ckpt)
    out = tmp_path / "m.safetensors"
    code, _, err = run_main("merge", "--base", ckpt, "--lora", files["a"], "--out", str(out),
                            capsys=capsys)
    assert code == 2 and "--allow-ckpt" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, stdout, _ = run_main("merge", "--base", ckpt, "--lora", files["a"], "--out", str(out),
                               "--allow-ckpt", capsys=capsys)
    assert code == 0
    ref = str(tmp_path / "ref.safetensors")
    merge_checkpoint(files["base"], [LoraSpec(files["a"])], ref)
    a, b = load_file(str(out)), load_file(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(stdout.strip().splitlines()[-1])["changed_tensors"] == 264


def test_ia3_and_dora_merge_through_the_stream(files, tmp_path):
    """Base-dependent algorithms: the delta computed from the streamed base weight."""
    out = str(tmp_path / "m.safetensors")
    merge_checkpoint(files["base"], [LoraSpec(files["ia3"], 0.5), LoraSpec(files["dora"])], out)
    base, merged = load_file(files["base"]), load_file(out)
    t_ia3, t_dora = (group_modules(load_lora(files[n])[0]) for n in ("ia3", "dora"))
    for name, parts in t_ia3.items():
        key = keys.kohya_to_checkpoint(name, "sd1")[0][0]
        w = base[key] + 0.5 * module_delta(parts, tuple(base[key].shape), name, base[key])
        if name in t_dora:
            w = w + module_delta(t_dora[name], tuple(w.shape), name, w)
        assert torch.allclose(merged[key], w, atol=1e-5, rtol=0), name


# -- LoRA + LoRA -> LoRA ---------------------------------------------------------------------------

def test_merge_loras_concat_equals_applying_both(files, tmp_path):
    out = str(tmp_path / "ab.safetensors")
    report = merge_loras([LoraSpec(files["a"], 0.5), LoraSpec(files["b"], -1.2)], out)
    assert report.mode == "concat" and report.save_dtype == "fp32"
    da, db, dc = _deltas(files["a"]), _deltas(files["b"]), _deltas(out)
    assert dc.keys() == da.keys() | db.keys()
    for name, d in dc.items():
        want = 0.5 * da.get(name, 0) - 1.2 * db.get(name, 0)
        assert _rel(d, want) < 1e-5, name
    tensors, _ = load_lora(out)
    shared = next(n for n in da if n in db)
    assert tensors[f"{shared}.lora_down.weight"].shape[0] == 4 + 3
    # applying the merged file == applying both, in a checkpoint
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    merge_checkpoint(files["base"], [LoraSpec(out)], one)
    merge_checkpoint(files["base"], [LoraSpec(files["a"], 0.5), LoraSpec(files["b"], -1.2)], two)
    x, y = load_file(one), load_file(two)
    assert all(torch.allclose(x[k], y[k], atol=1e-5, rtol=0) for k in x)
    assert describe(out)["algorithm"] == "locon"


def test_merge_loras_svd_through_full_deltas(files, tmp_path):
    with pytest.raises(UserError) as e:
        merge_loras([LoraSpec(files["a"]), LoraSpec(files["loha"])], str(tmp_path / "x.safetensors"))
    assert e.value.field == "--rank"
    with pytest.raises(UserError, match="base weight"):
        merge_loras([LoraSpec(files["a"]), LoraSpec(files["dora"])], str(tmp_path / "x.safetensors"),
                    rank=8)
    out = str(tmp_path / "svd.safetensors")
    # rank 64 >= every summed delta's rank (LoRA 4 + LoHa 2 x 2): lossless
    report = merge_loras([LoraSpec(files["a"], 0.8), LoraSpec(files["loha"], 1.5)], out, rank=64)
    assert report.mode == "svd" and report.kept_energy > 1 - 1e-6
    da, dl, dc = _deltas(files["a"]), _deltas(files["loha"]), _deltas(out)
    for name, d in dc.items():
        want = 0.8 * da.get(name, 0) + 1.5 * dl.get(name, 0)
        assert _rel(d, want) < 1e-4, name
    assert not list(tmp_path.glob("x.safetensors"))


# -- resize ---------------------------------------------------------------------------------------

def test_resize_full_rank_is_lossless_and_lower_ranks_keep_the_reported_energy(files, tmp_path):
    full = str(tmp_path / "full.safetensors")
    report = resize_lora(files["b"], full, rank=64)
    before, after = _deltas(files["b"]), _deltas(full)
    assert after.keys() == before.keys()
    assert max(_rel(after[n], before[n]) for n in before) < 1e-5
    assert report.kept_energy > 1 - 1e-9
    assert all(m["new_rank"] == m["rank"] for m in report.modules)

    low = str(tmp_path / "low.safetensors")
    report = resize_lora(files["a"], low, rank=2)
    before, after = _deltas(files["a"]), _deltas(low)
    per = {m["name"]: m for m in report.modules}
    for name, d in before.items():
        kept = float(after[name].norm() ** 2 / d.norm() ** 2)
        assert abs(kept - per[name]["kept_energy"]) < 1e-4, name
        assert abs(float((d - after[name]).norm() ** 2 / d.norm() ** 2) - (1 - kept)) < 1e-4
        assert per[name]["new_rank"] == 2
    total = sum(float(d.norm() ** 2) for d in before.values())
    assert abs(sum(float(a.norm() ** 2) for a in after.values()) / total - report.kept_energy) < 1e-4
    assert report.kept_energy < 0.999

    dyn = str(tmp_path / "dyn.safetensors")
    report = resize_lora(files["a"], dyn, dynamic=parse_dynamic("sv_fro:0.9"))
    assert all(m["kept_energy"] >= 0.81 - 1e-6 and 1 <= m["new_rank"] <= 4 for m in report.modules)
    # LoHa (full delta, SVD) comes out as LoRA
    lo = str(tmp_path / "loha.safetensors")
    resize_lora(files["loha"], lo, rank=64)
    before, after = _deltas(files["loha"]), _deltas(lo)
    assert max(_rel(after[n], before[n]) for n in before) < 1e-4
    assert describe(lo)["algorithm"] in ("lora", "locon")


def test_resize_cli_reports_energy(files, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    code, stdout, err = run_main("resize", "--lora", files["a"], "--rank", "1", "--out", str(out),
                                 capsys=capsys)
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["rank_max"] == 1 and 0 < result["kept_energy"] < 1
    assert len(result["modules"]) == 264 and "kept energy" in err and "resize:" in err


# -- command lines: exit 2, one line naming the flag, nothing written -------------------------------

def _bad_cases(files, d):
    a = files["a"]
    blocked = str(Path(a).with_suffix(".safetensors")) + "/sub/x.safetensors"
    out = str(d / "o.safetensors")
    return [
        (["merge", "--base", str(d / "missing.safetensors"), "--lora", a, "--out", out], "--base"),
        (["merge", "--base", files["base"], "--lora", str(d / "none.safetensors"), "--out", out],
         "--lora"),
        (["merge", "--base", files["base"], "--lora", f"{a}:abc", "--out", out], "--lora"),
        (["merge", "--base", files["base"], "--lora", f"{a}:1:2", "--out", out], "--lora"),
        (["merge", "--base", files["base"], "--lora", f"{a}:0", "--out", out], "--lora"),
        (["merge", "--base", files["base"], "--lora", a, "--out", blocked], "--out"),
        (["merge", "--base", files["base"], "--lora", a, "--out", str(d / "o.ckpt")], "--out"),
        (["merge", "--base", files["base"], "--lora", a, "--out", files["base"]], "--out"),
        (["merge", "--base", files["base"], "--lora", a, "--out", out, "--precision", "fp8"],
         "--precision"),
        (["merge", "--base", files["base"], "--lora", files["sd2"], "--out", out], "--lora"),
        (["merge", "--lora", a, "--out", out], "--base"),
        (["merge-loras", "--lora", a, "--lora", files["b"], "--out", out, "--rank", "0"], "--rank"),
        (["merge-loras", "--lora", a, "--lora", files["loha"], "--out", out], "--rank"),
        (["merge-loras", "--lora", f"{a}:1:1:1", "--out", out], "--lora"),
        (["merge-loras", "--out", out], "--lora"),
        (["extract", "--base", files["base"], "--tuned", files["base"], "--rank", "0",
          "--out", out], "--rank"),
        (["extract", "--base", files["base"], "--tuned", files["base"], "--rank", "4",
          "--out", out], "--tuned"),
        (["extract", "--base", files["base"], "--tuned", str(d / "t.safetensors"), "--rank", "4",
          "--out", out], "--tuned"),
        (["extract", "--base", files["base"], "--tuned", files["a"], "--rank", "4",
          "--out", out, "--clamp-quantile", "0"], "--clamp-quantile"),
        (["resize", "--lora", a, "--out", out], "--rank"),
        (["resize", "--lora", a, "--out", out, "--rank", "0"], "--rank"),
        (["resize", "--lora", a, "--out", out, "--dynamic", "sv_fro:2"], "--dynamic"),
        (["resize", "--lora", a, "--out", out, "--dynamic", "fro"], "--dynamic"),
        (["resize", "--lora", files["ia3"], "--out", out, "--rank", "2"], "--lora"),
        (["resize", "--lora", str(d / "none.safetensors"), "--out", out, "--rank", "2"], "--lora"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(files, tmp_path, capsys):
    for args, flag in _bad_cases(files, tmp_path):
        before = set(os.listdir(files["dir"]))
        code, stdout, err = run_main(*args, capsys=capsys)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code == 2, (args, err)
        assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, (args, err)
        assert not list(tmp_path.iterdir()), args
        assert set(os.listdir(files["dir"])) == before, args


def test_mismatch_lists_every_module_on_stdout(files, tmp_path, capsys):
    code, stdout, err = run_main("merge", "--base", files["base"], "--lora", files["sd2_nometa"],
                                 "--out", str(tmp_path / "o.safetensors"), capsys=capsys)
    assert code == 2 and "do not fit" in err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert len(result["unmatched"]) > 8 and "and" in err  # the line lists 8, stdout all


def test_merge_command_end_to_end(files, tmp_path):
    """The real `python -m lora_train_ext merge`: a progress line on stderr, JSON last on stdout."""
    out = tmp_path / "m.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "lora_train_ext", "merge", "--base", files["base"],
                           "--lora", f"{files['a']}:0.5", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "merge: 100.0%" in proc.stderr and "merged 264 modules" in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["changed_tensors"] == 264 and os.path.getsize(out) == result["bytes"]
    with open(out, "rb") as f:  # an aligned, valid safetensors file
        n = struct.unpack("<Q", f.read(8))[0]
    assert n % 8 == 0
    assert set(load_file(str(out))) == set(checkpoint_state_dict(build_bundle("sd1", "tiny")))


# -- inspect: which loaders read the file -----------------------------------------------------------

def test_inspect_loader_table(files):
    ia3 = describe(files["ia3"])
    assert ia3["loaders"]["webui"] == "yes" and ia3["loaders"]["sdnext"] == "yes"
    for loader in ("comfyui", "forge", "diffusers"):
        assert ia3["loaders"][loader].startswith("no"), loader
    assert any("IA3" in n for n in ia3["loader_notes"])
    dora = describe(files["dora"])
    assert dora["loaders"]["webui"] == dora["loaders"]["comfyui"] == "yes"
    assert dora["loaders"]["diffusers"].startswith("no") and "dora_scale" in dora["loaders"]["diffusers"]
    assert any("dora_scale" in n for n in dora["loader_notes"])
    lora = describe(files["a"])
    assert all(v == "yes" for v in lora["loaders"].values()) and lora["loader_notes"] == []


def test_sd2_openclip_rows_merge_and_extract(tmp_path):
    """SD2's text encoder: q / k / v are row blocks of in_proj_weight, both ways."""
    bundle = build_bundle("sd2", "tiny", seed=0)
    base = write_checkpoint(bundle, str(tmp_path / "base.safetensors"))
    net = build_network(bundle.trainable_roots(), "sd2",
                        NetworkConfig(rank=2, alpha=2.0, train_on="te"), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in net:
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.3)
    lora = str(tmp_path / "te.safetensors")
    save_lora(net.kohya_state_dict(), LoraInfo(arch="sd2", rank=2, alpha=2.0), lora,
              save_dtype="fp32", sidecar=False)
    merged = str(tmp_path / "merged.safetensors")
    merge_checkpoint(base, [LoraSpec(lora, 1.5)], merged)
    out = str(tmp_path / "x.safetensors")
    report = extract_lora(base, merged, out, rank=8, save_dtype="fp32")
    assert report.skipped_parts == ["unet"] and report.arch == "sd2"
    got, want = _deltas(out, "sd2"), _deltas(lora, "sd2")
    assert got.keys() == want.keys() and any("_q_proj" in n for n in got)
    assert max(_rel(got[n], 1.5 * want[n]) for n in want) < 1e-3


def test_extract_and_merge_loras_commands(files, tmp_path, capsys):
    merged = str(tmp_path / "m.safetensors")
    code, _, _ = run_main("merge", "--base", files["base"], "--lora", f"{files['b']}:1:0:1",
                          "--out", merged, capsys=capsys)
    assert code == 0
    out = str(tmp_path / "x.safetensors")
    code, stdout, err = run_main("extract", "--base", files["base"], "--tuned", merged,
                                 "--rank", "8", "--conv-rank", "4", "--out", out, capsys=capsys)
    assert code == 0 and "text encoder te identical" in err and "extract:" in err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["skipped_parts"] == ["te"] and result["parts"]["unet"] == result["modules"]
    info = describe(out)
    assert info["algorithm"] == "locon" and info["conv_ranks"] == [4]
    tensors = load_lora(out)[0]  # default precision fp16, alphas fp32
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    ml = str(tmp_path / "ml.safetensors")
    code, stdout, err = run_main("merge-loras", "--lora", f"{files['a']}:0.5", "--lora", files["b"],
                                 "--out", ml, capsys=capsys)
    assert code == 0 and "concat" in err
    assert json.loads(stdout.strip().splitlines()[-1])["mode"] == "concat"
