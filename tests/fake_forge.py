"""A stand-in for the parts of Forge (lllyasviel/stable-diffusion-webui-forge, its 2024+ `backend/`
rewrite) that `lora_train_ext.host.forge` uses, around the tiny SD1 / SD2 / SDXL models.

Each fact below was read in Forge's source (paths relative to its root):
- backend/operations.py: `using_forge_operations(...)` swaps `torch.nn.Linear`, `Conv2d` (and
  other ops) for `ForgeOperations`' classes while a model is built. `ForgeOperations.Linear` is a
  plain `torch.nn.Module` with `in_features`, `out_features`, `weight`, `bias`, `scale_weight`
  and `parameters_manual_cast`; its forward is `F.linear` with the weight (and bias) cast to the
  input's device and dtype when `parameters_manual_cast`. `ForgeOperations.Conv2d` subclasses
  `torch.nn.Conv2d` (its `reset_parameters` does nothing: weights come from the checkpoint; here
  they keep nn.Conv2d's init so that a seed gives the tiny models' weights).
- backend/loader.py `forge_loader` and modules/sd_models.py `forge_model_reload` run under
  `torch.inference_mode()`: every weight is an inference tensor. `forge_model_reload` replaces
  the `FakeInitialModel` placeholder in `sd_models.model_data` (modules/shared_items.py makes
  `shared.sd_model` read it) with the engine of `model_data.forge_loading_parameters
  ['checkpoint_info']`.
- backend/loader.py: text encoders are `IntegratedCLIP(CLIPTextModel, config,
  add_text_projection=True)` (backend/nn/clip.py: `.transformer`, `.logit_scale`,
  `.transformer.text_projection`); the UNet has LDM module paths (backend/nn/unet.py); the VAE
  is IntegratedAutoencoderKL (backend/nn/vae.py: `encoder`, `quant_conv`, `scaling_factor`,
  `shift_factor`, `process_in`, `encode(x, regulation=None)` returning a *sample*); the UNet's
  KModel (backend/modules/k_model.py) carries `storage_dtype`, `computation_dtype` and
  `predictor` (backend/modules/k_prediction.py: `prediction_type`, buffer `alphas_cumprod`).
- backend/diffusion_engine/sd15.py, sd20.py, sdxl.py: `forge_objects` (ForgeObjects(unet, clip,
  vae, clipvision), base.py, with `shallow_copy()`), `forge_objects_original`,
  `forge_objects_after_applying_lora`, `current_lora_hash = str([])`; SD1 `clip_l` (clip skip
  1, final layer norm), SD2 `clip_h` (23 layers: backend/huggingface/stabilityai/
  stable-diffusion-2-1/text_encoder/config.json; clip skip 1, final layer norm), SDXL `clip_l`
  (minimal clip skip 2, no final norm) and `clip_g` (minimal clip skip 2, no final norm, pooled
  output through `text_projection`); `text_processing_engine(_l/_g)`, `embedder = Timestep(256)`
  (16 here: the tiny SDXL's size width), `set_clip_skip`, `get_learned_conditioning` and
  `encode_first_stage` under `torch.inference_mode()`; flags `is_sd1/is_sd2/is_sdxl/is_sd3`,
  `is_inpaint`.
- backend/text_processing/classic_engine.py `encode_with_transformers`: moves
  `embeddings.position_ids` to the text encoder's device and `position_embedding` /
  `token_embedding` to fp32 (module `.to`, every call), runs the transformer with
  `output_hidden_states=True`, takes `hidden_states[-max(clip_skip, minimal_clip_skip)]`, the
  final layer norm when asked, the pooled output (through `text_projection` for `clip_g`).
  Tokenisation here is the tiny models' (77 ids), not Forge's 75-token chunks.
- backend/patcher/base.py ModelPatcher: `model`, `load_device`, `offload_device`, `lora_patches`
  ({(filename, strength_patch, strength_model, online_mode): {key: [patches]}}),
  `object_patches`, `clone()`, `add_patches(filename=, patches=, strength_patch=,
  strength_model=, online_mode=)`, `refresh_loras()`, `model.lora_loader` shared by clones;
  backend/patcher/clip.py CLIP (`cond_stage_model` a ModuleDict, `patcher`, `clone()`);
  backend/patcher/vae.py VAE (`first_stage_model`, `patcher`, `vae_dtype`, `clone()`).
- backend/patcher/lora.py LoraLoader.refresh (under inference_mode): returns when
  `str(list(lora_patches.keys()))` equals `loaded_hash`; else puts every `backup` Parameter back,
  then merges each key's patches into a new `Parameter(requires_grad=False)`, keeping the
  original in `backup`; `merge_lora_to_weight` ('lora' patches: up @ down * strength * alpha /
  rank, in fp32; with `dora_scale` through `weight_decompose`, whose norm axis follows the
  scale's shape: output axis when `dora_scale.shape[0] == weight.shape[0]`, else the input axis,
  plus `finfo(dtype).eps`, and the strength scaling the final change).
- backend/memory_management.py: `current_loaded_models` (LoadedModel: `model` = a patcher,
  `model_accelerated`, equality by patcher identity), `load_models_gpu(models)` (a new one:
  `unload_model_clones`, then `model_load`, which moves the model and calls `refresh_loras()`;
  a model that does not fit is partly left in CPU memory: its modules get
  `prev_parameters_manual_cast` and `parameters_manual_cast = True`), `get_torch_device()`,
  `soft_empty_cache()`. `stream_next_load` here makes the next load stream one module.
- backend/nn/unet.py BasicTransformerBlock: `forward` -> `checkpoint(self._forward, ...)`, whose
  `_forward` adds the attention and feed-forward branches to `x` in place (`x += n`); ResBlock
  `_forward` likewise (`h *= (1 + scale)`, `h += shift`). Here the tiny UNet's transformer blocks
  run that way (`ForgeTransformerBlock`).
- backend/attention.py: `attention_pytorch`, `attention_split`, ...; backend/nn/unet.py imports
  `attention_function` as a module global.
- extensions-builtin/sd_forge_lora/networks.py: `load_lora_state_dict` (`functools.lru_cache`
  by file name), `load_networks(names, te_multipliers, unet_multipliers)` (compiled targets
  [filename, unet, te, online] hashed into `current_lora_hash`; when equal nothing happens, else
  the original patchers are cloned with the files' patches and `forge_objects_after_applying_lora`
  is set), `list_available_networks()`, `available_networks`, `loaded_networks`,
  `networks_in_memory`. The key map (kohya name -> parameter key) is Forge's
  (`model_lora_keys_unet` / `_clip`), built here from our own name functions.
- modules/sd_models.py `forge_model_reload`: `sd_model.sd_checkpoint_info = checkpoint_info` (the
  chosen one, `.filename` its path) and `sd_model.filename = checkpoint_info.filename` (here the
  engine keeps its own info object with the chosen file's path).
- modules/processing.py: prompt caches `cached_c / cached_uc` (and Txt2Img `cached_hr_c /
  cached_hr_uc`) of three items; `process_images` runs under `torch.inference_mode()`,
  `forge_model_reload()`, `forge_objects = forge_objects_original.shallow_copy()`, activates the
  prompt's extra networks, then `forge_objects_after_applying_lora.shallow_copy()`, conditions and
  samples (here: one UNet call and a VAE decode). modules/shared_state.py: `stopping_generation`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import fake_webui
from lora_train_ext.core import keys

REAL_LINEAR = torch.nn.Linear
REAL_CONV2D = torch.nn.Conv2d
_OPS = {"manual_cast": False}


class ForgeLinear(torch.nn.Module):
    """backend/operations.py ForgeOperations.Linear: not an nn.Linear."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *a, **k):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        ref = REAL_LINEAR(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = ref.weight
        self.bias = ref.bias
        self.scale_weight = None
        self.parameters_manual_cast = _OPS["manual_cast"]

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.parameters_manual_cast:
            weight = weight.to(device=x.device, dtype=x.dtype)
            bias = bias.to(device=x.device, dtype=x.dtype) if bias is not None else None
        return F.linear(x, weight, bias)


class ForgeConv2d(REAL_CONV2D):
    """backend/operations.py ForgeOperations.Conv2d: an nn.Conv2d subclass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parameters_manual_cast = _OPS["manual_cast"]

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.parameters_manual_cast:
            weight = weight.to(device=x.device, dtype=x.dtype)
            bias = bias.to(device=x.device, dtype=x.dtype) if bias is not None else None
        return self._conv_forward(x, weight, bias)


@contextlib.contextmanager
def using_forge_operations(manual_cast: bool = False):
    saved = torch.nn.Linear, torch.nn.Conv2d, _OPS["manual_cast"]
    torch.nn.Linear, torch.nn.Conv2d, _OPS["manual_cast"] = ForgeLinear, ForgeConv2d, manual_cast
    try:
        yield
    finally:
        torch.nn.Linear, torch.nn.Conv2d, _OPS["manual_cast"] = saved


# -- backend.patcher -------------------------------------------------------------------------
def set_attr_raw(obj, attr, value):  # backend/utils.py
    names = attr.split(".")
    for name in names[:-1]:
        obj = getattr(obj, name)
    setattr(obj, names[-1], value)


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """backend/patcher/lora.py `weight_decompose` (fp32 here, as LoraLoader.refresh merges)."""
    dora_scale = dora_scale.to(device=weight.device, dtype=torch.float32)
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff.type(weight.dtype)
    if dora_scale.shape[0] == weight_calc.shape[0]:  # the norm axis follows the scale's shape
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True) \
            .reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1) \
            .norm(dim=1, keepdim=True).reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)) \
            .transpose(0, 1)
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def merge_lora_to_weight(patches, weight):
    """backend/patcher/lora.py `merge_lora_to_weight` for 'lora' patches (with `dora_scale`),
    computed in fp32, returned in the weight's dtype."""
    dtype = weight.dtype
    weight = weight.to(torch.float32).clone()
    for strength, v, strength_model, _offset, _function in patches:
        if strength_model != 1.0:
            weight = weight * strength_model
        kind, (up, down, alpha, mid, dora_scale) = v
        assert kind == "lora" and mid is None
        mat1, mat2 = up.float().to(weight.device), down.float().to(weight.device)
        scale = alpha / mat2.shape[0] if alpha is not None else 1.0
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
        if dora_scale is not None:
            weight = weight_decompose(dora_scale, weight, diff, scale, strength)
        else:
            weight = weight + (strength * scale) * diff
    return weight.to(dtype)


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.refreshes = 0  # merges done (not in Forge)

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current
        for k, w in self.backup.items():
            set_attr_raw(self.model, k, w)
        self.backup = {}
        for (key, _online), current in all_patches.items():
            weight = get_attr(self.model, key)
            assert isinstance(weight, torch.nn.Parameter)
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            merged = merge_lora_to_weight(current, weight)
            set_attr_raw(self.model, key, torch.nn.Parameter(merged, requires_grad=False))
        self.refreshes += 1
        self.loaded_hash = hashes


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = current_device or offload_device
        self.lora_patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device, 0, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0,
                    online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        model_keys = {k for k, _ in self.model.named_parameters()}
        these, loaded = {}, set()
        for key, patch in patches.items():
            if key in model_keys:
                loaded.add(key)
                these.setdefault(key, []).append([strength_patch, patch, strength_model, None, None])
        self.lora_patches[identifier] = these
        return loaded

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def forge_patch_model(self, target_device=None):
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device
        return self.model

    def forge_unpatch_model(self, target_device=None):
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device


class UnetPatcher(ModelPatcher):
    pass


class CLIP:
    def __init__(self, model_dict=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = torch.nn.ModuleDict(model_dict)
        self.patcher = ModelPatcher(self.cond_stage_model, torch.device("cpu"), torch.device("cpu"))

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


class VAE:
    def __init__(self, model):
        self.first_stage_model = model.eval()
        self.vae_dtype = next(model.parameters()).dtype
        self.latent_channels = 4
        self.patcher = ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))

    def decode(self, z):
        return self.first_stage_model.decode(z)


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


# -- models ------------------------------------------------------------------------------------
class Prediction(torch.nn.Module):
    def __init__(self, prediction_type: str):
        super().__init__()
        from lora_train_ext.core.models.tiny import sd_alphas_cumprod

        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().float())


class KModel(torch.nn.Module):
    def __init__(self, model, prediction_type: str):
        super().__init__()
        self.diffusion_model = model
        self.predictor = Prediction(prediction_type)
        self.storage_dtype = next(model.parameters()).dtype
        self.computation_dtype = self.storage_dtype


class IntegratedCLIP(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        hidden = transformer.config.hidden_size
        self.transformer.text_projection = torch.nn.Linear(hidden, hidden, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))


class Timestep(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        from lora_train_ext.core.models.unet import timestep_embedding

        return timestep_embedding(t, self.dim)


class TextEngine:
    """ClassicTextProcessingEngine, as far as the host uses it."""

    def __init__(self, text_encoder, key, minimal_clip_skip, return_pooled, final_layer_norm,
                 text_projection=False):
        self.text_encoder = text_encoder
        self.embedding_key = key
        self.minimal_clip_skip = minimal_clip_skip
        self.clip_skip = minimal_clip_skip
        self.return_pooled = return_pooled
        self.final_layer_norm = final_layer_norm
        self.text_projection = text_projection

    def encode_with_transformers(self, tokens):
        emb = self.text_encoder.transformer.text_model.embeddings
        emb.position_ids = emb.position_ids.to(device=torch.device("cpu"))
        emb.position_embedding = emb.position_embedding.to(dtype=torch.float32)
        emb.token_embedding = emb.token_embedding.to(dtype=torch.float32)
        outputs = self.text_encoder.transformer(tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = self.text_encoder.transformer.text_model.final_layer_norm(z)
        if self.return_pooled:
            pooled = outputs.pooler_output
            if self.text_projection and self.embedding_key != "clip_l":
                pooled = self.text_encoder.transformer.text_projection(pooled)
            return z, pooled
        return z, None

    def __call__(self, texts):
        from lora_train_ext.core.models.clip import tokenize

        z, pooled = self.encode_with_transformers(tokenize(list(texts)))
        return (z, pooled) if self.return_pooled else z


class FakeInitialModel:
    """modules/sd_models.py: the placeholder before the first load."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class IntegratedVAE:
    """backend/nn/vae.py IntegratedAutoencoderKL's methods, put onto the tiny AutoencoderKL."""

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return latent / self.scaling_factor + self.shift_factor

    def encode(self, x, regulation=None):
        posterior = super().encode(x)
        return regulation(posterior) if regulation is not None else posterior.sample()


def _hf_clip(hidden, layers, heads, mlp, act, seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_train_ext.core.models.clip import build_clip_text

    if layers == 12 and act == "quick_gelu":
        return build_clip_text("sd1", "tiny", seed=seed)  # as the tiny bundle's (same weights)
    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=mlp,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=77, hidden_act=act, bos_token_id=512,
                            eos_token_id=513, pad_token_id=513)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval()


def _forge_transformer_blocks(unet):
    """The tiny UNet's transformer blocks as Forge's BasicTransformerBlock runs them."""
    from lora_train_ext.core.models.unet import BasicTransformerBlock as Block

    cls = type("BasicTransformerBlock", (ForgeTransformerBlock, Block), {})
    for module in unet.modules():
        if type(module) is Block:
            module.__class__ = cls


class ForgeTransformerBlock:
    """backend/nn/unet.py BasicTransformerBlock: `forward` calls `checkpoint(self._forward, ...)`
    (which just calls it), and `_forward` adds each branch to `x` in place: `x += n` after
    self-attention and cross-attention, `x += x_skip` after the feed-forward. Same values as
    the tiny block's `x = branch + x`."""

    def forward(self, x, context=None):
        return self._forward(x, context)

    def _forward(self, x, context=None):
        n = self.attn1(self.norm1(x))
        x += n
        n = self.attn2(self.norm2(x), context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class FakeForgeEngine:
    """A ForgeDiffusionEngine over the tiny models of `arch` (seeds as `build_bundle`'s)."""

    def __init__(self, arch: str, seed: int = 0, prediction: str | None = None):
        from lora_train_ext.core.models.specs import build_unet, build_vae
        from lora_train_ext.core.models.tiny import default_prediction

        prediction = prediction or default_prediction(arch)
        with using_forge_operations(), torch.random.fork_rng(devices=[]):
            unet = build_unet(arch, "tiny", seed=seed)
            vae = build_vae(arch, "tiny", seed=seed + 1)
            if arch == "sd1":
                clips = {"clip_l": IntegratedCLIP(_hf_clip(32, 12, 2, 64, "quick_gelu", seed + 2))}
            elif arch == "sd2":
                clips = {"clip_h": IntegratedCLIP(_hf_clip(32, 23, 2, 128, "gelu", seed + 2))}
            else:
                clips = {"clip_l": IntegratedCLIP(_hf_clip(32, 12, 2, 64, "quick_gelu", seed + 2)),
                         "clip_g": IntegratedCLIP(_hf_clip(32, 32, 2, 128, "gelu", seed + 3))}
            torch.manual_seed(seed + 10)  # the text projections (a checkpoint's, in Forge)
        _forge_transformer_blocks(unet)
        vae.__class__ = type("IntegratedAutoencoderKL", (IntegratedVAE, type(vae)), {})
        vae.scaling_factor, vae.shift_factor = vae.scale_factor, 0.0
        clip = CLIP(clips)
        self.forge_objects = ForgeObjects(
            unet=UnetPatcher(KModel(unet, "v_prediction" if prediction == "v" else "epsilon"),
                             torch.device("cpu"), torch.device("cpu")),
            clip=clip, vae=VAE(vae))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = (
            arch == "sd1", arch == "sd2", arch == "sdxl", False)
        self.is_inpaint = False
        self.arch = arch
        if arch == "sdxl":
            self.text_processing_engine_l = TextEngine(clip.cond_stage_model.clip_l, "clip_l", 2,
                                                       False, False)
            self.text_processing_engine_g = TextEngine(clip.cond_stage_model.clip_g, "clip_g", 2,
                                                       True, False, text_projection=True)
            self.embedder = Timestep(16)
        else:
            key = "clip_h" if arch == "sd2" else "clip_l"
            self.text_processing_engine = TextEngine(clip.cond_stage_model[key], key, 1, False,
                                                     True)
        self.sd_checkpoint_info = types.SimpleNamespace(
            name_for_extra=f"fake_forge_{arch}", title=f"fake_forge_{arch}.safetensors",
            shorthash="f0f0f0f0f0", filename=f"fake_forge_{arch}.safetensors")

    def set_clip_skip(self, clip_skip):
        for name in ("text_processing_engine", "text_processing_engine_l",
                     "text_processing_engine_g"):
            if hasattr(self, name):
                getattr(self, name).clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        if self.arch != "sdxl":
            return self.text_processing_engine(prompt)
        cond_l = self.text_processing_engine_l(prompt)
        cond_g, pooled = self.text_processing_engine_g(prompt)
        flat = self.embedder(torch.tensor([64.0, 64, 0, 0, 64, 64])).reshape(1, -1)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2),
                "vector": torch.cat([pooled, flat.repeat(pooled.shape[0], 1)], dim=1)}

    @torch.inference_mode()
    def encode_first_stage(self, x):
        vae = self.forge_objects.vae.first_stage_model
        return vae.process_in(vae.encode(x))


def roots(m) -> list[torch.nn.Module]:
    fo = m.forge_objects_original
    return [fo.unet.model, fo.clip.cond_stage_model, fo.vae.first_stage_model]


def slots(m) -> dict[str, torch.Tensor]:
    """Every parameter and buffer object of the engine's three models, by module path."""
    out = {}
    for i, root in enumerate(roots(m)):
        for path, module in root.named_modules():
            for table in ("_parameters", "_buffers"):
                for name, t in getattr(module, table).items():
                    if t is not None:
                        out[f"{i}.{path}.{name}"] = t
    return out


# -- sd_forge_lora ------------------------------------------------------------------------------
def key_map(m) -> dict[str, str]:
    """kohya module name -> parameter key of the UNet KModel ('unet') or the CLIP dict ('clip')."""
    from lora_train_ext.core.networks.base import module_kind

    out = {}
    fo = m.forge_objects_original
    for path, module in fo.unet.model.diffusion_model.named_modules():
        if module_kind(module):
            try:
                out[keys.unet_kohya_name(path, m.arch)] = ("unet", f"diffusion_model.{path}.weight")
            except keys.KeyMapError:
                continue
    parts = {"sd1": {"te": "clip_l"}, "sd2": {"te": "clip_h"},
             "sdxl": {"te1": "clip_l", "te2": "clip_g"}}[m.arch]
    for part, clip_key in parts.items():
        for path, module in fo.clip.cond_stage_model[clip_key].transformer.named_modules():
            if module_kind(module) and ".layers." in path:
                out[keys.te_kohya_name(part, path)] = ("clip", f"{clip_key}.transformer.{path}.weight")
    return out


def lora_patches(m, state: dict) -> tuple[dict, dict]:
    """({unet key: patch}, {clip key: patch}) of a file's LoRA / DoRA modules."""
    unet, clip = {}, {}
    for name, (where, key) in key_map(m).items():
        up = state.get(f"{name}.lora_up.weight")
        if up is None:
            continue
        alpha = state.get(f"{name}.alpha")
        patch = ("lora", (up, state[f"{name}.lora_down.weight"],
                          float(alpha) if alpha is not None else None, None,
                          state.get(f"{name}.dora_scale")))
        (unet if where == "unet" else clip)[key] = patch
    return unet, clip


def install(arch: str, monkeypatch, tmp_path, placeholder: bool = False, seed: int = 0,
            prediction: str | None = None):
    """Fake `modules.*`, `backend.*` and `networks` in sys.modules; the engine loaded unless
    `placeholder` (then a tiny checkpoint file of `arch` is the chosen one)."""
    from safetensors.torch import load_file

    from lora_train_ext.core.models.tiny import build_bundle, write_checkpoint

    fake = fake_webui.install(build_bundle("sd1", "tiny", seed=0), monkeypatch)
    shared = fake.shared
    shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    shared.state.stopping_generation = False
    shared.opts.CLIP_stop_at_last_layers = 1
    shared.opts.emphasis = "Original"

    # modules.sd_models
    sd_models = types.ModuleType("modules.sd_models")
    checkpoint = str(tmp_path / f"fake_forge_{arch}.safetensors")
    write_checkpoint(build_bundle(arch, "tiny", seed=seed), checkpoint)
    ck_info = types.SimpleNamespace(name_for_extra=f"fake_forge_{arch}", shorthash=None,
                                    title=f"fake_forge_{arch}.safetensors", filename=checkpoint)
    sd_models.model_data = types.SimpleNamespace(
        sd_model=FakeInitialModel(), forge_hash="",
        forge_loading_parameters={"checkpoint_info": ck_info, "additional_modules": [],
                                  "unet_storage_dtype": None})
    sd_models.reloads = 0
    sd_models.model_path = str(tmp_path / "Stable-diffusion")

    @torch.inference_mode()
    def forge_model_reload():
        if isinstance(sd_models.model_data.sd_model, FakeInitialModel):
            engine = FakeForgeEngine(arch, seed=seed, prediction=prediction)
            engine.sd_checkpoint_info.filename = ck_info.filename  # the chosen file
            engine.filename = ck_info.filename
            sd_models.model_data.sd_model = engine
            shared.sd_model = engine
            sd_models.reloads += 1
            return engine, True
        return sd_models.model_data.sd_model, False

    sd_models.forge_model_reload = forge_model_reload
    sd_models.list_models = lambda: None
    sd_models.FakeInitialModel = FakeInitialModel
    shared.sd_model = sd_models.model_data.sd_model
    if not placeholder:
        forge_model_reload()

    # backend.*
    backend = types.ModuleType("backend")
    backend.__path__ = []
    mm = types.ModuleType("backend.memory_management")
    mm.current_loaded_models = []
    mm.stream_next_load = False
    mm.loads = 0

    class LoadedModel:
        def __init__(self, model):
            self.model = model
            self.model_accelerated = False
            self.device = model.load_device

        def model_load(self):
            self.model.forge_patch_model(self.device)
            if mm.stream_next_load:  # the model did not fit: one module streamed from the CPU
                mm.stream_next_load = False
                module = next(x for x in self.model.model.modules() if isinstance(x, ForgeLinear))
                module.prev_parameters_manual_cast = module.parameters_manual_cast
                module.parameters_manual_cast = True
                self.model_accelerated = True
            self.model.refresh_loras()
            mm.loads += 1

        def __eq__(self, other):
            return self.model is other.model

    def unload_model_clones(model):
        for i in reversed(range(len(mm.current_loaded_models))):
            if model.is_clone(mm.current_loaded_models[i].model):
                mm.current_loaded_models.pop(i).model.forge_unpatch_model()

    def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
        for x in models:
            loaded = LoadedModel(x)
            if loaded in mm.current_loaded_models:
                mm.current_loaded_models.remove(loaded)
                mm.current_loaded_models.insert(0, loaded)
                continue
            unload_model_clones(x)
            loaded.model_load()
            mm.current_loaded_models.insert(0, loaded)

    mm.LoadedModel = LoadedModel
    mm.unload_model_clones = unload_model_clones
    mm.load_models_gpu = load_models_gpu
    mm.load_model_gpu = lambda model: load_models_gpu([model])
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda force=False: None
    attention = types.ModuleType("backend.attention")

    def attention_pytorch(q, k, v, heads, mask=None):
        raise NotImplementedError

    def attention_split(q, k, v, heads, mask=None):
        raise NotImplementedError

    attention.attention_pytorch, attention.attention_split = attention_pytorch, attention_split
    backend_nn = types.ModuleType("backend.nn")
    backend_nn.__path__ = []
    backend_unet = types.ModuleType("backend.nn.unet")
    backend_unet.attention_function = attention_split
    backend_nn.unet = backend_unet
    engine_base = types.ModuleType("backend.diffusion_engine.base")
    engine_base.ForgeDiffusionEngine = FakeForgeEngine
    for name, mod in (("backend", backend), ("backend.memory_management", mm),
                      ("backend.attention", attention), ("backend.nn", backend_nn),
                      ("backend.nn.unet", backend_unet),
                      ("backend.diffusion_engine.base", engine_base),
                      ("modules.sd_models", sd_models)):
        monkeypatch.setitem(sys.modules, name, mod)
    backend.memory_management, backend.attention, backend.nn = mm, attention, backend_nn
    sys.modules["modules"].sd_models = sd_models
    sys.modules["modules.devices"].torch_gc = lambda: None

    # modules.processing: three-item caches, txt2img
    processing = fake.processing
    processing.StableDiffusionProcessing.cached_c = [None, None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None, None]

    class Txt2Img(processing.StableDiffusionProcessingTxt2Img):
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

        def close(self):
            pass

    processing.StableDiffusionProcessingTxt2Img = Txt2Img
    processing.generations = []

    def process_images(p):
        with torch.inference_mode():
            forge_model_reload()
            m = shared.sd_model
            m.forge_objects = m.forge_objects_original.shallow_copy()
            tags = re.findall(r"<lora:([^:>]+)(?::([^:>]+))?>", p.prompt)
            names = [n for n, _ in tags]
            weights = [float(w or 1.0) for _, w in tags]
            networks.load_networks(names, weights, weights)
            m.forge_objects = m.forge_objects_after_applying_lora.shallow_copy()
            mm.load_models_gpu([m.forge_objects.unet, m.forge_objects.clip.patcher])
            prompt = re.sub(r"<lora:[^>]+>", "", p.prompt)
            cond = m.get_learned_conditioning([prompt])
            g = torch.Generator().manual_seed(int(p.seed))
            x = torch.randn(1, 4, p.height // 8, p.width // 8, generator=g)
            unet = m.forge_objects.unet.model.diffusion_model
            t = torch.tensor([999])
            out = unet(x, t, context=cond["crossattn"], y=cond["vector"]) if m.arch == "sdxl" \
                else unet(x, t, context=cond)
            mm.load_models_gpu([m.forge_objects.vae.patcher])
            img = m.forge_objects.vae.decode(out / 0.18215).clamp(-1, 1)[0]
        arr = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        processing.generations.append(p.prompt)
        return types.SimpleNamespace(images=[Image.fromarray(arr)])

    processing.process_images = process_images

    # sd_forge_lora's networks
    networks = types.ModuleType("networks")
    networks.available_networks = {}
    networks.loaded_networks = []
    networks.networks_in_memory = {}
    networks.listed = 0

    def list_available_networks():
        networks.listed += 1
        networks.available_networks.clear()
        for root, _, files in os.walk(shared.cmd_opts.lora_dir):
            for f in files:
                if f.endswith(".safetensors"):
                    networks.available_networks[os.path.splitext(f)[0]] = os.path.join(root, f)

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename):
        return load_file(filename)

    def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        m = shared.sd_model
        networks.loaded_networks.clear()
        if any(n not in networks.available_networks for n in names):
            list_available_networks()
        files = [networks.available_networks[n] for n in names]
        compiled = [[f, u, t, False] for f, u, t in zip(files, unet_multipliers, te_multipliers)]
        if m.current_lora_hash == str(compiled):
            return
        m.current_lora_hash = str(compiled)
        m.forge_objects.unet = m.forge_objects_original.unet
        m.forge_objects.clip = m.forge_objects_original.clip
        for filename, strength_model, strength_clip, online in compiled:
            unet_patches, clip_patches = lora_patches(m, load_lora_state_dict(filename))
            unet = m.forge_objects.unet.clone()
            clip = m.forge_objects.clip.clone()
            unet.add_patches(filename=filename, patches=unet_patches,
                             strength_patch=strength_model, online_mode=online)
            clip.add_patches(filename=filename, patches=clip_patches,
                             strength_patch=strength_clip, online_mode=online)
            m.forge_objects.unet, m.forge_objects.clip = unet, clip
        m.forge_objects_after_applying_lora = m.forge_objects.shallow_copy()

    networks.list_available_networks = list_available_networks
    networks.load_lora_state_dict = load_lora_state_dict
    networks.load_networks = load_networks
    monkeypatch.setitem(sys.modules, "networks", networks)
    list_available_networks()
    fake.networks = networks
    fake.sd_models = sd_models
    fake.memory_management = mm
    fake.backend_unet = backend_unet
    fake.attention = attention
    return fake
