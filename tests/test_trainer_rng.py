"""A run seeds python `random`, numpy's and torch's global generators for itself; inside the WebUI
those are the host's too (its next generation draws from them). Whatever way a run ends, the
process's generators must be as they were before it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import small_run_config

from lora_train_ext.core.bundle import TrainControl
from lora_train_ext.core.trainer import train


def _process_rngs() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _assert_same(before: dict, after: dict) -> None:
    assert after["python"] == before["python"]
    (name_a, keys_a, *rest_a), (name_b, keys_b, *rest_b) = before["numpy"], after["numpy"]
    assert name_a == name_b and np.array_equal(keys_a, keys_b) and rest_a == rest_b
    assert torch.equal(after["torch"], before["torch"])
    assert len(after["cuda"]) == len(before["cuda"])
    assert all(torch.equal(a, b) for a, b in zip(after["cuda"], before["cuda"]))


def _control(how: str) -> TrainControl:
    control = TrainControl()

    def at_step_2(event):
        if event.kind == "step" and event.step == 2:
            if how == "raise":
                raise RuntimeError("injected failure")
            control.request_stop("test stop")

    if how != "finish":
        control.add_listener(at_step_2)
    return control


@pytest.mark.parametrize("how", ["finish", "stop", "raise"])
def test_run_gives_the_process_rngs_back(how, sd1_bundle, demo_dataset, tmp_path):
    cfg = small_run_config(tmp_path, demo_dataset, steps=3, lr=1e-3, batch_size=2,
                           network__train_on="te", network__dropout=0.1, data__flip=True)
    random.seed(1234)  # a state the run's seed (0) would not give
    np.random.seed(1234)
    torch.manual_seed(1234)
    random.random(), np.random.rand(), torch.rand(1)  # and not a freshly seeded one
    before = _process_rngs()
    if how == "raise":
        with pytest.raises(RuntimeError, match="injected failure"):
            train(sd1_bundle, cfg, _control(how))
    else:
        result = train(sd1_bundle, cfg, _control(how))
        assert result.stopped == (how == "stop") and result.steps == (2 if how == "stop" else 3)
    _assert_same(before, _process_rngs())


def test_a_run_does_not_depend_on_the_process_rngs(sd1_bundle, demo_dataset, tmp_path):
    """The run's own draws come from its seed, whatever the host's generators were."""
    results = []
    for i, host_seed in enumerate((1, 2)):
        random.seed(host_seed)
        np.random.seed(host_seed)
        torch.manual_seed(host_seed)
        cfg = small_run_config(tmp_path / str(i), demo_dataset, steps=2, lr=1e-3, batch_size=2,
                               network__train_on="te", network__dropout=0.1)
        results.append(train(sd1_bundle, cfg).losses)
    assert results[0] == results[1]
