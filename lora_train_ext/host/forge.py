"""Forge (lllyasviel/stable-diffusion-webui-forge, its 2024+ `backend/` rewrite) as a host.

Forge keeps the WebUI's surface for the queue lock, progress, txt2img, the Lora folder and files
(`WebUIHost` serves those, inherited), but its model is another thing. Facts used here, read in
Forge's source (paths relative to its root):

- `shared.sd_model` (modules/shared_items.py -> `sd_models.model_data`) is a `FakeInitialModel`
  placeholder until `sd_models.forge_model_reload()` loads the checkpoint chosen in
  `model_data.forge_loading_parameters['checkpoint_info']` (modules/sd_models.py), then a
  `ForgeDiffusionEngine` (backend/diffusion_engine/base.py), not an nn.Module, with flags
  `is_sd1` / `is_sd2` / `is_sdxl` / `is_sd3`, `is_inpaint`, `sd_checkpoint_info`,
  `current_lora_hash`, and `forge_objects` / `forge_objects_original` /
  `forge_objects_after_applying_lora` (ForgeObjects: `unet`, `clip`, `vae`).
- `forge_objects.unet` is a UnetPatcher (backend/patcher/unet.py) over a KModel
  (backend/modules/k_model.py): `.model.diffusion_model` is the UNet with LDM module paths
  (backend/nn/unet.py, `forward(x, timesteps, context, y, ...)`), `.model.predictor` holds
  `prediction_type` ('epsilon' / 'v_prediction') and `alphas_cumprod` (backend/modules/
  k_prediction.py), `.model.storage_dtype` / `.computation_dtype` the weights' and the
  arithmetic's dtypes (backend/loader.py).
- `forge_objects.clip.cond_stage_model` is a ModuleDict (backend/patcher/clip.py) of
  IntegratedCLIP (backend/nn/clip.py) under `clip_l` (SD1, SDXL), `clip_h` (SD2, a 23-layer
  HF CLIP: backend/huggingface/stabilityai/stable-diffusion-2-1/text_encoder/config.json),
  `clip_g` (SDXL); `.transformer` is the HF CLIPTextModel. The engine conditions with
  `text_processing_engine` (SD1/SD2) or `text_processing_engine_l` / `_g` (SDXL;
  backend/text_processing/classic_engine.py): calling it with a list of prompts runs the encoder
  (clip skip, final layer norm, pooled output with the projection for `clip_g`), and on its
  first call moves `position_embedding` / `token_embedding` to fp32. SDXL's size conditioning
  is `sd_model.embedder` (Timestep(256)) over height, width, crop top, crop left, target height,
  target width (backend/diffusion_engine/sdxl.py).
- `forge_objects.vae.first_stage_model` is IntegratedAutoencoderKL (backend/nn/vae.py):
  `encoder`, `quant_conv`, `process_in(latent) = (latent - shift_factor) * scaling_factor`;
  Forge's own `encode_first_stage` samples the posterior (not deterministic).
- Linear layers are `ForgeOperations.Linear` (backend/operations.py), a plain `torch.nn.Module`
  with `in_features`, `out_features`, `weight`, `bias` (not nn.Linear); its Conv2d subclasses
  nn.Conv2d. Quantised storage has other Linear classes (bnb nf4/fp4, GGUF) and fp8 weights with
  an optional `scale_weight`.
- The engine is built under `torch.inference_mode` (backend/loader.py `forge_loader`,
  modules/sd_models.py `forge_model_reload`): every weight is an inference tensor, which
  autograd cannot save for backward and which has no version counter.
- backend/memory_management.py moves models: `load_models_gpu(patchers)` loads each patcher's
  model, partly to the GPU when the "GPU Weights (MB)" slider (`forge_inference_memory`,
  modules_forge/main_entry.py) leaves too little room (the rest stays in CPU memory and is
  streamed per layer), and calls the patcher's `refresh_loras()`.
- LoRAs: the sd_forge_lora extension (extensions-builtin/sd_forge_lora/networks.py) clones the
  original patchers, adds patches (`ModelPatcher.add_patches`, backend/patcher/base.py) and keeps
  `sd_model.current_lora_hash` to skip work when the same files at the same strengths come
  again; files are read through `load_lora_state_dict`, an `lru_cache` by file name. The model's
  `lora_loader` (LoraLoader, backend/patcher/lora.py) merges patches into new Parameters,
  keeping the originals in `backup`, and `refresh(lora_patches={})` puts them back; its
  `loaded_hash` skips a refresh for the same patch keys. Its loader reads LoRA / LoCon, LoHa,
  LoKr, GLoRA, DoRA (`dora_scale`) and full (`diff`) modules, not IA3 or OFT
  (packages_3rdparty/comfyui_lora_collection/lora.py).
- Prompt caches are class attributes of three items: `StableDiffusionProcessing.cached_c /
  cached_uc`, `StableDiffusionProcessingTxt2Img.cached_hr_c / cached_hr_uc`
  (modules/processing.py). `shared.state` adds `stopping_generation` (modules/shared_state.py).
- Attention: backend/nn/unet.py calls the module-level `attention_function` it imported from
  backend/attention.py (`attention_pytorch`, `attention_xformers`, `attention_split`,
  `attention_sub_quad`, `attention_basic`).

How a run gets the model (`prepared_model`): load it if still the placeholder; drop Forge's
LoRA state (back to the original patchers and Parameters); load everything to the GPU and refuse
partial loading or quantised storage; then give every weight a form autograd can use. That last
step costs no copy: `plain_alias` makes a normal tensor over the inference tensor's memory
(`Tensor.set_` on its storage), so the memory is shared and nothing is written. (The documented
way, `with torch.inference_mode(False): p.data = p.data.clone()`, copies every tensor and, for a
moment, holds two of each.) The aliases sit in the modules' parameter tables while the run
trains; Forge's own objects go back at the end, and whenever Forge generates in between (a pause,
samples), so Forge only ever sees its own objects. Weights are never written: the aliases'
memory is the originals', so the model comes back bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.bundle import ModelBundle
from ..core.errors import UserError
from .base import Host, ModelInfo
from .webui import WebUIHost, _encoder_sha256

QUANTISED_STORAGE = ("nf4", "fp4", "gguf")
FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
TRAIN_SAFE_ATTENTION = ("attention_pytorch", "attention_xformers")
STALE_LORA_HASH = "lora-train-ext: files changed"  # forces Forge's LoraLoader to merge again
GPU_WEIGHTS = ("the 'GPU Weights (MB)' slider at the top of the page (or the free GPU memory) "
               "leaves too little room for the whole model: raise GPU Weights, close other "
               "programs that use the GPU, or start Forge without --always-low-vram")
PART_LABELS = {"unet": "UNet", "clip": "text encoders", "vae": "VAE"}
PART_HINTS = {"unet": "start Forge without --always-offload-from-vram / --always-no-vram / "
                      "--always-cpu",
              "clip": "start Forge with --always-gpu (Forge keeps the text encoders in CPU "
                      "memory with this GPU or VRAM setting)",
              "vae": "start Forge without --vae-in-cpu"}
LOW_BITS = ("set 'Diffusion in Low Bits' at the top of the page to Automatic and load an fp16, "
            "bf16 or fp32 checkpoint (fp8, nf4, fp4 and GGUF weights cannot be trained)")


@contextlib.contextmanager
def outside_inference_mode():
    """Leave inference mode if a caller is in it (outputs then are normal tensors), keeping the
    grad mode as it is; nothing otherwise. (`torch.inference_mode(False)` alone turns gradients
    on.)"""
    if not torch.is_inference_mode_enabled():
        yield
        return
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def plain_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor over the same memory as `t` (an inference tensor, or any tensor): same
    storage, offset, shape and strides, no copy. Autograd can save it and it has a version
    counter; writes through it are writes to `t`'s memory. Parameters stay Parameters (with the
    same requires_grad)."""
    with outside_inference_mode(), torch.no_grad():
        out = torch.empty(0, dtype=t.dtype, device=t.device)
        out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    if isinstance(t, nn.Parameter):
        return nn.Parameter(out, requires_grad=t.requires_grad)
    return out


_IN_PLACE_ARITHMETIC = {"add_": torch.Tensor.add, "sub_": torch.Tensor.sub,
                        "mul_": torch.Tensor.mul, "div_": torch.Tensor.div}


class _OutOfPlaceArithmetic(TorchFunctionMode):
    """While gradients are on, `x += n`, `h *= s` and the like on tensors autograd tracks run as
    `x = x + n`: Forge's UNet blocks (backend/nn/unet.py BasicTransformerBlock._forward `x += n`,
    ResBlock._forward `h *= (1 + scale); h += shift`) update in place tensors that the layer
    norms before them saved for backward, which autograd refuses ("modified by an inplace
    operation"). Values are the same; Python rebinds the name to the returned tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        alt = _IN_PLACE_ARITHMETIC.get(getattr(func, "__name__", ""))
        if alt is not None and torch.is_grad_enabled() and args and \
                any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return alt(*args, **kwargs)
        return func(*args, **kwargs)


def _forge_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's modules that route their forward through `_forward` (Forge's
    BasicTransformerBlock and ResBlock, where its in-place arithmetic is)."""
    return [mod for mod in unet.modules() if callable(getattr(type(mod), "_forward", None))]


def _autograd_safe_forward(module: nn.Module):
    original = type(module).forward.__get__(module)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        with _OutOfPlaceArithmetic():
            return original(*args, **kwargs)

    forward.lora_train_ext_out_of_place = True
    return forward


@dataclass
class _Slot:
    """One tensor of the model while a run holds it."""

    module: nn.Module
    table: str  # '_parameters' or '_buffers'
    name: str
    original: torch.Tensor  # Forge's object
    alias: torch.Tensor  # what the run trains with (same memory)


@dataclass
class _Held:
    """The model as a run holds it: Forge's tensors and their aliases, slot by slot."""

    slots: list[_Slot] = field(default_factory=list)
    installed: bool = False

    @classmethod
    def make(cls, roots: list[nn.Module]) -> "_Held":
        held = cls()
        aliases: dict[int, torch.Tensor] = {}  # a tensor shared by two modules keeps one alias
        seen: set[int] = set()
        for root in roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for table in ("_parameters", "_buffers"):
                    for name, t in getattr(module, table).items():
                        if t is None:
                            continue
                        alias = aliases.get(id(t))
                        if alias is None:
                            alias = aliases[id(t)] = plain_alias(t)
                        held.slots.append(_Slot(module, table, name, t, alias))
        return held

    def install(self) -> None:
        for s in self.slots:
            getattr(s.module, s.table)[s.name] = s.alias
        self.installed = True

    def give_back(self) -> None:
        """Forge's own objects into the modules (at the end, and while Forge generates)."""
        for s in self.slots:
            getattr(s.module, s.table)[s.name] = s.original
        self.installed = False

    def take_back(self) -> None:
        """After Forge had the model: every tensor must hold the values it held (Forge may have
        moved or replaced its objects, never with other values once its LoRA patches are
        removed); the run's aliases go back in. UserError when a value differs."""
        changed = []
        with torch.no_grad():
            for s in self.slots:
                now = getattr(s.module, s.table).get(s.name)
                if now is s.alias or (now is s.original and
                                      now.data_ptr() == s.alias.data_ptr()):
                    continue  # the same memory: the same values
                if now is None or now.shape != s.alias.shape or now.dtype != s.alias.dtype or \
                        not torch.equal(now.detach().to(s.alias.device), s.alias):
                    changed.append(s.name)
        if changed:
            raise UserError("model", f"{len(changed)} weights of the model hold other values "
                                     "after Forge generated (another model, or a LoRA left "
                                     "merged); the run's state is saved: resume it")
        self.install()


def _is_placeholder(m) -> bool:
    return m is None or not hasattr(m, "forge_objects")


def _text_engines(m) -> list:
    return [e for e in (getattr(m, n, None) for n in ("text_processing_engine",
                                                      "text_processing_engine_l",
                                                      "text_processing_engine_g"))
            if e is not None]


def _roots(m) -> dict[str, nn.Module]:
    """The three models Forge manages for an SD engine: the KModel (UNet and predictor), the
    text encoders' ModuleDict and the VAE."""
    fo = m.forge_objects_original
    return {"unet": fo.unet.model, "clip": fo.clip.cond_stage_model,
            "vae": fo.vae.first_stage_model}


def _patchers(m) -> list:
    fo = m.forge_objects_original
    return [fo.unet, fo.clip.patcher, fo.vae.patcher]


def _checkpoint_arch(path: str) -> tuple[str, str]:
    """(arch, why not) of a checkpoint file from its safetensors header (nothing is loaded);
    cached by the file's size and time (the tab asks for the model every second)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "", f"the chosen checkpoint {os.path.basename(path)} is not there"
    return _checkpoint_arch_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _checkpoint_arch_cached(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    from ..core.models.checkpoint_file import CheckpointFile, detect_arch

    try:
        ck = CheckpointFile.open(path)
        return detect_arch(ck.shapes, os.path.basename(path)), ""
    except UserError as e:
        return "", e.message


class ForgeHost(WebUIHost):
    """The resident Forge model (see the module's docstring); the rest as the WebUI's."""

    name = "forge"

    def __init__(self):
        super().__init__()
        self._held: _Held | None = None
        self._saved_attention_fn = None
        self._saved_clip_skip: list[tuple[object, int]] = []
        self._blocks: list[nn.Module] = []  # Forge's UNet blocks given autograd-safe forwards

    # -- model ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        from modules import shared

        m = shared.sd_model
        if _is_placeholder(m):
            return self._placeholder_info()
        info = getattr(m, "sd_checkpoint_info", None)
        name = getattr(info, "name_for_extra", None) or getattr(info, "title", "") or "checkpoint"
        arch = "sdxl" if getattr(m, "is_sdxl", False) else "sd2" if getattr(m, "is_sd2", False) \
            else "sd1" if getattr(m, "is_sd1", False) else ""
        if getattr(m, "is_sd3", False):
            arch = ""
        kmodel = m.forge_objects_original.unet.model
        predictor = getattr(kmodel, "predictor", None)
        kind = getattr(predictor, "prediction_type", "epsilon")
        prediction = "v" if kind == "v_prediction" else "epsilon"
        problem = ""
        if not arch:
            problem = "this model type cannot be trained (SD1.x, SD2.x and SDXL can)"
        elif getattr(m, "is_inpaint", False) or \
                getattr(kmodel.diffusion_model, "in_channels", 4) != 4:
            problem = "inpainting and depth models cannot be trained; load a text-to-image model"
        elif arch == "sdxl" and getattr(m, "text_processing_engine_l", None) is None:
            problem = ("this SDXL model lacks the CLIP-L + OpenCLIP bigG text encoder pair (a "
                       "refiner?); only SDXL base-type models can be trained")
        elif kind not in ("epsilon", "v_prediction") or \
                getattr(predictor, "alphas_cumprod", None) is None:
            problem = f"this model's prediction type ({kind}) cannot be trained"
        else:
            problem = self._storage_problem(m)
        return ModelInfo(name=name, arch=arch, prediction=prediction,
                         hash=getattr(info, "shorthash", "") or "", problem=problem,
                         default_resolution=1024 if arch == "sdxl" else 768 if prediction == "v" else 512,
                         default_dtype=self._default_dtype_for(self._storage_dtype(m)))

    def _placeholder_info(self) -> ModelInfo:
        """Forge loads the checkpoint on the first generation; until then the model is read
        from the chosen file's header (a run loads it when it starts)."""
        from modules import sd_models

        params = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
        ck = params.get("checkpoint_info")
        if ck is None:
            return ModelInfo(name="(none)", arch="", problem="no checkpoint is chosen")
        name = getattr(ck, "name_for_extra", None) or getattr(ck, "title", "") or "checkpoint"
        path = getattr(ck, "filename", "") or ""
        arch, why = _checkpoint_arch(path) if path.lower().endswith(".safetensors") else \
            ("", "Forge has not loaded it yet: generate one image, then train")
        return ModelInfo(name=name, arch=arch, hash=getattr(ck, "shorthash", "") or "",
                         problem=why, default_resolution=1024 if arch == "sdxl" else 512,
                         default_dtype=self._default_dtype_for(None))

    @staticmethod
    def _storage_dtype(m):
        return getattr(m.forge_objects_original.unet.model, "storage_dtype", None)

    def _storage_problem(self, m) -> str:
        """Why the weights cannot be trained as stored ('' when they can)."""
        storage = self._storage_dtype(m)
        if storage in QUANTISED_STORAGE or storage in FLOAT8:
            return f"the UNet is stored as {storage}: {LOW_BITS}"
        for part, root in _roots(m).items():
            for module in root.modules():
                if getattr(module, "scale_weight", None) is not None:
                    return f"the {part} holds scaled fp8 weights: {LOW_BITS}"
                for p in module._parameters.values():
                    if p is None:
                        continue
                    if p.dtype in FLOAT8 or hasattr(p, "gguf_cls") or \
                            hasattr(p, "bnb_quantized") or p.dtype == torch.uint8:
                        flag = " (start Forge without --clip-in-fp8-e4m3fn / " \
                               "--clip-in-fp8-e5m2)" if part == "clip" else ""
                        return f"the {part} is stored as {p.dtype}{flag}: {LOW_BITS}"
        return ""

    def _default_dtype_for(self, storage) -> str:
        """What the device runs fast (`core.device.preferred_dtype`); a half-precision model
        off the GPU trains in bf16 only."""
        from ..core.device import preferred_dtype

        device = self.device()
        if device is not None and device.type == "cuda":
            return preferred_dtype(device)
        if storage not in (None, torch.float32):
            return "bf16"
        return preferred_dtype(device) if device is not None else "fp32"

    def device(self) -> torch.device | None:
        """Where Forge loads models to (backend/memory_management.py `get_torch_device`)."""
        try:
            from backend import memory_management
        except ImportError:
            return None
        return torch.device(memory_management.get_torch_device())

    def weights_dtype(self) -> torch.dtype | None:
        from modules import shared

        m = shared.sd_model
        if _is_placeholder(m):
            return None
        storage = self._storage_dtype(m)
        if isinstance(storage, torch.dtype):
            return storage
        return next(m.forge_objects_original.unet.model.diffusion_model.parameters()).dtype

    def check_config(self, cfg) -> None:
        algo = cfg.network.algo
        if algo == "ia3":
            raise UserError("network.algo", "Forge cannot use IA3 files: its LoRA loader reads "
                                            "LoRA, LoCon, LoHa, LoKr, DoRA and full files, not "
                                            "IA3; choose another algorithm")
        if algo in ("oft", "boft"):
            raise UserError("network.algo", f"Forge cannot use {algo.upper()} files: its LoRA "
                                            "loader reads LoRA, LoCon, LoHa, LoKr, DoRA and full "
                                            "files; choose another algorithm")
        dtype = self.weights_dtype()
        if cfg.train.dtype == "fp32" and dtype is not None and dtype != torch.float32:
            raise UserError("train.dtype", "the loaded model is stored in half precision "
                                           "(Forge's default): use bf16 or fp16, or start Forge "
                                           "with --all-in-fp32 to train in fp32")

    # -- preparing and giving back --------------------------------------------------------------
    def _loaded_model(self):
        """shared.sd_model, loaded by Forge first when it is still the placeholder."""
        from modules import sd_models, shared

        m = shared.sd_model
        if _is_placeholder(m):
            params = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
            if params.get("checkpoint_info") is None:
                raise UserError("model", "no checkpoint is chosen: pick one at the top of the page")
            sd_models.forge_model_reload()
            m = shared.sd_model
        if _is_placeholder(m):
            raise UserError("model", "Forge did not load the checkpoint")
        return m

    def _drop_forge_loras(self, m) -> None:
        """Back to the original patchers (no LoRA patches), Forge's LoRA bookkeeping reset so
        the next generation applies its prompt's LoRAs afresh, and the merged weights replaced
        by the originals Forge kept (`LoraLoader.refresh({})`). No-op when nothing is merged."""
        fo = m.forge_objects_original
        m.forge_objects = fo.shallow_copy()
        m.forge_objects_after_applying_lora = fo.shallow_copy()
        m.current_lora_hash = str([])
        networks = _forge_networks_module()
        if networks is not None:
            networks.loaded_networks.clear()
        for patcher in _patchers(m):
            loader = getattr(patcher, "lora_loader", None)
            if loader is not None:
                loader.refresh(lora_patches={}, offload_device=patcher.offload_device)

    def _load_whole(self, m) -> torch.device:
        """All three models to Forge's device, entirely; UserError when Forge streams a part
        from CPU memory or keeps a model on another device."""
        from backend import memory_management

        memory_management.load_models_gpu(_patchers(m))
        device = torch.device(memory_management.get_torch_device())
        for part, root in _roots(m).items():
            label = PART_LABELS[part]
            streamed = any(type(module).__name__.startswith("DynamicSwap_") or
                           hasattr(module, "prev_parameters_manual_cast")
                           for module in root.modules())
            places = {t.device for t in list(root.parameters()) + list(root.buffers())}
            if streamed or len(places) > 1:
                raise UserError("model", f"Forge streams part of the {label} from CPU memory: "
                                         f"{GPU_WEIGHTS}; training needs the whole model on "
                                         f"{device}")
            if places and places != {device}:
                raise UserError("model", f"Forge keeps the {label} on {places.pop()}, not on "
                                         f"{device}: {PART_HINTS[part]}; training needs the "
                                         "whole model on one device")
        return device

    @staticmethod
    def _settle_text_encoders(m) -> None:
        """What Forge's text engine does to the encoder on its first call (position and token
        embeddings to fp32), done now, as Forge does it: otherwise the run's first conditioning
        would replace those weights mid-run."""
        with torch.inference_mode():
            for engine in _text_engines(m):
                emb = engine.text_encoder.transformer.text_model.embeddings
                emb.position_embedding = emb.position_embedding.to(dtype=torch.float32)
                emb.token_embedding = emb.token_embedding.to(dtype=torch.float32)

    @contextlib.contextmanager
    def prepared_model(self) -> Iterator[ModelBundle]:
        from modules import devices

        m = self._loaded_model()
        info = self.model_info()
        if info.problem:
            raise UserError("model", info.problem)
        self._drop_forge_loras(m)
        device = self._load_whole(m)
        self._settle_text_encoders(m)
        held = _Held.make(list(_roots(m).values()))
        held.install()
        self._held = held
        self._blocks = _forge_blocks(m.forge_objects_original.unet.model.diffusion_model)
        try:
            self._use_training_attention()
            self._set_clip_skip(m)
            yield self._bundle(m, info, device)
        finally:
            self._held = None
            held.give_back()
            self._restore_clip_skip()
            self._restore_attention()
            self._blocks = []
            devices.torch_gc()

    def _set_clip_skip(self, m) -> None:
        """The clip skip the WebUI's setting asks for, as Forge's processing sets it before it
        conditions (modules/processing.py `get_conds_with_caching`)."""
        from modules import shared

        self._saved_clip_skip = [(e, e.clip_skip) for e in _text_engines(m)]
        m.set_clip_skip(int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1))

    def _restore_clip_skip(self) -> None:
        for engine, value in self._saved_clip_skip:
            engine.clip_skip = value
        self._saved_clip_skip = []

    def _bundle(self, m, info: ModelInfo, device: torch.device) -> ModelBundle:
        """The bundle: text-encoder roots are the HF CLIPTextModels (`clip_l` / `clip_h` /
        `clip_g` `.transformer`, paths `text_model.encoder.layers.N...`, kohya's names); the
        conditioning is Forge's text engines run outside inference mode (with gradients when the
        caller has them on); SDXL's vector gets each image's own sizes."""
        fo = m.forge_objects_original
        kmodel = fo.unet.model
        unet = kmodel.diffusion_model
        vae = fo.vae.first_stage_model
        clip = fo.clip.cond_stage_model
        if info.arch == "sdxl":
            text_encoders = {"te1": clip.clip_l.transformer, "te2": clip.clip_g.transformer}
        elif info.arch == "sd2":
            text_encoders = {"te": clip.clip_h.transformer}
        else:
            text_encoders = {"te": clip.clip_l.transformer}
        vae_dtype = next(vae.parameters()).dtype
        compute = getattr(kmodel, "computation_dtype", None)
        if not isinstance(compute, torch.dtype):
            compute = next(unet.parameters()).dtype

        def encode(images: torch.Tensor) -> torch.Tensor:
            """The posterior's mean (Forge's own encode samples it), scaled as Forge does."""
            with outside_inference_mode(), torch.no_grad():
                x = images.to(device=device, dtype=vae_dtype)
                z = vae.encoder(x)
                if getattr(vae, "quant_conv", None) is not None:
                    z = vae.quant_conv(z)
                latents = vae.process_in(z.chunk(2, dim=1)[0]).float()
            if not torch.isfinite(latents).all():
                raise UserError("model", "the VAE gave NaN/inf latents (a half-precision VAE "
                                         "overflowing?): start Forge with --vae-in-fp32 or use "
                                         "an fp16-fixed VAE")
            return latents

        if info.arch == "sdxl":
            def condition(captions: list[str], sizes=None):
                with outside_inference_mode():
                    return _sdxl_condition(m, list(captions), sizes, info.default_resolution)
        else:
            engine = m.text_processing_engine

            def condition(captions: list[str], sizes=None):
                with outside_inference_mode():
                    return engine(list(captions))

        def denoise(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            cast = not torch.is_autocast_enabled() and compute != torch.float32
            if info.arch == "sdxl":
                context, y = cond["crossattn"], cond["vector"]
                if cast:
                    x, context, y = x.to(compute), context.to(compute), y.to(compute)
                return unet(x, t, context=context, y=y)
            if cast:
                x, cond = x.to(compute), cond.to(compute)
            return unet(x, t, context=cond)

        alphas = kmodel.predictor.alphas_cumprod
        return ModelBundle(
            arch=info.arch, unet=unet, text_encoders=text_encoders, vae=vae,
            encode=encode, condition=condition, denoise=denoise, prediction=info.prediction,
            alphas_cumprod=alphas.detach().double().cpu(), model_name=info.name,
            model_hash=info.hash, resolution=info.default_resolution, device=device,
            vae_id=self._forge_vae_id(info, vae),
        )

    @staticmethod
    def _forge_vae_id(info: ModelInfo, vae: nn.Module) -> str:
        """The checkpoint's hash when Forge uses the checkpoint's own VAE (no additional
        modules chosen), else a sha256 of the encoder's weights."""
        try:
            from modules import sd_models

            extra = (sd_models.model_data.forge_loading_parameters or {}).get(
                "additional_modules") or []
        except Exception:
            extra = None
        if info.hash and extra == []:
            return f"{info.hash}:checkpoint"
        return "weights:" + _encoder_sha256(vae, getattr(vae, "scaling_factor", 1.0))

    # -- attention ------------------------------------------------------------------------------
    def _use_training_attention(self) -> None:
        """Train with PyTorch's SDP attention unless Forge's choice is SDP or xformers already
        (its split / sub-quadratic / basic kernels are written for inference), and with Forge's
        UNet blocks' in-place arithmetic made out of place (`_OutOfPlaceArithmetic`; instance
        forwards, so gradient checkpointing's recomputation goes through them too)."""
        for block in self._blocks:
            if "forward" not in block.__dict__:
                block.forward = _autograd_safe_forward(block)
        self._saved_attention_fn = None
        try:
            from backend import attention
            from backend.nn import unet as forge_unet
        except ImportError:
            return
        current = getattr(forge_unet, "attention_function", None)
        if getattr(current, "__name__", "") in TRAIN_SAFE_ATTENTION:
            return
        sdp = getattr(attention, "attention_pytorch", None)
        if sdp is None or not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return
        self._saved_attention_fn = current
        forge_unet.attention_function = sdp

    def _restore_attention(self) -> None:
        for block in self._blocks:
            if getattr(block.__dict__.get("forward"), "lora_train_ext_out_of_place", False):
                del block.forward
        if self._saved_attention_fn is None:
            return
        from backend.nn import unet as forge_unet

        forge_unet.attention_function = self._saved_attention_fn
        self._saved_attention_fn = None

    # -- Forge's LoRA state and caches ------------------------------------------------------------
    def unload_baked_networks(self) -> int:
        """Forge's merged LoRAs out of the weights (its originals back); 1 when the model is
        loaded, 0 for the placeholder."""
        from modules import shared

        m = shared.sd_model
        if _is_placeholder(m):
            return 0
        self._drop_forge_loras(m)
        return 1

    def hot_load(self, paths: list[str]) -> None:
        """New files listed, rewritten ones read again: Forge's file cache (`lru_cache` by file
        name) cleared, `current_lora_hash` reset and every LoraLoader told its merge is stale, so
        the next generation reads and merges the files afresh. Touches no weight (a snapshot's
        hot-load comes mid-run)."""
        networks = _forge_networks_module()
        if networks is not None:
            networks.list_available_networks()
            cache_clear = getattr(networks.load_lora_state_dict, "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
            for path in paths:
                getattr(networks, "networks_in_memory", {}).pop(
                    os.path.splitext(os.path.basename(path))[0], None)
        from modules import shared

        m = shared.sd_model
        if not _is_placeholder(m):
            fo = m.forge_objects_original
            m.current_lora_hash = str([])
            m.forge_objects = fo.shallow_copy()
            m.forge_objects_after_applying_lora = fo.shallow_copy()
            for patcher in _patchers(m):
                loader = getattr(patcher, "lora_loader", None)
                if loader is not None and loader.loaded_hash != str([]):
                    loader.loaded_hash = STALE_LORA_HASH
        self.clear_conditioning_cache()

    def clear_conditioning_cache(self) -> None:
        """Forge's prompt caches hold three items (arguments, result, extra parameters)."""
        from modules import processing

        processing.StableDiffusionProcessing.cached_c = [None, None, None]
        processing.StableDiffusionProcessing.cached_uc = [None, None, None]
        processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None, None]
        processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None, None]

    def checkpoint_state(self) -> "_ForgeState":
        """The loaded model's UNet and text-encoder tensors under checkpoint names, as plain
        aliases of Forge's (inference) tensors, so writes through them write the model. Forge's
        text encoders are HF CLIP models: SD1's and SDXL's CLIP-L are named as in checkpoints;
        SD2's and SDXL's OpenCLIP towers are renamed (keys.hf_to_openclip) and their q/k/v fused
        into `in_proj_weight` / `in_proj_bias` copies that `checkpoint_written` copies back. The
        VAE is left out (no LoRA changes it; Save takes it from the checkpoint file)."""
        from ..core import keys

        m = self._loaded_model()
        arch = self.model_info().arch
        fo = m.forge_objects_original
        state = _ForgeState()
        for k, t in fo.unet.model.diffusion_model.state_dict(keep_vars=True).items():
            state[keys.UNET_CHECKPOINT_PREFIX + k] = plain_alias(t)
        clip = fo.clip.cond_stage_model
        parts = {"sd1": {"te": "clip_l"}, "sd2": {"te": "clip_h"},
                 "sdxl": {"te1": "clip_l", "te2": "clip_g"}}.get(arch, {})
        for part, name in parts.items():
            prefix = keys.checkpoint_prefix(arch, part)
            tensors = getattr(clip, name).transformer.state_dict(keep_vars=True)
            if keys.te_family(arch, part) == "clip":
                for k, t in tensors.items():
                    state[prefix + k] = plain_alias(t)
                continue
            fused: dict[str, list] = {}
            for k, t in tensors.items():
                path, _, kind = k.rpartition(".")
                if kind not in ("weight", "bias"):
                    continue
                try:
                    oc_path, chunk = keys.hf_to_openclip(path)
                except keys.KeyMapError:
                    continue  # embeddings, projection: no LoRA changes them
                if chunk is None:
                    state[f"{prefix}{oc_path}.{kind}"] = plain_alias(t)
                else:
                    fused.setdefault(f"{prefix}{oc_path}_{kind}", []).append((chunk.index, t))
            for key, chunks in fused.items():
                chunks.sort(key=lambda c: c[0])
                if [i for i, _ in chunks] != [0, 1, 2]:
                    continue
                aliases = [plain_alias(t) for _, t in chunks]
                with torch.no_grad():
                    state[key] = torch.cat([a.detach() for a in aliases], dim=0)
                state.fused[key] = aliases
        return state

    def checkpoint_written(self, state: dict) -> None:
        """The fused OpenCLIP q/k/v copies written back into Forge's q_proj / k_proj / v_proj."""
        for key, aliases in getattr(state, "fused", {}).items():
            rows = [a.shape[0] for a in aliases]
            with torch.no_grad():
                for alias, piece in zip(aliases, torch.split(state[key], rows, dim=0)):
                    if not torch.equal(alias, piece.to(alias.device)):
                        alias.copy_(piece)

    def save_state(self, changed=()) -> dict:
        """What Save writes: the loaded checkpoint file's tensors (so the VAE and every key keep
        the file's names) with the model's UNet and text-encoder tensors in their places;
        UserError when the file lacks a `changed` key."""
        from safetensors.torch import load_file

        from modules import sd_models

        m = self._loaded_model()
        info = getattr(m, "sd_checkpoint_info", None)
        path = getattr(info, "filename", "") or ""
        if not path.lower().endswith(".safetensors") or not os.path.isfile(path):
            raise UserError("merge", "Save needs the loaded checkpoint as a .safetensors file "
                                     f"(Forge loaded {os.path.basename(path) or 'no file'}); "
                                     "merge into a file with `python -m lora_train_ext merge` "
                                     "instead")
        extra = (getattr(sd_models.model_data, "forge_loading_parameters", None) or {}).get(
            "additional_modules") or []
        if extra:
            raise UserError("merge", "Forge uses modules beside the checkpoint ("
                                     + ", ".join(os.path.basename(str(e)) for e in extra)
                                     + "); Save writes the checkpoint file's own VAE and text "
                                     "encoders: choose 'None' for them at the top of the page "
                                     "(or merge into a file with `python -m lora_train_ext "
                                     "merge`)")
        model = self.checkpoint_state()
        out = load_file(path)
        missing = [k for k in changed if k not in out]
        if missing:
            raise UserError("merge", f"{os.path.basename(path)} does not name "
                                     f"{len(missing)} of the model's tensors as checkpoints do "
                                     f"(e.g. {missing[0]}); merge into a file with "
                                     "`python -m lora_train_ext merge` instead")
        for k, t in model.items():
            if k in out:
                out[k] = t.detach()
        return out

    def release_networks(self) -> None:
        self.unload_baked_networks()

    # -- lending the model to Forge (pause, samples) ------------------------------------------------
    def lend_model(self, snapshot: str) -> dict:
        """Paused: Forge's own objects and attention back, the snapshot hot-loaded, the queue
        lock let go."""
        from modules import shared

        self._restore_attention()
        if self._held is not None:
            self._held.give_back()
        token = Host.lend_model(self, snapshot)
        token["model_object"] = id(shared.sd_model)
        shared.state.textinfo = f"Training LoRA: paused; test <lora:{os.path.splitext(os.path.basename(snapshot))[0]}>"
        return token

    def take_model_back(self, token: dict) -> None:
        """The lock again, the same model object, Forge's LoRAs out, every weight checked to hold
        its values and the run's aliases back in."""
        from modules import shared

        Host.take_model_back(self, token)
        m = shared.sd_model
        if id(m) != token.get("model_object"):
            raise UserError("model", "Forge loaded another model object while the run was "
                                     "paused; its state is saved: resume it from its state folder")
        self._take_back(m)
        shared.state.interrupted = False
        shared.state.skipped = False
        if hasattr(shared.state, "stopping_generation"):
            shared.state.stopping_generation = False

    def _take_back(self, m) -> None:
        self._drop_forge_loras(m)
        if self._held is not None:
            self._held.take_back()
        self._use_training_attention()

    def interrupt_requested(self) -> bool:
        from modules import shared

        state = shared.state
        return bool(state.interrupted or state.skipped or getattr(state, "stopping_generation", False))

    def generate(self, prompts, negative, seed, steps, width, height, cfg_scale,
                 sampler_name: str = ""):
        """Forge's txt2img; during a run (samples) on Forge's own objects with the run's adapter
        hooked in, and the run's aliases back afterwards."""
        held = self._held if self._held is not None and self._held.installed else None
        if held is None:
            return super().generate(prompts, negative, seed, steps, width, height, cfg_scale,
                                    sampler_name)
        from modules import shared

        self._restore_attention()
        held.give_back()
        try:
            return super().generate(prompts, negative, seed, steps, width, height, cfg_scale,
                                    sampler_name)
        finally:
            self._take_back(shared.sd_model)


class _ForgeState(dict):
    """checkpoint key -> tensor; `fused`: OpenCLIP in_proj copies -> Forge's q, k, v aliases."""

    def __init__(self):
        super().__init__()
        self.fused: dict[str, list[torch.Tensor]] = {}


def _forge_networks_module():
    """sd_forge_lora's `networks` module (it has `load_lora_state_dict`), if loaded."""
    mod = sys.modules.get("networks")
    return mod if mod is not None and hasattr(mod, "load_lora_state_dict") else None


def _sdxl_condition(m, captions: list[str], sizes, resolution: int) -> dict:
    """{'crossattn', 'vector'} as Forge's SDXL `get_learned_conditioning` builds them
    (backend/diffusion_engine/sdxl.py), outside inference mode and with each image's own
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w) where Forge takes one size for the
    batch and the crop from its settings; no zeroing of empty captions (Forge zeroes only an
    all-empty negative prompt)."""
    cond_l = m.text_processing_engine_l(captions)
    cond_g, pooled = m.text_processing_engine_g(captions)
    rows = [tuple(float(v) for v in s) for s in sizes] if sizes else \
        [(resolution, resolution, 0, 0, resolution, resolution)] * len(captions)
    if len(rows) != len(captions):
        raise ValueError(f"{len(rows)} sizes for {len(captions)} captions")
    table = torch.tensor(rows, dtype=torch.float32)
    flat = m.embedder(table.reshape(-1)).reshape(len(rows), -1).to(pooled)
    return {"crossattn": torch.cat([cond_l, cond_g], dim=2),
            "vector": torch.cat([pooled, flat], dim=1)}
