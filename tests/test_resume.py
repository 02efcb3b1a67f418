"""Exact resume and snapshots on the tiny SD1 model.

A run stopped early with its state and resumed must end with the weights (and losses, LR history,
snapshots) of a run that was never stopped: optimizer and scheduler state, every RNG, the noise
generator, the data position, dropout and the text / latent caches all have to line up.
Continuing from a plain LoRA file (no state) takes over its weights and step count.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import small_run_config

from lora_train_ext import cli
from lora_train_ext.core import optim as O
from lora_train_ext.core.bundle import TrainControl
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.networks import build_network
from lora_train_ext.core.continue_from import steps_from
from lora_train_ext.core.trainer import Trainer, train
from lora_train_ext.demo import demo_dataset_dir

AVAILABLE = O.available_optimizers()
STEMS = ("00_red_circle", "01_blue_square", "02_green_triangle", "03_yellow_circle",
         "04_red_square")


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("sd1", "tiny", seed=0)


def _images(root, count: int) -> str:
    folder = root / f"img{count}"
    folder.mkdir()
    source = os.path.join(demo_dataset_dir(), "4_shapes")
    for stem in STEMS[:count]:
        for ext in (".png", ".txt"):
            shutil.copy(os.path.join(source, stem + ext), folder / (stem + ext))
    return str(folder)


@pytest.fixture(scope="module")
def five_images(tmp_path_factory) -> str:
    """Batch 2 -> 3 batches an epoch (2, 2, 1), so steps of two batches straddle epochs."""
    return _images(tmp_path_factory.mktemp("data"), 5)


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> str:
    return _images(tmp_path_factory.mktemp("data"), 2)


def make_cfg(out, dataset: str, steps: int, **settings):
    return small_run_config(out, dataset, steps, lr=2e-3, batch_size=2, **settings)


def stop_at(step: int) -> TrainControl:
    control = TrainControl()
    control.add_listener(lambda e: control.request_stop("test interrupt")
                         if e.kind == "step" and e.step == step else None)
    return control


def assert_same_tensors(path_a: str, path_b: str) -> None:
    a, b = load_lora(path_a)[0], load_lora(path_b)[0]
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    assert all(torch.equal(a[k], b[k]) for k in a), f"close but not equal (max {worst})"


def history(result) -> list:
    """NAME.history.json without the wall-clock seconds (the one value that is not computed)."""
    with open(result.history_path) as f:
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in json.load(f)]


def straight_and_resumed(bundle, tmp_path, dataset, total, stop, **settings):
    straight = train(bundle, make_cfg(tmp_path / "straight", dataset, total, **settings))
    cfg = make_cfg(tmp_path / "resumed", dataset, total, **settings)
    first = train(bundle, cfg, stop_at(stop))
    assert first.stopped and first.steps == stop and os.path.isfile(
        os.path.join(first.state_dir, "training_state.pth"))
    assert os.path.isfile(os.path.join(first.state_dir, "config.json"))
    resumed = train(bundle, make_cfg(tmp_path / "resumed", dataset, total, **settings),
                    resume_dir=first.state_dir)
    assert not resumed.stopped and resumed.steps == total
    return straight, first, resumed


# -- exact resume --------------------------------------------------------------------------------
def test_resume_equals_uninterrupted_adamw_cosine_grad_accum(bundle, five_images, tmp_path):
    """AdamW + cosine, batch 2 x grad_accum 2 over 3-batch epochs: step 2 straddles the first
    epoch end, the stop (after step 3) falls exactly on the second. UNet only, so captions come
    from the text cache (filled in another order after the resume); dropout and flips draw
    from the RNGs."""
    straight, first, resumed = straight_and_resumed(
        bundle, tmp_path, five_images, total=4, stop=3, network__train_on="unet",
        train__grad_accum=2, optim__scheduler="cosine", optim__warmup_steps=1,
        network__dropout=0.1, data__flip=True)
    assert_same_tensors(straight.path, resumed.path)
    assert resumed.losses == straight.losses
    assert history(resumed) == history(straight)
    assert resumed.metadata["ss_session_id"] == first.metadata["ss_session_id"]  # one run


@pytest.mark.parametrize("name", ["Prodigy", "AdamWScheduleFree"])
def test_resume_equals_uninterrupted_adaptive_and_schedule_free(name, bundle, five_images,
                                                                tmp_path):
    """Stopped mid-epoch (step 2 of 3-batch epochs); images decoded every step (no latent
    cache), UNet and text encoder trained, rank dropout on, a snapshot every step of which
    the last one is kept, across the resume too (schedule-free: eval/train switches)."""
    if not AVAILABLE[name][0]:
        pytest.skip(AVAILABLE[name][1])
    lr = 1.0 if O.get_spec(name).adaptive else 1e-2
    straight, first, resumed = straight_and_resumed(
        bundle, tmp_path, five_images, total=4, stop=2, optim__optimizer=name, optim__lr=lr,
        data__cache_latents=False, network__rank_dropout=0.2, save__save_every_steps=1,
        save__keep_last=1)
    assert_same_tensors(straight.path, resumed.path)
    assert resumed.losses == straight.losses
    assert resumed.lrs == straight.lrs
    assert [os.path.basename(p) for p in first.snapshots] == ["demo_lora-step00000002.safetensors"]
    assert [os.path.basename(p) for p in resumed.snapshots] == \
        [os.path.basename(p) for p in straight.snapshots] == ["demo_lora-step00000003.safetensors"]
    assert not os.path.exists(first.snapshots[0])  # retention went on after the resume
    assert_same_tensors(straight.snapshots[0], resumed.snapshots[0])


def test_resume_with_ema_and_validation_equals_uninterrupted(bundle, five_images, tmp_path):
    """The EMA of the weights is in the state: the EMA file of a resumed run is the one of an
    uninterrupted run, bit for bit; so are the validation losses in the history (one image held
    out, measured every step; the resumed run does not measure its start again)."""
    straight, first, resumed = straight_and_resumed(
        bundle, tmp_path, five_images, total=5, stop=2, train__ema=True, train__ema_decay=0.7,
        train__ema_start_step=1, data__validation_count=1, train__validate_every_steps=1,
        network__dropout=0.1)
    assert_same_tensors(straight.path, resumed.path)
    assert_same_tensors(straight.ema_path, resumed.ema_path)
    a, b = load_lora(straight.path)[0], load_lora(straight.ema_path)[0]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in first.val_losses] == [0, 1, 2]
    assert resumed.val_losses == straight.val_losses
    assert [s for s, _ in straight.val_losses] == [0, 1, 2, 3, 4, 5]
    assert history(resumed) == history(straight)
    assert resumed.warnings == []


# -- continuing a plain LoRA file ----------------------------------------------------------------
def test_continue_from_a_plain_lora_file_takes_weights_and_steps(bundle, two_images, tmp_path):
    base = train(bundle, make_cfg(tmp_path / "a", two_images, 2, network__train_on="te"))
    file_tensors = load_lora(base.path)[0]
    seen = {}

    def on_start(trainer, event):
        if event.kind == "start":
            seen["step"], seen["total"] = event.step, event.total
            seen["weights"] = {k: v.clone() for k, v in trainer.network.kohya_state_dict().items()}

    cfg = make_cfg(tmp_path / "b", two_images, 2, network__train_on="te",
                   network__existing_lora=base.path)
    control = TrainControl()
    trainer = Trainer(bundle, cfg, control)
    control.add_listener(lambda e: on_start(trainer, e))
    result = trainer.run()
    assert (seen["step"], seen["total"]) == (2, 4)
    assert all(torch.equal(seen["weights"][k], v) for k, v in file_tensors.items())
    assert result.steps == 4
    meta = load_lora(result.path)[1]
    assert (meta["ss_steps"], meta["ss_max_train_steps"]) == ("4", "4")

    # no metadata: the step count comes from the name, as ComfyUI's node writes it
    bare = tmp_path / "other_7_steps.safetensors"
    save_file(file_tensors, str(bare))
    control = TrainControl()
    control.add_listener(lambda e: control.request_stop() if e.kind == "start" else None)
    cfg = make_cfg(tmp_path / "c", two_images, 2, network__train_on="te",
                   network__existing_lora=str(bare))
    result = train(bundle, cfg, control)
    assert result.stopped and result.steps == 7 and result.total_steps == 9


@pytest.mark.parametrize("meta, name, steps", [
    ({"ss_steps": "1200"}, "anything.safetensors", 1200),
    ({}, "my_lora_1200_steps.safetensors", 1200),
    ({}, "trained_lora_10_steps_20250225_203716.safetensors", 10),
    ({}, "demo_lora-step00000300.safetensors", 300),
    ({}, "style_v2.safetensors", 0),
    ({}, "demo_lora-000003.safetensors", 0),  # an epoch number, not steps
    ({"ss_steps": "n/a"}, "x_5_steps.safetensors", 5),
])
def test_steps_from_metadata_or_file_name(meta, name, steps):
    assert steps_from(meta, name) == steps


def _rewrite(path: str, out: str, meta_changes: dict, tensor_change=None) -> str:
    tensors, meta = load_lora(path)
    meta.update(meta_changes)
    if tensor_change is not None:
        tensors = tensor_change(tensors)
    save_file(tensors, out, metadata=meta)
    return out


@pytest.fixture(scope="module")
def rank4_file(bundle, two_images, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("rank4")
    return train(bundle, make_cfg(out, two_images, 1, network__train_on="te", network__rank=4,
                                  network__alpha=4.0)).path


@pytest.mark.parametrize("kind, match", [
    ("rank", "has rank 4"),
    ("arch", "sdxl_base_v1-0"),
    ("algo", "loha"),
    ("alpha", "has alpha 8"),
    ("keys", "does not fit"),
])
def test_continue_from_an_unfitting_file_is_a_clear_error(kind, match, bundle, two_images,
                                                         rank4_file, tmp_path):
    out = str(tmp_path / "other.safetensors")
    rank, path = 4, out
    if kind == "rank":
        rank, path = 2, rank4_file
    elif kind == "arch":
        _rewrite(rank4_file, out, {"ss_base_model_version": "sdxl_base_v1-0"})
    elif kind == "algo":
        _rewrite(rank4_file, out, {"ss_network_module": "lycoris.kohya",
                                   "ss_network_args": json.dumps({"algo": "loha"})})
    elif kind == "alpha":
        _rewrite(rank4_file, out, {}, lambda t: {k: v * 2 if k.endswith(".alpha") else v
                                                 for k, v in t.items()})
    else:
        _rewrite(rank4_file, out, {}, lambda t: {k.replace("lora_te_", "lora_te1_"): v
                                                 for k, v in t.items()})
    cfg = make_cfg(tmp_path / "x", two_images, 1, network__train_on="te", network__rank=rank,
                   network__alpha=float(rank), network__existing_lora=path)
    with pytest.raises(UserError) as err:
        train(bundle, cfg)
    assert err.value.field == "network.existing_lora"
    assert match in err.value.message, err.value.message


# -- snapshots -----------------------------------------------------------------------------------
def test_snapshot_retention_and_contents(bundle, two_images, tmp_path):
    """Epochs of 2 steps; a snapshot every step and every epoch (the epoch name wins), the last
    2 kept, fp16. Each is a complete file: its step, epoch and own name in the metadata."""
    cfg = make_cfg(tmp_path, two_images, 5, network__train_on="te", train__batch_size=1,
                   save__save_every_steps=1, save__save_every_epochs=1, save__keep_last=2,
                   save__save_dtype="fp16")
    events = []
    result = train(bundle, cfg, TrainControl(events.append))
    written = [os.path.basename(e.path) for e in events if e.kind == "snapshot"]
    assert written == ["demo_lora-step00000001.safetensors", "demo_lora-000001.safetensors",
                       "demo_lora-step00000003.safetensors", "demo_lora-000002.safetensors"]
    assert [os.path.basename(p) for p in result.snapshots] == written[2:]
    for gone in written[:2]:
        stem = os.path.join(tmp_path, gone[:-len(".safetensors")])
        assert not os.path.exists(stem + ".safetensors") and not os.path.exists(stem + ".json")
    network = build_network(bundle.trainable_roots(), "sd1", cfg.network, seed=5)
    for path, step, epoch in zip(result.snapshots, (3, 4), (1, 2)):
        assert os.path.isfile(path[:-len(".safetensors")] + ".json")
        tensors, meta = load_lora(path)
        assert (meta["ss_steps"], meta["ss_epoch"]) == (str(step), str(epoch))
        assert meta["ss_output_name"] == os.path.basename(path)[:-len(".safetensors")]
        assert all(t.dtype == (torch.float32 if k.endswith(".alpha") else torch.float16)
                   for k, t in tensors.items())
        network.load_kohya_state_dict(tensors)  # complete: every key, every shape
    final = load_lora(result.path)[1]
    assert final["ss_steps"] == "5" and final["ss_output_name"] == "demo_lora"


# -- command line --------------------------------------------------------------------------------
def test_cli_stop_after_then_resume_equals_a_straight_run(tmp_path, capsys):
    common = ["--steps", "4", "--batch-size", "1", "--rank", "2", "--train-on", "te",
              "--scheduler", "linear", "--warmup", "1", "--lr", "2e-3"]

    def demo(*args: str) -> dict:
        assert cli.main(["demo", *args]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        return json.loads(out[-1])

    straight = demo("--out", str(tmp_path / "a"), *common)
    stopped = demo("--out", str(tmp_path / "b"), *common, "--stop-after", "2")
    assert stopped["stopped"] and stopped["steps"] == 2 and stopped["state_dir"]
    resumed = demo("--resume", stopped["state_dir"])
    assert not resumed["stopped"] and resumed["steps"] == straight["steps"] == 4
    assert resumed["lora_path"] == stopped["lora_path"]
    assert_same_tensors(straight["lora_path"], resumed["lora_path"])
    assert resumed["final_loss"] == straight["final_loss"]
    assert resumed["warnings"] == []  # the saved config came back unchanged


@pytest.mark.parametrize("accum", [1, 2])
def test_a_stop_asked_mid_step_ends_at_the_last_step_taken_and_resumes_exactly(
        bundle, five_images, tmp_path, accum):
    """The stop arrives while step 4 computes (inside its UNet forward): step 4 is not taken,
    the run ends at 3, and the resumed run ends with the uninterrupted run's weights."""
    settings = dict(train__grad_accum=accum, network__dropout=0.1)
    straight = train(bundle, make_cfg(tmp_path / "a", five_images, 6, **settings))
    control = TrainControl()
    calls = {"n": 0, "step": 0}
    control.add_listener(lambda e: calls.update(step=e.step) if e.kind == "step" else None)
    denoise = bundle.denoise

    def denoise_then_stop(*args, **kwargs):
        out = denoise(*args, **kwargs)
        if calls["step"] == 3 and control.pause_requested is False:
            control.request_stop("asked mid-step")
        return out

    bundle.denoise = denoise_then_stop
    try:
        stopped = train(bundle, make_cfg(tmp_path / "b", five_images, 6, **settings), control)
    finally:
        bundle.denoise = denoise
    assert stopped.stopped and stopped.steps == 3 and len(stopped.losses) == 3
    resumed = train(bundle, make_cfg(tmp_path / "b", five_images, 6, **settings),
                    resume_dir=stopped.state_dir)
    assert resumed.steps == 6
    assert_same_tensors(straight.path, resumed.path)
    assert resumed.losses == straight.losses
