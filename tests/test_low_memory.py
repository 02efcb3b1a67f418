"""Low-memory training: frozen parts offloaded to the CPU between uses (train.offload_frozen).

On a CPU machine a move to the CPU changes no tensor, so the offload's own record (`moves`, the
set of parts `away`) is read at the moments that matter: every text-encoder call, every UNet
call, the run's end. What a real move does to the tensors (new storage, same Parameter objects,
same values) is imitated with clones where the guard has to accept it.
"""

from __future__ import annotations

import torch

from conftest import small_run_config, state_sha256
from lora_train_ext.core import trainer as trainer_module
from lora_train_ext.core.bundle import TrainControl
from lora_train_ext.core.errors import TrainingError
from lora_train_ext.core.guard import BaseGuard
from lora_train_ext.core.offload import FrozenOffload, offload_plan
from lora_train_ext.core.trainer import Trainer


def _watched_run(bundle, cfg):
    """Run; record where the offload said each part was at every TE / VAE / UNet call."""
    seen = {"condition": [], "denoise": [], "encode": []}
    holder = {}
    condition, denoise, encode = bundle.condition, bundle.denoise, bundle.encode

    def away():
        t = holder.get("trainer")
        return None if t is None or t.offload is None else set(t.offload.away)

    def c(*a, **k):
        seen["condition"].append(away())
        return condition(*a, **k)

    def d(*a, **k):
        seen["denoise"].append(away())
        return denoise(*a, **k)

    def e(*a, **k):
        seen["encode"].append(away())
        return encode(*a, **k)

    bundle.condition, bundle.denoise, bundle.encode = c, d, e
    events = []
    try:
        trainer = Trainer(bundle, cfg, TrainControl(events.append))
        holder["trainer"] = trainer
        result = trainer.run()
    finally:
        bundle.condition, bundle.denoise, bundle.encode = condition, denoise, encode
    return trainer, result, seen, events


def test_offload_keeps_vae_and_text_encoder_away_between_uses(sd1_bundle, demo_dataset, tmp_path):
    before = state_sha256(*sd1_bundle.base_modules())
    params = [id(p) for m in sd1_bundle.base_modules() for p in m.parameters()]
    cfg = small_run_config(tmp_path, demo_dataset, steps=4, lr=1e-3, batch_size=2,
                           network__train_on="unet", train__offload_frozen=True)
    trainer, result, seen, events = _watched_run(sd1_bundle, cfg)
    assert result.steps == 4
    # latents were cached with the VAE on the device (the offload did not exist yet)
    assert seen["encode"] and all(a is None for a in seen["encode"])
    # every UNet call: both frozen parts away
    assert len(seen["denoise"]) >= 4
    assert all(a == {"vae", "te"} for a in seen["denoise"]), seen["denoise"]
    # every text-encoder call (a caption not yet cached) had the TE home, the VAE still away
    assert seen["condition"] and all(a == {"vae"} for a in seen["condition"]), seen["condition"]
    moves = trainer.offload.moves
    assert moves[:2] == [("vae", "cpu"), ("te", "cpu")]
    # each cache miss: home then away again; the end: everything restored
    assert moves.count(("te", "cpu")) == 1 + 2 * len(seen["condition"])
    assert moves[-2:] == [("vae", "restored"), ("te", "restored")]
    assert trainer.offload.away == set()
    assert any("offloaded to the CPU: vae, te" in e.message for e in events)
    # the host's objects and values as before
    assert [id(p) for m in sd1_bundle.base_modules() for p in m.parameters()] == params
    assert state_sha256(*sd1_bundle.base_modules()) == before


def test_offload_same_weights_as_without(sd1_bundle, demo_dataset, tmp_path):
    """Offloading changes where tensors sit, never what is computed."""
    files = []
    for flag in (False, True):
        cfg = small_run_config(tmp_path / str(flag), demo_dataset, steps=3, lr=1e-3,
                               batch_size=2, network__train_on="unet",
                               train__offload_frozen=flag)
        files.append(Trainer(sd1_bundle, cfg).run().path)
    from safetensors.torch import load_file

    a, b = load_file(files[0]), load_file(files[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offload_with_a_trained_text_encoder_keeps_it_and_says_so(sd1_bundle, demo_dataset,
                                                                  tmp_path):
    cfg = small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=2,
                           network__train_on="both", train__offload_frozen=True)
    trainer, result, seen, _ = _watched_run(sd1_bundle, cfg)
    assert result.steps == 2
    assert set(trainer.offload.parts) == {"vae"}
    assert all(a == {"vae"} for a in seen["denoise"] + seen["condition"])
    assert ("te", "cpu") not in trainer.offload.moves
    assert any("text encoder is trained" in w and "stays on the device" in w
               for w in result.warnings), result.warnings


def test_offload_without_latent_cache_keeps_the_vae(sd1_bundle, demo_dataset, tmp_path):
    cfg = small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=2,
                           network__train_on="unet", train__offload_frozen=True,
                           data__cache_latents=False)
    trainer, result, seen, _ = _watched_run(sd1_bundle, cfg)
    assert set(trainer.offload.parts) == {"te"}
    assert seen["encode"] and all(a == {"te"} for a in seen["encode"])
    assert any("VAE stays on the device" in w for w in result.warnings)


def test_offload_off_moves_nothing(sd1_bundle, demo_dataset, tmp_path):
    cfg = small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=2,
                           network__train_on="unet")
    trainer, result, seen, _ = _watched_run(sd1_bundle, cfg)
    assert trainer.offload is None and all(a is None for a in seen["denoise"])
    assert not any("offload" in w for w in result.warnings)


def test_offload_plan_messages():
    assert offload_plan(enabled=False, te_trained=False, cache_text=True, latents_cached=True,
                        te_names=["te"]) == ([], [])
    parts, notes = offload_plan(enabled=True, te_trained=False, cache_text=True,
                                latents_cached=True, te_names=["te1", "te2"])
    assert parts == ["vae", "te1", "te2"] and notes == []
    parts, notes = offload_plan(enabled=True, te_trained=False, cache_text=False,
                                latents_cached=True, te_names=["te"])
    assert parts == ["vae"] and "data.cache_text" in notes[0]


def test_guard_accepts_moved_storage_but_not_other_values():
    m = torch.nn.Linear(4, 4)
    guard = BaseGuard([m])
    guard.freeze()
    with torch.no_grad():
        m.weight.data = m.weight.data.clone()  # a round trip to the CPU: new storage
        m.bias.data = m.bias.data.clone()
    try:
        guard.verify()
        raise AssertionError("a new storage must be seen by verify()")
    except TrainingError:
        pass
    guard.accept_moved()
    guard.verify()  # same values, new storage: accepted
    with torch.no_grad():
        m.bias.data = m.bias.data + 1
    guard.accept_moved()
    try:
        guard.verify()
        raise AssertionError("other values must fail")
    except TrainingError as e:
        assert "bias" in str(e)
    guard.restore()


def test_frozen_offload_using_brings_back_and_sends_away():
    te = torch.nn.Linear(2, 2)
    off = FrozenOffload({"te": te, "vae": torch.nn.Linear(2, 2)}, home=torch.device("cpu"))
    off.send_away()
    assert off.away == {"te", "vae"}
    with off.using("te"):
        assert off.away == {"vae"}
    assert off.away == {"te", "vae"}
    with off.using("other"):  # not offloaded: nothing moves
        pass
    off.restore()
    assert off.away == set()
    assert off.moves == [("te", "cpu"), ("vae", "cpu"), ("te", "cpu"), ("te", "cpu"),
                         ("te", "restored"), ("vae", "restored")]


def test_setting_is_declared():
    from lora_train_ext.core.config import SETTINGS

    spec = SETTINGS["train.offload_frozen"]
    assert spec.default is False and spec.kind is bool
    assert trainer_module.FrozenOffload is FrozenOffload
