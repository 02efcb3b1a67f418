"""The WebUI host against a stand-in of the WebUI's module surface (tests/fake_webui.py), and the
run manager / test grid on the standalone host."""

from __future__ import annotations

import copy
import os
import random
import sys

import numpy as np
import pytest
import torch

import fake_webui
from conftest import requires_grad_flags, state_sha256
from lora_train_ext.core.config import RunConfig
from lora_train_ext.demo import demo_config
from lora_train_ext.runs import RunManager, lora_prompt, parse_strengths, strength_grid


def _cfg(dataset, steps=6, name="hosted"):
    cfg = demo_config("", steps=steps, seed=0, rank=4, alpha=None, lr=2e-3, batch_size=2,
                      grad_accum=1, dataset=dataset)
    cfg.save.output_dir = ""
    cfg.save.output_name = name
    return cfg


@pytest.fixture()
def webui(sd1_bundle, monkeypatch, tmp_path):
    fake = fake_webui.install(sd1_bundle, monkeypatch)
    fake.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
    os.makedirs(fake.shared.cmd_opts.lora_dir)
    from lora_train_ext.host.webui import WebUIHost

    return fake, WebUIHost()


def test_model_info_and_refusals(webui):
    fake, host = webui
    info = host.model_info()
    assert (info.arch, info.prediction, info.problem) == ("sd1", "epsilon", "")
    fake.shared.cmd_opts.medvram = True  # supported: see test_run_under_medvram_and_lowvram
    assert host.model_info().problem == ""
    fake.shared.cmd_opts.medvram = False
    fake.shared.sd_model = None
    assert host.model_info().problem == "no checkpoint is loaded"


def test_run_saves_to_lora_dir_hot_loads_and_restores(webui, demo_dataset):
    fake, host = webui
    model = fake.shared.sd_model
    before = state_sha256(model)
    flags = requires_grad_flags(model)
    manager = RunManager(host)
    record = manager.create(_cfg(demo_dataset))
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    assert record.files == [os.path.join(fake.shared.cmd_opts.lora_dir, "hosted.safetensors")]
    assert os.path.isfile(record.files[0])
    assert state_sha256(model) == before
    assert requires_grad_flags(model) == flags
    assert fake.networks.listed == 1  # hot-load refreshed the Lora extension's list
    assert fake.processing.StableDiffusionProcessing.cached_c == [None, None]
    assert fake.shared.state.sampling_step == 6 and fake.shared.state.sampling_steps == 6
    assert "loss" in fake.shared.state.textinfo
    assert fake.shared.state.begun == 1


def _hook_table(model):
    """Every module's forward pre-hooks in order, and the VAE's instance-level methods."""
    vae = model.first_stage_model
    return ([(name, list(m._forward_pre_hooks.items())) for name, m in model.named_modules()
             if m._forward_pre_hooks],
            {k: vae.__dict__.get(k) for k in ("encode", "decode")})


@pytest.mark.parametrize("medvram", [True, False], ids=["medvram", "lowvram"])
def test_run_under_medvram_and_lowvram(webui, demo_dataset, medvram):
    """The WebUI's low-VRAM hooks stay out of the run (none fires: the trainer's steps would see
    blocks moved away between forward and backward) and come back exactly afterwards."""
    fake, host = webui
    model = fake.shared.sd_model
    hooked = fake_webui.apply_lowvram(fake, medvram=medvram)
    unet = model.model.diffusion_model
    assert len(hooked) == (3 if medvram else 4 + len(unet.input_blocks) + len(unet.output_blocks))
    # the WebUI conditioned a prompt before: the text encoder's parent is on the GPU
    model.get_learned_conditioning(["a prompt"])
    assert fake.lowvram.module_in_gpu is model.cond_stage_model.wrapped
    fake.lowvram.moves.clear()
    table = _hook_table(model)
    assert len(table[0]) == len(hooked) and all(table[1].values())
    before = state_sha256(model)
    assert host.model_info().problem == ""
    seen = {}

    def during(event):
        if event.kind == "step" and "hooks" not in seen:
            seen["hooks"] = _hook_table(model)
            seen["in_gpu"] = fake.lowvram.module_in_gpu

    manager = RunManager(host)
    record = manager.create(_cfg(demo_dataset, steps=3, name=f"low{int(medvram)}"))
    record.control.add_listener(during)
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    assert os.path.isfile(record.files[0])
    # the estimate before the run counted the whole model, from the WebUI's own modules
    weights = sum(t.numel() * t.element_size() for m in (
        model.model.diffusion_model, model.cond_stage_model.wrapped.transformer,
        model.first_stage_model) for t in [*m.parameters(), *m.buffers()])
    assert record.memory_estimate["model_bytes"] == weights
    assert record.memory_estimate["kind"] == "RSS"
    assert fake.lowvram.moves == []  # no hook moved anything during the run
    assert seen["hooks"][0] == [] and seen["hooks"][1] == {"encode": None, "decode": None}
    assert seen["in_gpu"] is None
    # afterwards: the same hooks in the same order, the wrappers, the module on the GPU
    assert _hook_table(model) == table
    assert fake.lowvram.module_in_gpu is model.cond_stage_model.wrapped
    assert model.lowvram is True
    assert state_sha256(model) == before
    # and the WebUI's hooks work again
    model.first_stage_model.encode(torch.zeros(1, 3, 64, 64))
    assert fake.lowvram.moves == [model.first_stage_model]


def test_baked_networks_are_unloaded_before_training(webui, demo_dataset):
    fake, host = webui
    model = fake.shared.sd_model
    clean = state_sha256(model)
    with fake_webui.baked_lora(model, fake.networks) as changed:
        assert state_sha256(model) != clean
        with host.prepared_model() as bundle:
            assert bundle.unet is model.model.diffusion_model
            assert state_sha256(model) == clean  # trains on the original weights
            assert fake.networks.loaded_networks == []
            assert all(m.network_current_names == () for m in changed)
    assert state_sha256(model) == clean


def test_interrupt_stops_saves_and_restores(webui, demo_dataset):
    fake, host = webui
    model = fake.shared.sd_model
    before = state_sha256(model)
    manager = RunManager(host)
    record = manager.create(_cfg(demo_dataset, steps=200))
    record.control.add_listener(
        lambda e: setattr(fake.shared.state, "interrupted", True) if e.step == 3 else None)
    manager.execute(record)
    assert record.state == "stopped" and record.step <= 5
    assert os.path.isfile(record.files[0])
    assert state_sha256(model) == before


def test_injected_exception_is_reported_and_model_restored(webui, demo_dataset, monkeypatch):
    fake, host = webui
    model = fake.shared.sd_model
    before = state_sha256(model)
    flags = requires_grad_flags(model)
    manager = RunManager(host)
    record = manager.create(_cfg(demo_dataset, steps=20))

    def boom(event):
        if event.kind == "step" and event.step == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    record.control.add_listener(boom)
    manager.execute(record)
    assert record.state == "failed"
    assert record.error.startswith("out of memory") and "batch_size" in record.error
    # the settings to lower, from the run's own values (batch 2, 64 px, rank 4, AdamW)
    assert "train.batch_size 2 -> 1 (train.grad_accum 1 -> 2 keeps the batch)" in record.error
    assert "train.gradient_checkpointing off -> on" in record.error
    assert "optim.optimizer AdamW -> an 8-bit one" in record.error
    assert "data.resolution" not in record.error and "network.rank" not in record.error
    assert state_sha256(model) == before
    assert requires_grad_flags(model) == flags


@pytest.mark.parametrize("where", ["start", "step", "snapshot", "host.hot_load",
                                   "host.on_progress", "host.interrupt_requested"])
def test_an_exception_in_any_callback_restores_the_model(where, webui, demo_dataset):
    """A listener of each event the run sends, or a host hook the run calls, raises: the run
    fails with the message, the model is as it was, the lock is free and the next run works."""
    fake, host = webui
    model = fake.shared.sd_model
    before, flags = state_sha256(model), requires_grad_flags(model)
    manager = RunManager(host)
    cfg = _cfg(demo_dataset, steps=6, name="boom")
    cfg.save.save_every_steps = 2
    record = manager.create(cfg)

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected in {where}")
    if where.startswith("host."):
        name = where.split(".", 1)[1]
        calls = {"n": 0}
        original = getattr(host, name)

        def fails_later(*args, **kwargs):  # after the run has started training
            calls["n"] += 1
            if calls["n"] > (1 if name == "hot_load" else 3):  # hot_load: the 2nd snapshot
                boom()
            return original(*args, **kwargs)
        setattr(host, name, fails_later)  # on the instance; taken away below
    else:
        record.control.add_listener(lambda e: boom() if e.kind == where and e.step >= 0 else None)
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "failed" and f"injected in {where}" in record.error, record.error
    assert state_sha256(model) == before
    assert requires_grad_flags(model) == flags
    host.__dict__.pop(where.partition(".")[2], None)
    lock = host.gpu_lock()
    assert lock.acquire(timeout=60)  # let go by the failed run (another thread could take it)
    lock.release()
    again = manager.create(_cfg(demo_dataset, steps=2, name="after"))
    with host.exclusive("test"):
        manager.execute(again)
    assert again.state == "finished", again.error
    assert state_sha256(model) == before


def test_bad_fields_are_refused_before_model_work(webui, tmp_path):
    _, host = webui
    manager = RunManager(host)
    cfg = _cfg(str(tmp_path / "missing"))
    with pytest.raises(Exception, match="data.dataset_dir"):
        manager.create(cfg)
    with pytest.raises(Exception, match="network.rank"):
        RunConfig.from_dict({"network": {"rank": 0}}).validate()
    assert manager.list() == []


def test_strength_parsing_and_prompt_form():
    assert parse_strengths("0, 0.5,1", "x") == [0.0, 0.5, 1.0]
    with pytest.raises(Exception, match="TE strengths"):
        parse_strengths("0, high", "TE strengths")
    assert lora_prompt("a", 0.6, 1.0) == "<lora:a:te=0.6:unet=1>"


def test_standalone_grid_and_stale_cache(tmp_path, demo_dataset):
    from lora_train_ext.host.standalone import StandaloneHost, parse_lora_tags

    assert parse_lora_tags("x <lora:n:te=0.5:unet=1>") == ("x", [("n", 0.5, 1.0)])
    assert parse_lora_tags("x <lora:n:0.3:0.7>")[1] == [("n", 0.3, 0.7)]
    assert parse_lora_tags("<lora:n:0.4>")[1] == [("n", 0.4, 0.4)]
    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)

    def trained(seed: int, lr: float):
        cfg = _cfg(demo_dataset, steps=4, name="same_name")
        cfg.train.seed = seed
        cfg.optim.lr = lr
        record = manager.create(cfg)
        with host.exclusive("t"), host.prepared_model():
            manager.execute(record)
        assert record.state == "finished", record.error
        grid, images, prompts = strength_grid(host, "same_name", "shp style, red circle", "", 7,
                                          [0.0, 1.0], [0.0, 1.0], steps=3, width=64, height=64)
        return grid, [np.asarray(i) for i in images], prompts

    grid, cells, prompts = trained(0, 5e-2)
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64
    assert prompts[1].endswith("<lora:same_name:te=0:unet=1>")
    assert np.array_equal(cells[0], trained(0, 5e-2)[1][0])  # strength 0 = the base model
    assert not np.array_equal(cells[0], cells[3])  # the LoRA changes the image
    _, cells2, _ = trained(3, 1e-1)  # retrained into the same name
    assert not np.array_equal(cells[3], cells2[3])  # the new weights are used, not a stale copy


def _vae_id_of(host) -> str:
    with host.prepared_model() as bundle:
        return bundle.vae_id


@pytest.mark.parametrize("failure", ["no sd_vae", "no checkpoint hash"])
def test_vae_id_tells_vaes_apart_when_the_lookup_fails(failure, webui, monkeypatch):
    """The latent cache is keyed by the VAE id: without the WebUI's VAE file or the checkpoint's
    hash it comes from the encoder's weights, never a constant."""
    fake, host = webui
    model = fake.shared.sd_model
    named = _vae_id_of(host)
    assert named == "abcdef1234:checkpoint"  # the lookup: checkpoint hash + loaded VAE file
    if failure == "no sd_vae":
        monkeypatch.delattr(sys.modules["modules.sd_vae"], "loaded_vae_file")
    else:
        model.sd_checkpoint_info.shorthash = None
    original = model.first_stage_model
    first = _vae_id_of(host)
    assert first != named and _vae_id_of(host) == first  # the same weights: the same id
    model.first_stage_model = copy.deepcopy(original)  # equal weights in another module
    assert _vae_id_of(host) == first
    with torch.no_grad():  # a weight in the middle of the encoder, not its first or last layer
        next(p for n, p in model.first_stage_model.named_parameters()
             if n.startswith("encoder.down.1"))[0].reshape(-1)[0] += 1e-3
    second = _vae_id_of(host)
    assert second != first
    model.first_stage_model = copy.deepcopy(original)  # a fine-tuned decoder encodes the same
    with torch.no_grad():
        model.first_stage_model.decoder.conv_out.weight.mul_(0.5)
    assert _vae_id_of(host) == first
    model.first_stage_model = original
    assert _vae_id_of(host) == first


def test_run_leaves_the_global_rngs_as_they_were(webui, demo_dataset):
    """A run in the WebUI must not reseed the process's random, numpy and torch generators (the
    WebUI and other extensions draw from them)."""
    fake, host = webui
    random.seed(1234)
    np.random.seed(4321)
    torch.manual_seed(2468)
    random.random(), np.random.rand(), torch.rand(1)  # states away from a fresh seed
    py, nps, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    manager = RunManager(host)
    record = manager.create(_cfg(demo_dataset, steps=3, name="rng"))
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == nps[0] and np.array_equal(after[1], nps[1]) and after[2:] == nps[2:]
    assert torch.equal(torch.get_rng_state(), pt)


def test_snapshots_after_a_lora_generation_do_not_fail_the_run(webui, demo_dataset):
    """After a generation with a LoRA, the Lora extension keeps backups on every module it
    touched (with no network applied any more). A snapshot's hot-load mid-run must not write
    those weights again: that bumped their version counters and failed the run."""
    fake, host = webui
    model = fake.shared.sd_model
    with fake_webui.baked_lora(model, fake.networks):
        host.unload_baked_networks()  # the next plain generation: restored, backups kept
    kept = [m for m in model.modules() if getattr(m, "network_weights_backup", None) is not None]
    assert kept
    versions = [m.weight._version for m in kept]
    manager = RunManager(host)
    cfg = _cfg(demo_dataset, steps=4, name="snap")
    cfg.save.save_every_steps = 2
    record = manager.create(cfg)
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    assert [os.path.basename(p) for p in record.files] == ["snap.safetensors",
                                                           "snap-step00000002.safetensors"]
    assert [m.weight._version for m in kept] == versions  # nothing written again


def test_the_prompt_cache_is_cleared_after_any_run(webui, demo_dataset):
    fake, host = webui
    processing = fake.processing
    manager = RunManager(host)
    cfg = _cfg(demo_dataset, steps=2, name="cache")
    cfg.data.dataset_dir = demo_dataset
    record = manager.create(cfg)
    processing.StableDiffusionProcessing.cached_c = ["stale", "stale"]
    record.config.data.dataset_dir = "/nonexistent/for/this/test"  # it fails at set-up
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "failed"
    assert processing.StableDiffusionProcessing.cached_c == [None, None]


def test_run_records_keep_at_most_100_ended_runs_oldest_dropped_first(tmp_path, monkeypatch):
    """Ended runs (finished / stopped / failed / cancelled) beyond 100 are dropped, the one that
    ended longest ago first; queued, running and paused records stay however old they are."""
    import lora_train_ext.runs as runs_mod
    from lora_train_ext.core.errors import TrainingError
    from lora_train_ext.host.standalone import StandaloneHost

    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    assert manager.keep_finished == runs_mod.KEEP_FINISHED_RUNS == 100
    monkeypatch.setattr(manager, "prepare_config", lambda cfg, confine=False: cfg)
    active = [manager.create(RunConfig()) for _ in range(5)]
    for record, state in zip(active, ["running", "paused", "queued", "queued", "queued"]):
        record.state, record.created = state, 1.0  # older than everything else
    ended = []
    for i in range(110):
        record = manager.create(RunConfig())
        # ended in the reverse order of creation: the oldest *ended* are the last created
        record.state = ("finished", "stopped", "failed", "cancelled")[i % 4]
        record.created, record.finished = 100.0 + i, 10_000.0 - i
        ended.append(record)
    newest = manager.create(RunConfig())  # creating prunes
    kept = {r.id for r in manager.list()}
    assert len(kept) == 5 + 100 + 1
    assert {r.id for r in active} <= kept and newest.id in kept
    dropped = [r.id for r in ended if r.id not in kept]
    assert dropped == [r.id for r in ended[-10:]]  # the 10 that ended first
    with pytest.raises(KeyError):
        manager.get(dropped[0])

    # a run that ends drops the oldest ended record at once (here: fails in training)
    def fail(*args, **kwargs):
        raise TrainingError("boom")

    monkeypatch.setattr(runs_mod, "train", fail)
    oldest_kept = min((r for r in ended if r.id in kept), key=lambda r: r.finished)
    with host.exclusive("test"):
        manager.execute(newest)
    assert newest.state == "failed" and newest.error == "training failed: boom"
    ids = {r.id for r in manager.list()}
    assert newest.id in ids and oldest_kept.id not in ids
    assert sum(r.state in runs_mod.ENDED_STATES for r in manager.list()) == 100
    assert sum(r.state in ("queued", "running", "paused") for r in manager.list()) == 5


def test_webui_write_roots_are_its_configured_folders(webui, tmp_path, monkeypatch):
    """What a run asked for over the API may write in: the output folder setting, the Lora
    folder and the run folder setting (or outputs/lora-train in the WebUI's data folder)."""
    fake, host = webui
    lora = fake.shared.cmd_opts.lora_dir
    from modules import paths_internal

    default_runs = os.path.join(paths_internal.data_path, "outputs", "lora-train")
    assert host.write_roots() == [lora, default_runs]
    monkeypatch.setattr(fake.shared.opts, "lora_train_output_dir", str(tmp_path / "mine"),
                        raising=False)
    monkeypatch.setattr(fake.shared.opts, "lora_train_run_dir", str(tmp_path / "runs"),
                        raising=False)
    assert host.write_roots() == [str(tmp_path / "mine"), lora, str(tmp_path / "runs")]


def test_out_of_memory_advice_follows_the_runs_settings(monkeypatch, capsys):
    from lora_train_ext import cli
    from lora_train_ext.runs import describe_failure, smaller_settings

    cfg = RunConfig()
    cfg.data.resolution, cfg.network.rank, cfg.train.batch_size = "1024x768", 32, 4
    assert smaller_settings(cfg) == [
        "train.gradient_checkpointing off -> on",
        "train.batch_size 4 -> 2 (train.grad_accum 1 -> 2 keeps the batch)",
        "data.resolution 1024x768 -> 768x576",
        f"optim.optimizer {cfg.optim.optimizer} -> an 8-bit one (AdamW8bit)",
        "network.rank 32 -> 16"]
    lean = RunConfig()
    lean.data.resolution, lean.network.rank, lean.train.batch_size = "256", 4, 1
    lean.train.gradient_checkpointing, lean.optim.optimizer = True, "AdamW8bit"
    assert smaller_settings(lean) == ["lower data.resolution or free memory taken by other programs"]
    assert describe_failure(RuntimeError("boom"), cfg) == "RuntimeError: boom"
    # the command line: the advice, exit 1, no traceback
    monkeypatch.setitem(cli.COMMANDS, "demo", lambda args: (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("training failed: out of memory: lower train.batch_size"), err
    monkeypatch.setitem(cli.COMMANDS, "demo", lambda args: (_ for _ in ()).throw(KeyError("x")))
    with pytest.raises(KeyError):
        cli.main(["demo"])  # anything else is not dressed up
