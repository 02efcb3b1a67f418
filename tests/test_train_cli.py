"""`python -m lora_train_ext train --checkpoint FILE`: the headless trainer on a checkpoint file.

Arch detection on every real key list and on tiny checkpoints, refusals (inpainting, depth,
refiner, LoRA / VAE files, pickles without --allow-ckpt), the widths read from the shapes, SD2's
prediction type as the WebUI detects it, streaming loads equal to the file, the demo reproduced
bit for bit from its NAME.config.toml, Ctrl-C stopping like an interrupt and --resume going on,
and every bad input as exit 2 with one line per problem naming the flag.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_path import parse_shape, read_tsv
from lora_train_ext import cli
from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.models.checkpoint_file import (
    CheckpointFile, detect_arch, expected_shapes, forward_test_is_v, inspect_checkpoint,
    load_checkpoint, match_size, needs_real_tokenizer)
from lora_train_ext.core.models.clip import clip_bpe_path, clip_bpe_tokenizer, tokenize
from lora_train_ext.core.models.tiny import build_bundle, checkpoint_state_dict, write_checkpoint
from lora_train_ext.core.preflight import preflight
from lora_train_ext.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {"sd1": ("sd15_unet", "sd15_vae", "sd15_te"),
             "sd2": ("sd21v_unet", "sd21v_vae", "sd21v_te"),
             "sdxl": ("sdxl_unet", "sd15_vae", "sdxl_te1", "sdxl_te2")}


def reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for name in REFERENCE[arch]:
        for key, shape in read_tsv("checkpoint_keys", f"{name}.tsv"):
            out[key] = parse_shape(shape)
    return out


@pytest.fixture()
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {arch: write_checkpoint(build_bundle(arch, "tiny", seed=0), str(folder / f"{arch}.safetensors"))
            for arch in ("sd1", "sd2", "sdxl")}


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lora_train_ext", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300, **kw)


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if line]


# -- what a file is ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_arch_and_real_widths_from_every_reference_key_list(arch):
    shapes = reference_shapes(arch)
    assert detect_arch(shapes) == arch
    assert match_size(arch, shapes) == "real"
    assert needs_real_tokenizer(shapes)
    assert set(expected_shapes(arch, "real")) <= set(shapes)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_arch_and_tiny_widths_from_tiny_checkpoints(arch, tiny_checkpoints):
    found = inspect_checkpoint(tiny_checkpoints[arch])
    assert (found.arch, found.size) == (arch, "tiny")


def test_reference_lists_with_extras_still_load():
    """Real files carry position_ids, EMA copies, the DDPM buffers: tolerated."""
    shapes = reference_shapes("sd1")
    shapes.update({"cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
                   "model_ema.decay": (), "alphas_cumprod": (1000,), "betas": (1000,)})
    assert (detect_arch(shapes), match_size("sd1", shapes)) == ("sd1", "real")


def test_old_sd1_key_names_are_renamed_as_the_webui_does(tmp_path, sd1_bundle):
    state = checkpoint_state_dict(sd1_bundle)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in state.items()}
    path = str(tmp_path / "old.safetensors")
    save_file(old, path)
    bundle, info = load_checkpoint(path)
    assert info.arch == "sd1"
    assert all(torch.equal(state[k], v) for k, v in checkpoint_state_dict(bundle).items())


@pytest.mark.parametrize("channels, word", [(9, "inpainting"), (5, "depth"),
                                            (8, "instruct-pix2pix"), (7, "input channels")])
def test_non_text_to_image_unets_are_refused(channels, word):
    for arch in ("sd1", "sd2", "sdxl"):
        shapes = reference_shapes(arch)
        key = "model.diffusion_model.input_blocks.0.0.weight"
        shapes[key] = (320, channels, 3, 3)
        with pytest.raises(UserError, match=word) as e:
            detect_arch(shapes)
        assert e.value.field == "model.checkpoint"


def test_sdxl_refiner_like_and_other_models_are_refused():
    te2 = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
           for k, v in reference_shapes("sdxl").items() if k.startswith("conditioner.embedders.1.")}
    unet = {k: v for k, v in reference_shapes("sdxl").items() if k.startswith("model.diffusion_model.")}
    unet["model.diffusion_model.input_blocks.0.0.weight"] = (384, 4, 3, 3)  # the refiner's width
    with pytest.raises(UserError, match="refiner"):
        detect_arch({**unet, **te2})
    depth = {**reference_shapes("sd2"), "depth_model.model.pretrained.act_postprocess3.0.project.0.bias": (256,)}
    with pytest.raises(UserError, match="depth"):
        detect_arch(depth)
    with pytest.raises(UserError, match="LoRA"):
        detect_arch({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (8, 320)})
    vae_only = {k[len("first_stage_model."):]: v for k, v in reference_shapes("sd1").items()
                if k.startswith("first_stage_model.")}
    with pytest.raises(UserError, match="--vae"):
        detect_arch(vae_only)
    with pytest.raises(UserError, match="unknown type"):  # a UNet but no known text encoder
        detect_arch({k: v for k, v in reference_shapes("sd1").items() if not k.startswith("cond_")})


def test_unknown_widths_are_refused_naming_a_tensor():
    shapes = reference_shapes("sd1")
    shapes["model.diffusion_model.out.2.weight"] = (4, 321, 3, 3)
    with pytest.raises(UserError, match=r"out\.2\.weight is 4x321x3x3, expected 4x320x3x3"):
        match_size("sd1", shapes)


# -- loading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_streamed_load_equals_the_file_and_predicts_the_same(arch, tiny_checkpoints):
    original = build_bundle(arch, "tiny", seed=0)
    bundle, info = load_checkpoint(tiny_checkpoints[arch])
    want, got = checkpoint_state_dict(original), checkpoint_state_dict(bundle)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    with torch.no_grad():
        assert torch.equal(original.denoise(x, t, original.condition(["a cat"])),
                           bundle.denoise(x, t, bundle.condition(["a cat"])))
    import hashlib

    assert info.sha256 == hashlib.sha256(Path(tiny_checkpoints[arch]).read_bytes()).hexdigest()
    assert bundle.model_hash == info.sha256[:10] and bundle.model_name == arch
    assert info.prediction == original.prediction and info.how == "from its metadata"


def test_base_dtype_bf16_keeps_the_weights_in_bf16(tiny_checkpoints):
    bundle, info = load_checkpoint(tiny_checkpoints["sd1"], base_dtype="bf16")
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.text_encoders["te"].parameters()} == {torch.bfloat16}
    assert info.base_dtype == "bf16"
    bundle, _ = load_checkpoint(tiny_checkpoints["sd1"], base_dtype="fp16")
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}  # an fp16 VAE overflows


def test_a_separate_vae_file_replaces_the_checkpoints(tmp_path, tiny_checkpoints):
    other = build_bundle("sd1", "tiny", seed=5)
    vae = {k: v.contiguous() for k, v in other.vae.state_dict().items()}  # bare names, as VAE files
    vae["model_ema.decay"] = torch.tensor(0.999)  # ignored, as the WebUI ignores it
    path = str(tmp_path / "my.vae.safetensors")
    save_file(vae, path)
    bundle, _ = load_checkpoint(tiny_checkpoints["sd1"], vae_path=path)
    own, _ = load_checkpoint(tiny_checkpoints["sd1"])
    assert all(torch.equal(v, bundle.vae.state_dict()[k]) for k, v in other.vae.state_dict().items())
    assert bundle.vae_id != own.vae_id
    bad = str(tmp_path / "bad.vae.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(UserError, match="not a VAE") as e:
        inspect_checkpoint(tiny_checkpoints["sd1"], vae_path=bad)
    assert e.value.field == "model.vae"


def test_ckpt_needs_allow_ckpt(tmp_path, sd1_bundle):
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": checkpoint_state_dict(sd1_bundle), "global_step": 1}, path)
    with pytest.raises(UserError, match="--allow-ckpt"):
        CheckpointFile.open(path)
    bundle, info = load_checkpoint(path, allow_pickle=True)
    want = checkpoint_state_dict(sd1_bundle)
    assert all(torch.equal(want[k], v) for k, v in checkpoint_state_dict(bundle).items())
    assert info.arch == "sd1" and info.how == "default"


def test_truncated_and_foreign_files_are_named(tmp_path, tiny_checkpoints):
    data = Path(tiny_checkpoints["sd1"]).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        CheckpointFile.open(str(cut))
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        CheckpointFile.open(str(text))


# -- prediction type ------------------------------------------------------------------------------
def _sd2_with_output(tmp_path, name: str, bias: float, metadata: bool = False) -> str:
    """A tiny SD2 whose UNet outputs `bias` everywhere (out.2 weight 0): the WebUI's forward test
    sees mean(out - 0.5) = bias - 0.5. Random tiny weights give no meaningful answer (their
    output is not trained towards noise or v), so the test models are made to differ this way."""
    bundle = build_bundle("sd2", "tiny", seed=0)
    with torch.no_grad():
        bundle.unet.out[2].weight.zero_()
        bundle.unet.out[2].bias.fill_(bias)
    path = str(tmp_path / f"{name}.safetensors")
    if metadata:
        write_checkpoint(bundle, path)
    else:
        save_file(checkpoint_state_dict(bundle), path, metadata={"format": "pt"})
    return path


def test_sd2_prediction_is_detected_by_the_webuis_forward_test(tmp_path):
    v = _sd2_with_output(tmp_path, "v", bias=-2.0)  # mean(out - x) = -2.5 < -1: v
    eps = _sd2_with_output(tmp_path, "eps", bias=0.5)  # 0: epsilon
    bundle, info = load_checkpoint(v)
    assert (info.prediction, info.how, bundle.prediction) == ("v", "detected", "v")
    assert info.line() == "checkpoint: sd2, v-prediction (detected)"
    assert bundle.resolution == 64  # tiny
    bundle, info = load_checkpoint(eps)
    assert (info.prediction, info.how) == ("epsilon", "detected")
    assert info.line() == "checkpoint: sd2, epsilon (detected)"
    assert forward_test_is_v(load_checkpoint(v, base_dtype="bf16")[0].unet, 32)


def test_given_prediction_yaml_and_metadata_win_over_the_forward_test(tmp_path):
    v = _sd2_with_output(tmp_path, "v", bias=-2.0)
    _, info = load_checkpoint(v, prediction="epsilon")
    assert (info.prediction, info.how) == ("epsilon", "given")
    Path(tmp_path / "v.yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    assert load_checkpoint(v)[1].how == "from v.yaml"
    assert load_checkpoint(v)[1].prediction == "epsilon"
    eps = _sd2_with_output(tmp_path, "eps_meta", bias=0.5, metadata=True)
    meta = CheckpointFile.open(eps).metadata
    assert meta["modelspec.prediction_type"] == "v"  # the tiny SD2's own (SD2.1-768)
    assert load_checkpoint(eps)[1].prediction == "v"


# -- the command ------------------------------------------------------------------------------------
def test_train_with_the_demos_config_gives_the_demos_weights(tmp_path, capsys, keep_threads):
    demo = run_demo(str(tmp_path / "demo"), steps=3, seed=0, rank=4, batch_size=2)
    config = tmp_path / "demo" / "demo_lora.config.toml"
    saved = RunConfig.read(str(config))
    assert saved.model.checkpoint == demo["base_path"]
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "again"),
                     "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert "checkpoint: sd1, epsilon (from its metadata)" in err
    assert (result["arch"], result["steps"], result["stopped"]) == ("sd1", 3, False)
    want, got = load_file(demo["lora_path"]), load_file(result["lora_path"])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    again = RunConfig.read(result["config_path"])
    assert again.save.output_dir == str(tmp_path / "again")
    assert {k: v for k, v in again.changed().items() if k != "save.output_dir"} == \
        {k: v for k, v in saved.changed().items() if k != "save.output_dir"}


def test_train_sd2_end_to_end_reads_arch_and_writes_the_tabs_files(tmp_path, capsys,
                                                                   demo_dataset, tiny_checkpoints):
    out = tmp_path / "out"
    assert cli.main(["train", "--checkpoint", tiny_checkpoints["sd2"], "--dataset", demo_dataset,
                     "--out", str(out), "--resolution", "64", "--no-enable-buckets", "--steps", "2",
                     "--rank", "2", "--dtype", "fp32", "--output-name", "x"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["arch"], result["prediction"]) == ("sd2", "v")
    assert sorted(os.listdir(out)) == ["x.config.toml", "x.history.csv", "x.history.json", "x.json",
                                       "x.safetensors"]
    meta = CheckpointFile.open(str(out / "x.safetensors")).metadata
    assert meta["ss_v_parameterization"] == "True" and meta["ss_sd_model_name"] == "sd2"
    assert RunConfig.read(str(out / "x.config.toml")).model.arch == "sd2"


@pytest.mark.parametrize("args, flags", [
    (["--rank", "0"], ["--rank"]),
    (["--checkpoint", "{missing}"], ["--checkpoint"]),
    (["--arch", "sd2"], ["--arch"]),
    (["--base-dtype", "bf16"], ["--base-dtype"]),
    (["--base-dtype", "fp8"], ["--base-dtype"]),
    (["--vae", "{missing}"], ["--vae"]),
    (["--rank", "0", "--lr", "-1"], ["--rank", "--lr"]),
    (["--vae", "{missing}", "--dataset", "{missing}"], ["--vae", "--dataset"]),
    (["--device", "tpu"], ["--device"]),
])
def test_bad_input_exits_2_one_line_per_problem_naming_the_flag(args, flags, tmp_path, capsys,
                                                                demo_dataset, tiny_checkpoints):
    base = {"--checkpoint": tiny_checkpoints["sd1"], "--dataset": demo_dataset,
            "--out": str(tmp_path / "out"), "--dtype": "fp32"}
    args = [a.replace("{missing}", str(tmp_path / "missing")) for a in args]
    for i in range(0, len(args) - 1, 2):
        base[args[i]] = args[i + 1]
    argv = ["train", *[x for kv in base.items() for x in kv]]
    assert cli.main(argv) == 2
    lines = error_lines(capsys)
    assert len(lines) == len(flags), lines
    for line, flag in zip(lines, flags):
        assert line.startswith(f"error: {flag}"), lines
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_out_are_named(capsys, demo_dataset):
    assert cli.main(["train", "--dataset", demo_dataset]) == 2
    lines = error_lines(capsys)
    assert lines[0].startswith("error: --checkpoint (model.checkpoint)")
    assert lines[1].startswith("error: --out (save.output_dir)")


def test_ckpt_refused_without_allow_ckpt(tmp_path, capsys, demo_dataset, sd1_bundle):
    path = str(tmp_path / "model.ckpt")
    torch.save(checkpoint_state_dict(sd1_bundle), path)
    argv = ["train", "--checkpoint", path, "--dataset", demo_dataset, "--out", str(tmp_path / "o"),
            "--dtype", "fp32"]
    assert cli.main(argv) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: --checkpoint (model.checkpoint)")
    assert "--allow-ckpt" in lines[0] and "runs any code" in lines[0]


def test_an_inpainting_checkpoint_is_refused_by_the_command(tmp_path, capsys, demo_dataset,
                                                            sd1_bundle):
    state = checkpoint_state_dict(sd1_bundle)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, 3, 3)
    path = str(tmp_path / "inpaint.safetensors")
    save_file(state, path)
    assert cli.main(["train", "--checkpoint", path, "--dataset", demo_dataset,
                     "--out", str(tmp_path / "o")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "--checkpoint" in lines[0] and "inpainting" in lines[0]


def test_the_webui_and_the_demo_refuse_the_headless_settings(tmp_path, capsys, demo_dataset,
                                                             tiny_checkpoints):
    cfg = RunConfig()
    cfg.data.dataset_dir = demo_dataset
    cfg.model.checkpoint = tiny_checkpoints["sd1"]
    cfg.model.base_dtype = "fp32"
    fields = {p.field for p in preflight(cfg, host_check=lambda c: None).problems}
    assert {"model.checkpoint", "model.base_dtype"} <= fields
    assert cli.main(["demo", "--checkpoint", tiny_checkpoints["sd1"], "--out", str(tmp_path)]) == 2
    assert "train --checkpoint" in capsys.readouterr().err


def test_ctrl_c_stops_saves_and_resume_ends_where_an_uninterrupted_run_does(tmp_path, demo_dataset,
                                                                            tiny_checkpoints):
    common = ["--checkpoint", tiny_checkpoints["sd1"], "--dataset", demo_dataset,
              "--resolution", "64", "--no-enable-buckets", "--steps", "40", "--rank", "2",
              "--batch-size", "1", "--dtype", "fp32", "--threads", "1", "--output-name", "r"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "lora_train_ext", "train", *common,
                             "--out", str(tmp_path / "a")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "] 1/40" in line:  # training has begun
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(seen) + err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stopped"] and 1 <= stopped["steps"] < 40
    assert "--resume" in err and os.path.isdir(stopped["state_dir"])
    resumed = run_cli("train", "--resume", stopped["state_dir"], "--threads", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == 40
    straight = run_cli("train", *common, "--out", str(tmp_path / "b"))
    assert straight.returncode == 0, straight.stderr
    a, b = load_file(str(tmp_path / "a" / "r.safetensors")), load_file(str(tmp_path / "b" / "r.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the real tokenizer ---------------------------------------------------------------------------
@pytest.mark.skipif(not clip_bpe_path(), reason="open_clip_torch (CLIP's BPE vocabulary) not installed")
def test_real_checkpoints_get_clips_own_token_ids():
    tok = clip_bpe_tokenizer()
    assert len(tok) == 49408
    ids = tokenize(["a photo of a cat"], tokenizer=tok)[0, :7].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_bpe_vocabulary_is_built_in_clips_order(tmp_path):
    """From a merges file: 256 byte symbols (printable ones first), the same with </w>, one token
    per merge, then start and end."""
    import gzip

    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nc a\nca t</w>\n")
    tok = clip_bpe_tokenizer(str(path))
    vocab = tok.get_vocab()
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["ca"] == 512
    assert vocab["cat</w>"] == 513 and vocab["<|startoftext|>"] == 514
    assert tokenize(["cat"], tokenizer=tok)[0, :3].tolist() == [514, 513, 515]
