"""Non-reentrant gradient checkpointing switched on per run, without touching model classes.

The WebUI's own checkpointing uses the reentrant form, which gives no gradient when only adapter
parameters require it. Here each chosen block gets an instance-level `forward` that runs the
class's forward under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`; removing the
instance attribute restores the block exactly.
"""

from __future__ import annotations

import functools

import torch.utils.checkpoint as ckpt
from torch import nn


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks worth checkpointing: the UNet's top-level blocks, a text encoder's layers."""
    blocks: list[nn.Module] = []
    for attr in ("input_blocks", "output_blocks"):
        blocks.extend(getattr(model, attr, []) or [])
    if hasattr(model, "middle_block"):
        blocks.append(model.middle_block)
    for path, module in model.named_modules():
        if path.endswith("encoder.layers") or path.endswith("transformer.resblocks"):
            blocks.extend(module)
    return blocks


class GradientCheckpointing:
    def __init__(self, models: list[nn.Module]):
        self.blocks = [b for m in models for b in checkpoint_blocks(m)]
        self._active: list[nn.Module] = []

    def enable(self) -> "GradientCheckpointing":
        for block in self.blocks:
            if "forward" in block.__dict__:
                continue  # someone else patched this instance; leave it alone
            original = type(block).forward.__get__(block)

            @functools.wraps(original)
            def forward(*args, _original=original, **kwargs):
                return ckpt.checkpoint(_original, *args, use_reentrant=False, **kwargs)

            block.forward = forward
            self._active.append(block)
        return self

    def disable(self) -> None:
        for block in self._active:
            block.__dict__.pop("forward", None)
        self._active.clear()
