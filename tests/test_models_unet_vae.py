"""The in-code UNet and VAE: checkpoint names and shapes, forward shapes, determinism, and the
numerics that names cannot check (timestep embedding, attention heads, conv/linear projections,
the VAE's asymmetric padding)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fixtures_path import FIXTURES_DIR

from lora_train_ext.core.errors import UserError
from lora_train_ext.core.models import unet as unet_mod
from lora_train_ext.core.models import vae as vae_mod
from lora_train_ext.core.models.specs import SPECS, arch_spec, build_unet, build_vae

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
UNET_FIXTURES = {"sd1": "sd15_unet.tsv", "sd2": "sd21v_unet.tsv", "sdxl": "sdxl_unet.tsv"}
VAE_FIXTURES = {"sd1": "sd15_vae.tsv", "sd2": "sd21v_vae.tsv", "sdxl": "sd15_vae.tsv"}
ARCHS = ["sd1", "sd2", "sdxl"]


def fixtures_dir() -> Path:
    return FIXTURES_DIR


def load_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from a `key<TAB>AxBxC` file; a blank shape is a scalar: ()."""
    shapes = {}
    text = (fixtures_dir() / "checkpoint_keys" / name).read_text(encoding="utf-8")
    for line in text.splitlines():
        if not line.strip():
            continue
        key, _, shape = line.partition("\t")
        shapes[key] = tuple(int(d) for d in shape.split("x")) if shape else ()
    return shapes


def state_shapes(model: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def unet_inputs(arch: str, batch: int = 1, size: int = 8, seed: int = 0):
    spec = arch_spec(arch, "tiny").unet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 7, spec.context_dim, generator=g)
    y = torch.randn(batch, spec.adm_in_channels, generator=g) if spec.adm_in_channels else None
    return x, t, context, y


@pytest.fixture(scope="module")
def tiny_unets():
    return {arch: build_unet(arch, "tiny", seed=0) for arch in ARCHS}


# -- names and shapes ------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["tiny", "real"])
@pytest.mark.parametrize("arch", ARCHS)
def test_unet_keys_match_checkpoint(arch, size):
    expected = load_shapes(UNET_FIXTURES[arch])
    got = state_shapes(build_unet(arch, size, device="meta"), UNET_PREFIX)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    if size == "real":
        wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
        assert not wrong, list(wrong.items())[:5]


@pytest.mark.parametrize("size", ["tiny", "real"])
@pytest.mark.parametrize("arch", ARCHS)
def test_vae_keys_match_checkpoint(arch, size):
    expected = load_shapes(VAE_FIXTURES[arch])
    got = state_shapes(build_vae(arch, size, device="meta"), VAE_PREFIX)
    assert set(got) == set(expected)
    if size == "real":
        wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
        assert not wrong, list(wrong.items())[:5]


@pytest.mark.parametrize("arch, params", [("sd1", 859_520_964), ("sdxl", 2_567_463_684)])
def test_real_parameter_counts(arch, params):
    model = build_unet(arch, "real", device="meta")
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.is_meta for p in model.parameters())


def test_spec_table():
    assert set(SPECS) == {"sd1", "sd2", "sdxl"}
    for arch in ARCHS:
        real, tiny = SPECS[arch]["real"].unet, SPECS[arch]["tiny"].unet
        assert real.level_depths == tiny.level_depths
        assert real.middle_depth == tiny.middle_depth
        assert (real.use_linear, real.num_res_blocks, len(real.channel_mult)) == \
            (tiny.use_linear, tiny.num_res_blocks, len(tiny.channel_mult))
        assert SPECS[arch]["tiny"].vae.downscale == SPECS[arch]["real"].vae.downscale == 8
    assert SPECS["sdxl"]["tiny"].unet.level_depths == (0, 2, 10)
    assert SPECS["sd1"]["real"].unet.level_depths == (1, 1, 1, 0)
    assert SPECS["sdxl"]["real"].unet.adm_in_channels == 2816
    assert SPECS["sd1"]["real"].vae.scale_factor == 0.18215
    assert SPECS["sd2"]["real"].vae.scale_factor == 0.18215
    assert SPECS["sdxl"]["real"].vae.scale_factor == 0.13025
    assert SPECS["sd1"]["real"].unet.heads_for(640) == (8, 80)
    assert SPECS["sd2"]["real"].unet.heads_for(640) == (10, 64)


def test_unknown_arch_or_size():
    with pytest.raises(UserError):
        build_unet("sd3", "tiny", device="meta")
    with pytest.raises(UserError):
        build_vae("sd1", "huge", device="meta")


# -- UNet forward ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_unet_forward_shape(arch, tiny_unets):
    x, t, context, y = unet_inputs(arch, batch=2)
    with torch.no_grad():
        out = tiny_unets[arch](x, t, context, y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3  # not zero-initialised: gradients reach every layer


def test_sdxl_needs_y(tiny_unets):
    x, t, context, _ = unet_inputs("sdxl")
    with pytest.raises(ValueError, match="needs y"):
        tiny_unets["sdxl"](x, t, context)


def test_sdxl_y_changes_output(tiny_unets):
    x, t, context, y = unet_inputs("sdxl")
    with torch.no_grad():
        a = tiny_unets["sdxl"](x, t, context, y)
        b = tiny_unets["sdxl"](x, t, context, y + 1.0)
    assert not torch.allclose(a, b)


def test_unet_uses_timesteps_and_context(tiny_unets):
    x, t, context, _ = unet_inputs("sd1")
    model = tiny_unets["sd1"]
    with torch.no_grad():
        base = model(x, t, context)
        assert not torch.allclose(base, model(x, t + 100, context))
        assert not torch.allclose(base, model(x, t, context + 1.0))
        assert torch.equal(base, model(x, t, context))


def test_unet_batch_items_independent(tiny_unets):
    x, t, context, _ = unet_inputs("sd2", batch=2)
    model = tiny_unets["sd2"]
    with torch.no_grad():
        both = model(x, t, context)
        first = model(x[:1], t[:1], context[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)


def test_seed_determinism():
    a = build_unet("sd1", seed=3).state_dict()
    b = build_unet("sd1", seed=3).state_dict()
    c = build_unet("sd1", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)
    va, vb = build_vae("sd1", seed=3).state_dict(), build_vae("sd1", seed=3).state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_unet("sd1", seed=9)
    build_vae("sd1", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_build_dtype_and_mode():
    model = build_unet("sd1", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert not model.training


def test_bf16_forward():
    """A model cast whole to bf16 runs (GroupNorm in float32 with bf16 parameters)."""
    x, t, context, _ = unet_inputs("sd1")
    unet = build_unet("sd1", dtype=torch.bfloat16)
    vae = build_vae("sd1", dtype=torch.bfloat16)
    with torch.no_grad():
        out = unet(x.bfloat16(), t, context.bfloat16())
        image = vae.decode(vae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.bfloat16)).mode())
    assert out.dtype == image.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(image).all()


def test_top_level_blocks_can_be_checkpointed():
    """A trainer wraps input_blocks[i] / middle_block / output_blocks[i], each called as
    block(x, emb, context): wrapped with gradient checkpointing, the gradients are unchanged."""

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, emb, context=None):
            return checkpoint(self.inner, x, emb, context, use_reentrant=False)

    x, t, context, y = unet_inputs("sd1")
    plain = build_unet("sd1", seed=1).train()
    wrapped = build_unet("sd1", seed=1).train()
    for blocks in (wrapped.input_blocks, wrapped.output_blocks):
        for i in range(len(blocks)):
            blocks[i] = Checkpointed(blocks[i])
    wrapped.middle_block = Checkpointed(wrapped.middle_block)

    plain(x, t, context, y).square().mean().backward()
    wrapped(x, t, context, y).square().mean().backward()
    probe = "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    g_plain = dict(plain.named_parameters())[probe].grad
    g_wrapped = dict(wrapped.named_parameters())[probe.replace("3.1.", "3.inner.1.")].grad
    assert g_plain is not None and g_plain.abs().sum() > 0
    torch.testing.assert_close(g_plain, g_wrapped)


# -- pieces with known numerics --------------------------------------------------------------

def test_timestep_embedding_cos_first():
    t = torch.tensor([0, 7, 999])
    emb = unet_mod.timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000.0) * i / 4) for i in range(4)]
    expected = torch.tensor(
        [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 7, 999)])
    torch.testing.assert_close(emb, expected)
    assert unet_mod.timestep_embedding(t, 7).shape == (3, 7)


def test_cross_attention_matches_manual_heads():
    torch.manual_seed(0)
    attn = unet_mod.CrossAttention(query_dim=12, heads=3, dim_head=4, context_dim=5)
    x, ctx = torch.randn(2, 6, 12), torch.randn(2, 9, 5)
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    outs = []
    for h in range(3):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        outs.append(w @ v[..., s])
    expected = attn.to_out(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x, ctx), expected)


def test_conv_and_linear_projections_agree():
    """SD1's 1x1-conv proj_in/proj_out and SD2's Linear ones compute the same thing."""
    torch.manual_seed(0)
    conv = unet_mod.SpatialTransformer(16, 2, 8, 1, 6, groups=4, use_linear=False)
    lin = unet_mod.SpatialTransformer(16, 2, 8, 1, 6, groups=4, use_linear=True)
    state = {k: (v.flatten(1) if k.startswith("proj_") and v.dim() == 4 else v)
             for k, v in conv.state_dict().items()}
    lin.load_state_dict(state)
    x, ctx = torch.randn(2, 16, 3, 5), torch.randn(2, 4, 6)
    torch.testing.assert_close(conv(x, ctx), lin(x, ctx), rtol=1e-4, atol=1e-5)


def test_vae_downsample_pads_right_and_bottom():
    down = vae_mod.Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # picks the bottom-right tap of each 3x3 window
        down.conv.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = down(x)
    # windows start at 0 and 2; bottom-right taps are (2,2),(2,4),(4,2),(4,4): 4 is the zero pad
    torch.testing.assert_close(out, torch.tensor([[[[10.0, 0.0], [0.0, 0.0]]]]))


# -- VAE -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_tiny_vae_shapes(arch):
    vae = build_vae(arch, seed=0)
    assert vae.scale_factor == arch_spec(arch).vae.scale_factor
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x)
        assert posterior.mean.shape == (2, 4, 4, 6)
        assert torch.equal(posterior.mode(), posterior.mean)
        a = posterior.sample(generator=torch.Generator().manual_seed(1))
        b = posterior.sample(generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and not torch.equal(a, posterior.mean)
        assert posterior.kl().shape == (2,)
        image = vae.decode(a)
    assert image.shape == x.shape
    assert torch.isfinite(image).all()


def test_vae_attention_is_single_head_softmax():
    torch.manual_seed(0)
    block = vae_mod.AttnBlock(8, groups=4)
    x = torch.randn(1, 8, 3, 3)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # (1, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # (1, HW, HW)
    out = (v @ w.transpose(1, 2)).reshape(1, 8, 3, 3)
    torch.testing.assert_close(block(x), x + block.proj_out(out))


def test_unet_upsample_is_nearest_then_conv():
    up = unet_mod.Upsample(2)
    x = torch.randn(1, 2, 2, 2)
    torch.testing.assert_close(up(x), up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
