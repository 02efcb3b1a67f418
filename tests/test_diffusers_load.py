"""diffusers (a test-only dependency) reads our SD1, SD2 and SDXL LoRA / LoCon files.

The files come from a short `train` run on the tiny bundles. diffusers' own kohya loader
(`lora_state_dict` of the pipelines' LoRA mixins, with the UNet config for SDXL's LDM-style names)
converts them, and its state-dict helpers bring the result to the PEFT layout `load_lora_weights`
hands to peft. peft itself is not used: diffusers enables it only with transformers >= 4.34 and the
WebUI pins 4.30.2. So the test does peft's part by hand, on diffusers models built from configs with
our tiny models' block structure and widths (`UNet2DConditionModel`, `CLIPTextModel`, SDXL's second
encoder `CLIPTextModelWithProjection`):
- every converted key names an existing Linear / Conv2d with shapes a LoRA layer on it would have
  (no unexpected keys), and the adapted modules are exactly the modules the algorithm targets in
  the diffusers model (no missing keys);
- the rank / alpha diffusers derives for its LoraConfig (`get_peft_kwargs`) are ours;
- every tensor equals ours, where our own key map (`keys.py`) names the diffusers module.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch import nn

from lora_train_ext.core import keys
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.clip import CLIP_SPECS
from lora_train_ext.core.models.openclip import OPENCLIP_SPECS
from lora_train_ext.core.models.specs import arch_spec
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.trainer import train
from lora_train_ext.demo import demo_config, demo_dataset_dir

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only dependency")
    transformers = pytest.importorskip("transformers")


def _loader_api():
    """(SD mixin, SDXL mixin, to-peft helpers) of the installed diffusers, or skip."""
    try:
        from diffusers.loaders.lora_pipeline import (StableDiffusionLoraLoaderMixin as SD,
                                                     StableDiffusionXLLoraLoaderMixin as SDXL)
    except ImportError:
        try:
            from diffusers.loaders.lora import LoraLoaderMixin as SD  # diffusers < 0.30
            from diffusers.loaders.lora import StableDiffusionXLLoraLoaderMixin as SDXL
        except ImportError as e:
            pytest.skip(f"diffusers {diffusers.__version__} has no kohya LoRA loader: {e}")
    try:
        from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                     convert_unet_state_dict_to_peft)
        from diffusers.utils.peft_utils import get_peft_kwargs
    except ImportError as e:
        pytest.skip(f"diffusers {diffusers.__version__} lacks its PEFT conversion helpers: {e}")
    return SD, SDXL, (convert_unet_state_dict_to_peft, convert_state_dict_to_diffusers,
                      convert_state_dict_to_peft, get_peft_kwargs)


RANK, ALPHA = 4, 2.0  # alpha != rank: the scale must reach diffusers' config
CASES = [("sd1", "lora"), ("sd1", "locon"), ("sd2", "lora"), ("sdxl", "lora"), ("sdxl", "locon")]
# The module kinds a kohya LoRA adapts, as diffusers paths (LoCon adds the res blocks and samplers).
DIFFUSERS_LORA = re.compile(
    r"^(down_blocks|up_blocks)\.\d+\.attentions\.\d+\.|^mid_block\.attentions\.0\.")
DIFFUSERS_LORA_INNER = re.compile(
    r"\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.(0\.proj|2)))$")
DIFFUSERS_LOCON = re.compile(
    r"^((down_blocks|up_blocks)\.\d+|mid_block)\.resnets\.\d+\."
    r"(conv1|conv2|time_emb_proj|conv_shortcut)$"
    r"|^(down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.0\.conv$")
DIFFUSERS_TE = re.compile(
    r"^text_model\.encoder\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


# -- diffusers models with the tiny models' structure ---------------------------------------------

def diffusers_unet(arch: str):
    """A `UNet2DConditionModel` with the tiny LDM UNet's levels, res blocks, transformer depths
    and widths (so every LoRA shape matches); heads do not change any weight's shape."""
    spec = arch_spec(arch, "tiny").unet
    depths = spec.level_depths
    widths = tuple(spec.model_channels * m for m in spec.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths)
    up = tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths))
    config = dict(
        sample_size=8, in_channels=spec.in_channels, out_channels=spec.out_channels,
        layers_per_block=spec.num_res_blocks, block_out_channels=widths,
        down_block_types=down, up_block_types=up, norm_num_groups=spec.norm_groups,
        cross_attention_dim=spec.context_dim, use_linear_projection=spec.use_linear,
        attention_head_dim=tuple(spec.heads_for(w)[0] for w in widths),
        transformer_layers_per_block=tuple(max(d, 1) for d in depths),
    )
    if spec.adm_in_channels:
        pooled = OPENCLIP_SPECS[(arch, "tiny")].embed
        config.update(addition_embed_type="text_time",
                      addition_time_embed_dim=(spec.adm_in_channels - pooled) // 6,
                      projection_class_embeddings_input_dim=spec.adm_in_channels)
    return diffusers.UNet2DConditionModel(**config)


def diffusers_text_encoders(arch: str) -> dict[str, nn.Module]:
    """Our part name -> the HF text model diffusers would hold there (SD2's OpenCLIP tower as the
    23-layer `CLIPTextModel` diffusers converts it to; SDXL's te2 with its projection)."""
    def clip(hidden, layers, heads, mlp, projection=0):
        cfg = transformers.CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, intermediate_size=mlp,
                                          vocab_size=514, max_position_embeddings=77,
                                          projection_dim=projection or hidden)
        cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
        return cls(cfg)

    if arch == "sd2":
        s = OPENCLIP_SPECS[("sd2", "tiny")]
        return {"te": clip(s.width, s.layers - 1, s.heads, s.mlp)}
    s = CLIP_SPECS[(arch, "tiny")]
    encoders = {"te1" if arch == "sdxl" else "te": clip(s.hidden, s.layers, s.heads, s.mlp)}
    if arch == "sdxl":
        g = OPENCLIP_SPECS[("sdxl", "tiny")]
        encoders["te2"] = clip(g.width, g.layers, g.heads, g.mlp, projection=g.embed)
    return encoders


# -- the files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(arch, algo) -> path of a 1-step UNet + text-encoder file from `train`."""
    files = {}
    for arch, algo in CASES:
        out = tmp_path_factory.mktemp(f"{arch}_{algo}")
        cfg = demo_config(str(out), steps=1, seed=0, rank=RANK, alpha=ALPHA, lr=1e-2,
                          batch_size=1, grad_accum=1, dataset=demo_dataset_dir(), arch=arch,
                          algo=algo)
        cfg.save.output_name = f"{arch}_{algo}"
        files[(arch, algo)] = train(build_bundle(arch, "tiny", seed=0), cfg).path
    return files


# -- what peft would do with diffusers' output ----------------------------------------------------

def _diffusers_load(path: str, arch: str, unet, encoders):
    """Run diffusers' loader up to the point where it calls peft: {model key: (peft state dict,
    LoraConfig kwargs)} with model keys 'unet', 'te' / 'te1', 'te2'."""
    sd_mixin, sdxl_mixin, (unet_to_peft, to_diffusers, to_peft, peft_kwargs) = _loader_api()

    folder, name = os.path.split(path)
    if arch == "sdxl":
        state, alphas = sdxl_mixin.lora_state_dict(folder, weight_name=name,
                                                   unet_config=unet.config)
    else:
        state, alphas = sd_mixin.lora_state_dict(folder, weight_name=name)
    assert alphas, "diffusers read no alpha"
    prefixes = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder",
                "te2": "text_encoder_2"}
    out = {}
    for part, prefix in prefixes.items():
        if part != "unet" and part not in encoders:
            continue
        sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        sub_alphas = {k[len(prefix) + 1:]: v for k, v in alphas.items()
                      if k.split(".")[0] == prefix}
        if part == "unet":
            sub = unet_to_peft(sub)
            model = unet
        else:
            sub = to_peft(to_diffusers(sub))
            model = encoders[part]
        names = [n for n, _ in model.named_modules()]
        if part == "unet":
            rank = {f"^{k}": v.shape[1] for k, v in sub.items() if "lora_B" in k and v.ndim > 1}
        else:
            rank = {f"{n}.lora_B.weight": sub[f"{n}.lora_B.weight"].shape[1] for n in names
                    if f"{n}.lora_B.weight" in sub}
        kwargs = peft_kwargs(rank, network_alpha_dict=sub_alphas, peft_state_dict=sub,
                             is_unet=part == "unet")
        out[part] = (sub, kwargs)
    assert sum(len(sub) for sub, _ in out.values()) == len(state), "keys outside unet/te"
    return out


def _lora_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_A, lora_B) weight shapes of a peft LoRA layer on `module`."""
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    assert isinstance(module, nn.Linear), type(module)
    return (rank, module.in_features), (module.out_features, rank)


def _expected_targets(part: str, model: nn.Module, algo: str) -> set[str]:
    found = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if part == "unet":
            hit = (DIFFUSERS_LORA.match(name) and DIFFUSERS_LORA_INNER.search(name)) or \
                  (algo == "locon" and DIFFUSERS_LOCON.match(name))
        else:
            hit = DIFFUSERS_TE.match(name)
        if hit:
            found.add(name)
    return found


def _our_diffusers_path(name: str, arch: str) -> tuple[str, str]:
    """kohya name -> (part, diffusers module path) by our key map."""
    part, _ = keys.split_kohya_name(name)
    if part == "unet":
        return part, keys.unet_ldm_to_diffusers(keys.unet_ldm_path(name, arch), arch)
    return keys.te_hf_path(name)


@pytest.mark.parametrize("arch,algo", CASES)
def test_diffusers_loads_our_file(arch, algo, trained):
    path = trained[(arch, algo)]
    unet = diffusers_unet(arch)
    encoders = diffusers_text_encoders(arch)
    loaded = _diffusers_load(path, arch, unet, encoders)
    assert set(loaded) == {"unet", *encoders}
    models = {"unet": unet, **encoders}

    for part, (sub, kwargs) in loaded.items():
        model = models[part]
        modules = dict(model.named_modules())
        paths = {k.rsplit(".lora_", 1)[0] for k in sub}
        unexpected = sorted(p for p in paths if p not in modules)
        assert not unexpected, f"{part}: {len(unexpected)} unexpected, e.g. {unexpected[:3]}"
        assert set(sub) == {f"{p}.lora_{ab}.weight" for p in paths for ab in "AB"}, part
        missing = sorted(_expected_targets(part, model, algo) - paths)
        assert not missing, f"{part}: {len(missing)} missing, e.g. {missing[:3]}"
        assert paths == _expected_targets(part, model, algo), part
        assert sorted(kwargs["target_modules"]) == sorted(paths)
        assert kwargs["r"] == RANK and not kwargs["rank_pattern"], part
        assert kwargs["lora_alpha"] == ALPHA and not kwargs["alpha_pattern"], part
        for p in paths:
            a_shape, b_shape = _lora_shapes(modules[p], RANK)
            assert tuple(sub[f"{p}.lora_A.weight"].shape) == a_shape, p
            assert tuple(sub[f"{p}.lora_B.weight"].shape) == b_shape, p

    ours, _ = load_lora(path)
    names = {k.split(".")[0] for k in ours}
    assert sum(len(sub) for sub, _ in loaded.values()) == 2 * len(names)
    for name in names:
        part, dpath = _our_diffusers_path(name, arch)
        sub, _ = loaded[part]
        assert torch.equal(sub[f"{dpath}.lora_A.weight"], ours[f"{name}.lora_down.weight"]), name
        assert torch.equal(sub[f"{dpath}.lora_B.weight"], ours[f"{name}.lora_up.weight"]), name
        assert float(ours[f"{name}.alpha"]) == ALPHA
