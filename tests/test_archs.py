"""SD2 and SDXL in code: checkpoint names, real shapes, conditioning, targets, and the adapter
invariants on OpenCLIP's fused attention (identity at init, adapted == merged, exact detach),
training of UNet + text encoders, and merging the trained file into the checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from conftest import state_sha256
from fixtures_path import read_tsv
from lora_train_ext.core import keys
from lora_train_ext.core.config import NetworkConfig
from lora_train_ext.core.guard import BaseGuard
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.merge import merge_lora_into_checkpoint
from lora_train_ext.core.models.clip import build_clip_text
from lora_train_ext.core.models.openclip import OPENCLIP_SPECS, build_openclip_text, causal_mask
from lora_train_ext.core.models.specs import arch_spec
from lora_train_ext.core.models.tiny import (build_bundle, checkpoint_state_dict,
                                             load_checkpoint_state_dict, size_embedding,
                                             write_checkpoint)
from lora_train_ext.core.networks import LoRAModule, build_network
from lora_train_ext.core.networks.mha import WeightSite, is_adapted, mha_sites
from lora_train_ext.core.networks.targets import find_targets
from lora_train_ext.core.trainer import train
from lora_train_ext.demo import demo_config

ARCHS = ["sd2", "sdxl"]
CHECKPOINT_FIXTURES = {
    "sd1": {"unet": "sd15_unet.tsv", "vae": "sd15_vae.tsv", "te": "sd15_te.tsv"},
    "sd2": {"unet": "sd21v_unet.tsv", "vae": "sd21v_vae.tsv", "te": "sd21v_te.tsv"},
    "sdxl": {"unet": "sdxl_unet.tsv", "vae": "sd15_vae.tsv", "te1": "sdxl_te1.tsv",
             "te2": "sdxl_te2.tsv"},
}
MODULE_FIXTURES = {
    "sd2": ("sd2_te.tsv", "sd2_unet_lora.tsv", "sd2_unet_locon_extra.tsv"),
    "sdxl": ("sdxl_te.tsv", "sdxl_unet_lora.tsv", "sdxl_unet_locon_extra.tsv"),
}
CAPTIONS = ["shp style, red circle", "blue square, black background"]


@pytest.fixture(scope="module")
def bundles():
    return {arch: build_bundle(arch, "tiny", seed=0) for arch in ARCHS}


def _fixture_names(name: str) -> list[str]:
    return [row[0] for row in read_tsv("checkpoint_keys", name)]


def _kohya(name: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in read_tsv("kohya_modules", name)]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])


def _outputs(bundle, sizes=()):
    x, t = _inputs()
    with torch.no_grad():
        cond = bundle.condition(CAPTIONS, list(sizes))
        return cond, bundle.denoise(x, t, cond)


def _cond_tensors(cond) -> list[torch.Tensor]:
    return [cond["crossattn"], cond["vector"]] if isinstance(cond, dict) else [cond]


def _network(bundle, seed=3, rank=4, alpha=2.0, conv=False):
    cfg = NetworkConfig(rank=rank, alpha=alpha, algo="locon" if conv else "lora")
    return build_network(bundle.trainable_roots(), bundle.arch, cfg, seed=seed)


def _randomise_up(network, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in network:
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * scale)


def _module_facts(bundle):
    """(path, class) of every module and the state-dict keys: what attach must not leave behind."""
    roots = bundle.base_modules()
    return ([(i, p, type(m)) for i, r in enumerate(roots) for p, m in r.named_modules()],
            [(i, k) for i, r in enumerate(roots) for k in r.state_dict()])


# -- names and shapes ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_checkpoint_keys_equal_fixtures(arch, bundles):
    bundle = bundles[arch] if arch in bundles else build_bundle(arch)
    state = checkpoint_state_dict(bundle)
    for part, fixture in CHECKPOINT_FIXTURES[arch].items():
        prefix = keys.checkpoint_prefix(arch, part)
        expected = _fixture_names(fixture)
        if part == "vae":
            expected = [k for k in expected if k.startswith(prefix)]
        got = [k for k in state if k.startswith(prefix)]
        assert len(got) == len(expected), part
        assert set(got) == set(expected), part
    assert len(state) == sum(len(_fixture_names(f)) for f in CHECKPOINT_FIXTURES[arch].values())


@pytest.mark.parametrize("arch,part,fixture", [
    ("sd2", "te", "sd21v_te.tsv"), ("sdxl", "te1", "sdxl_te1.tsv"), ("sdxl", "te2", "sdxl_te2.tsv")])
def test_real_text_encoder_shapes_equal_fixtures(arch, part, fixture):
    if keys.te_family(arch, part) == "openclip":
        model = build_openclip_text(arch, "real", device="meta")
    else:
        model = build_clip_text(arch, "real", device="meta")
    prefix = keys.checkpoint_prefix(arch, part)
    got = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if keys.te_family(arch, part) == "clip":
            k = keys.normalize_te_path(k)
        got[prefix + k] = "x".join(str(n) for n in v.shape)
    expected = {row[0]: row[1] for row in read_tsv("checkpoint_keys", fixture)}
    assert got == expected


def test_real_sdxl_vector_width_is_2816():
    pooled = OPENCLIP_SPECS[("sdxl", "real")].embed
    assert pooled + 6 * 256 == arch_spec("sdxl", "real").unet.adm_in_channels == 2816
    assert 768 + pooled == arch_spec("sdxl", "real").unet.context_dim == 2048
    assert OPENCLIP_SPECS[("sd2", "real")].width == arch_spec("sd2", "real").unet.context_dim


def test_checkpoint_round_trip(bundles, tmp_path):
    from safetensors.torch import load_file

    src = bundles["sd2"]
    path = write_checkpoint(src, str(tmp_path / "sd2.safetensors"))
    other = build_bundle("sd2", seed=7)
    assert not torch.equal(other.unet.out[2].weight, src.unet.out[2].weight)
    load_checkpoint_state_dict(other, load_file(path))
    a, b = checkpoint_state_dict(src), checkpoint_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- conditioning ---------------------------------------------------------------------------------

def test_openclip_block_matches_reference_attention():
    """One block by hand: q/k/v are rows 0:d, d:2d, 2d:3d of in_proj, causal, heads split."""
    model = build_openclip_text("sd2", "tiny", seed=4)
    block = model.transformer.resblocks[3]
    d, heads = model.spec.width, model.spec.heads
    x = torch.randn(77, 2, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = block(x, model.attn_mask)
        h = block.ln_1(x).permute(1, 0, 2)  # (B, L, d)
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        q, k, v = (F.linear(h, w[i * d:(i + 1) * d], b[i * d:(i + 1) * d])
                   .reshape(2, 77, heads, d // heads).transpose(1, 2) for i in range(3))
        scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5 + causal_mask(77)
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 77, d)
        y = x + block.attn.out_proj(att).permute(1, 0, 2)
        y = y + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(y))))
    assert torch.allclose(got, y, atol=1e-5, rtol=0)


def test_sd2_condition_is_penultimate_with_final_norm(bundles):
    bundle = bundles["sd2"]
    te = bundle.text_encoders["te"]
    cond0, _ = _outputs(bundle)
    assert cond0.shape == (2, 77, arch_spec("sd2", "tiny").unet.context_dim)
    last = te.transformer.resblocks[-1]
    saved = last.mlp.c_fc.weight.clone()
    with torch.no_grad():
        last.mlp.c_fc.weight.mul_(3.0)  # the last block is not read
        cond1, _ = _outputs(bundle)
        te.ln_final.bias.add_(0.5)  # ln_final is
        cond2, _ = _outputs(bundle)
        te.ln_final.bias.sub_(0.5)
        last.mlp.c_fc.weight.copy_(saved)
    assert torch.equal(cond0, cond1)
    assert not torch.allclose(cond0, cond2)


def test_sdxl_condition_parts(bundles):
    bundle = bundles["sdxl"]
    te1, te2 = bundle.text_encoders["te1"], bundle.text_encoders["te2"]
    spec = arch_spec("sdxl", "tiny").unet
    res = bundle.resolution
    cond, out = _outputs(bundle)
    assert cond["crossattn"].shape == (2, 77, spec.context_dim)
    assert cond["vector"].shape == (2, spec.adm_in_channels)
    assert out.shape == (2, 4, 8, 8)
    # default sizes are the bundle's resolution, uncropped
    explicit, _ = _outputs(bundle, [(res, res, 0, 0, res, res)] * 2)
    assert all(torch.equal(a, b) for a, b in zip(_cond_tensors(cond), _cond_tensors(explicit)))
    # te1: the penultimate hidden state, no final norm; te2: penultimate, no ln_final
    w1 = te1.config.hidden_size
    saved = te1.text_model.final_layer_norm.bias.clone()
    last2 = te2.transformer.resblocks[-1].mlp.c_fc.weight
    saved2 = last2.clone()
    with torch.no_grad():
        te1.text_model.final_layer_norm.bias.add_(1.0)
        te1.text_model.encoder.layers[-1].mlp.fc1.weight.mul_(2.0)
        last2.mul_(2.0)  # changes the pooled part of the vector only
        changed, _ = _outputs(bundle)
        te1.text_model.encoder.layers[-1].mlp.fc1.weight.div_(2.0)
        te1.text_model.final_layer_norm.bias.copy_(saved)
        last2.copy_(saved2)
    assert torch.equal(changed["crossattn"], cond["crossattn"])
    pooled = te2.spec.embed
    assert not torch.allclose(changed["vector"][:, :pooled], cond["vector"][:, :pooled])
    assert torch.equal(changed["vector"][:, pooled:], cond["vector"][:, pooled:])
    # size/crop features: the six numbers in order, each through the timestep embedding
    other, _ = _outputs(bundle, [(512, 768, 16, 32, 64, 64), (res, res, 0, 0, res, res)])
    assert torch.equal(other["vector"][1], cond["vector"][1])
    dim = (spec.adm_in_channels - pooled) // 6
    table = torch.tensor([[512.0, 768, 16, 32, 64, 64]])
    assert torch.equal(other["vector"][0, pooled:], size_embedding(table, dim)[0])
    assert torch.equal(other["crossattn"], cond["crossattn"])
    # crossattn = te1 hidden_states[-2] next to te2's penultimate block input
    from lora_train_ext.core.models.clip import tokenize

    with torch.no_grad():
        h1 = te1(tokenize(CAPTIONS), output_hidden_states=True).hidden_states[-2]
        h2, pooled2 = te2.encode(tokenize(CAPTIONS, pad_id=0), "penultimate", final_norm=False,
                                 pooled=True)
    assert torch.equal(cond["crossattn"][..., :w1], h1)
    assert torch.equal(cond["crossattn"][..., w1:], h2)
    assert torch.equal(cond["vector"][:, :pooled], pooled2)


# -- targets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("conv", [False, True])
def test_targets_equal_fixtures(arch, conv, bundles):
    te_file, unet_file, extra_file = MODULE_FIXTURES[arch]
    expected = _kohya(te_file) + _kohya(unet_file) + (_kohya(extra_file) if conv else [])
    targets = find_targets(bundles[arch].trainable_roots(), arch, "both", conv=conv)
    got = [(t.name, t.kind) for t in targets]
    assert len(got) == len(expected) == len(set(got))
    assert set(got) == set(expected)
    counts = {}
    for t in targets:
        counts[t.part] = counts.get(t.part, 0) + 1
    if arch == "sd2":
        assert counts == {"unet": 278 if conv else 192, "te": 138}
    else:
        assert counts == {"unet": 788 if conv else 722, "te1": 72, "te2": 192}


def test_openclip_attention_targets_are_weight_sites(bundles):
    targets = find_targets(bundles["sd2"].trainable_roots(), "sd2", "te")
    by_name = {t.name: t for t in targets}
    mha = bundles["sd2"].text_encoders["te"].transformer.resblocks[5].attn
    d = mha.embed_dim
    for i, qkv in enumerate("qkv"):
        site = by_name[f"lora_te_text_model_encoder_layers_5_self_attn_{qkv}_proj"].module
        assert isinstance(site, WeightSite) and site.owner is mha
        assert site.rows == slice(i * d, (i + 1) * d)
        assert torch.equal(site.weight, mha.in_proj_weight[i * d:(i + 1) * d])
    out = by_name["lora_te_text_model_encoder_layers_5_self_attn_out_proj"].module
    assert isinstance(out, WeightSite) and out.owner is mha.out_proj and out.rows is None
    fc1 = by_name["lora_te_text_model_encoder_layers_5_mlp_fc1"].module
    assert fc1 is bundles["sd2"].text_encoders["te"].transformer.resblocks[5].mlp.c_fc
    assert not any("layers_23_" in n for n in by_name)  # SD2 never runs its last layer


# -- adapter invariants ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("conv", [False, True])
def test_zero_init_adapter_is_identity(arch, conv, bundles):
    bundle = bundles[arch]
    cond0, out0 = _outputs(bundle)
    net = _network(bundle, conv=conv)
    assert all(torch.count_nonzero(a.lora_up.weight) == 0 for a in net)
    net.attach()
    try:
        cond1, out1 = _outputs(bundle)
    finally:
        net.detach()
    assert all(torch.equal(a, b) for a, b in zip(_cond_tensors(cond0), _cond_tensors(cond1)))
    if conv:
        # A hooked stride-2 conv whose output is 1x1 (tiny SD1/SD2's last downsampler) comes back
        # with other (equivalent) strides after `output + 0`, and the next conv then rounds
        # differently: equal values, not equal bits.
        assert torch.allclose(out0, out1, atol=1e-6, rtol=0)
    else:
        assert torch.equal(out0, out1)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_forward_equals_merged_weights(arch, bundles):
    bundle = bundles[arch]
    net = _network(bundle, conv=True)
    _randomise_up(net)
    net.set_multiplier(0.7)
    cond0, out0 = _outputs(bundle)
    net.attach()
    try:
        cond_h, out_h = _outputs(bundle)
    finally:
        net.detach()
    for a, b in zip(_cond_tensors(cond_h), _cond_tensors(cond0)):
        assert (a - b).abs().max() > 1e-3  # the text-encoder adapters really act
    assert (out_h - out0).abs().max() > 1e-3

    saved = {}
    with torch.no_grad():
        for a in net:
            w = a.base.weight  # WeightSite: a view of the fused weight's rows
            saved[a.name] = w.clone()
            w += a.delta_weight().to(w.dtype)
    try:
        cond_m, out_m = _outputs(bundle)
    finally:
        with torch.no_grad():
            for a in net:
                a.base.weight.copy_(saved[a.name])
    for a, b in zip(_cond_tensors(cond_h), _cond_tensors(cond_m)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(out_h, out_m, atol=1e-5, rtol=0)


def test_mha_adapters_on_one_attention():
    """q/k/v/out on a bare MultiheadAttention: the adapted forward is MHA with merged weights,
    gradients reach every adapter, nothing of the module changes while attached or after."""
    torch.manual_seed(0)
    d, heads = 16, 2
    mha = nn.MultiheadAttention(d, heads).requires_grad_(False)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x = torch.randn(5, 3, d)
    mask = causal_mask(5)
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    facts = [(id(p), p._version, p.data_ptr(), p.clone()) for p in params]
    keys_before = list(mha.state_dict())
    with torch.no_grad():
        base_out = mha(x, x, x, need_weights=False, attn_mask=mask)[0]

    adapters = {}
    for which, site in mha_sites(mha).items():
        a = LoRAModule(f"lora_te_x_{which}", site, rank=3, alpha=1.5)
        with torch.no_grad():
            a.lora_up.weight.normal_(std=0.2)
        adapters[which] = a
    for a in adapters.values():
        a.attach()
    assert is_adapted(mha) and is_adapted(mha.out_proj)
    assert isinstance(mha, nn.MultiheadAttention) and not parametrize.is_parametrized(mha)
    assert list(mha.state_dict()) == keys_before
    assert torch.equal(adapters["q"].base.weight, facts[0][3][:d])  # the site reads the base
    out = mha(x, x, x, need_weights=False, attn_mask=mask)[0]

    merged_in = torch.cat([facts[0][3][i * d:(i + 1) * d] + adapters[w].delta_weight()
                           for i, w in enumerate("qkv")])
    merged_out = facts[2][3] + adapters["out"].delta_weight()
    ref, _ = F.multi_head_attention_forward(
        x, x, x, d, heads, merged_in, facts[1][3], None, None, False, 0.0, merged_out,
        facts[3][3], training=False, need_weights=False, attn_mask=mask)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert (out - base_out).abs().max() > 1e-2

    out.square().sum().backward()
    for which, a in adapters.items():
        assert a.lora_up.weight.grad is not None and a.lora_up.weight.grad.abs().sum() > 0, which
    assert all(p.grad is None for p in params)

    adapters["k"].detach()  # the others stay attached
    assert is_adapted(mha)
    with torch.no_grad():
        partial = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert not torch.allclose(partial, out.detach())
    for a in adapters.values():
        a.detach()
    assert type(mha) is nn.MultiheadAttention and type(mha.out_proj) is not type(adapters["out"])
    assert type(mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert not is_adapted(mha) and not is_adapted(mha.out_proj)
    assert not parametrize.is_parametrized(mha) and not parametrize.is_parametrized(mha.out_proj)
    assert list(mha.state_dict()) == keys_before
    for p, (pid, version, ptr, value) in zip(params, facts):
        assert (id(p), p._version, p.data_ptr()) == (pid, version, ptr)
        assert torch.equal(p, value)
    assert mha.in_proj_weight is params[0] and mha.out_proj.weight is params[2]
    with torch.no_grad():
        assert torch.equal(mha(x, x, x, need_weights=False, attn_mask=mask)[0], base_out)


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_leaves_model_bit_identical(arch, bundles):
    bundle = bundles[arch]
    roots = bundle.base_modules()
    before = state_sha256(*roots)
    facts = _module_facts(bundle)
    guard = BaseGuard(roots)
    guard.freeze()
    _, out0 = _outputs(bundle)
    net = _network(bundle, conv=True)
    _randomise_up(net)
    net.attach()
    try:
        assert _module_facts(bundle)[1] == facts[1]  # state-dict keys stay while attached
        _outputs(bundle)
    finally:
        net.detach()
        guard.restore()
    guard.verify()  # no tensor written to, not even a version bump
    _, out1 = _outputs(bundle)
    assert torch.equal(out0, out1)
    assert state_sha256(*roots) == before
    assert _module_facts(bundle) == facts
    for root in roots:
        for m in root.modules():
            assert not m._forward_hooks and not parametrize.is_parametrized(m) and not is_adapted(m)


# -- training and merging -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(bundles, tmp_path_factory):
    """A 2-step UNet + text-encoder run per arch (batch 2, 64 px, the demo images)."""
    runs = {}
    for arch in ARCHS:
        bundle = bundles[arch]
        out = tmp_path_factory.mktemp(arch)
        cfg = demo_config(str(out), steps=2, seed=0, rank=4, alpha=None, lr=1e-2, batch_size=2,
                          grad_accum=1)
        cfg.save.output_name = f"{arch}_lora"
        before = state_sha256(*bundle.base_modules())
        facts = _module_facts(bundle)
        result = train(bundle, cfg)
        assert state_sha256(*bundle.base_modules()) == before
        assert _module_facts(bundle) == facts
        runs[arch] = (result, cfg, out)
    return runs


@pytest.mark.parametrize("arch", ARCHS)
def test_training_moves_unet_and_text_encoder_adapters(arch, bundles, trained):
    result, _, _ = trained[arch]
    assert bundles[arch].prediction == ("v" if arch == "sd2" else "epsilon")
    tensors, meta = load_lora(result.path)
    ups = {k[:-len(".lora_up.weight")]: v for k, v in tensors.items()
           if k.endswith(".lora_up.weight")}
    moved = {}
    for name, up in ups.items():
        part = keys.split_kohya_name(name)[0]
        moved.setdefault(part, []).append(bool(torch.count_nonzero(up)))
    if arch == "sd2":
        assert result.modules == {"unet": 192, "te": 138}
        # at 64 px the mid block sees a 1x1 map: self-attention over one token is the identity
        # in q and k (softmax of one score is 1), so their gradient is 0 up to rounding noise
        one_token = [n for n in ups if n.startswith("lora_unet_mid_block_")
                     and n.endswith(("_attn1_to_q", "_attn1_to_k"))]
        assert len(one_token) == 2
        moved["unet"] = [bool(torch.count_nonzero(up)) for n, up in ups.items()
                         if n.startswith("lora_unet_") and n not in one_token]
        assert all(moved["unet"]) and all(moved["te"])
        assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
        assert meta["modelspec.architecture"].startswith("stable-diffusion-v2-768-v")
    else:
        assert result.modules == {"unet": 722, "te1": 72, "te2": 192}
        assert all(moved["unet"]) and all(moved["te2"])
        # te1 is read at its penultimate layer: layers 0-10 learn, layer 11 gets no gradient
        for name, up in ups.items():
            if name.startswith("lora_te1_"):
                assert bool(torch.count_nonzero(up)) == ("_layers_11_" not in name), name
        assert meta["ss_base_model_version"].startswith("sdxl_")
    assert all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_checkpoint_predicts_like_the_adapted_model(arch, bundles, trained, tmp_path):
    from safetensors.torch import load_file

    bundle = bundles[arch]
    result, cfg, _ = trained[arch]
    base_path = write_checkpoint(bundle, str(tmp_path / "base.safetensors"))
    merged_path = str(tmp_path / "merged.safetensors")
    report = merge_lora_into_checkpoint(base_path, [(result.path, 1.0)], merged_path)  # arch: auto
    assert report.changed_modules == sum(result.modules.values()) and not report.unmatched

    tensors, _ = load_lora(result.path)
    net = build_network(bundle.trainable_roots(), arch, cfg.network, seed=9)
    net.load_kohya_state_dict(tensors)
    _, out0 = _outputs(bundle)
    net.attach()
    try:
        cond_h, out_h = _outputs(bundle)
    finally:
        net.detach()
    assert (out_h - out0).abs().max() > 1e-3

    original = checkpoint_state_dict(bundle)
    load_checkpoint_state_dict(bundle, load_file(merged_path))
    try:
        cond_m, out_m = _outputs(bundle)
    finally:
        load_checkpoint_state_dict(bundle, original)
    for a, b in zip(_cond_tensors(cond_h), _cond_tensors(cond_m)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(out_h, out_m, atol=1e-5, rtol=0)
