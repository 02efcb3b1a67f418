"""Single-file Stable Diffusion checkpoints as the WebUI reads them: SD1.x, SD2.x (epsilon or v)
and SDXL base, in `.safetensors` (or a pickled `.ckpt`, only when allowed).

- `CheckpointFile.open(path)` reads the tensor table only (names, shapes, dtypes, offsets and the
  metadata of a safetensors header; a `.ckpt` must be unpickled, which can run code it holds, so
  it is refused unless `allow_pickle`). Old SD1 files without the `text_model.` level are renamed
  as the WebUI renames them.
- `detect_arch(shapes)` tells the architecture from key names and a few shapes, and refuses what
  cannot be trained with a reason: inpainting (UNet input conv with 9 channels), depth (5) and
  instruct-pix2pix (8) models, the SDXL refiner (only OpenCLIP bigG in the conditioner), unCLIP,
  LoRA / VAE / diffusers-format files, anything unknown.
- `match_size(arch, shapes)` finds the model widths whose every tensor shape equals the file's:
  the real SD1.5 / SD2.1 / SDXL widths or the tiny look-alikes of `specs.py` (heads and group
  counts do not show in shapes, so only known widths are accepted).
- `load_checkpoint(path)` builds the in-code models on the meta device, allocates them once in
  the base dtype on the target device and streams every tensor from the file into them, in file
  order, one at a time: there is never a second full copy in memory (peak extra = the largest
  tensor). The same pass computes the file's sha256 (the WebUI's model hash, first 10 digits).
- The prediction type (`detect_prediction`): a `NAME.yaml` beside the file (the WebUI's own rule:
  `parameterization: "v"`), else the file's `modelspec.prediction_type` metadata, else a `v_pred`
  key, else for SD2 the WebUI's forward test (`sd_models_config.is_using_v_parameterization_for_sd2`:
  the UNet at timestep 999 on an input of 0.5 everywhere and a context of 0.5 everywhere; v when
  the mean of output - input is below -1), else epsilon.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..errors import UserError
from .clip import CLIP_VOCAB, clip_bpe_tokenizer
from .openclip import causal_mask
from .specs import SPECS, build_unet, build_vae
from .tiny import (assemble_bundle, build_text_encoders, checkpoint_keys, default_prediction)

FIELD = "model.checkpoint"
VAE_FIELD = "model.vae"
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 16 * 1024 * 1024

# the WebUI's renames for SD1 files saved before CLIPTextModel had its `text_model` level
_LEGACY_PREFIXES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.":
        "cond_stage_model.transformer.text_model.final_layer_norm.",
}

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
UNET_OUT = "model.diffusion_model.out.2.weight"
SD1_TE = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
SD2_TE = "cond_stage_model.model.ln_final.weight"
SDXL_TE1 = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
SDXL_TE2 = "conditioner.embedders.1.model.ln_final.weight"
REFINER_TE = "conditioner.embedders.0.model.ln_final.weight"
VAE_PREFIX = "first_stage_model."


def fix_key(key: str) -> str:
    for old, new in _LEGACY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


@dataclass
class _Entry:
    name: str  # the name in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte offsets in the file (safetensors)
    end: int = 0


@dataclass
class CheckpointFile:
    """A checkpoint's tensor table. `shapes`: key (WebUI names, legacy SD1 names fixed) ->
    shape; `metadata`: the safetensors header's `__metadata__` ({} for a .ckpt)."""

    path: str
    kind: str  # 'safetensors' | 'pickle'
    entries: dict[str, _Entry]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0
    file_size: int = 0
    _tensors: dict[str, torch.Tensor] | None = None  # a .ckpt's state dict (memory-mapped)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    @classmethod
    def open(cls, path: str, allow_pickle: bool = False, field_name: str = FIELD) -> "CheckpointFile":
        if not os.path.isfile(path):
            raise UserError(field_name, f"file not found: {path}")
        name = os.path.basename(path)
        if path.lower().endswith(PICKLE_EXTENSIONS):
            if not allow_pickle:
                raise UserError(field_name, f"{name} is a pickle file: loading it runs any code "
                                            "stored in it; convert it to .safetensors, or pass "
                                            "--allow-ckpt if you trust where it came from")
            return _open_pickle(os.path.abspath(path), os.path.getmtime(path), field_name)
        return _open_safetensors(path, field_name)

    # -- reading ------------------------------------------------------------------------------
    def stream(self, targets: dict[str, torch.Tensor], hasher=None,
               extra_hashers: dict[str, object] | None = None) -> set[str]:
        """Copy each file tensor named in `targets` (key -> an allocated tensor of the same
        shape, any dtype and device) into it, in file order, one tensor at a time; return the
        keys filled. hasher: a hashlib object fed every byte of the file in order (safetensors;
        a .ckpt is hashed in a separate pass). extra_hashers: key prefix -> hashlib object fed
        the raw bytes of the tensors under that prefix."""
        extra_hashers = extra_hashers or {}
        if self.kind == "pickle":
            return self._stream_pickle(targets, hasher, extra_hashers)
        filled: set[str] = set()
        scratch = torch.empty(0, dtype=torch.uint8)
        order = sorted(self.entries.items(), key=lambda kv: kv[1].begin)
        with open(self.path, "rb", buffering=0) as f:
            header = f.read(self.data_start)
            if hasher is not None:
                hasher.update(header)
            pos = self.data_start
            for key, e in order:
                if e.begin > pos:  # a gap (not written by safetensors itself): hash, skip
                    pos = _skip(f, e.begin - pos, hasher, pos)
                n = e.end - e.begin
                dest = targets.get(key)
                if dest is None:
                    pos = _skip(f, n, hasher, pos) if e.end > pos else pos
                    continue
                if tuple(dest.shape) != e.shape:
                    raise UserError(FIELD, f"{key} is {_shape(e.shape)} in the file; the model "
                                           f"needs {_shape(dest.shape)}")
                direct = (dest.device.type == "cpu" and dest.dtype == e.dtype
                          and dest.is_contiguous() and n > 0)
                if direct:
                    buf = dest.detach().reshape(-1).view(torch.uint8)
                else:
                    if scratch.numel() < n:
                        scratch = torch.empty(n, dtype=torch.uint8)
                    buf = scratch[:n]
                view = memoryview(buf.numpy()) if n else memoryview(b"")
                _read_into(f, view, self.path)
                pos += n
                if hasher is not None:
                    hasher.update(view)
                for prefix, h in extra_hashers.items():
                    if key.startswith(prefix):
                        h.update(view)
                if not direct and n:
                    with torch.no_grad():
                        dest.copy_(buf.view(e.dtype).reshape(e.shape))
                filled.add(key)
            if hasher is not None:  # anything after the last tensor
                while True:
                    rest = f.read(_CHUNK)
                    if not rest:
                        break
                    hasher.update(rest)
        return filled

    def _stream_pickle(self, targets, hasher, extra_hashers) -> set[str]:
        filled = set()
        with torch.no_grad():
            for key, dest in targets.items():
                t = self._tensors.get(key) if self._tensors is not None else None
                if t is None:
                    continue
                if tuple(dest.shape) != tuple(t.shape):
                    raise UserError(FIELD, f"{key} is {_shape(t.shape)} in the file; the model "
                                           f"needs {_shape(dest.shape)}")
                dest.copy_(t)
                for prefix, h in extra_hashers.items():
                    if key.startswith(prefix):
                        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
                filled.add(key)
        if hasher is not None:
            with open(self.path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    hasher.update(chunk)
        return filled

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.entries)


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def _read_into(f, view: memoryview, path: str) -> None:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise UserError(FIELD, f"{os.path.basename(path)} ends early (truncated?)")
        done += got


def _skip(f, n: int, hasher, pos: int) -> int:
    if hasher is None:
        f.seek(n, os.SEEK_CUR)
        return pos + n
    left = n
    while left > 0:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            raise UserError(FIELD, f"{getattr(f, 'name', 'the file')} ends early (truncated?)")
        hasher.update(chunk)
        left -= len(chunk)
    return pos + n


def _open_safetensors(path: str, field_name: str) -> CheckpointFile:
    name = os.path.basename(path)
    size = os.path.getsize(path)

    def bad(why: str) -> UserError:
        return UserError(field_name, f"{name} is not a safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("too short")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise bad("no valid header")
        try:
            table = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise bad("its header is not JSON") from None
    if not isinstance(table, dict):
        raise bad("its header is not a table")
    meta = table.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, _Entry] = {}
    for key, info in table.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r}: unknown dtype or bad entry") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != numel * itemsize or begin < 0 or data_start + end > size:
            raise bad(f"tensor {key!r} does not fit the file (truncated?)")
        fixed = fix_key(key)
        entries[fixed] = _Entry(key, dtype, shape, data_start + begin, data_start + end)
    return CheckpointFile(path=path, kind="safetensors", entries=entries,
                          metadata={str(k): str(v) for k, v in meta.items()},
                          data_start=data_start, file_size=size)


@lru_cache(maxsize=1)
def _open_pickle(path: str, mtime: float, field_name: str) -> CheckpointFile:
    """Unpickle once per file and modification time (the preflight and the loader share it);
    memory-mapped where the file is torch's zip format."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(field_name, f"cannot read {os.path.basename(path)}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(field_name, f"{os.path.basename(path)} holds no state dict")
    tensors = {fix_key(str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    entries = {k: _Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    return CheckpointFile(path=path, kind="pickle", entries=entries, file_size=os.path.getsize(path),
                          _tensors=tensors)


# -- what a file is ------------------------------------------------------------------------------
def detect_arch(shapes: dict[str, tuple[int, ...]], name: str = "the file") -> str:
    """'sd1', 'sd2' or 'sdxl' from the key names (and the UNet's input channels); UserError with
    what the file is instead where it cannot be trained."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    def refuse(what: str) -> UserError:
        return UserError(FIELD, f"{name} is {what}")

    if UNET_IN not in shapes:
        if has("lora_") or any(".lora_down." in k or ".hada_w1_a" in k for k in shapes):
            raise refuse("a LoRA / LyCORIS file, not a checkpoint")
        if "encoder.conv_in.weight" in shapes or "first_stage_model.encoder.conv_in.weight" in shapes:
            raise refuse("a VAE only; give it with --vae (model.vae) next to a checkpoint")
        if "conv_in.weight" in shapes or has("down_blocks."):
            raise refuse("a diffusers-format UNet; give a single-file checkpoint (the WebUI's "
                         "format)")
        raise refuse("not a Stable Diffusion checkpoint (it has no UNet "
                     "`model.diffusion_model.*`)")
    if REFINER_TE in shapes and SDXL_TE1 not in shapes:
        raise refuse("an SDXL refiner (its conditioner has only OpenCLIP bigG); only SDXL "
                     "base-type models can be trained")
    if has("depth_model."):
        raise refuse("a depth model (SD2 depth); load a text-to-image model")
    if has("embedder.model.") or has("noise_augmentor."):
        raise refuse("an unCLIP model; load a text-to-image model")
    if has("cond_stage_model.roberta."):
        raise refuse("an AltDiffusion model (XLM-R text encoder), which cannot be trained")
    unet_in = shapes[UNET_IN]
    channels = unet_in[1] if len(unet_in) == 4 else -1
    if channels != 4:
        what = {9: "an inpainting model (its UNet takes 9 input channels)",
                5: "a depth model (its UNet takes 5 input channels)",
                8: "an instruct-pix2pix model (its UNet takes 8 input channels)"}.get(
            channels, f"no text-to-image model (its UNet takes {channels} input channels, not 4)")
        raise refuse(what + "; load a text-to-image model")
    label = "model.diffusion_model.label_emb.0.0.weight" in shapes
    if SDXL_TE2 in shapes and SDXL_TE1 in shapes:
        arch = "sdxl"
    elif SD2_TE in shapes:
        arch = "sd2"
    elif SD1_TE in shapes:
        arch = "sd1"
    else:
        raise refuse("a model of unknown type: no SD1 (CLIP-L), SD2 (OpenCLIP ViT-H) or SDXL "
                     "(CLIP-L + OpenCLIP bigG) text encoder keys")
    if label != (arch == "sdxl"):
        raise refuse(f"a model of unknown type ({ARCH_NAMES[arch]} text encoder, but the UNet "
                     f"{'has' if label else 'lacks'} a class/size embedding)")
    return arch


@lru_cache(maxsize=8)
def expected_shapes(arch: str, size: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of the in-code models of `arch` at `size` (built on meta)."""
    parts = _meta_parts(arch, size)
    return {full: tuple(t.shape) for _, _, full, t in checkpoint_keys(arch, parts)}


def _meta_parts(arch: str, size: str) -> list[tuple[str, torch.nn.Module]]:
    unet = build_unet(arch, size, device="meta")
    vae = build_vae(arch, size, device="meta")
    tes = build_text_encoders(arch, size, device="meta")
    return [("unet", unet), ("vae", vae), *tes.items()]


def match_size(arch: str, shapes: dict[str, tuple[int, ...]], name: str = "the file",
               vae_given: bool = False) -> str:
    """'real' or 'tiny': the widths whose every tensor the file has with the same shape (the
    VAE's not needed when `vae_given`). UserError naming the first differences otherwise."""
    best = None
    for size in SPECS[arch]:
        want = expected_shapes(arch, size)
        missing, wrong = [], []
        for key, shape in want.items():
            if vae_given and key.startswith(VAE_PREFIX):
                continue
            have = shapes.get(key)
            if have is None:
                missing.append(key)
            elif tuple(have) != shape:
                wrong.append(f"{key} is {_shape(have)}, expected {_shape(shape)}")
        if not missing and not wrong:
            return size
        score = len(missing) + len(wrong)
        if best is None or score < best[0]:
            best = (score, size, missing, wrong)
    _, size, missing, wrong = best
    title = f"{ARCH_NAMES[arch]} ({'the real widths' if size == 'real' else 'tiny test widths'})"
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensors have other shapes (e.g. {wrong[0]})")
    if missing:
        parts.append(f"{len(missing)} tensors are missing (e.g. {missing[0]})")
    raise UserError(FIELD, f"{name} does not have the layout of {title}: {'; '.join(parts)}")


def vae_shapes(vae: CheckpointFile) -> dict[str, tuple[int, ...]]:
    """A VAE file's tensors under checkpoint names (`first_stage_model.` + key), with or without
    the prefix in the file; the WebUI's ignored keys (loss.*, model_ema.*) left out."""
    out = {}
    for key, e in vae.entries.items():
        if key.startswith(("loss.", "model_ema.")):
            continue
        out[key if key.startswith(VAE_PREFIX) else VAE_PREFIX + key] = e.shape
    return out


def check_vae(vae: CheckpointFile, arch: str, size: str) -> None:
    shapes = vae_shapes(vae)
    want = {k: s for k, s in expected_shapes(arch, size).items() if k.startswith(VAE_PREFIX)}
    missing = [k for k in want if k not in shapes]
    wrong = [k for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    if missing or wrong:
        example = (missing or wrong)[0][len(VAE_PREFIX):]
        raise UserError(VAE_FIELD, f"{os.path.basename(vae.path)} is not a VAE for this "
                                   f"{ARCH_NAMES[arch]} model ({len(missing)} tensors missing, "
                                   f"{len(wrong)} of other shapes, e.g. {example})")


def needs_real_tokenizer(shapes: dict[str, tuple[int, ...]]) -> bool:
    """True when a text encoder has CLIP's real vocabulary (49408 ids)."""
    return any(k.endswith("token_embedding.weight") and v and v[0] == CLIP_VOCAB
               for k, v in shapes.items())


@dataclass
class CheckpointCheck:
    arch: str
    size: str
    file: CheckpointFile
    vae: CheckpointFile | None = None


def inspect_checkpoint(path: str, vae_path: str = "", allow_pickle: bool = False,
                       tokenizer: bool = True) -> CheckpointCheck:
    """Everything that can be told before building anything: readable, arch, widths, VAE file,
    tokenizer vocabulary (unless `tokenizer` is False). UserError (model.checkpoint or
    model.vae) on the first problem."""
    ck = CheckpointFile.open(path, allow_pickle)
    name = os.path.basename(path)
    arch = detect_arch(ck.shapes, name)
    vae = CheckpointFile.open(vae_path, allow_pickle, VAE_FIELD) if vae_path else None
    size = match_size(arch, ck.shapes, name, vae_given=vae is not None)
    if vae is not None:
        check_vae(vae, arch, size)
    if tokenizer and needs_real_tokenizer(ck.shapes):
        clip_bpe_tokenizer()  # raises UserError when CLIP's vocabulary is not installed
    return CheckpointCheck(arch, size, ck, vae)


# -- prediction type ------------------------------------------------------------------------------
_YAML_PARAM = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)[\"']?\s*(#.*)?$", re.M)


def prediction_from_files(ck: CheckpointFile) -> tuple[str, str] | None:
    """(prediction, how) from what the file and its neighbours say, or None."""
    yaml_path = os.path.splitext(ck.path)[0] + ".yaml"
    if os.path.isfile(yaml_path):
        with open(yaml_path, encoding="utf-8", errors="replace") as f:
            m = _YAML_PARAM.search(f.read())
        # the WebUI builds the model from this config; without the key ldm means eps
        value = m.group(1).lower() if m else "eps"
        return ("v" if value == "v" else "epsilon", f"from {os.path.basename(yaml_path)}")
    meta = ck.metadata.get("modelspec.prediction_type", "").strip().lower()
    if meta in ("v", "v_prediction", "v-prediction"):
        return "v", "from its metadata"
    if meta in ("epsilon", "eps"):
        return "epsilon", "from its metadata"
    if "v_pred" in ck.entries:
        return "v", "from its v_pred key"
    return None


@torch.no_grad()
def forward_test_is_v(unet: torch.nn.Module, context_dim: int) -> bool:
    """The WebUI's SD2 test: mean(unet(0.5, t=999, context 0.5) - 0.5) < -1 means v. Run in the
    UNet's own dtype and device (autocast where it is not fp32)."""
    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=p.device)
    t = torch.tensor([999], device=p.device)
    context = torch.full((1, 2, context_dim), 0.5, device=p.device)
    with torch.autocast(p.device.type, dtype=p.dtype, enabled=p.dtype != torch.float32):
        out = unet(x, t, context=context)
    return float((out.float() - x).mean()) < -1


def detect_prediction(arch: str, ck: CheckpointFile, unet: torch.nn.Module | None,
                      context_dim: int) -> tuple[str, str]:
    """(prediction, how): 'from NAME.yaml', 'from its metadata', 'detected' (SD2's forward
    test), or 'default' (SD1 / SDXL: epsilon)."""
    found = prediction_from_files(ck)
    if found:
        return found
    if arch == "sd2" and unet is not None:
        return ("v" if forward_test_is_v(unet, context_dim) else "epsilon"), "detected"
    return default_prediction("sd1"), "default"


# -- loading --------------------------------------------------------------------------------------
BASE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadInfo:
    path: str
    arch: str
    size: str
    prediction: str
    how: str  # where the prediction type came from: 'given', 'detected', 'from ...', 'default'
    base_dtype: str
    sha256: str = ""
    vae_path: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        pred = "v-prediction" if self.prediction == "v" else "epsilon"
        return f"checkpoint: {self.arch}, {pred} ({self.how})"


def load_checkpoint(path: str, *, vae_path: str = "", device: str | torch.device = "cpu",
                    base_dtype: str = "fp32", prediction: str = "auto", allow_pickle: bool = False,
                    hash_file: bool = True, tokenizer: str = "auto",
                    checked: CheckpointCheck | None = None):
    """(ModelBundle, LoadInfo) for a checkpoint file, its weights streamed into models built in
    place (see the module's docstring).

    base_dtype: 'fp32', 'fp16' or 'bf16' for the UNet and text encoders; the VAE stays fp32
    unless bf16 (an fp16 SD VAE overflows). prediction: 'auto' (detect) or 'epsilon' / 'v'.
    tokenizer: 'auto' (CLIP's real one for real vocabularies, the offline stand-in for tiny
    ones) or 'stand-in' (speed measurements on random weights only).
    """
    import time

    t0 = time.time()
    check = checked or inspect_checkpoint(path, vae_path, allow_pickle, tokenizer == "auto")
    arch, size, ck = check.arch, check.size, check.file
    device = torch.device(device)
    dtype = BASE_DTYPES[base_dtype]
    vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32

    parts = _meta_parts(arch, size)
    built: list[tuple[str, torch.nn.Module]] = []
    for part, module in parts:
        module = module.to(vae_dtype if part == "vae" else dtype)
        module = module.to_empty(device=device)
        _fill_buffers(module)
        built.append((part, module))
    modules = dict(built)

    targets = {full: t for part, _, full, t in checkpoint_keys(arch, built)
               if not (check.vae is not None and part == "vae")}
    hasher = hashlib.sha256() if hash_file else None
    vae_hasher = hashlib.sha256()
    filled = ck.stream(targets, hasher, {VAE_PREFIX: vae_hasher})
    vae_filled: set[str] = set()
    if check.vae is not None:
        vae_targets = {full: t for part, _, full, t in checkpoint_keys(arch, built) if part == "vae"}
        by_file_key = {}
        for key in check.vae.entries:
            full = key if key.startswith(VAE_PREFIX) else VAE_PREFIX + key
            if full in vae_targets:
                by_file_key[key] = vae_targets[full]
        vae_hasher = hashlib.sha256()
        vae_filled = {k if k.startswith(VAE_PREFIX) else VAE_PREFIX + k
                      for k in check.vae.stream(by_file_key, vae_hasher)}
        filled |= vae_filled
    if ck.kind == "pickle" or (check.vae is not None and check.vae.kind == "pickle"):
        _open_pickle.cache_clear()  # let the unpickled tensors go
        ck._tensors = None
    missing = [k for k in (targets if check.vae is None else {**targets, **vae_targets})
               if k not in filled]
    if missing:
        raise UserError(FIELD, f"{os.path.basename(path)} lacks {len(missing)} tensors of "
                               f"{ARCH_NAMES[arch]} (e.g. {missing[0]})")

    unet_spec = SPECS[arch][size].unet
    if prediction == "auto":
        prediction, how = detect_prediction(arch, ck, modules["unet"], unet_spec.context_dim)
    else:
        how = "given"
    tok = None
    if tokenizer == "auto" and needs_real_tokenizer(ck.shapes):
        tok = clip_bpe_tokenizer()
    sha = hasher.hexdigest() if hasher is not None else ""
    vae_digest = vae_hasher.hexdigest()[:16]
    text_encoders = {p: m for p, m in built if p not in ("unet", "vae")}
    bundle = assemble_bundle(
        arch, size, modules["unet"], modules["vae"], text_encoders, prediction=prediction,
        device=device, model_name=os.path.splitext(os.path.basename(path))[0],
        model_hash=sha[:10], vae_id=f"sha256:{vae_digest}",
        extras={"checkpoint": os.path.abspath(path), "vae_file": vae_path}, tokenizer=tok)
    info = LoadInfo(path=os.path.abspath(path), arch=arch, size=size, prediction=prediction,
                    how=how, base_dtype=base_dtype, sha256=sha, vae_path=vae_path,
                    seconds=round(time.time() - t0, 3))
    return bundle, info


def _fill_buffers(module: torch.nn.Module) -> None:
    """Buffers that are no checkpoint tensor, computed as their modules compute them: CLIP's
    `position_ids` (0..n-1) and OpenCLIP's causal `attn_mask`. Any other buffer outside the state
    dict would be left uninitialised by `to_empty`: refuse it."""
    persistent = set(module.state_dict().keys())
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand(buf.shape))
            elif name.endswith("attn_mask"):
                buf.copy_(causal_mask(buf.shape[-1]).to(buf.dtype))
            elif name not in persistent:
                raise RuntimeError(f"buffer {name} of {type(module).__name__} has no value after "
                                   "building on the meta device; teach _fill_buffers about it")


def resolve_base_dtype(base_dtype: str, train_dtype: str, device: torch.device | str) -> str:
    """'auto': fp32 on the CPU; on a GPU the training precision (bf16 / fp16) or fp32."""
    if base_dtype != "auto":
        return base_dtype
    if torch.device(device).type == "cpu":
        return "fp32"
    return train_dtype if train_dtype in ("bf16", "fp16") else "fp32"


__all__ = ["CheckpointFile", "LoadInfo", "detect_arch", "detect_prediction", "expected_shapes",
           "forward_test_is_v", "inspect_checkpoint", "load_checkpoint", "match_size",
           "resolve_base_dtype", "BASE_DTYPES"]
