"""Test oracle: the weight change the WebUI's built-in Lora extension makes from a file's tensors.

Written for these tests from reading that extension's source (`network.py` NetworkModule:
`calc_scale`, `finalize_updown`, `apply_weight_decompose`; `network_lora.py`, `network_hada.py`,
`network_lokr.py`, `network_ia3.py`, `network_full.py`, `network_oft.py` (v1.10.1) `calc_updown`;
`lyco_helpers.py`), not copied from it. It follows the loader step by step, reshapes included, so
a file whose tensors the loader would read differently from our modules (a wrong axis, a missing
scale, a shape the loader cannot reshape) fails here. Everything is computed in float64 so the
oracle's own rounding is far below the tolerances the tests use.

Facts it encodes:
- Module type: the first of LoRA (`lora_up.weight` + `lora_down.weight`), LoHa (all four
  `hada_w*`), IA3 (`weight`), LoKr (`lokr_w1` or `_a`/`_b`, and `lokr_w2` or `_a`/`_b`), full
  (`diff`), OFT (`oft_blocks` or `oft_diag`) whose tensors are all present.
- OFT (v1.10.1): scale is fixed at 1 (alpha is the constraint). `oft_blocks` B: Q = B - B^T;
  when alpha is present and alpha x out != 0 (out: the layer's output channels, a
  MultiheadAttention's embed_dim), Q *= (min(|Q|, alpha x out) + 1e-8) / (|Q| + 1e-8), |Q| over
  the whole tensor; R = (I + Q)(I - Q)^-1 per block. 3 axes: blocks = B.shape[0], block size =
  out // blocks; each block of rows W_k becomes R_k^T W_k (einsum 'k n m, k n ... -> k m ...').
  4 axes (BOFT): stages = B.shape[0], blocks = B.shape[1], block size b = B.shape[2]; stage i
  regroups the rows (c, 2, k) -> (c, k, 2) with k = 2^i b / 2, applies R_d W_d per block of b
  rows, and regroups back. `rescale`, when present, multiplies the result's rows. The delta is
  the result - W.
- scale = the `scale` tensor if present, else alpha / dim when both are known, else 1. dim:
  LoRA `lora_down.shape[0]`; LoHa `hada_w1_b.shape[0]`; LoKr `lokr_w1_b.shape[0]`, overridden by
  `lokr_w2_b.shape[0]`; IA3 and full have none.
- finalize: (add a `bias` tensor), reshape to a 4-d output shape, reshape to the base weight's
  shape when the sizes agree, times scale, DoRA when `dora_scale` is present, times the
  multiplier. A full module's `diff_b` is the bias change, times the multiplier only.
- DoRA: V = W + delta; W' = V * dora_scale / norm, the norm over all axes but axis 1 of V,
  shaped (1, in, 1...) with as many trailing 1s as the module's weight has axes after the first;
  the delta is W' - W.
"""

from __future__ import annotations

import torch


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def module_type(w: dict[str, torch.Tensor]) -> str:
    if "lora_up.weight" in w and "lora_down.weight" in w:
        return "lora"
    if all(k in w for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "hada"
    if "weight" in w:
        return "ia3"
    has1 = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
    has2 = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
    if has1 and has2:
        return "lokr"
    if "diff" in w:
        return "full"
    if "oft_blocks" in w or "oft_diag" in w:
        return "oft"
    raise AssertionError(f"the loader accepts no module with tensors {sorted(w)}")


def _cp(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """CP rebuild: core (r1, r2, k, k), wa (r1, out), wb (r2, in) -> (out, in, k, k)."""
    partial = torch.tensordot(core, wb, dims=([1], [0]))  # (r1, k, k, in)
    full = torch.tensordot(wa, partial, dims=([0], [0]))  # (out, k, k, in)
    return full.permute(0, 3, 1, 2)


def _conventional(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def _lora(w, orig, is_conv):
    down, up = _d(w["lora_down.weight"]), _d(w["lora_up.weight"])
    if is_conv:  # the loader builds Conv2d modules: a 2-d down becomes (r, in, 1, 1)
        if down.dim() == 2:
            down = down.reshape(down.shape[0], -1, 1, 1)
        up = up.reshape(up.shape[0], up.shape[1], 1, 1)
    else:
        down = down.reshape(down.shape[0], -1)
        up = up.reshape(up.shape[0], -1)
    shape = [up.shape[0], down.shape[1]]
    if "lora_mid.weight" in w:
        raise AssertionError("lora_mid (CP LoCon) is not used by our files")
    if down.dim() == 4:
        shape += list(down.shape[2:])
    return _conventional(up, down, shape), shape, down.shape[0]


def _hada(w, orig):
    w1a, w1b, w2a, w2b = (_d(w[k]) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    dim = w1b.shape[0]
    if "hada_t1" in w:
        shape = [w1a.shape[1], w1b.shape[1]]
        t1 = _d(w["hada_t1"])
        first = _cp(t1, w1a, w1b)
        shape += list(t1.shape[2:])
    else:
        shape = [w1a.shape[0], w1b.shape[1]]
        if w1b.dim() == 4:
            shape += list(w1b.shape[2:])
        first = _conventional(w1a, w1b, shape)
    if "hada_t2" in w:
        second = _cp(_d(w["hada_t2"]), w2a, w2b)
    else:
        second = _conventional(w2a, w2b, shape)
    return first * second, shape, dim


def _ia3(w, orig):
    scale = _d(w["weight"])
    shape = [scale.shape[0], orig.shape[1]]
    if w["on_input"].item():
        shape.reverse()
    else:
        scale = scale.reshape(-1, 1)
    return orig * scale, shape, None


def _lokr(w, orig):
    dim = None
    if "lokr_w1" in w:
        w1 = _d(w["lokr_w1"])
    else:
        w1 = _d(w["lokr_w1_a"]) @ _d(w["lokr_w1_b"])
        dim = w["lokr_w1_b"].shape[0]
    if "lokr_w2" in w:
        w2 = _d(w["lokr_w2"])
    elif "lokr_t2" in w:
        w2 = _cp(_d(w["lokr_t2"]), _d(w["lokr_w2_a"]), _d(w["lokr_w2_b"]))
    else:
        w2 = _d(w["lokr_w2_a"]) @ _d(w["lokr_w2_b"])
    if "lokr_w2_b" in w:
        dim = w["lokr_w2_b"].shape[0]
    shape = [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
    if orig.dim() == 4:
        shape = list(orig.shape)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape), shape, dim


def _full(w, orig):
    diff = _d(w["diff"])
    return diff, list(diff.shape), None


def _regroup(x: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """Rows indexed (c, first, second) -> (c, second, first)."""
    rest = x.shape[1:]
    return x.reshape(-1, first, second, *rest).permute(0, 2, 1, *range(3, 3 + len(rest))) \
        .reshape(-1, *rest)


def _oft(w, orig, out_dim):
    if "oft_diag" in w:
        raise AssertionError("old LyCORIS oft_diag is not made by us")
    blocks = _d(w["oft_blocks"])
    alpha = _d(w["alpha"]) if "alpha" in w else None
    constraint = 0.0 if alpha is None else float(alpha) * out_dim
    b = blocks.shape[-1]
    eye = torch.eye(b, dtype=torch.float64)
    q = blocks - blocks.transpose(-1, -2)
    if constraint != 0:
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    r = torch.matmul(eye + q, torch.linalg.inv(eye - q))
    if blocks.dim() == 3:
        k, n = blocks.shape[0], out_dim // blocks.shape[0]
        merged = torch.einsum("knm,kn...->km...", r, orig.reshape(k, n, *orig.shape[1:]))
        merged = merged.reshape(orig.shape)
    else:
        x = orig
        for i in range(blocks.shape[0]):
            k = 2 ** i * (b // 2)
            x = _regroup(x, 2, k)
            x = torch.einsum("dij,dj...->di...", r[i], x.reshape(-1, b, *orig.shape[1:]))
            x = _regroup(x.reshape(orig.shape), k, 2)
        merged = x
    if "rescale" in w:
        merged = _d(w["rescale"]).reshape(-1, *([1] * (orig.dim() - 1))) * merged
    return merged - orig, list(orig.shape), None


def loader_delta(w: dict[str, torch.Tensor], orig_weight: torch.Tensor, multiplier: float = 1.0,
                 module_weight_shape: tuple[int, ...] | None = None,
                 oft_out_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight change, bias change or None), float64, for one module's tensors `w` applied to a
    layer whose weight is `orig_weight` (for an OpenCLIP q/k/v: that row block).
    `module_weight_shape`: the shape the loader takes the module's axis count from (the layer's
    own weight; a MultiheadAttention's `out_proj.weight`). `oft_out_dim`: the output channels
    OFT reads from the layer (default the rows of `orig_weight`; a MultiheadAttention's
    embed_dim, which is the rows of a q / k / v block)."""
    orig = _d(orig_weight)
    kind = module_type(w)
    is_conv = orig.dim() == 4
    if kind == "oft":
        updown, shape, dim = _oft(w, orig, oft_out_dim or orig.shape[0])
    elif kind == "lora":
        updown, shape, dim = _lora(w, orig, is_conv)
    elif kind == "hada":
        updown, shape, dim = _hada(w, orig)
    elif kind == "ia3":
        updown, shape, dim = _ia3(w, orig)
    elif kind == "lokr":
        updown, shape, dim = _lokr(w, orig)
    else:
        updown, shape, dim = _full(w, orig)
    ex_bias = _d(w["diff_b"]) if kind == "full" and "diff_b" in w else None

    # finalize
    if "bias" in w:
        raise AssertionError("a LoRA `bias` tensor is not used by our files")
    if len(shape) == 4:
        updown = updown.reshape(shape)
    if orig.numel() == updown.numel():
        updown = updown.reshape(orig.shape)
    if ex_bias is not None:
        ex_bias = ex_bias * multiplier
    alpha = w["alpha"].item() if "alpha" in w else None
    if "scale" in w:
        scale = w["scale"].item()
    elif dim is not None and alpha is not None:
        scale = alpha / dim
    else:
        scale = 1.0
    updown = updown * scale
    if "dora_scale" in w:
        axes_after_first = len(module_weight_shape or orig.shape) - 1
        merged = updown + orig
        columns = merged.shape[1]
        norm = merged.transpose(0, 1).reshape(columns, -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(columns, *([1] * axes_after_first)).transpose(0, 1)
        updown = merged * (_d(w["dora_scale"]) / norm) - orig
    assert updown.shape == orig.shape, (kind, tuple(updown.shape), tuple(orig.shape))
    return updown * multiplier, ex_bias


def module_tensors(file_tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of one module of a file, under the names the loader's modules read."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in file_tensors.items() if k.startswith(prefix)}
