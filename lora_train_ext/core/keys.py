"""Module-name maps: LDM path <-> kohya name <-> HF / diffusers name, for SD1, SD2 and SDXL.

Vocabulary (one word for one thing):
- path: a module's dotted name inside its root module, no `.weight`
  (UNet: LDM names relative to the UNet, `input_blocks.1.1.transformer_blocks.0.attn1.to_q`;
  text encoder: HF `CLIPTextModel` names, `text_model.encoder.layers.0.self_attn.q_proj`;
  OpenCLIP: names relative to the OpenCLIP model, `transformer.resblocks.0.attn.in_proj`).
- name: a kohya module name as stored in LoRA files (`lora_unet_...`, `lora_te_...`).
- key: a checkpoint tensor name (`model.diffusion_model.input_blocks.1.1.proj_in.weight`).
- part: which network a module lives in: 'unet', 'te' (SD1/SD2), 'te1' / 'te2' (SDXL), 'vae'.

kohya names are paths with `.` replaced by `_`, so underscores are ambiguous on the way back.
Names are parsed back with the known vocabulary of multi-word path components (`transformer_blocks`,
`to_out`, `self_attn`, ...) and then checked against the arch's block table, so the inverse maps are
exact for every module of the real models. Where a live model is at hand,
`build_unet_name_table` gives an exact reverse dict from its own module list.

The UNet block table is derived from each arch's layout (levels, res blocks per level, levels with
attention), not from per-key rules. Pure Python: no torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, NamedTuple

ARCHES = ("sd1", "sd2", "sdxl")


class KeyMapError(ValueError):
    """A path, name or key outside the known structure of its arch."""


# ---------------------------------------------------------------------------------------------
# UNet: LDM <-> diffusers

@dataclass(frozen=True)
class UNetLayout:
    """The block structure that fixes every UNet name.

    levels: resolution levels; res_blocks: res blocks per down level (up levels have one more);
    attention_levels: levels whose blocks carry a spatial transformer; label_emb: SDXL's
    pooled-text/size embedding; kohya_style: which paths kohya names are built from.
    """

    levels: int
    res_blocks: int
    attention_levels: frozenset
    label_emb: bool
    kohya_style: str  # 'diffusers' (SD1/SD2) | 'ldm' (SDXL)


UNET_LAYOUTS: dict[str, UNetLayout] = {
    "sd1": UNetLayout(4, 2, frozenset({0, 1, 2}), label_emb=False, kohya_style="diffusers"),
    "sd2": UNetLayout(4, 2, frozenset({0, 1, 2}), label_emb=False, kohya_style="diffusers"),
    "sdxl": UNetLayout(3, 2, frozenset({1, 2}), label_emb=True, kohya_style="ldm"),
}

# Inside an LDM ResBlock -> inside a diffusers ResnetBlock2D.
RES_INNER = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Inside an LDM Downsample -> inside a diffusers Downsample2D.
DOWN_INNER = {"op": "conv"}

LDM_ROOTS = frozenset({"time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks",
                       "out"})
DIFFUSERS_ROOTS = frozenset({"time_embedding", "add_embedding", "conv_in", "down_blocks",
                             "mid_block", "up_blocks", "conv_norm_out", "conv_out"})


@dataclass(frozen=True)
class _Block:
    """One LDM module prefix and its diffusers twin. inner: renames of the first one or two
    components below the prefix (None: the rest of the path is the same on both sides)."""

    ldm: str
    diffusers: str
    inner: dict | None = None


def _layout(arch: str) -> UNetLayout:
    try:
        return UNET_LAYOUTS[arch]
    except KeyError:
        raise KeyMapError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHES)}") from None


@lru_cache(maxsize=None)
def _unet_blocks(arch: str) -> tuple[_Block, ...]:
    lay = _layout(arch)
    per_level = lay.res_blocks + 1  # down: res blocks + downsampler; up: res blocks + 1
    blocks = [
        _Block("time_embed.0", "time_embedding.linear_1"),
        _Block("time_embed.2", "time_embedding.linear_2"),
        _Block("input_blocks.0.0", "conv_in"),
        _Block("out.0", "conv_norm_out"),
        _Block("out.2", "conv_out"),
    ]
    if lay.label_emb:
        blocks += [_Block("label_emb.0.0", "add_embedding.linear_1"),
                   _Block("label_emb.0.2", "add_embedding.linear_2")]
    for level in range(lay.levels):
        attention = level in lay.attention_levels
        for j in range(lay.res_blocks):
            k = 1 + level * per_level + j
            blocks.append(_Block(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}",
                                 RES_INNER))
            if attention:
                blocks.append(_Block(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}"))
        if level < lay.levels - 1:
            blocks.append(_Block(f"input_blocks.{(level + 1) * per_level}.0",
                                 f"down_blocks.{level}.downsamplers.0", DOWN_INNER))
    blocks += [
        _Block("middle_block.0", "mid_block.resnets.0", RES_INNER),
        _Block("middle_block.1", "mid_block.attentions.0"),
        _Block("middle_block.2", "mid_block.resnets.1", RES_INNER),
    ]
    for up in range(lay.levels):
        level = lay.levels - 1 - up
        attention = level in lay.attention_levels
        for j in range(per_level):
            k = up * per_level + j
            blocks.append(_Block(f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}", RES_INNER))
            if attention:
                blocks.append(_Block(f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}"))
            if j == per_level - 1 and level > 0:
                # The upsampler follows the attention when the block has one.
                blocks.append(_Block(f"output_blocks.{k}.{2 if attention else 1}",
                                     f"up_blocks.{up}.upsamplers.0"))
    return tuple(blocks)


@lru_cache(maxsize=None)
def _block_index(arch: str, side: str) -> dict[str, _Block]:
    return {getattr(b, side): b for b in _unet_blocks(arch)}


def _rename_inner(rest: list[str], inner: dict | None, path: str) -> list[str]:
    if not rest or inner is None:
        return rest
    for n in (2, 1):
        head = ".".join(rest[:n])
        if len(rest) >= n and head in inner:
            return inner[head].split(".") + rest[n:]
    raise KeyMapError(f"{path!r}: no counterpart for {'.'.join(rest)!r} in this block")


def _translate(path: str, arch: str, src: str, dst: str) -> str:
    index = _block_index(arch, src)
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        block = index.get(".".join(parts[:n]))
        if block is None:
            continue
        inner = block.inner
        if inner is not None and src == "diffusers":
            inner = {v: k for k, v in inner.items()}
        rest = _rename_inner(parts[n:], inner, path)
        return ".".join([getattr(block, dst)] + rest)
    raise KeyMapError(f"{path!r} is not a module path of the {arch} UNet ({src} names)")


def unet_ldm_to_diffusers(ldm_path: str, arch: str) -> str:
    """LDM UNet path -> diffusers path (`input_blocks.4.0.skip_connection` ->
    `down_blocks.1.resnets.0.conv_shortcut`). A trailing `.weight` / `.bias` passes through.
    Raises KeyMapError for paths with no diffusers twin (e.g. the `input_blocks.N` containers)."""
    return _translate(ldm_path, arch, "ldm", "diffusers")


def unet_diffusers_to_ldm(path: str, arch: str) -> str:
    """diffusers UNet path -> LDM path; the exact inverse of `unet_ldm_to_diffusers`."""
    return _translate(path, arch, "diffusers", "ldm")


# ---------------------------------------------------------------------------------------------
# Flat kohya names back to dotted paths

# Path components that contain `_` themselves; every other `_` in a kohya name was a `.`.
UNET_WORDS = frozenset({
    # LDM
    "time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "in_layers",
    "emb_layers", "out_layers", "skip_connection",
    # diffusers
    "time_embedding", "add_embedding", "linear_1", "linear_2", "conv_in", "conv_out",
    "conv_norm_out", "down_blocks", "mid_block", "up_blocks", "conv_shortcut", "time_emb_proj",
    # both (spatial transformer)
    "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
})
TE_WORDS = frozenset({
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1",
    "layer_norm2", "final_layer_norm", "token_embedding", "position_embedding",
})


def _unflatten(flat: str, words: frozenset) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`, joining the
    longest run of `_`-separated tokens that is a known word."""
    tokens = flat.split("_")
    if not flat or any(not t for t in tokens):
        raise KeyMapError(f"{flat!r} is not a flattened module path")
    longest = max(w.count("_") for w in words) + 1
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 1, -1):
            word = "_".join(tokens[i:i + n])
            if word in words:
                parts.append(word)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _flatten(path: str) -> str:
    return path.replace(".", "_")


def split_kohya_name(name: str) -> tuple[str, str]:
    """`lora_te1_text_model_...` -> ('te1', 'text_model_...').
    part is 'unet', 'te', 'te1' or 'te2'."""
    m = re.fullmatch(r"lora_(unet|te|te1|te2)_(.+)", name)
    if not m:
        raise KeyMapError(f"{name!r} is not a kohya module name (lora_unet_ / lora_te_ / "
                          "lora_te1_ / lora_te2_ + path)")
    return m.group(1), m.group(2)


# ---------------------------------------------------------------------------------------------
# UNet: LDM <-> kohya

def unet_kohya_name(ldm_path: str, arch: str) -> str:
    """LDM UNet path -> kohya name: SD1/SD2 `lora_unet_` + diffusers path, SDXL `lora_unet_` +
    LDM path, `.` -> `_` (what every loader expects). Raises KeyMapError off the block table."""
    diffusers = unet_ldm_to_diffusers(ldm_path, arch)  # also validates the path for SDXL
    style = _layout(arch).kohya_style
    return "lora_unet_" + _flatten(diffusers if style == "diffusers" else ldm_path)


def unet_ldm_path(kohya_name: str, arch: str) -> str:
    """kohya UNet name -> LDM path; exact inverse of `unet_kohya_name`. Also reads the other
    style (LDM names in SD1/SD2 files, diffusers names in SDXL files), which loaders accept."""
    part, flat = split_kohya_name(kohya_name)
    if part != "unet":
        raise KeyMapError(f"{kohya_name!r} is not a UNet name")
    path = _unflatten(flat, UNET_WORDS)
    root = path.split(".", 1)[0]
    if root in DIFFUSERS_ROOTS:
        return unet_diffusers_to_ldm(path, arch)
    if root in LDM_ROOTS:
        unet_ldm_to_diffusers(path, arch)  # validate against the block table
        return path
    raise KeyMapError(f"{kohya_name!r}: {root!r} is not a UNet block")


def build_unet_name_table(arch: str, ldm_paths: Iterable[str]) -> dict[str, str]:
    """{kohya name: LDM path} for the given module paths (e.g. a live UNet's named_modules()).
    Paths with no kohya name (containers, the root '') are left out; two paths with one name
    raise KeyMapError."""
    table: dict[str, str] = {}
    for path in ldm_paths:
        try:
            name = unet_kohya_name(path, arch)
        except KeyMapError:
            continue
        if table.setdefault(name, path) != path:
            raise KeyMapError(f"{table[name]!r} and {path!r} share the kohya name {name!r}")
    return table


# ---------------------------------------------------------------------------------------------
# Text encoders: HF CLIP <-> kohya, OpenCLIP <-> HF CLIP

TE_PARTS: dict[str, tuple[str, ...]] = {"sd1": ("te",), "sd2": ("te",), "sdxl": ("te1", "te2")}

HF_CLIP_MODULE = re.compile(
    r"text_model\.(encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12]"
    r"|layer_norm[12])|embeddings\.(token_embedding|position_embedding)|final_layer_norm)")


def normalize_te_path(hf_path: str) -> str:
    """HF CLIPTextModel path with the `text_model.` level, which transformers 5 drops."""
    return hf_path if hf_path.startswith("text_model.") else "text_model." + hf_path


def te_kohya_name(prefix: str, hf_path: str) -> str:
    """('te' | 'te1' | 'te2', HF CLIP path with or without `text_model.`) -> kohya name,
    always with `text_model_` (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`)."""
    if prefix not in ("te", "te1", "te2"):
        raise KeyMapError(f"text encoder prefix {prefix!r}; expected 'te', 'te1' or 'te2'")
    path = normalize_te_path(hf_path)
    if not HF_CLIP_MODULE.fullmatch(path):
        raise KeyMapError(f"{hf_path!r} is not a CLIP text encoder module path")
    return f"lora_{prefix}_" + _flatten(path)


def te_hf_path(kohya_name: str) -> tuple[str, str]:
    """kohya text-encoder name -> (prefix, HF CLIP path with `text_model.`)."""
    part, flat = split_kohya_name(kohya_name)
    if part == "unet":
        raise KeyMapError(f"{kohya_name!r} is not a text encoder name")
    path = _unflatten(flat, TE_WORDS)
    if not HF_CLIP_MODULE.fullmatch(path):
        raise KeyMapError(f"{kohya_name!r} is not a CLIP text encoder module")
    return part, path


class RowChunk(NamedTuple):
    """Chunk `index` of `count` equal row blocks of a fused weight: q/k/v are chunks 0/1/2 of 3
    of OpenCLIP's `in_proj_weight` (3d, d). Width-free, so it holds for tiny test models too."""

    index: int
    count: int

    def rows(self, total_rows: int) -> slice:
        """The row slice inside a fused weight with `total_rows` rows."""
        if total_rows % self.count:
            raise KeyMapError(f"{total_rows} rows do not split into {self.count} equal chunks")
        n = total_rows // self.count
        return slice(self.index * n, (self.index + 1) * n)

    def select(self, weight):
        """`weight[rows]` for a torch tensor or numpy array (a view, not a copy)."""
        return weight[self.rows(len(weight))]


QKV = ("q_proj", "k_proj", "v_proj")
_OPENCLIP_LAYER = re.compile(
    r"(?:transformer\.)?resblocks\.(\d+)\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj"
    r"|ln_1|ln_2)")
_OPENCLIP_TO_HF_LAYER = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
_OPENCLIP_TO_HF_TOP = {
    "ln_final": "text_model.final_layer_norm",
    "token_embedding": "text_model.embeddings.token_embedding",
}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def openclip_to_hf(path: str) -> list[tuple[str, RowChunk | None]]:
    """OpenCLIP text-tower path (relative to the OpenCLIP model; `transformer.` optional) ->
    [(HF CLIP path, row chunk or None)]. `resblocks.N.attn.in_proj` (the fused
    `in_proj_weight`, (3d, d)) gives q_proj / k_proj / v_proj as chunks 0/1/2 of 3."""
    if path in _OPENCLIP_TO_HF_TOP:
        return [(_OPENCLIP_TO_HF_TOP[path], None)]
    m = _OPENCLIP_LAYER.fullmatch(path)
    if not m:
        raise KeyMapError(f"{path!r} is not an OpenCLIP text-tower module path")
    layer, inner = m.groups()
    base = f"text_model.encoder.layers.{layer}."
    if inner == "attn.in_proj":
        return [(base + "self_attn." + qkv, RowChunk(i, 3)) for i, qkv in enumerate(QKV)]
    return [(base + _OPENCLIP_TO_HF_LAYER[inner], None)]


def hf_to_openclip(hf_path: str) -> tuple[str, RowChunk | None]:
    """HF CLIP path (with or without `text_model.`) -> (OpenCLIP path `transformer.resblocks...`,
    row chunk of `attn.in_proj` for q/k/v, else None); the inverse of `openclip_to_hf`."""
    path = normalize_te_path(hf_path)
    for oc, hf in _OPENCLIP_TO_HF_TOP.items():
        if path == hf:
            return oc, None
    m = _HF_LAYER.fullmatch(path)
    if m:
        layer, inner = m.groups()
        base = f"transformer.resblocks.{layer}."
        if inner.startswith("self_attn.") and inner[len("self_attn."):] in QKV:
            return base + "attn.in_proj", RowChunk(QKV.index(inner[len("self_attn."):]), 3)
        for oc, hf in _OPENCLIP_TO_HF_LAYER.items():
            if inner == hf:
                return base + oc, None
    raise KeyMapError(f"{hf_path!r} has no OpenCLIP counterpart")


# ---------------------------------------------------------------------------------------------
# Checkpoint keys (merge into / extract from a WebUI checkpoint)

UNET_CHECKPOINT_PREFIX = "model.diffusion_model."
VAE_CHECKPOINT_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class _TextEncoderCheckpoint:
    prefix: str
    family: str  # 'clip': HF CLIPTextModel names; 'openclip': fused in_proj, resblocks
    width: int | None = None  # OpenCLIP: the real model's d, so in_proj_weight is (3d, d)


_CHECKPOINT_TE: dict[str, dict[str, _TextEncoderCheckpoint]] = {
    "sd1": {"te": _TextEncoderCheckpoint("cond_stage_model.transformer.", "clip")},
    "sd2": {"te": _TextEncoderCheckpoint("cond_stage_model.model.", "openclip", 1024)},
    "sdxl": {"te1": _TextEncoderCheckpoint("conditioner.embedders.0.transformer.", "clip"),
             "te2": _TextEncoderCheckpoint("conditioner.embedders.1.model.", "openclip", 1280)},
}


def _te_checkpoint(arch: str, part: str) -> _TextEncoderCheckpoint:
    _layout(arch)
    try:
        return _CHECKPOINT_TE[arch][part]
    except KeyError:
        raise KeyMapError(f"{arch} has no text encoder {part!r}; its parts are "
                          f"{', '.join(TE_PARTS[arch])}") from None


def checkpoint_prefix(arch: str, part: str) -> str:
    """Checkpoint key prefix of a part: 'unet' -> `model.diffusion_model.`, 'vae' ->
    `first_stage_model.`, SD1 'te' -> `cond_stage_model.transformer.`, SD2 'te' ->
    `cond_stage_model.model.`, SDXL 'te1' / 'te2' -> `conditioner.embedders.0.transformer.` /
    `conditioner.embedders.1.model.`."""
    if part == "unet":
        _layout(arch)
        return UNET_CHECKPOINT_PREFIX
    if part == "vae":
        _layout(arch)
        return VAE_CHECKPOINT_PREFIX
    return _te_checkpoint(arch, part).prefix


def te_family(arch: str, part: str) -> str:
    """'clip' (HF CLIP names in the checkpoint) or 'openclip' (fused in_proj, resblocks)."""
    return _te_checkpoint(arch, part).family


def openclip_width(arch: str, part: str) -> int:
    """The real OpenCLIP text width d (SD2 'te' 1024, SDXL 'te2' 1280); in_proj is (3d, d)."""
    te = _te_checkpoint(arch, part)
    if te.family != "openclip":
        raise KeyMapError(f"{arch} {part} is not an OpenCLIP text encoder")
    return te.width


def _openclip_weight_key(path: str) -> str:
    # nn.MultiheadAttention keeps its fused projection as a bare parameter, `in_proj_weight`.
    return path + "_weight" if path.endswith(".in_proj") else path + ".weight"


def _row_slice(chunk: RowChunk | None, te: _TextEncoderCheckpoint, width: int | None):
    if chunk is None:
        return None
    return chunk.rows(chunk.count * (width or te.width))


def kohya_to_checkpoint(kohya_name: str, arch: str,
                        width: int | None = None) -> list[tuple[str, slice | None]]:
    """kohya name -> [(checkpoint weight key it modifies, row slice or None)]. OpenCLIP q/k/v
    (SD2 te, SDXL te2) give rows of `attn.in_proj_weight` (3d, d): `weight[rows]` is the (d, d)
    block the delta adds to. d is the real model's width unless `width` is given (tiny models)."""
    part, _ = split_kohya_name(kohya_name)
    if part == "unet":
        return [(UNET_CHECKPOINT_PREFIX + unet_ldm_path(kohya_name, arch) + ".weight", None)]
    prefix, hf_path = te_hf_path(kohya_name)
    te = _te_checkpoint(arch, prefix)
    if te.family == "clip":
        return [(te.prefix + hf_path + ".weight", None)]
    oc_path, chunk = hf_to_openclip(hf_path)
    return [(te.prefix + _openclip_weight_key(oc_path), _row_slice(chunk, te, width))]


def checkpoint_to_kohya(key: str, arch: str,
                        width: int | None = None) -> list[tuple[str, slice | None]]:
    """Checkpoint weight key -> [(kohya name, row slice or None)]: three entries (q, k, v rows)
    for an OpenCLIP `in_proj_weight`, one for other module weights, [] for keys no kohya module
    names (biases, VAE, bare parameters, unknown or extra keys). `width` as in
    `kohya_to_checkpoint`."""
    _layout(arch)
    try:
        if key.startswith(UNET_CHECKPOINT_PREFIX) and key.endswith(".weight"):
            path = key[len(UNET_CHECKPOINT_PREFIX):-len(".weight")]
            return [(unet_kohya_name(path, arch), None)]
        for part in TE_PARTS[arch]:
            te = _CHECKPOINT_TE[arch][part]
            if not key.startswith(te.prefix):
                continue
            rest = key[len(te.prefix):]
            if te.family == "clip":
                if rest.endswith(".weight"):
                    return [(te_kohya_name(part, rest[:-len(".weight")]), None)]
                return []
            if rest.endswith(".in_proj_weight"):
                path = rest[:-len("_weight")]
            elif rest.endswith(".weight"):
                path = rest[:-len(".weight")]
            else:
                return []
            return [(te_kohya_name(part, hf), _row_slice(chunk, te, width))
                    for hf, chunk in openclip_to_hf(path)]
    except KeyMapError:
        return []
    return []
