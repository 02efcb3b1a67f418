"""Merging into the loaded model on Forge (stand-in: tests/fake_forge.py): the merge gives the
weights Forge's own LoRA loader gives for <lora:NAME:s>, through the OpenCLIP renaming and q/k/v
fusing for SDXL's second text encoder; Revert is bit-identical and leaves Forge's inference
tensors in place; Save writes the checkpoint file's keys with the merged tensors."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fake_forge
from conftest import state_sha256
from lora_train_ext.core.errors import UserError
from lora_train_ext.merging import ModelMerger, parse_merge_lines


def _sha(m) -> str:
    return state_sha256(*fake_forge.roots(m))


def _lora(fake, name: str, seed: int = 5) -> str:
    """UNet linears, a CLIP-L layer and (SDXL) the OpenCLIP encoder's q, k, v and fc1."""
    m = fake.shared.sd_model
    fo = m.forge_objects_original
    g = torch.Generator().manual_seed(seed)
    tensors, unet = {}, 0
    for kohya, (where, key) in fake_forge.key_map(m).items():
        root = fo.unet.model if where == "unet" else fo.clip.cond_stage_model
        w = fake_forge.get_attr(root, key)
        if w.dim() != 2:
            continue
        if where == "unet":
            if unet >= 3:
                continue
            unet += 1
        elif not (("_layers_0_" in kohya and (kohya.startswith("lora_te2_") or m.arch == "sd2"))
                  or
                  "_layers_1_mlp_fc1" in kohya):
            continue
        tensors[f"{kohya}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.5
        tensors[f"{kohya}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.5
        tensors[f"{kohya}.alpha"] = torch.tensor(2.0)
    path = os.path.join(fake.shared.cmd_opts.lora_dir, f"{name}.safetensors")
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_merge_is_forges_lora_then_revert_and_save(arch, monkeypatch, tmp_path):
    from lora_train_ext.host.forge import ForgeHost

    fake = fake_forge.install(arch, monkeypatch, tmp_path)
    host = ForgeHost()
    m = fake.shared.sd_model
    path = _lora(fake, "mergeme")
    host.hot_load([path])
    if arch != "sd1":
        assert sum(("lora_te2_" if arch == "sdxl" else "lora_te_") in k and "_self_attn_" in k
                   for k in load_file(path)) == 12  # q, k, v, out_proj (down, up, alpha)
    clean = _sha(m)
    objects = fake_forge.slots(m)
    host.generate(["a <lora:mergeme:0.7>"], "", 1, 2, 64, 64, 7.0)  # Forge merges it itself
    forge_merged = {k: t.detach().clone() for k, t in fake_forge.slots(m).items()}
    host.generate(["a plain"], "", 1, 2, 64, 64, 7.0)
    assert _sha(m) == clean

    merger = ModelMerger(host)
    state = merger.merge(parse_merge_lines("mergeme:0.7", host.find_lora))
    n_unet = sum(k.startswith("model.diffusion_model.") for k in state.backups)
    # sd1: 3 UNet + CLIP-L fc1; sd2: 3 UNet + OpenCLIP layer 0 (in_proj fused, out_proj, c_fc,
    # c_proj) + c_fc of layer 1; sdxl: 3 UNet + CLIP-L fc1 + OpenCLIP layer 0 (4) + c_fc
    assert n_unet == 3 and len(state.backups) == {"sd1": 4, "sd2": 8, "sdxl": 9}[arch]
    now = fake_forge.slots(m)
    assert now.keys() == objects.keys() and all(now[k] is objects[k] for k in objects)
    assert all(t.is_inference() for t in now.values())  # Forge's own tensors, written in place
    for k in now:  # the weights Forge's loader gives <lora:mergeme:0.7>
        torch.testing.assert_close(now[k], forge_merged[k], rtol=0, atol=1e-6, msg=k)
    assert _sha(m) != clean
    a, b = merger.compare("a", "", 1, 2, 64)
    assert a.size == b.size == (64, 64) and a.tobytes() != b.tobytes()
    merged_sha = _sha(m)

    out = merger.save_checkpoint("merged_forge", "fp32")
    saved = load_file(out)
    source = load_file(m.sd_checkpoint_info.filename)
    assert saved.keys() == source.keys()
    live = host.checkpoint_state()
    for key in state.backups:
        assert torch.equal(saved[key], live[key].float()), key
    if arch != "sd1":
        qkv = [k for k in state.backups if k.endswith("attn.in_proj_weight")]
        assert len(qkv) == 1 and saved[qkv[0]].shape == source[qkv[0]].shape
        assert not torch.equal(saved[qkv[0]], source[qkv[0]])
        clip = m.forge_objects_original.clip.cond_stage_model
        tower = (clip.clip_g if arch == "sdxl" else clip.clip_h).transformer
        attn = tower.text_model.encoder.layers[0].self_attn
        torch.testing.assert_close(saved[qkv[0]], torch.cat(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), rtol=0, atol=0)
    untouched = [k for k in saved if k.startswith("first_stage_model.")]
    assert untouched and all(torch.equal(saved[k], source[k]) for k in untouched)
    assert _sha(m) == merged_sha  # saving writes nothing into the model

    assert merger.revert()
    assert _sha(m) == clean  # bit for bit
    after = fake_forge.slots(m)
    assert all(after[k] is objects[k] for k in objects)
    assert all(t.is_inference() for t in after.values())


def test_save_refuses_what_the_checkpoint_file_cannot_hold(monkeypatch, tmp_path):
    from lora_train_ext.host.forge import ForgeHost

    fake = fake_forge.install("sd1", monkeypatch, tmp_path)
    host = ForgeHost()
    _lora(fake, "mergeme")
    host.hot_load([])
    merger = ModelMerger(host)
    merger.merge(parse_merge_lines("mergeme:1", host.find_lora))
    params = fake.sd_models.model_data.forge_loading_parameters
    params["additional_modules"] = ["/models/VAE/other_vae.safetensors"]
    with pytest.raises(UserError) as e:
        merger.save_checkpoint("merged_forge", "fp16")
    assert e.value.field == "merge" and "other_vae.safetensors" in e.value.message
    params["additional_modules"] = []
    fake.shared.sd_model.sd_checkpoint_info.filename = str(tmp_path / "gone.ckpt")
    with pytest.raises(UserError) as e:
        merger.save_checkpoint("merged_forge", "fp16")
    assert ".safetensors" in e.value.message and "gone.ckpt" in e.value.message
    assert not os.path.exists(os.path.join(host.checkpoint_dir(), "merged_forge.safetensors"))
    assert merger.revert()
