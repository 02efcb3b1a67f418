"""The memory estimate (core/memory.py) against measured peaks, and its parts' arithmetic.

The measured runs happen in fresh child processes (`bench.memory.run_case`): each reads its own
resident memory just before the run and its peak (`VmHWM`, reset through /proc/self/clear_refs)
after it, so nothing this test process did before counts. Linux only.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import small_run_config
from lora_train_ext.core import memory as M
from lora_train_ext.core.config import NetworkConfig

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or
                           not os.path.exists("/proc/self/clear_refs"),
                           reason="peak RSS is read from /proc (Linux)")


@linux
@pytest.mark.parametrize("case", ["tiny-256-b4", "tiny-512-b4", "tiny-512-b2-checkpointing"])
def test_estimate_within_15_percent_of_measured_run_growth(case, tmp_path):
    from lora_train_ext.bench.memory import run_case

    row = run_case(case, "tiny", "sd1", "", str(tmp_path), steps=2, timeout=900)
    assert row["steps"] == 2
    growth, est = row["run_growth_mib"], row["estimate_run_mib"]
    assert growth > 100, row  # activations dominate: the comparison means something
    assert abs(est / growth - 1) <= 0.15, row


def test_trace_counts_activations_not_weights(sd1_bundle):
    """The traced saved bytes grow with batch and pixels, ignore the weights, and checkpointing
    keeps less."""
    net = NetworkConfig(rank=4, train_on="unet")
    a = M.trace_unet(sd1_bundle.unet, "sd1", net, batch=1, height=128, width=128)
    b = M.trace_unet(sd1_bundle.unet, "sd1", net, batch=2, height=128, width=128)
    c = M.trace_unet(sd1_bundle.unet, "sd1", net, batch=1, height=256, width=256)
    # activations scale with the batch and the pixels (attention linearly: flash kernels)
    assert 1.8 * a["total"] < b["total"] < 2.2 * a["total"]
    assert 3.0 * a["total"] < c["total"] < 4.5 * a["total"]
    assert a["kept"] + a["max_block"] < a["total"]
    weights = sum(p.numel() * 4 for p in sd1_bundle.unet.parameters())
    # what does not grow with the batch is far less than the weights: the weights that ops
    # save for the backward are the model's, counted once in model_bytes, not here
    assert 2 * a["total"] - b["total"] < weights / 3
    # the host's model is untouched: no hook, no adapter, no meta tensor left on it
    assert all(p.device.type == "cpu" for p in sd1_bundle.unet.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in sd1_bundle.unet.modules())


def test_estimate_parts_follow_the_options(sd1_bundle, demo_dataset, tmp_path):
    def est(**settings):
        cfg = small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=2,
                               network__train_on="unet", **settings)
        return M.estimate(cfg, arch="sd1", unet=sd1_bundle.unet,
                          text_encoders=sd1_bundle.text_encoders, vae=sd1_bundle.vae,
                          device="cpu", images=4, captions=4)

    base = est()
    weights = sum(p.numel() * 4 for m in sd1_bundle.base_modules() for p in m.parameters()) + \
        sum(b.numel() * b.element_size() for m in sd1_bundle.base_modules() for b in m.buffers())
    assert base.model_bytes == weights
    assert base.parts["latent_cache"] == 4 * 4 * 8 * 8 * 4  # 4 images, 4 x 8 x 8 fp32
    assert est(train__gradient_checkpointing=True).parts["activations"] < \
        base.parts["activations"]
    assert est(optim__optimizer="SGD").parts["adapter"] < base.parts["adapter"]
    # fp16 base weights: half the model's bytes
    cfg = small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=2)
    half = M.estimate(cfg, arch="sd1", unet=sd1_bundle.unet,
                      text_encoders=sd1_bundle.text_encoders, vae=sd1_bundle.vae,
                      device="cpu", base_dtype=torch.float16)
    assert abs(half.model_bytes - weights / 2) < weights * 0.01
    # on a GPU, offloading takes the VAE and the cached text encoder off the device
    gpu = M.estimate(small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=2,
                                      network__train_on="unet", train__offload_frozen=True),
                     arch="sd1", unet=sd1_bundle.unet, text_encoders=sd1_bundle.text_encoders,
                     vae=sd1_bundle.vae, device="cuda")
    te_vae = sum(M._param_bytes(m) for m in (*sd1_bundle.text_encoders.values(), sd1_bundle.vae))
    assert gpu.kind == "VRAM" and gpu.model_bytes == weights - te_vae


def test_suggestions_name_options_that_fit(sd1_bundle, demo_dataset, tmp_path):
    cfg = small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=4,
                           network__train_on="unet", data__resolution="256",
                           data__cache_latents=False)
    full = M.estimate(cfg, arch="sd1", unet=sd1_bundle.unet,
                      text_encoders=sd1_bundle.text_encoders, vae=sd1_bundle.vae, device="cpu")
    ckpt = M.estimate(small_run_config(tmp_path, demo_dataset, steps=2, lr=1e-3, batch_size=4,
                                       network__train_on="unet", data__resolution="256",
                                       data__cache_latents=False,
                                       train__gradient_checkpointing=True),
                      arch="sd1", unet=sd1_bundle.unet, text_encoders=sd1_bundle.text_encoders,
                      vae=sd1_bundle.vae, device="cpu")
    free = (full.run_bytes + ckpt.run_bytes) // 2  # checkpointing fits, the run as set does not
    tight = M.estimate(cfg, arch="sd1", unet=sd1_bundle.unet,
                       text_encoders=sd1_bundle.text_encoders, vae=sd1_bundle.vae, device="cpu",
                       free_bytes=free)
    assert tight.fits is False
    assert any(s.startswith("train.gradient_checkpointing = true") for s in tight.suggestions)
    assert "does not fit" in tight.text() and "gradient_checkpointing" in tight.text()
    roomy = M.estimate(cfg, arch="sd1", unet=sd1_bundle.unet,
                       text_encoders=sd1_bundle.text_encoders, vae=sd1_bundle.vae,
                       device="cpu", free_bytes=full.run_bytes * 2)
    assert roomy.fits is True and roomy.suggestions == []


def test_meta_copy_copies_no_real_tensor_the_host_hangs_on_modules():
    """A host's module may refer to the whole model (or hold tuples of backups): the copy for
    the trace shares such references instead of copying them (a real SDXL WebUI ran out of
    memory when the copy was deep)."""
    from lora_train_ext.core.memory import meta_copy

    big = torch.nn.Linear(64, 64)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv2d(2, 2, 3))
    object.__setattr__(net[0], "whole_model", big)  # a plain reference, not a child
    net[0].held = [torch.ones(64, 64)]  # tensors inside other objects
    net[0].backups = (torch.ones(8, 8), torch.zeros(8))
    net[1].weight_backup = torch.ones(2, 2, 3, 3)
    net[0].register_forward_hook(lambda *a: None)
    out = meta_copy(net)
    assert out is not net and out[0] is not net[0]
    assert out[0].whole_model is big and out[0].held is net[0].held  # shared, not copied
    tensors = list(out.parameters()) + list(out.buffers()) + list(out[0].backups) + \
        [out[1].weight_backup]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert not out[0]._forward_hooks and net[0]._forward_hooks
    assert net[0].weight.device.type == "cpu" and net[0].backups[0].device.type == "cpu"
    y = out[0](torch.empty(3, 8, device="meta"))
    assert y.shape == (3, 8) and y.device.type == "meta"
