"""Adapters whose change is a weight delta built from their factors (LoHa, LoKr, IA3, DoRA, full,
OFT, BOFT).

Their output change is the base layer's own operation (F.linear, or F.conv2d with the base's
stride / padding / dilation / groups) applied with the delta as weight (and the bias change as
bias, for `full`), so the hooked forward is the merged-weights forward up to rounding, and the
delta comes from one place (`make_delta`) for training, merging and saving alike.

Dropout has no hidden activation to act on here. `module_dropout` leaves the whole delta out for
a forward and `rank_dropout` drops output rows of the delta, as LyCORIS does for LoHa / LoKr
(kept rows scaled by 1 / (1 - p), as our LoRA scales its rank dropout); `dropout` drops
elements of the output change. Only `module_dropout` acts on weight sites (`mha.py`), which read
`delta_weight()` directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule, module_kind


class WeightDeltaModule(AdapterModule):
    """Base of the weight-form adapters. Subclasses implement `make_delta()`: the fp32 delta at
    multiplier 1, shaped like the base weight (`(out, in)` or `(out, in, kh, kw)`)."""

    supported_kinds = ("linear", "conv1x1", "conv3x3")

    def __init__(self, name: str, base: nn.Module, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__(name, base)
        if self.kind not in self.supported_kinds:
            raise TypeError(f"{name}: {type(self).__name__} needs a "
                            f"{' / '.join(self.supported_kinds)} base, got {type(base).__name__}"
                            + (f" ({self.kind})" if self.kind else ""))
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    # -- to implement ----------------------------------------------------------------------
    def make_delta(self) -> torch.Tensor:
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        """Scale the delta by exactly `factor` in place (max-norm regularisation): the
        parameters a delta is linear in, per algorithm. Scaling every parameter by the same
        amount does not do it for a product of several factors."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        return self.make_delta() * self.multiplier

    def delta_bias(self) -> torch.Tensor | None:
        """The change of the base bias (multiplier applied), or None: only `full` has one."""
        return None

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        return weight_form_forward(self, x)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return hook_output(self, args, output)


def hook_output(adapter: AdapterModule, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """base output + the adapter's output change, with the base output's strides.

    `output + delta` may give a conv output whose size-1 axes carry other strides (a
    channels-last (B, C, 1, 1) comes back contiguous); the next conv then picks another kernel
    and rounds differently, so a zero delta would no longer leave the model bit-identical."""
    if adapter.multiplier == 0.0:
        return output
    delta = adapter.forward_delta(args[0]).to(output.dtype)
    return output.clone().add_(delta)


def weight_form_forward(adapter: AdapterModule, x: torch.Tensor) -> torch.Tensor:
    """The output change of a weight-form adapter (`delta_weight()`, optional `delta_bias()`),
    with its module / rank / output dropout while training."""
    if adapter.training and adapter.module_dropout and \
            torch.rand((), device="cpu").item() < adapter.module_dropout:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    delta = adapter.delta_weight()
    if adapter.training and adapter.rank_dropout:
        keep = torch.rand(delta.shape[0], device=delta.device) >= adapter.rank_dropout
        mask = keep.to(delta.dtype) / (1.0 - adapter.rank_dropout)
        delta = delta * mask.reshape(-1, *([1] * (delta.dim() - 1)))
    if not torch.is_autocast_enabled():
        x = x.to(delta.dtype)
    bias = adapter.delta_bias() if hasattr(adapter, "delta_bias") else None
    out = base_op(adapter.base, x, delta, bias)
    if adapter.training and adapter.dropout:
        out = F.dropout(out, p=adapter.dropout)
    return out


def base_op(base: nn.Module, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The base layer's operation with another weight (and bias)."""
    if module_kind(base).startswith("conv"):
        return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation,
                        getattr(base, "groups", 1))
    return F.linear(x, weight, bias)


def base_weight_fp32(base: nn.Module) -> torch.Tensor:
    """The frozen base weight as fp32 (a view of it when it is fp32 already)."""
    return base.weight.detach().float()


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """`nn.init.kaiming_uniform_(a=sqrt(5))` (nn.Linear's default), fan_in = numel / shape[0]."""
    fan_in = max(1, math.prod(shape[1:]))
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)


def scale_from_file(alpha: torch.Tensor | float | None, dim: int | None) -> float:
    """alpha / dim as the WebUI's loader reads a LyCORIS module (`calc_scale`): 1 when the file
    has no alpha or the module has no rank (full factors)."""
    if alpha is None or dim is None:
        return 1.0
    return float(alpha) / dim
