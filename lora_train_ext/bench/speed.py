"""Training step speed on a real-size UNet, as a ratio to the least work any trainer must do.

    python -m lora_train_ext.bench.speed [--arch sd1] [--latent 16] [--batch 1] [--steps 3]
                                         [--rank 16] [--device cpu|cuda] [--dtype fp32|bf16]

Both sides run the real-size UNet (random weights, built from the real config) on the same
noised latents and conditioning:
- baseline: the least work of any adapter trainer, a forward of the frozen UNet and a backward
  to its input (every layer's activation gradient, no weight gradient, no optimizer);
- ours: one full training step of `Trainer`'s inner work: LoRA hooks on the 192 (SD1) transformer
  modules, the MSE loss, backward into the adapters, clip-grad-norm and an AdamW step.
The ratio (ours / baseline) is what the adapters, the loss and the optimizer cost on top; on a
GPU it also prints images/s and peak memory. Text encoders are not run (cached conditioning).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..core.config import NetworkConfig
from ..core.dtypes import TORCH_DTYPES as DTYPES
from ..core.models.specs import arch_spec, build_unet
from ..core.networks import build_network


def _timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run(arch: str = "sd1", latent: int = 16, batch: int = 1, steps: int = 3, rank: int = 16,
        device: str = "cpu", dtype: str = "fp32") -> dict:
    dev = torch.device(device)
    unet = build_unet(arch, "real", device=dev, seed=0).requires_grad_(False)
    spec = arch_spec(arch, "real").unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(dev)
    t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
    ctx = torch.randn(batch, 77, spec.context_dim, generator=g).to(dev)
    y = torch.randn(batch, spec.adm_in_channels, generator=g).to(dev) if spec.adm_in_channels else None
    target = torch.randn(x.shape, generator=g).to(dev)
    amp = dict(device_type=dev.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def baseline():
        xi = x.clone().requires_grad_(True)
        with torch.autocast(**amp):
            out = unet(xi, t, context=ctx, y=y)
        out.float().square().mean().backward()

    net = build_network({"unet": unet}, arch, NetworkConfig(rank=rank, alpha=rank, train_on="unet"),
                        seed=0).to(dev)
    params = net.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def ours():
        with torch.autocast(**amp):
            out = unet(x, t, context=ctx, y=y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_s = _timed(baseline, steps, dev)
    net.train()
    net.attach()
    try:
        ours_s = _timed(ours, steps, dev)
    finally:
        net.detach()
    result = {
        "arch": arch, "device": str(dev), "dtype": dtype, "latent": latent, "pixels": latent * 8,
        "batch": batch, "rank": rank, "modules": len(net), "threads": torch.get_num_threads(),
        "baseline_s": round(base_s, 4), "ours_s": round(ours_s, 4),
        "ratio": round(ours_s / base_s, 3), "images_per_s": round(batch / ours_s, 3),
    }
    if dev.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_train_ext.bench.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sdxl"))
    p.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8); default 16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    args = p.parse_args(argv)
    print(json.dumps(run(args.arch, args.latent, args.batch, args.steps, args.rank, args.device,
                         args.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
