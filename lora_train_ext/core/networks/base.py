"""Adapters as separate parameters beside frozen base modules.

An adapter never edits its base module's weights. `attach()` adds its output to the base module's
output through a forward hook; `detach()` removes the hook, which leaves the model exactly as it
was. Weights a module reads without calling a submodule (OpenCLIP's fused attention) are adapted
as weights instead, through a stand-in base (`networks/mha.py`), with the same attach / detach. `delta_weight()` gives the same change as a weight delta (for merging and for tests that
compare the hooked forward with a merged one).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")


def module_kind(module: nn.Module) -> str:
    """'linear', 'conv1x1', 'conv3x3' (any kxk with k > 1), or '' for unsupported modules.

    By class (nn.Linear, nn.Conv2d and their subclasses), else by what the layer is, for hosts
    whose layers are their own classes (Forge's `ForgeOperations.Linear` is a plain nn.Module):
    a linear layer holds a 2-D `weight` Parameter of shape (out_features, in_features) and says
    `in_features` / `out_features`; a 2-D convolution holds a 4-D `weight` of shape (out_channels,
    in_channels, kh, kw), says the nn.Conv2d geometry (in / out channels, kernel size, stride,
    padding, dilation), is not transposed and has one group. Anything else (embeddings, norms,
    fused attention, quantised layers whose weight has another shape) is ''."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    weight = getattr(module, "_parameters", {}).get("weight")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return ""
    if weight.dim() == 2:
        out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if isinstance(in_f, int) and isinstance(out_f, int) and tuple(weight.shape) == (out_f, in_f):
            return "linear"
        return ""
    if weight.dim() == 4 and all(hasattr(module, a) for a in CONV_ATTRS) and \
            not getattr(module, "transposed", False) and getattr(module, "groups", 1) == 1:
        kernel = tuple(module.kernel_size) if isinstance(module.kernel_size, (tuple, list)) else \
            (module.kernel_size, module.kernel_size)
        if tuple(weight.shape) == (module.out_channels, module.in_channels, *kernel):
            return "conv1x1" if kernel == (1, 1) else "conv3x3"
    return ""


class AdapterModule(nn.Module):
    """One adapted base module. Subclasses implement `forward_delta` and `delta_weight`.

    The base module is held outside the module tree (so it is not in `state_dict()` and not in
    `parameters()`): the adapter's state dict holds exactly the tensors of the file.
    """

    def __init__(self, name: str, base: nn.Module):
        super().__init__()
        self.name = name  # kohya module name, e.g. lora_unet_..._attn1_to_q
        self.__dict__["base"] = base
        self.kind = module_kind(base)
        self.multiplier = 1.0
        self._handle = None

    # -- hooking ---------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self) -> None:
        if self._handle is None:
            # A base that is a stand-in for a weight its owner reads directly (fused attention,
            # networks/mha.py) applies the delta to that weight; every other base gets a hook.
            attach_adapter = getattr(self.base, "attach_adapter", None)
            if attach_adapter is not None:
                self._handle = attach_adapter(self)
            else:
                self._handle = self.base.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0.0:
            return output
        delta = self.forward_delta(args[0])
        return output + delta.to(output.dtype)

    # class-wide switch: False reads alpha from its tensor at every use (the plain path, kept for
    # the benchmark and the tests that compare both)
    cache_alpha = True

    def alpha_value(self) -> float:
        """The `alpha` buffer as a Python float, read once per value.

        Reading a GPU tensor's value waits for the GPU, and a forward used to read it in every
        module. The float is kept with the tensor it came from and that tensor's version counter,
        so `load_state_dict`, `copy_` and `.to()` (a new tensor) are seen and read again."""
        t = self._buffers.get("alpha")
        if t is None:
            raise AttributeError(f"{type(self).__name__} has no alpha")
        if not self.cache_alpha:
            return float(t)
        try:
            version = t._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter
            return float(t)
        cached = self.__dict__.get("_alpha_cache")
        if cached is not None and cached[0] is t and cached[1] == version:
            return cached[2]
        value = float(t)
        object.__setattr__(self, "_alpha_cache", (t, version, value))
        return value

    # -- to implement ----------------------------------------------------------------------
    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The change of the base module's output for input x, multiplier applied."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The change of the base weight (same shape), multiplier applied, fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        """Multiply the delta by factor, in place (max-norm regularisation)."""
        raise NotImplementedError

    def base_weight_shape(self) -> tuple[int, ...]:
        return tuple(self.base.weight.shape)


class AdapterNetwork(nn.Module):
    """All adapters of a run, by kohya module name, with the file's tensor names as state."""

    def __init__(self, adapters: Iterable[AdapterModule], arch: str, algo: str):
        super().__init__()
        self.arch = arch
        self.algo = algo
        self.adapters = nn.ModuleDict({a.name: a for a in adapters})

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self):
        return iter(self.adapters.values())

    def attach(self) -> None:
        for a in self:
            a.attach()

    def detach(self) -> None:
        for a in self:
            a.detach()

    def scale_weight_norms_(self, max_norm: float) -> None:
        """Scale each adapter down so the norm of its weight delta is at most max_norm (kohya's
        scale_weight_norms)."""
        adapters = list(self)
        if not adapters:
            return
        with torch.no_grad():
            norms = [a.delta_weight().norm() for a in adapters]
            device = norms[0].device
            norms = torch.stack([n.to(device) for n in norms])
            # one read of the values for all modules (each read waits for a GPU)
            over = (norms > max_norm).tolist()
            factors = (max_norm / norms).tolist()
            for a, is_over, factor in zip(adapters, over, factors):
                if is_over:
                    a.scale_delta_(float(factor))

    def set_multiplier(self, value: float, part: str | None = None) -> None:
        """Set the strength of every adapter, or of one part ('unet' or a text encoder)."""
        for a in self:
            if part is None or part_of(a.name) == part:
                a.multiplier = float(value)

    def names(self, part: str | None = None) -> list[str]:
        return [a.name for a in self if part is None or part_of(a.name) == part]

    def parts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self:
            out[part_of(a.name)] = out.get(part_of(a.name), 0) + 1
        return out

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors under the file's keys (`NAME.lora_down.weight`, `NAME.alpha`, ...)."""
        out = {}
        for name, tensor in self.state_dict().items():
            key = name[len("adapters."):]
            t = tensor.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[key] = t.contiguous().cpu()
        return out

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a file's tensors exactly; raise on any missing or unexpected key."""
        state = {"adapters." + k: v for k, v in tensors.items()}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"adapter file does not match the network: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        for k, v in state.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{k[len('adapters.'):]}: shape {tuple(v.shape)} in the file, "
                                 f"{tuple(own[k].shape)} expected")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].dtype))

    def trainable_parameters(self, part: str | None = None) -> list[nn.Parameter]:
        return [p for a in self if part is None or part_of(a.name) == part
                for p in a.parameters() if p.requires_grad]


def part_of(kohya_name: str) -> str:
    """'lora_unet_x' -> 'unet'; 'lora_te_x' -> 'te'; 'lora_te1_x' -> 'te1'."""
    rest = kohya_name[len("lora_"):] if kohya_name.startswith("lora_") else kohya_name
    return rest.split("_", 1)[0]
