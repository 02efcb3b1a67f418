"""The trainer's declared seams: the TrainingData protocol (TrainData satisfies it; a stand-in with
nothing but its members trains, saves its position and resumes exactly), and the one rule for a
file's algorithm that inspect and continue-from-file share (metadata first, then shapes)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from conftest import small_run_config

from lora_train_ext.core.bundle import TrainControl, TrainingData
from lora_train_ext.core.data import Batch, TrainData
from lora_train_ext.core.inspect import algo_of_file
from lora_train_ext.core.trainer import train

PROTOCOL_MEMBERS = ("steps_per_epoch", "num_images", "batches", "state_dict", "load_state_dict",
                    "cache_latents", "tag_frequency", "dataset_dirs_meta")


class StandInData:
    """Exactly the TrainingData members over 3 fixed random 64 px images (batches of 2 and 1):
    an attribute the trainer reached for beyond them would fail the run."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self._images = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
        self._captions = ["red circle", "blue square", "green triangle"]
        self._latents: torch.Tensor | None = None
        self._position = (0, 0)

    @property
    def steps_per_epoch(self) -> int:
        return 2

    @property
    def num_images(self) -> int:
        return 3

    def batches(self, epoch: int, start: int = 0):
        order = torch.randperm(3, generator=torch.Generator().manual_seed(epoch))
        plan = [order[:2], order[2:]]
        for b in range(start, len(plan)):
            idx = plan[b]
            self._position = (epoch, b + 1)
            cached = self._latents is not None
            yield Batch(images=None if cached else self._images[idx],
                        latents=self._latents[idx] if cached else None,
                        captions=[self._captions[i] for i in idx.tolist()],
                        loss_weight=torch.ones(len(idx)), mask=None, sizes=[])

    def state_dict(self) -> dict:
        return {"epoch": self._position[0], "batch_index": self._position[1]}

    def load_state_dict(self, state: dict) -> None:
        self._position = (int(state["epoch"]), int(state["batch_index"]))

    def cache_latents(self, encode, vae_id: str, progress=None) -> None:
        self._latents = encode(self._images)
        if progress is not None:
            progress(3, 3)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        return {"1_shapes": {c: 1 for c in self._captions}}

    def dataset_dirs_meta(self) -> dict[str, dict[str, int]]:
        return {"1_shapes": {"n_repeats": 1, "img_count": 3}}


def test_train_data_satisfies_the_protocol(demo_dataset):
    cfg = small_run_config("unused", demo_dataset, steps=1, lr=1e-3, batch_size=2)
    data = TrainData(cfg.data, batch_size=2, seed=0)
    assert isinstance(data, TrainingData) and isinstance(StandInData(), TrainingData)
    declared = {n for n in dir(TrainingData) if not n.startswith("_")}
    assert declared == set(PROTOCOL_MEMBERS)
    for name in PROTOCOL_MEMBERS:
        wanted = getattr(TrainingData, name)
        if isinstance(wanted, property):
            assert isinstance(getattr(data, name), int), name
            continue
        have = inspect.signature(getattr(TrainData, name)).parameters
        for param in inspect.signature(wanted).parameters.values():
            assert param.name in have, (name, param.name)
            assert have[param.name].default == param.default, (name, param.name)


@pytest.mark.parametrize("cache_latents", [True, False])
def test_a_stand_in_dataset_trains_and_resumes_exactly(cache_latents, sd1_bundle, demo_dataset,
                                                       tmp_path):
    def cfg(out):
        return small_run_config(out, demo_dataset, steps=4, lr=2e-3, batch_size=2,
                                network__train_on="unet", data__cache_latents=cache_latents)

    straight = train(sd1_bundle, cfg(tmp_path / "a"), data=StandInData())
    control = TrainControl()
    control.add_listener(lambda e: control.request_stop() if e.kind == "step" and e.step == 3
                         else None)
    first = train(sd1_bundle, cfg(tmp_path / "b"), control, data=StandInData())
    assert first.stopped and first.steps == 3
    state = torch.load(f"{first.state_dir}/training_state.pth", weights_only=True)
    assert state["data"] == {"epoch": 1, "batch_index": 1}
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    resumed = train(sd1_bundle, cfg(tmp_path / "b"), data=StandInData(),
                    resume_dir=first.state_dir)
    assert resumed.losses == straight.losses and len(straight.losses) == 4
    meta = resumed.metadata
    assert meta["ss_num_train_images"] == "3"
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_shapes": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(meta["ss_tag_frequency"])["1_shapes"]["red circle"] == 1


def _lora_args(**args) -> dict[str, str]:
    return {"ss_network_module": "networks.lora", "ss_network_args": json.dumps(args)}


LINEAR = {"lora_te_x.lora_down.weight": (4, 8), "lora_te_x.lora_up.weight": (8, 4),
          "lora_te_x.alpha": ()}
CONV3 = {"lora_unet_c.lora_down.weight": (4, 8, 3, 3), "lora_unet_c.lora_up.weight": (8, 4, 1, 1),
         "lora_unet_c.alpha": ()}
LOHA = {f"lora_unet_h.hada_{w}": (4, 8) for w in ("w1_a", "w1_b", "w2_a", "w2_b")}
DORA = {**LINEAR, "lora_te_x.dora_scale": (1, 8)}


@pytest.mark.parametrize("meta, shapes, algo", [
    ({}, LINEAR, "lora"),                                    # no metadata: the shapes tell
    ({}, {**LINEAR, **CONV3}, "locon"),                      # a kxk conv kernel: LoCon
    ({}, LOHA, "loha"),
    ({}, {**LINEAR, **LOHA}, "mixed:loha+lora"),
    ({}, {"lora_te_x.something": (1,)}, "unknown"),
    (_lora_args(), {**LINEAR, **CONV3}, "locon"),            # kohya LoCon: args without algo
    (_lora_args(algo="locon"), LINEAR, "lora"),              # a LoCon config with no conv trained
    (_lora_args(algo="lora"), LINEAR, "lora"),
    ({"ss_network_module": "lycoris.kohya",                  # LyCORIS writes DoRA as lora + dora_wd
      "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True"})}, DORA, "dora"),
    ({"ss_network_module": "lycoris.kohya",                  # metadata first: what the file says
      "ss_network_args": json.dumps({"algo": "loha"})}, LINEAR, "loha"),
    ({"ss_network_module": "lycoris.kohya", "ss_network_args": "not json"}, LOHA, "loha"),
])
def test_algo_of_file_metadata_first_then_shapes(meta, shapes, algo):
    assert algo_of_file(meta, shapes) == algo
