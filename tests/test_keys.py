"""Key maps against the real models' names: every kohya module of SD1 / SD2 / SDXL lands on a
checkpoint weight of the right shape and comes back to the same name; every UNet Linear / Conv
path round-trips through its kohya name."""

from __future__ import annotations

import pytest

from fixtures_path import parse_shape, read_tsv
from lora_train_ext.core import keys
from lora_train_ext.core.keys import KeyMapError, RowChunk

CHECKPOINT_FILES = {
    "sd1": ("sd15_unet.tsv", "sd15_te.tsv"),
    "sd2": ("sd21v_unet.tsv", "sd21v_te.tsv"),
    "sdxl": ("sdxl_unet.tsv", "sdxl_te1.tsv", "sdxl_te2.tsv"),
}
# (file suffix, module count) per FORMATS.md
KOHYA_FILES = {
    "sd1": (("unet_lora", 192), ("unet_locon_extra", 86), ("te", 72)),
    "sd2": (("unet_lora", 192), ("unet_locon_extra", 86), ("te", 138)),
    "sdxl": (("unet_lora", 722), ("unet_locon_extra", 66), ("te", 264)),
}


def checkpoint_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name in CHECKPOINT_FILES[arch]:
        for key, shape in read_tsv("checkpoint_keys", name):
            shapes[key] = parse_shape(shape)
    return shapes


def kohya_rows(arch: str) -> list[tuple[str, str, tuple[int, ...] | None]]:
    rows = []
    for suffix, count in KOHYA_FILES[arch]:
        table = read_tsv("kohya_modules", f"{arch}_{suffix}.tsv")
        assert len(table) == count
        for row in table:
            rows.append((row[0], row[1], parse_shape(row[2]) if len(row) > 2 else None))
    return rows


def unet_module_paths(arch: str) -> list[str]:
    """LDM paths of the UNet's Linear (2-D weight) and Conv (4-D weight) modules."""
    shapes = checkpoint_shapes(arch)
    prefix = keys.UNET_CHECKPOINT_PREFIX
    return [k[len(prefix):-len(".weight")] for k, s in shapes.items()
            if k.startswith(prefix) and k.endswith(".weight") and len(s) in (2, 4)]


@pytest.mark.parametrize("arch", keys.ARCHES)
def test_every_kohya_module_lands_on_a_checkpoint_weight(arch):
    shapes = checkpoint_shapes(arch)
    seen = set()
    for name, kind, shape in kohya_rows(arch):
        targets = keys.kohya_to_checkpoint(name, arch)
        assert len(targets) == 1, name
        key, rows = targets[0]
        assert key in shapes, (name, key)
        base = shapes[key]
        if rows is None:
            module_shape = base
        else:
            assert key.endswith(".attn.in_proj_weight"), (name, key)
            assert rows.stop <= base[0] and rows.step is None, (name, rows)
            module_shape = (rows.stop - rows.start,) + base[1:]
            assert module_shape[0] * 3 == base[0], (name, module_shape)  # q/k/v: (d, d) of (3d, d)
        if shape is not None:
            assert module_shape == shape, (name, key, module_shape, shape)
        assert len(module_shape) == (2 if kind == "linear" else 4), (name, kind, module_shape)
        assert (key, str(rows)) not in seen, (name, key, rows)
        seen.add((key, str(rows)))
        assert (name, rows) in keys.checkpoint_to_kohya(key, arch), (name, key)


@pytest.mark.parametrize("arch", keys.ARCHES)
def test_unet_paths_round_trip(arch):
    paths = unet_module_paths(arch)
    assert paths
    names = {}
    for path in paths:
        name = keys.unet_kohya_name(path, arch)
        assert keys.unet_ldm_path(name, arch) == path, (path, name)
        diffusers = keys.unet_ldm_to_diffusers(path, arch)
        assert keys.unet_diffusers_to_ldm(diffusers, arch) == path, (path, diffusers)
        flat = (diffusers if arch in ("sd1", "sd2") else path).replace(".", "_")
        assert name == "lora_unet_" + flat
        assert name not in names, (path, names.get(name))
        names[name] = path
    assert keys.build_unet_name_table(arch, ["", "input_blocks", "input_blocks.1"] + paths) == names
    unet_fixture = {n for n, _, _ in kohya_rows(arch) if n.startswith("lora_unet_")}
    assert unet_fixture <= set(names)


@pytest.mark.parametrize("arch", keys.ARCHES)
def test_checkpoint_keys_round_trip(arch):
    mapped = 0
    for key, shape in checkpoint_shapes(arch).items():
        entries = keys.checkpoint_to_kohya(key, arch)
        is_module_weight = key.endswith(".weight") or key.endswith(".in_proj_weight")
        if is_module_weight and len(shape) in (2, 4):
            assert entries, key
        for name, rows in entries:
            assert keys.kohya_to_checkpoint(name, arch) == [(key, rows)], (key, name)
            mapped += 1
    assert mapped


@pytest.mark.parametrize("arch, ldm_path, name", [
    ("sd1", "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("sd1", "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
    ("sd1", "input_blocks.4.0.skip_connection", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"),
    ("sd1", "input_blocks.3.0.op", "lora_unet_down_blocks_0_downsamplers_0_conv"),
    ("sd1", "input_blocks.11.0.in_layers.2", "lora_unet_down_blocks_3_resnets_1_conv1"),
    ("sd1", "middle_block.1.proj_in", "lora_unet_mid_block_attentions_0_proj_in"),
    ("sd1", "middle_block.2.emb_layers.1", "lora_unet_mid_block_resnets_1_time_emb_proj"),
    ("sd1", "output_blocks.2.1.conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
    ("sd1", "output_blocks.5.2.conv", "lora_unet_up_blocks_1_upsamplers_0_conv"),
    ("sd1", "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
     "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"),
    ("sd1", "output_blocks.9.0.out_layers.3", "lora_unet_up_blocks_3_resnets_0_conv2"),
    ("sd1", "time_embed.0", "lora_unet_time_embedding_linear_1"),
    ("sd1", "input_blocks.0.0", "lora_unet_conv_in"),
    ("sd1", "out.2", "lora_unet_conv_out"),
    ("sd2", "output_blocks.8.2.conv", "lora_unet_up_blocks_2_upsamplers_0_conv"),
    ("sdxl", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("sdxl", "middle_block.1.transformer_blocks.9.attn2.to_k",
     "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k"),
    ("sdxl", "output_blocks.2.2.conv", "lora_unet_output_blocks_2_2_conv"),
    ("sdxl", "input_blocks.7.0.skip_connection", "lora_unet_input_blocks_7_0_skip_connection"),
    ("sdxl", "label_emb.0.0", "lora_unet_label_emb_0_0"),
])
def test_unet_names(arch, ldm_path, name):
    assert keys.unet_kohya_name(ldm_path, arch) == name
    assert keys.unet_ldm_path(name, arch) == ldm_path


@pytest.mark.parametrize("arch, ldm_path, diffusers", [
    ("sd1", "input_blocks.1.0.in_layers.0", "down_blocks.0.resnets.0.norm1"),
    ("sd1", "input_blocks.1.0.out_layers.0", "down_blocks.0.resnets.0.norm2"),
    ("sd1", "input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
    ("sd1", "input_blocks.9.0", "down_blocks.2.downsamplers.0"),
    ("sd1", "input_blocks.10.0", "down_blocks.3.resnets.0"),
    ("sd1", "output_blocks.3.1", "up_blocks.1.attentions.0"),
    ("sd1", "out.0", "conv_norm_out"),
    ("sd1", "time_embed.2", "time_embedding.linear_2"),
    ("sdxl", "input_blocks.4.1", "down_blocks.1.attentions.0"),
    ("sdxl", "input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    ("sdxl", "input_blocks.8.1.proj_out", "down_blocks.2.attentions.1.proj_out"),
    ("sdxl", "output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("sdxl", "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("sdxl", "output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ("sdxl", "label_emb.0.2", "add_embedding.linear_2"),
])
def test_unet_ldm_diffusers(arch, ldm_path, diffusers):
    assert keys.unet_ldm_to_diffusers(ldm_path, arch) == diffusers
    assert keys.unet_diffusers_to_ldm(diffusers, arch) == ldm_path


def test_unet_names_of_the_other_style_are_read():
    assert keys.unet_ldm_path("lora_unet_input_blocks_1_1_proj_in", "sd1") == \
        "input_blocks.1.1.proj_in"
    assert keys.unet_ldm_path("lora_unet_down_blocks_1_attentions_0_proj_in", "sdxl") == \
        "input_blocks.4.1.proj_in"


@pytest.mark.parametrize("call", [
    lambda: keys.unet_kohya_name("input_blocks.1", "sd1"),
    lambda: keys.unet_kohya_name("input_blocks.1.0.in_layers", "sd1"),
    lambda: keys.unet_kohya_name("input_blocks.12.0.op", "sd1"),
    lambda: keys.unet_kohya_name("input_blocks.1.1.proj_in", "sdxl"),  # level 0: no attention
    lambda: keys.unet_kohya_name("input_blocks.1.1.proj_in", "sd3"),
    lambda: keys.unet_ldm_path("lora_unet_down_blocks_3_attentions_0_proj_in", "sd1"),
    lambda: keys.unet_ldm_path("lora_te_text_model_encoder_layers_0_mlp_fc1", "sd1"),
    lambda: keys.unet_ldm_path("lora_unet_foo_0", "sd1"),
    lambda: keys.unet_ldm_path("lora_unet_down_blocks__0", "sd1"),
    lambda: keys.te_hf_path("lora_te_text_model_encoder_layers_0_foo"),
    lambda: keys.te_hf_path("lora_unet_conv_in"),
    lambda: keys.te_kohya_name("te3", "encoder.layers.0.mlp.fc1"),
    lambda: keys.te_kohya_name("te", "encoder.layers.0.mlp"),
    lambda: keys.openclip_to_hf("transformer.resblocks.0.attn"),
    lambda: keys.hf_to_openclip("text_model.embeddings.position_embedding"),
    lambda: keys.checkpoint_prefix("sd1", "te1"),
    lambda: keys.kohya_to_checkpoint("lora_te2_text_model_encoder_layers_0_mlp_fc1", "sd2"),
    lambda: RowChunk(0, 3).rows(100),
    lambda: keys.openclip_width("sdxl", "te1"),
])
def test_bad_input_raises(call):
    with pytest.raises(KeyMapError):
        call()


@pytest.mark.parametrize("prefix", ["te", "te1", "te2"])
@pytest.mark.parametrize("layer", [0, 11, 31])
@pytest.mark.parametrize("inner", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                   "self_attn.out_proj", "mlp.fc1", "mlp.fc2", "layer_norm1"])
def test_te_names(prefix, layer, inner):
    short = f"encoder.layers.{layer}.{inner}"
    name = keys.te_kohya_name(prefix, short)
    assert name == f"lora_{prefix}_text_model_" + short.replace(".", "_")
    assert keys.te_kohya_name(prefix, "text_model." + short) == name
    assert keys.te_hf_path(name) == (prefix, "text_model." + short)
    oc_path, chunk = keys.hf_to_openclip(short)
    assert (keys.normalize_te_path(short), chunk) in keys.openclip_to_hf(oc_path)


def test_te_examples():
    assert keys.te_kohya_name("te", "text_model.encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert keys.te_kohya_name("te", "encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert keys.te_hf_path("lora_te2_text_model_encoder_layers_31_mlp_fc2") == \
        ("te2", "text_model.encoder.layers.31.mlp.fc2")
    assert keys.te_hf_path("lora_te1_text_model_final_layer_norm") == \
        ("te1", "text_model.final_layer_norm")


def test_openclip():
    qkv = [("text_model.encoder.layers.3.self_attn.q_proj", RowChunk(0, 3)),
           ("text_model.encoder.layers.3.self_attn.k_proj", RowChunk(1, 3)),
           ("text_model.encoder.layers.3.self_attn.v_proj", RowChunk(2, 3))]
    assert keys.openclip_to_hf("resblocks.3.attn.in_proj") == qkv
    assert keys.openclip_to_hf("transformer.resblocks.3.attn.in_proj") == qkv
    for oc, hf in [("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                   ("mlp.c_proj", "mlp.fc2"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")]:
        full = f"text_model.encoder.layers.7.{hf}"
        assert keys.openclip_to_hf(f"resblocks.7.{oc}") == [(full, None)]
        assert keys.hf_to_openclip(full) == (f"transformer.resblocks.7.{oc}", None)
    assert keys.openclip_to_hf("ln_final") == [("text_model.final_layer_norm", None)]
    for hf, chunk in qkv:
        assert keys.hf_to_openclip(hf) == ("transformer.resblocks.3.attn.in_proj", chunk)


def test_row_chunk():
    assert [RowChunk(i, 3).rows(3072) for i in range(3)] == \
        [slice(0, 1024), slice(1024, 2048), slice(2048, 3072)]
    assert RowChunk(2, 3).select(list(range(6))) == [4, 5]


def test_checkpoint_examples():
    assert keys.checkpoint_prefix("sd1", "unet") == "model.diffusion_model."
    assert keys.checkpoint_prefix("sd1", "te") == "cond_stage_model.transformer."
    assert keys.checkpoint_prefix("sd2", "te") == "cond_stage_model.model."
    assert keys.checkpoint_prefix("sdxl", "te1") == "conditioner.embedders.0.transformer."
    assert keys.checkpoint_prefix("sdxl", "te2") == "conditioner.embedders.1.model."
    assert keys.checkpoint_prefix("sdxl", "vae") == "first_stage_model."
    assert keys.TE_PARTS["sdxl"] == ("te1", "te2")
    assert keys.te_family("sd2", "te") == "openclip"
    qkv_k = "lora_te_text_model_encoder_layers_5_self_attn_k_proj"
    assert keys.kohya_to_checkpoint(qkv_k, "sd2") == \
        [("cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight", slice(1024, 2048))]
    assert keys.kohya_to_checkpoint("lora_te_text_model_encoder_layers_5_self_attn_v_proj", "sd2",
                                    width=32) == \
        [("cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight", slice(64, 96))]
    assert keys.openclip_width("sdxl", "te2") == 1280
    assert keys.kohya_to_checkpoint("lora_te_text_model_encoder_layers_5_mlp_fc1", "sd1") == \
        [("cond_stage_model.transformer.text_model.encoder.layers.5.mlp.fc1.weight", None)]
    assert keys.kohya_to_checkpoint("lora_unet_down_blocks_0_attentions_0_proj_in", "sd1") == \
        [("model.diffusion_model.input_blocks.1.1.proj_in.weight", None)]
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert keys.checkpoint_to_kohya(in_proj, "sdxl") == [
        (f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj",
         slice(i * 1280, (i + 1) * 1280))
        for i, p in enumerate("qkv")]
    assert keys.checkpoint_to_kohya(in_proj, "sdxl", width=8)[2][1] == slice(16, 24)
    for ignored in ["model.diffusion_model.input_blocks.1.1.proj_in.bias",
                    "first_stage_model.encoder.conv_in.weight",
                    "cond_stage_model.model.positional_embedding",
                    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias",
                    "model_ema.diffusion_modelinput_blocks11weight",
                    "model.diffusion_model.input_blocks.1.weight"]:
        assert keys.checkpoint_to_kohya(ignored, "sd2") == []
