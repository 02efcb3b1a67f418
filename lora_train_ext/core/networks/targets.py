"""Which modules an adapter wraps, per arch, and their kohya names.

One table of path patterns (LDM paths inside the UNet, HF CLIP paths inside a text encoder) picks
the modules kohya's trainer picks:
- UNet, LoRA (LierLa): every Linear / 1x1 Conv of the spatial transformers (attention, feed-forward,
  proj_in / proj_out).
- UNet, LoCon (C3Lier) adds the res blocks' convs, time-embedding linears and skip connections,
  and the down/upsamplers' convs.
- Text encoders: self-attention q/k/v/out and the MLP's fc1/fc2 of every layer, named by HF CLIP
  paths. OpenCLIP towers (SD2's `te`, SDXL's `te2`, paths `transformer.resblocks.N...`) map onto
  the same names: q/k/v are row blocks of the fused `attn.in_proj_weight` and, like `attn.out_proj`,
  are adapted as weights through `mha.WeightSite` stand-ins; `mlp.c_fc` / `mlp.c_proj` are fc1 /
  fc2. SD2 reads OpenCLIP's penultimate layer, so its last layer gets no adapter (23 x 6 = 138).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .. import keys
from ..errors import UserError
from .base import module_kind
from .mha import mha_sites

UNET_TRANSFORMER = re.compile(
    r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
UNET_CONV_EXTRA = re.compile(
    r"^((input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\."
    r"(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
    r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.\d+\.conv)$")
TE_LAYER = re.compile(
    r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")

OPENCLIP_ATTN = re.compile(r"^transformer\.resblocks\.(\d+)\.attn$")
OPENCLIP_MLP = re.compile(r"^transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)$")
# Last text-encoder layers the host never runs, by (arch, part): SD2 conditions on OpenCLIP's
# penultimate layer. (SDXL's te1 and te2 are read at the penultimate layer too, but te2's last
# layer makes the pooled embedding and kohya's files name every te1 layer.)
UNUSED_LAST_LAYERS = {("sd2", "te"): 1}

BLOCK_RE = re.compile(r"^(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.")


@dataclass
class Target:
    name: str  # kohya module name
    part: str  # 'unet', 'te', 'te1', 'te2'
    path: str  # dotted path inside its root module
    module: nn.Module
    kind: str  # 'linear', 'conv1x1', 'conv3x3'


def block_id(ldm_path: str) -> str:
    """kohya's block ids: IN00..IN11, MID, OUT00..OUT11 ('' outside the three block lists)."""
    m = BLOCK_RE.match(ldm_path)
    if not m:
        return ""
    if m.group(2) is not None:
        return f"IN{int(m.group(2)):02d}"
    if m.group(3) is not None:
        return f"OUT{int(m.group(3)):02d}"
    return "MID"


def parse_block_filter(text: str) -> list[str]:
    """'IN,MID' / 'OUT03 OUT04' -> tokens; '' -> [] (all blocks)."""
    tokens = [t for t in re.split(r"[\s,;]+", text.strip().upper()) if t]
    for t in tokens:
        if not re.fullmatch(r"IN(\d\d)?|MID|OUT(\d\d)?", t):
            raise UserError("network.block_filter",
                            f"{t!r} is not a block; use IN, MID, OUT or IN00..IN11, OUT00..OUT11")
    return tokens


def parse_block_values(text: str, field: str, integer: bool = False) -> dict[str, float]:
    """'IN:4, MID:8, OUT04:16' -> {'IN': 4, 'MID': 8, 'OUT04': 16}; '' -> {}."""
    out: dict[str, float] = {}
    for item in [t for t in re.split(r"[\s,;]+", text.strip().upper()) if t]:
        key, _, raw = item.partition(":")
        if not re.fullmatch(r"IN(\d\d)?|MID|OUT(\d\d)?", key) or not raw:
            raise UserError(field, f"{item!r} is not BLOCK:VALUE; blocks are IN, MID, OUT or "
                                   "IN00..IN11, OUT00..OUT11, e.g. 'IN:4, MID:8, OUT:16'")
        try:
            value = float(raw)
        except ValueError:
            raise UserError(field, f"{raw!r} in {item!r} is not a number") from None
        if value < 0 or (integer and (value < 1 or not value.is_integer())):
            raise UserError(field, f"{item!r}: give {'a whole number >= 1' if integer else 'a number >= 0'}")
        out[key] = int(value) if integer else value
    return out


def block_value(block: str, values: dict[str, float], default):
    """The value for a block id: its own entry, else its group's (IN / OUT), else default."""
    if not block or not values:
        return default
    if block in values:
        return values[block]
    group = "MID" if block == "MID" else block[:-2]
    return values.get(group, default)


def block_selected(ldm_path: str, tokens: list[str]) -> bool:
    if not tokens:
        return True
    bid = block_id(ldm_path)
    return any(bid == t or (t in ("IN", "OUT") and bid.startswith(t)) for t in tokens)


def find_targets(roots: dict[str, nn.Module], arch: str, train_on: str = "both",
                 conv: bool = False, block_filter: str = "") -> list[Target]:
    """Modules to adapt. roots: {'unet': unet, 'te': te} (SDXL: 'te1', 'te2')."""
    tokens = parse_block_filter(block_filter)
    targets: list[Target] = []
    for part, root in roots.items():
        is_unet = part == "unet"
        if (train_on == "unet" and not is_unet) or (train_on == "te" and is_unet):
            continue
        for path, module in root.named_modules():
            kind = module_kind(module)
            if not kind:
                continue
            if is_unet:
                hit = (UNET_TRANSFORMER.match(path) and kind != "conv3x3") or \
                      (conv and UNET_CONV_EXTRA.match(path))
                if not hit or not block_selected(path, tokens):
                    continue
                name = keys.unet_kohya_name(path, arch)
            else:
                if not TE_LAYER.match(path):
                    continue
                name = keys.te_kohya_name(part, path)
            targets.append(Target(name=name, part=part, path=path, module=module, kind=kind))
        if not is_unet:
            targets.extend(openclip_targets(root, arch, part))
    return targets


def openclip_targets(root: nn.Module, arch: str, part: str) -> list[Target]:
    """Targets of an OpenCLIP text tower (none for other roots): per used layer q, k, v, out (as
    `WeightSite`s of the MultiheadAttention) and fc1 / fc2 (`mlp.c_fc` / `mlp.c_proj`, hooked).
    Paths are OpenCLIP's: `transformer.resblocks.N.attn.in_proj[q]`, `...attn.out_proj`."""
    blocks = getattr(getattr(root, "transformer", None), "resblocks", None)
    if blocks is None:
        return []
    used = len(blocks) - UNUSED_LAST_LAYERS.get((arch, part), 0)
    targets: list[Target] = []
    for path, module in root.named_modules():
        m = OPENCLIP_ATTN.match(path)
        if m and isinstance(module, nn.MultiheadAttention):
            if int(m.group(1)) >= used:
                continue
            sites = mha_sites(module)
            hf_paths = [hf for hf, _ in keys.openclip_to_hf(path + ".in_proj")]
            hf_paths += [hf for hf, _ in keys.openclip_to_hf(path + ".out_proj")]
            for (which, site), hf in zip(sites.items(), hf_paths):
                inner = f".in_proj[{which}]" if which != "out" else ".out_proj"
                targets.append(Target(name=keys.te_kohya_name(part, hf), part=part,
                                      path=path + inner, module=site, kind="linear"))
            continue
        m = OPENCLIP_MLP.match(path)
        if m and module_kind(module) == "linear" and int(m.group(1)) < used:
            hf, _ = keys.openclip_to_hf(path)[0]
            targets.append(Target(name=keys.te_kohya_name(part, hf), part=part, path=path,
                                  module=module, kind="linear"))
    return targets
