"""Training options end to end on the tiny SD1 model: every optimizer, every LR schedule seen in
the progress events, every loss, the adaptive optimizers' guardrails, schedule-free eval weights,
seeds, and the demo's flags (a bad value exits 2 with one line naming the flag)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

from conftest import small_run_config, state_sha256
from lora_train_ext import cli
from lora_train_ext.core import optim as O
from lora_train_ext.core import sched as S
from lora_train_ext.core import trainer as trainer_module
from lora_train_ext.core.bundle import TrainControl
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.trainer import Trainer, train
from lora_train_ext.demo import demo_dataset_dir

AVAILABLE = O.available_optimizers()


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("sd1", "tiny", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """Three demo images in a flat folder (repeats 1): epochs of 3 samples."""
    folder = tmp_path_factory.mktemp("data") / "img"
    folder.mkdir()
    source = os.path.join(demo_dataset_dir(), "4_shapes")
    for stem in ("00_red_circle", "01_blue_square", "02_green_triangle"):
        for ext in (".png", ".txt"):
            shutil.copy(os.path.join(source, stem + ext), folder / (stem + ext))
    return str(folder)


def make_cfg(out, dataset: str, steps: int = 3, **settings):
    """The demo's run made small with batch 1 (see conftest.small_run_config)."""
    return small_run_config(out, dataset, steps, lr=1e-3, batch_size=1, **settings)


def run(bundle, cfg, trainer_hook=None):
    """Train; return (result, events). trainer_hook(trainer, event) sees every event."""
    events = []
    control = TrainControl(events.append)
    trainer = Trainer(bundle, cfg, control)
    if trainer_hook is not None:
        control.add_listener(lambda e: trainer_hook(trainer, e))
    return trainer.run(), events


def steps_of(events):
    return [e for e in events if e.kind == "step"]


# -- optimizers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(O.OPTIMIZERS))
def test_each_optimizer_trains_the_tiny_model(name, bundle, images, tmp_path):
    ok, hint = AVAILABLE[name]
    if not ok:
        pytest.skip(f"{name} not installed: {hint}")
    if name == "AdamW8bit" and not torch.cuda.is_available():
        pytest.skip("bitsandbytes needs a CUDA GPU")
    spec = O.get_spec(name)
    cfg = make_cfg(tmp_path, images, steps=3, network__train_on="te", optim__optimizer=name,
                   optim__lr=1.0 if spec.adaptive else 1e-3)
    result, events = run(bundle, cfg)
    steps = steps_of(events)
    assert [e.step for e in steps] == [1, 2, 3]
    assert all(math.isfinite(e.loss) for e in steps)
    assert all(math.isfinite(v) and v > 0 for e in steps for v in e.lr.values())
    tensors, meta = load_lora(result.path)
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(float(u.abs().max()) > 0 for u in ups)  # every adapter left its zero start
    assert meta["ss_optimizer"].split("(")[0] == name
    assert meta["ss_lr_scheduler"] == "constant"
    assert result.lrs == steps[-1].lr


def test_missing_optional_package_is_a_clear_error_before_model_work(
        monkeypatch, bundle, images, tmp_path, capsys):
    before = state_sha256(*bundle.base_modules())
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # `import prodigyopt` fails
    monkeypatch.setattr(trainer_module, "build_network",
                        lambda *a, **k: pytest.fail("model work before the settings check"))
    cfg = make_cfg(tmp_path, images, optim__optimizer="Prodigy", optim__lr=1.0)
    with pytest.raises(UserError) as err:
        train(bundle, cfg)
    assert err.value.field == "optim.optimizer"
    assert "pip install prodigyopt" in str(err.value)
    assert state_sha256(*bundle.base_modules()) == before

    assert cli.main(["demo", "--out", str(tmp_path / "cli"), "--optimizer", "prodigy"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith("error: --optimizer (optim.optimizer): ")
    assert "pip install prodigyopt" in line


@pytest.mark.parametrize("name, settings, field_name", [
    ("Prodigy", {"optim__unet_lr": 1.0, "optim__te_lr": 0.5}, "optim.te_lr"),
    ("DAdaptAdam", {"network__loraplus_ratio": 16.0}, "network.loraplus_ratio"),
])
def test_adaptive_optimizers_refuse_mixed_lrs_before_model_work(
        name, settings, field_name, monkeypatch, bundle, images, tmp_path):
    if not AVAILABLE[name][0]:
        pytest.skip(AVAILABLE[name][1])
    monkeypatch.setattr(trainer_module, "build_network",
                        lambda *a, **k: pytest.fail("model work before the settings check"))
    cfg = make_cfg(tmp_path, images, optim__optimizer=name, optim__lr=1.0, **settings)
    with pytest.raises(UserError) as err:
        train(bundle, cfg)
    assert err.value.field == field_name


@pytest.mark.parametrize("name, args, expected_warning", [
    ("Prodigy", "d_coef=2 use_bias_correction=True", "safeguard_warmup"),
    ("DAdaptAdam", "weight_decay=0.01", "decouple=True"),
])
def test_adaptive_guardrails_and_effective_lr(name, args, expected_warning, bundle, images,
                                              tmp_path):
    """Warnings come before the run (log events, TrainResult.warnings); each step's LR is d * lr
    as the optimizer used it, also in NAME.history.json."""
    if not AVAILABLE[name][0]:
        pytest.skip(AVAILABLE[name][1])
    total, warmup, lr = 4, 1, 0.5
    cfg = make_cfg(tmp_path, images, steps=total, network__train_on="te", optim__optimizer=name,
                   optim__optimizer_args=args, optim__lr=lr, optim__scheduler="cosine",
                   optim__warmup_steps=warmup)
    expected = {}

    def on_event(trainer, event):
        if event.kind == "step":  # after the step: the group holds the d it used
            d = trainer.optimizer.param_groups[0]["d"]
            expected[event.step] = d * lr * S.lr_factor("cosine", event.step - 1, total, warmup)

    result, events = run(bundle, cfg, on_event)
    kinds = [e.kind for e in events]
    logs = [e.message for e in events[:kinds.index("start")] if e.kind == "log"]
    assert any("should be 1.0" in w for w in result.warnings)  # LR 0.5
    assert any(expected_warning in w for w in result.warnings)
    assert all(f"warning: {w}" in logs for w in result.warnings)
    steps = steps_of(events)
    for e in steps:
        assert e.lr["te"] == pytest.approx(expected[e.step], rel=1e-9, abs=1e-30)
    scheduled = [lr * S.lr_factor("cosine", e.step - 1, total, warmup) for e in steps]
    assert all(0 < e.lr["te"] < s for e, s in zip(steps, scheduled) if s)  # d < 1 scales it
    with open(result.history_path) as f:
        history = json.load(f)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["lr"] for h in history] == [e.lr for e in steps]
    assert [h["loss"] for h in history] == [e.loss for e in steps]
    assert os.path.basename(result.history_path) == "demo_lora.history.json"


@pytest.mark.skipif(not AVAILABLE["AdamWScheduleFree"][0], reason="schedulefree not installed")
def test_schedule_free_saves_its_averaged_eval_weights(bundle, images, tmp_path):
    """Snapshots and the final file hold x (eval mode), not the training point y."""
    cfg = make_cfg(tmp_path, images, steps=3, network__train_on="te",
                   optim__optimizer="AdamWScheduleFree", optim__lr=1e-2, save__save_every_steps=2)
    eval_at_2 = {}

    def on_event(trainer, event):
        if event.kind == "step" and event.step == 2:  # before the snapshot, in train mode
            opt = trainer.optimizer
            weight = 1 - 1 / opt.param_groups[0]["betas"][0]
            for name, p in trainer.network.named_parameters():
                eval_at_2[name[len("adapters."):]] = torch.lerp(
                    p.detach(), opt.state[p]["z"], weight).clone()

    events = []
    control = TrainControl(events.append)
    trainer = Trainer(bundle, cfg, control)
    control.add_listener(lambda e: on_event(trainer, e))
    result = trainer.run()

    snapshot, _ = load_lora(result.snapshots[0])
    assert eval_at_2 and all(torch.equal(snapshot[k], v) for k, v in eval_at_2.items())
    final, _ = load_lora(result.path)
    assert trainer.optimizer.param_groups[0]["train_mode"] is False
    params = {n[len("adapters."):]: p.detach().clone() for n, p in trainer.network.named_parameters()}
    assert all(torch.equal(final[k], v) for k, v in params.items())
    O.set_train_mode(trainer.optimizer, True)  # the training point y is another one
    trained = {n[len("adapters."):]: p.detach() for n, p in trainer.network.named_parameters()}
    assert any(not torch.equal(final[k], v) for k, v in trained.items())


# -- schedulers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_scheduler_lrs_in_progress_match_lr_factor(name, bundle, images, tmp_path):
    """Two groups (LoRA+ ratio 4): each follows the curve from its own initial LR; the LR of
    step s is the one it trained with, lr_factor(s - 1)."""
    total, warmup, cycles, power = 5, 2, 2, 2.0
    cfg = make_cfg(tmp_path, images, steps=total, network__train_on="te",
                   network__loraplus_ratio=4.0, optim__scheduler=name, optim__warmup_steps=warmup,
                   optim__scheduler_cycles=cycles, optim__scheduler_power=power)
    result, events = run(bundle, cfg)
    steps = steps_of(events)
    assert len(steps) == total
    for e in steps:
        for group, base in (("te", 1e-3), ("te_up", 4e-3)):
            want = base * S.lr_factor(name, e.step - 1, total, warmup, cycles, power, lr_init=base)
            assert e.lr[group] == pytest.approx(want, rel=1e-12, abs=1e-20), (group, e.step)
    meta = load_lora(result.path)[1]
    assert meta["ss_lr_scheduler"] == name
    assert meta["ss_lr_warmup_steps"] == str(warmup)


# -- losses --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, settings", [
    ("mse", {"loss__min_snr_gamma": 5.0, "loss__noise_offset": 0.05}),
    ("l1", {"loss__multires_noise_iterations": 3, "loss__input_perturbation": 0.1}),
    ("huber", {"loss__huber_schedule": "snr", "loss__debiased_estimation": True,
               "model__prediction": "v"}),
    ("smooth_l1", {"loss__huber_schedule": "exponential", "loss__noise_offset": 0.1,
                   "loss__noise_offset_random_strength": True, "loss__timestep_min": 100,
                   "loss__timestep_max": 900, "loss__min_snr_gamma": 1.0}),
])
def test_each_loss_runs_end_to_end(kind, settings, bundle, images, tmp_path):
    cfg = make_cfg(tmp_path, images, steps=2, network__train_on="te", loss__loss=kind, **settings)
    result, events = run(bundle, cfg)
    assert len(steps_of(events)) == 2 and all(math.isfinite(x) for x in result.losses)
    meta = load_lora(result.path)[1]
    assert meta["ss_loss_type"] == kind
    assert float(meta["ss_min_snr_gamma"]) == cfg.loss.min_snr_gamma
    assert float(meta["ss_noise_offset"]) == cfg.loss.noise_offset
    assert meta["ss_huber_schedule"] == cfg.loss.huber_schedule
    assert meta["ss_v_parameterization"] == str(cfg.model.prediction == "v")
    assert float(meta["ss_ip_noise_gamma"]) == cfg.loss.input_perturbation
    assert meta["ss_debiased_estimation"] == str(cfg.loss.debiased_estimation)


# -- seeds ---------------------------------------------------------------------------------------
def test_same_seed_same_weights_different_seed_differs_with_random_options(bundle, images,
                                                                           tmp_path):
    """Every random option on: dropout of all three kinds, offset and pyramid noise, flips."""
    options = dict(network__dropout=0.1, network__rank_dropout=0.1, network__module_dropout=0.1,
                   loss__noise_offset=0.05, loss__multires_noise_iterations=2, data__flip=True,
                   network__train_on="te")
    a = train(bundle, make_cfg(tmp_path / "a", images, steps=2, **options))
    b = train(bundle, make_cfg(tmp_path / "b", images, steps=2, **options))
    c = train(bundle, make_cfg(tmp_path / "c", images, steps=2, train__seed=7, **options))
    ta, tb, tc = (load_lora(r.path)[0] for r in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.losses == b.losses
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


# -- command line --------------------------------------------------------------------------------
@pytest.mark.parametrize("args, flag", [
    (["--optimizer", "adamx"], "--optimizer"),
    (["--optimizer-args", "oops"], "--optimizer-args"),
    (["--optimizer-args", "no_such_arg=1"], "--optimizer-args"),
    (["--optimizer", "Prodigy", "--unet-lr", "1", "--te-lr", "0.5"],
     "--te-lr" if AVAILABLE["Prodigy"][0] else "--optimizer"),
    (["--scheduler", "cosine_annealing"], "--scheduler"),
    (["--warmup", "-3"], "--warmup"),
    (["--warmup", "ten"], "--warmup"),
    (["--loss", "l3"], "--loss"),
    (["--min-snr-gamma", "-1"], "--min-snr-gamma"),
    (["--noise-offset", "x"], "--noise-offset"),
    (["--save-every", "-1"], "--save-every"),
    (["--keep-last", "-1"], "--keep-last"),
    (["--save-dtype", "fp8"], "--save-dtype"),
    (["--epochs", "-1"], "--epochs"),
    (["--train-on", "vae"], "--train-on"),
    (["--te-lr", "-1"], "--te-lr"),
    (["--stop-after", "0"], "--stop-after"),
    (["--resume", "/nonexistent/demo_lora-state"], "--resume"),
    (["--resume", "/nonexistent/demo_lora-state", "--lr", "1"], "--resume"),
    (["--config", "/nonexistent/run.toml"], "--config"),
])
def test_bad_demo_flags_exit_2_with_one_line(args, flag, tmp_path, capsys):
    code = cli.main(["demo", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag}"), err
    assert not [f for f in os.listdir(tmp_path)]  # refused before any model work


def test_config_file_then_flags_over_demo_defaults(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"optim": {"optimizer": "Lion", "scheduler": "linear"},
                                "train": {"max_steps": 50}, "network": {"rank": 4}}))
    args = cli.build_parser().parse_args(
        ["demo", "--config", str(path), "--steps", "7", "--warmup", "0.25", "--loss", "huber",
         "--save-every", "3", "--keep-last", "2", "--save-state", "--optimizer-args",
         "weight_decay=0.1"])
    cfg, given, from_file = cli.demo_run_config(args)
    assert from_file and {"train.max_steps", "warmup", "loss.loss"} <= given
    assert (cfg.optim.optimizer, cfg.optim.scheduler) == ("Lion", "linear")  # from the file
    assert cfg.optim.optimizer_args == "weight_decay=0.1"
    assert cfg.train.max_steps == 7  # the flag beats the file
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_ratio) == (0, 0.25)
    assert cfg.loss.loss == "huber" and cfg.save.save_every_steps == 3 and cfg.save.keep_last == 2
    assert cfg.save.save_state is True
    assert cfg.network.rank == 4 and cfg.network.alpha == 4.0  # the demo's alpha follows rank
    assert cfg.data.resolution == "64" and cfg.train.dtype == "fp32"  # the demo's defaults
    adaptive, _, _ = cli.demo_run_config(cli.build_parser().parse_args(
        ["demo", "--optimizer", "prodigy", "--warmup", "5"]))
    assert (adaptive.optim.optimizer, adaptive.optim.lr) == ("Prodigy", 1.0)
    assert adaptive.optim.warmup_steps == 5
