"""Which modules an adapter wraps, per arch, and their kohya names.

One table of path patterns (LDM paths inside the UNet, HF CLIP paths inside a text encoder) picks
the modules kohya's trainer picks:
- UNet, LoRA (LierLa): every Linear / 1x1 Conv of the spatial transformers (attention, feed-forward,
  proj_in / proj_out).
- UNet, LoCon (C3Lier) adds the res blocks' convs, time-embedding linears and skip connections,
  and the down/upsamplers' convs.
- Text encoders: self-attention q/k/v/out and the MLP's fc1/fc2 of every layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .. import keys
from ..errors import UserError
from .base import module_kind

UNET_TRANSFORMER = re.compile(
    r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
UNET_CONV_EXTRA = re.compile(
    r"^((input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\."
    r"(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
    r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.\d+\.conv)$")
TE_LAYER = re.compile(
    r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")

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
    return targets
