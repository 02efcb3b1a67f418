"""Our in-code models equal an independent implementation: diffusers (a test-only dependency).

For SD1, SD2-v and SDXL, the tiny bundle's checkpoint is written to a `.safetensors` file with
`write_checkpoint` (the WebUI's LDM key names) and read back by diffusers' own single-file loading:
`UNet2DConditionModel.from_single_file` / `AutoencoderKL.from_single_file` (which convert with
`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`) and, for the text encoders,
`create_diffusers_clip_model_from_ldm` (what diffusers' pipelines call for a single file's CLIP /
OpenCLIP tower: `convert_ldm_clip_checkpoint` / `convert_open_clip_checkpoint`). Then both sides
run on the same inputs, and their outputs must agree to fp32 rounding:
- text encoders at the layer our bundle reads (SD1: last hidden state after the final norm; SD2:
  the penultimate block then the final norm, which diffusers gets as the last hidden state of the
  23-layer tower it converts ViT-H to; SDXL te1 and te2: penultimate hidden state, no final norm,
  and te2's pooled projection);
- the UNet's output (SDXL also with its added conditioning: pooled text embedding + size/crop
  `time_ids`), given the very conditioning our bundle built;
- the VAE's posterior mean (and the bundle's scaled latents) and its decoder output.

No network: `from_single_file` would fetch a diffusers config from the Hub. Instead the test
derives each config with diffusers' own mapping from the LDM yaml (`create_unet_diffusers_config_
from_ldm`, `create_vae_diffusers_config_from_ldm`, fed a yaml-like dict written from our specs),
writes it to a local folder and passes that folder as `config=` with `local_files_only=True`. The
text encoders' configs are written the way the Hub repos diffusers' pipelines use have them
(CLIP-L: quick_gelu; the OpenCLIP towers: gelu; SD2: 23 layers), at our widths. Where the tiny
models leave what diffusers can infer, the test says so at the override (`_tiny_overrides`).

Once at real width (`test_real_width_equals_diffusers`, marked slow, run with LORA_TRAIN_SLOW=1):
the same comparison on real-size random weights, on the CPU. To keep memory at one copy of the
weights, the diffusers models there are built on the `meta` device and take diffusers' converted
tensors by assignment (`load_state_dict(strict=True, assign=True)`; the converted state dict holds
our very tensors, except OpenCLIP's split q/k/v), instead of `from_single_file` reading a 4-14 GB
file into a second copy; the conversion functions are the ones `from_single_file` calls.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import types
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from lora_train_ext.core.models.clip import CLIP_SPECS, tokenize
from lora_train_ext.core.models.openclip import OPENCLIP_SPECS
from lora_train_ext.core.models.specs import arch_spec
from lora_train_ext.core.models.tiny import (OPENCLIP_PAD_ID, build_bundle, checkpoint_state_dict,
                                             write_checkpoint)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only dependency")
    transformers = pytest.importorskip("transformers")


def _diffusers_api():
    """(UNet2DConditionModel, AutoencoderKL, single_file_utils) of the installed diffusers.

    diffusers 0.39's `models.autoencoders` package imports its RAE autoencoder eagerly, and that
    module needs a transformers class (Dinov2WithRegistersConfig, transformers >= 4.48) the WebUI's
    transformers 4.30 lacks, so `AutoencoderKL` fails to import with it. Only then, a placeholder
    stands in for that one unrelated module; AutoencoderKL itself is diffusers' own code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from diffusers.loaders import single_file_utils as sfu
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
        except ImportError as e:
            pytest.skip(f"diffusers {diffusers.__version__} lacks single-file loading: {e}")
        try:
            from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        except ImportError as e:
            rae = "diffusers.models.autoencoders.autoencoder_rae"
            if "Dinov2WithRegisters" not in str(e) or rae in sys.modules:
                pytest.skip(f"diffusers {diffusers.__version__}: no AutoencoderKL: {e}")
            placeholder = types.ModuleType(rae)
            placeholder.AutoencoderRAE = None
            sys.modules[rae] = placeholder
            from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    for name in ("create_unet_diffusers_config_from_ldm", "create_vae_diffusers_config_from_ldm",
                 "convert_ldm_unet_checkpoint", "convert_ldm_vae_checkpoint",
                 "convert_ldm_clip_checkpoint", "convert_open_clip_checkpoint",
                 "create_diffusers_clip_model_from_ldm", "load_single_file_checkpoint"):
        if not hasattr(sfu, name):
            pytest.skip(f"diffusers {diffusers.__version__} has no single_file_utils.{name}")
    return UNet2DConditionModel, AutoencoderKL, sfu


# -- configs --------------------------------------------------------------------------------------

def ldm_original_config(arch: str, size: str) -> dict:
    """The LDM / sgm yaml as the dict diffusers' config mappers read, with our spec's numbers
    (the benchmark builds diffusers' UNet from the same function)."""
    from lora_train_ext.bench.reference import ldm_unet_config

    return ldm_unet_config(arch, size)


def _tiny_overrides(arch: str, size: str) -> tuple[dict, dict]:
    """(UNet, VAE) diffusers config entries the LDM yaml cannot carry for the tiny models.

    - norm_num_groups: ldm hard-codes GroupNorm(32) (`normalization()`, `Normalize()`); our tiny
      specs shrink the groups to 8 with the widths, which no yaml field says.
    - SDXL's added conditioning: diffusers recognises SDXL by its real context width (2048) and only
      then maps `label_emb` to `add_embedding` (addition_embed_type 'text_time', 256 features per
      size number); at another width it takes the vector as a class embedding. The tiny SDXL gets
      what the real one gets, at its width: 16 features per size number (specs.py).
    Real width: no override (asserted by the real-width test).
    """
    if size != "tiny":
        return {}, {}
    spec = arch_spec(arch, size)
    unet = {"norm_num_groups": spec.unet.norm_groups}
    if spec.unet.adm_in_channels is not None:
        pooled = OPENCLIP_SPECS[(arch, size)].embed
        unet.update(class_embed_type=None, addition_embed_type="text_time",
                    addition_time_embed_dim=(spec.unet.adm_in_channels - pooled) // 6,
                    projection_class_embeddings_input_dim=spec.unet.adm_in_channels)
    return unet, {"norm_num_groups": spec.vae.norm_groups}


def diffusers_configs(sfu, arch: str, size: str, checkpoint: dict) -> tuple[dict, dict]:
    """(UNet config, VAE config) from diffusers' own LDM-yaml mapping, plus `_tiny_overrides`."""
    original = ldm_original_config(arch, size)
    image_size = 64 if size == "tiny" else None  # tiny: no model type to infer the default from
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint,
                                                         image_size=image_size)
        vae = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint,
                                                       image_size=image_size)
    unet_extra, vae_extra = _tiny_overrides(arch, size)
    unet.update(unet_extra)
    vae.update(vae_extra)
    return unet, vae


def text_configs(arch: str, size: str) -> dict[str, tuple[type, object]]:
    """Our text-encoder part -> (transformers class, CLIPTextConfig) as diffusers' pipelines hold
    them: CLIP-L (`openai/clip-vit-large-patch14`: quick_gelu), SD2's ViT-H as a 23-layer
    `CLIPTextModel` (`stabilityai/stable-diffusion-2`'s text_encoder: gelu; diffusers drops the
    last block, which SD2 never reads), SDXL's bigG as `CLIPTextModelWithProjection` (gelu)."""
    def config(hidden, layers, heads, mlp, vocab, act, projection=None):
        return transformers.CLIPTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
            projection_dim=projection or hidden, bos_token_id=vocab - 2, eos_token_id=vocab - 1)

    out = {}
    if arch in ("sd1", "sdxl"):
        c = CLIP_SPECS[(arch, size)]
        out["te" if arch == "sd1" else "te1"] = (
            transformers.CLIPTextModel, config(c.hidden, c.layers, c.heads, c.mlp, c.vocab, c.act))
    if arch == "sd2":
        o = OPENCLIP_SPECS[(arch, size)]
        out["te"] = (transformers.CLIPTextModel,
                     config(o.width, o.layers - 1, o.heads, o.mlp, o.vocab, "gelu"))
    if arch == "sdxl":
        o = OPENCLIP_SPECS[(arch, size)]
        out["te2"] = (transformers.CLIPTextModelWithProjection,
                      config(o.width, o.layers, o.heads, o.mlp, o.vocab, "gelu", o.embed))
    return out


# HF CLIP's `position_ids` buffer (arange(77); persistent in transformers 4.30) is not in our
# checkpoint (`checkpoint_state_dict` skips it, as most real checkpoints do), so diffusers'
# conversion does not produce it: the model keeps its own arange, the same numbers.
POSITION_IDS = "text_model.embeddings.position_ids"


def _only(checkpoint: dict, prefix: str) -> dict:
    return {k: t for k, t in checkpoint.items() if k.startswith(prefix)}


def _te_checkpoint(arch: str, part: str, checkpoint: dict) -> dict:
    """What the text-encoder loader is handed. SDXL te2: only `conditioner.embedders.1.`: diffusers
    tells te1 from te2 in one file by comparing te1's width with the model's (768 vs 1280); the
    tiny te1 and te2 are both 32 wide, so given the whole file it would load te1's weights into
    te2 (and fail on the MLP shapes)."""
    if arch == "sdxl" and part == "te2":
        return _only(checkpoint, "conditioner.embedders.1.")
    return checkpoint


def _converted_text(sfu, arch: str, part: str, model: nn.Module, checkpoint: dict) -> dict:
    """diffusers' conversion of one text encoder (the function its single-file loader picks)."""
    if arch == "sd1" or part == "te1":
        return sfu.convert_ldm_clip_checkpoint(checkpoint)
    prefix = "cond_stage_model.model." if arch == "sd2" else "conditioner.embedders.1.model."
    return sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)


def _assert_covers(name: str, model: nn.Module, converted: dict, allowed=(POSITION_IDS,)) -> None:
    """The converted state dict fills exactly the model's tensors (from_single_file loads with
    strict=False when accelerate is absent, so a missing key would silently stay random)."""
    own = set(model.state_dict())
    missing = sorted(own - set(converted) - set(allowed))
    unexpected = sorted(set(converted) - own)
    assert not missing and not unexpected, \
        f"{name}: missing {missing[:3]}, unexpected {unexpected[:3]}"


# -- diffusers' models from our checkpoint --------------------------------------------------------

def diffusers_from_file(path: str, arch: str, workdir) -> dict[str, nn.Module]:
    """diffusers' single-file loading of our checkpoint file, offline: part -> model."""
    unet_cls, vae_cls, sfu = _diffusers_api()
    checkpoint = sfu.load_single_file_checkpoint(path, local_files_only=True)
    unet_cfg, vae_cfg = diffusers_configs(sfu, arch, "tiny", checkpoint)
    models: dict[str, nn.Module] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part, cls, cfg in (("unet", unet_cls, unet_cfg), ("vae", vae_cls, vae_cfg)):
            folder = workdir / part
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(cfg))
            models[part] = cls.from_single_file(path, config=str(folder), local_files_only=True)
        _assert_covers("unet", models["unet"],
                       sfu.convert_ldm_unet_checkpoint(checkpoint, unet_cfg))
        _assert_covers("vae", models["vae"], sfu.convert_ldm_vae_checkpoint(checkpoint, vae_cfg))
        for part, (cls, cfg) in text_configs(arch, "tiny").items():
            folder = workdir / part
            cfg.save_pretrained(str(folder))
            te_ckpt = _te_checkpoint(arch, part, checkpoint)
            model = sfu.create_diffusers_clip_model_from_ldm(
                cls, te_ckpt, config=str(folder), local_files_only=True)
            _assert_covers(part, model, _converted_text(sfu, arch, part, model, te_ckpt))
            models[part] = model
    return {k: m.eval().requires_grad_(False) for k, m in models.items()}


def diffusers_sharing(arch: str, size: str, checkpoint: dict) -> dict[str, nn.Module]:
    """diffusers' models built on `meta` and given diffusers' conversion of `checkpoint` by
    assignment (strict), so they share our tensors: one copy of real-size weights in memory."""
    unet_cls, vae_cls, sfu = _diffusers_api()
    unet_cfg, vae_cfg = diffusers_configs(sfu, arch, size, checkpoint)
    models: dict[str, nn.Module] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part, cls, cfg, convert in (
                ("unet", unet_cls, unet_cfg, sfu.convert_ldm_unet_checkpoint),
                ("vae", vae_cls, vae_cfg, sfu.convert_ldm_vae_checkpoint)):
            with torch.device("meta"):
                model = cls.from_config(cfg)
            model.load_state_dict(convert(checkpoint, cfg), strict=True, assign=True)
            models[part] = model
        for part, (cls, cfg) in text_configs(arch, size).items():
            with torch.device("meta"):
                model = cls(cfg)
            te_ckpt = _te_checkpoint(arch, part, checkpoint)
            converted = _converted_text(sfu, arch, part, model, te_ckpt)
            converted.setdefault(POSITION_IDS, torch.arange(cfg.max_position_embeddings)[None])
            model.load_state_dict(converted, strict=True, assign=True)
            models[part] = model
    return {k: m.eval().requires_grad_(False) for k, m in models.items()}


# -- the comparison -------------------------------------------------------------------------------

CAPTIONS = ["shp style, red circle", "blue square, black background, a much longer caption " * 3]
SDXL_SIZES = [(64, 64, 0, 0, 64, 64), (96, 80, 8, 4, 64, 72)]  # orig h, w, crop top, left, target


def _diff(name: str, ours: torch.Tensor, ref: torch.Tensor, results: dict) -> None:
    assert ours.shape == ref.shape, f"{name}: {tuple(ours.shape)} vs {tuple(ref.shape)}"
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().max().item()
    results[name] = ((ours - ref).abs().max().item(), scale)


def compare(bundle, models: dict[str, nn.Module], latent: int, image: int) -> dict:
    """name -> (max abs diff, max abs of diffusers' output), our bundle vs diffusers' models, on
    the same inputs: the bundle's own condition / denoise / encode and its modules."""
    arch = bundle.arch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([10, 700])
    images = torch.rand(1, 3, image, image, generator=g) * 2 - 1
    z = torch.randn(1, 4, image // 8, image // 8, generator=g)
    results: dict = {}
    sizes = SDXL_SIZES if arch == "sdxl" else None
    with torch.no_grad():
        cond = bundle.condition(CAPTIONS, sizes)
        if arch == "sd1":
            ref = models["te"](tokenize(CAPTIONS))[0]
            _diff("te (last, final norm)", cond, ref, results)
            ref_unet = models["unet"](x, t, encoder_hidden_states=cond).sample
        elif arch == "sd2":
            ref = models["te"](tokenize(CAPTIONS, pad_id=OPENCLIP_PAD_ID))[0]
            _diff("te (penultimate, final norm)", cond, ref, results)
            ref_unet = models["unet"](x, t, encoder_hidden_states=cond).sample
        else:
            out1 = models["te1"](tokenize(CAPTIONS), output_hidden_states=True)
            out2 = models["te2"](tokenize(CAPTIONS, pad_id=OPENCLIP_PAD_ID),
                                 output_hidden_states=True)
            w1 = out1.hidden_states[-2].shape[-1]
            pooled_dim = out2.text_embeds.shape[-1]
            _diff("te1 (penultimate)", cond["crossattn"][..., :w1], out1.hidden_states[-2], results)
            _diff("te2 (penultimate)", cond["crossattn"][..., w1:], out2.hidden_states[-2], results)
            _diff("te2 pooled projection", cond["vector"][:, :pooled_dim], out2.text_embeds,
                  results)
            added = {"text_embeds": cond["vector"][:, :pooled_dim],
                     "time_ids": torch.tensor(sizes, dtype=torch.float32)}
            ref_unet = models["unet"](x, t, encoder_hidden_states=cond["crossattn"],
                                      added_cond_kwargs=added).sample
        _diff("unet", bundle.denoise(x, t, cond), ref_unet, results)
        del ref_unet
        mean = models["vae"].encode(images).latent_dist.mean
        _diff("vae encode (posterior mean)", bundle.vae.encode(images).mean, mean, results)
        _diff("bundle.encode (scaled latents)", bundle.encode(images),
              mean * models["vae"].config.scaling_factor, results)
        _diff("vae decode", bundle.vae.decode(z), models["vae"].decode(z).sample, results)
    return results


def norm_settings(model: nn.Module, skip: str | None = None) -> Counter:
    """How many GroupNorms / LayerNorms of each (groups, width, eps, affine) a model has (modules
    under `skip` left out). An eps off by 10x (1e-5 vs 1e-6) moves a tiny UNet's output by ~1e-5
    of its scale on random weights: the order of the rounding tolerance, so the outputs alone
    cannot tell it; this can."""
    found: Counter = Counter()
    for name, m in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(m, nn.GroupNorm):
            found[("GroupNorm", m.num_groups, m.num_channels, m.eps, m.affine)] += 1
        elif isinstance(m, nn.LayerNorm):
            found[("LayerNorm", tuple(m.normalized_shape), m.eps, m.elementwise_affine)] += 1
    return found


def check_norms(bundle, models: dict[str, nn.Module]) -> None:
    ours = {"unet": bundle.unet, "vae": bundle.vae, **bundle.text_encoders}
    for part, model in ours.items():
        skip = None
        if bundle.arch == "sd2" and part == "te":  # diffusers drops the last block (never read)
            skip = f"transformer.resblocks.{model.num_layers - 1}."
        assert norm_settings(model, skip) == norm_settings(models[part]), part


def _report(arch: str, size: str, results: dict) -> str:
    return "\n".join(f"{arch} {size} {name}: max abs diff {d:.3g} (output max {s:.3g}, "
                     f"relative {d / s:.3g})" for name, (d, s) in results.items())


def _check(arch: str, size: str, results: dict, rel: float) -> None:
    report = _report(arch, size, results)
    print("\n" + report)
    bad = [name for name, (d, s) in results.items() if not d <= rel * max(s, 1e-6)]
    assert not bad, f"differs beyond fp32 rounding ({rel:g} of output scale): {bad}\n{report}"


# Measured (CPU, torch 2.13, diffusers 0.39): tiny outputs agree to <= 3e-6 of their scale (VAE
# decode; UNet ~1e-6, text encoders ~1e-6 or exactly), real-width ones to <= 2.5e-6. 1e-5 / 1e-4
# leave room for other BLAS / SDPA kernels; a wrong wiring is far above (swapping one crop
# number in SDXL's time_ids moves the tiny UNet output by 3e-2 of its scale). Epsilons are
# checked apart (`check_norms`).
TINY_REL = 1e-5
REAL_REL = 1e-4  # deeper sums at real width accumulate more rounding


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_equals_diffusers_single_file(arch, tmp_path):
    bundle = build_bundle(arch, "tiny", seed=0)
    assert bundle.prediction == ("v" if arch == "sd2" else "epsilon")
    path = write_checkpoint(bundle, str(tmp_path / f"tiny-{arch}.safetensors"))
    models = diffusers_from_file(path, arch, tmp_path)
    spec = arch_spec(arch, "tiny")
    if arch == "sdxl":  # the added conditioning is diffusers' SDXL path, not a class embedding
        assert models["unet"].config.addition_embed_type == "text_time"
    assert models["vae"].config.scaling_factor == spec.vae.scale_factor
    check_norms(bundle, models)
    results = compare(bundle, models, latent=8, image=64)
    _check(arch, "tiny", results, TINY_REL)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LORA_TRAIN_SLOW") != "1",
                    reason="real-size models (GBs of RAM, minutes): set LORA_TRAIN_SLOW=1")
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_real_width_equals_diffusers(arch):
    assert _tiny_overrides(arch, "real") == ({}, {})
    bundle = build_bundle(arch, "real", seed=0)
    checkpoint = checkpoint_state_dict(bundle)  # our tensors, not copies
    models = diffusers_sharing(arch, "real", checkpoint)
    del checkpoint
    cfg = models["unet"].config
    assert cfg.norm_num_groups == 32
    if arch == "sdxl":
        assert cfg.addition_embed_type == "text_time" and cfg.addition_time_embed_dim == 256
    check_norms(bundle, models)
    results = compare(bundle, models, latent=16, image=64)
    del models, bundle
    gc.collect()
    _check(arch, "real", results, REAL_REL)
