"""Shared test fixtures: the tiny SD1 bundle and the demo dataset."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture()
def sd1_bundle():
    from lora_train_ext.core.models.tiny import build_bundle

    return build_bundle("sd1", "tiny", seed=0)


@pytest.fixture()
def demo_dataset():
    from lora_train_ext.demo import demo_dataset_dir

    return demo_dataset_dir()


def state_sha256(*modules: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer's bytes, names included: bit-exact identity."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in sorted(m.state_dict().items()):
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()


def requires_grad_flags(*modules: torch.nn.Module) -> list[bool]:
    return [p.requires_grad for m in modules for p in m.parameters()]


MODEL_CAPTIONS = ["shp style, red circle", "blue square, black background"]


def model_outputs(bundle):
    """(conditioning, UNet output) of a bundle on one fixed input: 2 latents, t = 10 and 700."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = bundle.condition(MODEL_CAPTIONS)
        return cond, bundle.denoise(x, t, cond)


def small_run_config(out, dataset: str, steps: int, lr: float, batch_size: int, **settings):
    """The demo's run (64 px, fp32) made small: rank 2; `section__key=value` overrides."""
    from lora_train_ext.demo import demo_config

    cfg = demo_config(str(out), steps=steps, seed=0, rank=2, alpha=None, lr=lr,
                      batch_size=batch_size, grad_accum=1, dataset=dataset)
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()
