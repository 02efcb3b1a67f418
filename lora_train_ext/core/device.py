"""Which training precision a device runs fast, in one place.

`preferred_dtype(device)` is the default a host offers: bf16 autocast where the device runs bf16
natively (Ampere and newer GPUs; CPUs whose bf16 kernels are clearly faster than fp32, as with
AMX), fp16 on GPUs without bf16, fp32 on other CPUs. `dtype_is_slow(device, dtype)` says, in a
sentence the preflight shows as a warning, when a chosen precision will run much slower.

On a CPU the instruction flags alone do not settle it: a CPU may report AVX512_BF16 and run bf16
autocast no faster than fp32 (then fp32 is the default: same speed, more precision), and the first
bf16 calls of a process are far slower than the later ones (kernels are built on first use). So
a CPU without bf16 instructions is slow for bf16, and one with them is timed once per process: a
small training step (conv, norms, linears, attention; forward and backward) in both precisions,
on one thread, after warm-up calls, the fastest of interleaved rounds. `LORA_TRAIN_CPU_BF16=1|0`
skips the timing and says it.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

ENV_OVERRIDE = "LORA_TRAIN_CPU_BF16"
FAST_RATIO = 0.8  # bf16 autocast at most this share of fp32's time: the CPU's default is bf16
SLOW_RATIO = 1.5  # more than this: a bf16 run on this CPU gets a warning


@dataclass(frozen=True)
class CpuBf16:
    how: str  # how it was decided: 'environment', 'no bf16 instructions', 'measured'
    ratio: float | None = None  # measured bf16 / fp32 time of the probe step
    forced: bool | None = None  # LORA_TRAIN_CPU_BF16's answer

    @property
    def faster(self) -> bool:
        """bf16 autocast clearly beats fp32 here: offer it by default."""
        if self.forced is not None:
            return self.forced
        return self.ratio is not None and self.ratio <= FAST_RATIO

    @property
    def slower(self) -> bool:
        """bf16 autocast is much slower than fp32 here: warn."""
        if self.forced is not None:
            return not self.forced
        if self.how == "no bf16 instructions":
            return True
        return self.ratio is not None and self.ratio > SLOW_RATIO


def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def cpu_bf16_flags() -> bool | None:
    """True when the CPU reports bf16 instructions (AVX512_BF16, AMX, Arm BF16), False when it
    reports none, None when it cannot tell (no probe in this torch, no /proc/cpuinfo)."""
    probes = [getattr(torch.cpu, name, None) for name in
              ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    answers = []
    for probe in probes:
        if probe is None:
            continue
        try:
            answers.append(bool(probe()))
        except Exception:  # a probe this build cannot run
            continue
    if any(answers):
        return True
    flags = _cpuinfo_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if answers:
        return False
    return None


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    out: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            out.update(value.split())
    return out


def _probe_step(x: torch.Tensor, params: dict[str, torch.Tensor], amp: bool) -> None:
    """A small training step with the UNet's kinds of ops: conv, group norm, SiLU, linear,
    layer norm, GELU, attention; forward and backward to the input."""
    F = torch.nn.functional
    xi = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        h = F.conv2d(xi, params["conv"], padding=1)
        h = F.silu(F.group_norm(h.float(), 8).to(h.dtype))
        t = h.flatten(2).transpose(1, 2)
        t = F.layer_norm(t, (t.shape[-1],))
        q = F.linear(t, params["q"]).reshape(1, -1, 2, 32).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(1, -1, 64)
        t = F.linear(F.gelu(F.linear(a, params["up"])), params["down"]) + t
    t.float().square().mean().backward()


def _measure_cpu_bf16(rounds: int = 7) -> float:
    """bf16 autocast time / fp32 time of the probe step: the fastest of interleaved rounds on
    one thread each (a kernel's speed, not how busy the other cores are)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 16, 16, generator=g)
    params = {"conv": torch.randn(64, 64, 3, 3, generator=g) * 0.05,
              "q": torch.randn(64, 64, generator=g) * 0.1,
              "up": torch.randn(256, 64, generator=g) * 0.1,
              "down": torch.randn(64, 256, generator=g) * 0.1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(2):  # first calls build kernels
                _probe_step(x, params, False)
                _probe_step(x, params, True)
            best = {False: float("inf"), True: float("inf")}
            for r in range(rounds):
                for amp in ((False, True) if r % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    _probe_step(x, params, amp)
                    best[amp] = min(best[amp], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best[True] / max(best[False], 1e-9)


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """How this CPU runs bf16 autocast against fp32; decided once per process."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return CpuBf16("environment", forced=True)
    if forced in ("0", "false", "no", "off"):
        return CpuBf16("environment", forced=False)
    if cpu_bf16_flags() is False:
        return CpuBf16("no bf16 instructions")
    return CpuBf16("measured", round(_measure_cpu_bf16(), 2))


def cuda_bf16(device: torch.device) -> bool:
    try:
        if device.index is not None:
            major, _ = torch.cuda.get_device_capability(device)
            return major >= 8
        return bool(torch.cuda.is_bf16_supported())
    except Exception:
        return False


def preferred_dtype(device) -> str:
    """The training precision to offer by default on `device`: 'bf16', 'fp16' or 'fp32'."""
    dev = _device(device)
    if dev.type == "cuda":
        return "bf16" if cuda_bf16(dev) else "fp16"
    if dev.type == "cpu":
        return "bf16" if cpu_bf16().faster else "fp32"
    return "fp32"  # mps, xpu, ...: the precision every device runs


def dtype_is_slow(device, dtype: str) -> str:
    """'' when `dtype` suits `device`; otherwise why it will be slow and what to choose."""
    dev = _device(device)
    if dtype == "bf16" and dev.type == "cpu":
        info = cpu_bf16()
        if not info.slower:
            return ""
        times = f" ~{info.ratio:.1f}x" if info.ratio else ""
        why = {"environment": f"{ENV_OVERRIDE}=0 says this CPU has no fast bf16",
               "no bf16 instructions": "it has no bf16 instructions",
               "measured": "its bf16 kernels measured slow"}[info.how]
        return (f"train.dtype bf16 on this CPU ({_cpu_name()}) runs{times or ' much'} slower "
                f"than fp32 ({why}): choose fp32")
    if dtype == "bf16" and dev.type == "cuda" and not cuda_bf16(dev):
        return "train.dtype bf16 on this GPU has no native support and runs slowly: choose fp16"
    return ""


def _cpu_name() -> str:
    name = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown CPU"
