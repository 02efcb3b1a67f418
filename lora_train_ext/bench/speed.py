"""Training step speed, side by side in one process, on the same UNet weights, inputs and rank.

    python -m lora_train_ext.bench.speed --arch sd1 --res 256 --batch 1 --dtype fp32 --rank 16 \\
        --threads 2 --repeats 5 [--size real|tiny] [--cases bare,adapter,full,peft] [--device cpu]

Cases (`--cases`, comma-separated; the default is the first four):
- bare: the least work of any adapter trainer: a forward of the frozen UNet and a backward to its
  input (every layer's activation gradient, no weight gradient, no optimizer);
- adapter: our adapter step: LoRA hooks on kohya's targets (SD1: 192 modules), MSE loss, backward
  into the adapters, clip-grad-norm 1 and AdamW as the trainer builds it;
- full: the trainer's own loop (`Trainer.run()` on a bundle with this UNet): a batch from the
  latent cache, text conditioning from its cache, noise and timesteps, the loss, the optimizer,
  the scheduler, the loss value read and logged, the progress event;
- peft: diffusers' UNet2DConditionModel on the very same tensors with a peft LoRA (same rank,
  alpha and modules), MSE loss, backward, clip-grad-norm 1 and torch's AdamW with its defaults
  (what diffusers' training scripts build); skipped with a note when diffusers or peft is missing;
- diffusers_bare: diffusers' UNet frozen, forward and backward to the input (the bare step of
  the reference, for its own overhead);
- adapter_plain: the adapter step with the levers named by `--plain` switched off (default all:
  fused_delta, cache_alpha, fused_adam, conv_matmul): the code path before they were added;
- peft_fused: the peft step with torch's fused AdamW (as our trainer builds it).

The cases alternate step by step (the order turns each round) after one warm-up step each, so a
busy machine slows them alike; with `full`, the trainer drives and the other cases run between
its steps. Each case prints one JSON line: step_ms (median wall time) and its spread (min, max),
cpu_ms (the process's CPU time per step: on a machine shared with other work it counts the work
done, not the waits; with one thread and OMP_WAIT_POLICY=PASSIVE, no spinning either),
images_per_s, peak_mem (CPU: the process's resident memory while the step runs, sampled every
2 ms, and peak_mem_step above its level when the step began; CUDA: peak allocated),
ratio_to_bare and ratio_to_peft (medians of the per-round ratios of wall times, with their
spread; cpu_ratio_* the same of CPU times), and the FLOPs of one step counted by torch's FlopCounterMode (forward and
backward; attention on the CPU counted with torch's own formula) or, without it, counted by hand
for the forward only (`flops_by` says which).
`--size tiny` runs the same on the tiny models (the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import optim as O
from ..core.bundle import ModelBundle, Progress, TrainControl
from ..core.config import NetworkConfig, RunConfig
from ..core.dtypes import TORCH_DTYPES as DTYPES
from ..core.models import unet as unet_module
from ..core.models.specs import arch_spec, build_unet, build_vae
from ..core.models.tiny import default_prediction, sd_alphas_cumprod
from ..core.networks import AdapterNetwork, LoRAModule, build_network
from . import reference as R

DEFAULT_CASES = ("bare", "adapter", "full", "peft")
ALL_CASES = DEFAULT_CASES + ("diffusers_bare", "adapter_plain", "peft_fused")
LEVERS = ("fused_delta", "cache_alpha", "fused_adam", "conv_matmul")
LR = 1e-4
MAX_GRAD_NORM = 1.0


# -- FLOPs -----------------------------------------------------------------------------------------

def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t)


def _bmm(b: int, n: int, k: int, m: int) -> int:
    return 2 * b * n * k * m


def sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    """Forward attention on the CPU: scores q k^T and their product with v (torch's formula for
    its GPU kernels, which FlopCounterMode lacks for the CPU one)."""
    b, h, n, d = _shape(query)
    m, dv = _shape(key)[-2], _shape(value)[-1]
    return _bmm(b * h, n, d, m) + _bmm(b * h, n, m, dv)


def sdpa_cpu_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    """Backward attention on the CPU, as torch counts its GPU kernels' backward: the scores
    recomputed, then the gradients of v, of the scores, of q and of k."""
    b, h, n, d = _shape(query)
    m, dv = _shape(key)[-2], _shape(value)[-1]
    return (_bmm(b * h, n, d, m) + _bmm(b * h, n, dv, m) + _bmm(b * h, m, n, dv)
            + _bmm(b * h, n, m, d) + _bmm(b * h, d, n, m))


for _fn in (sdpa_cpu_flops, sdpa_cpu_backward_flops):
    _fn._get_raw = True  # torch >= 2.4 hands raw arguments only to functions marked so


def _cpu_attention_mapping() -> dict:
    ops = torch.ops.aten
    out = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", sdpa_cpu_flops),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward",
                      sdpa_cpu_backward_flops)):
        if hasattr(ops, name):
            out[getattr(ops, name)] = fn
    return out


def count_flops(fn: Callable[[], object]) -> tuple[int | None, str]:
    """(FLOPs of one call of fn, 'FlopCounterMode'), or (None, reason) without the counter."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None, "no torch.utils.flop_counter in this torch"
    mapping = _cpu_attention_mapping()
    try:
        mode = FlopCounterMode(display=False, custom_mapping=mapping)
    except TypeError:
        mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return int(mode.get_total_flops()), "FlopCounterMode"


def hand_count_forward_flops(unet: nn.Module, call: Callable[[], object]) -> int:
    """The forward's matrix FLOPs counted by hand while `call` runs it: 2 x multiply-adds of
    every Linear and Conv2d and of attention's two products (scores, weighted values)."""
    total = [0]

    def linear(m: nn.Linear, args, out):
        total[0] += 2 * (args[0].numel() // m.in_features) * m.in_features * m.out_features

    def conv(m: nn.Conv2d, args, out):
        kh, kw = m.kernel_size
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * kh * kw

    def attention(m: nn.Module, args, out):
        x = args[0]
        ctx = args[1] if len(args) > 1 and args[1] is not None else x
        inner = m.to_q.out_features
        total[0] += 2 * 2 * x.shape[0] * x.shape[1] * ctx.shape[1] * inner

    handles = []
    for m in unet.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif hasattr(m, "to_q") and hasattr(m, "to_k") and hasattr(m, "heads"):
            handles.append(m.register_forward_hook(attention))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return total[0]


# -- memory ----------------------------------------------------------------------------------------

def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """Peak memory while a step runs: CUDA peak allocated, else the process's resident set
    sampled every 2 ms by a thread (Linux), else the process's lifetime peak (ru_maxrss)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else \
            "rss" if _rss_bytes() is not None else "max_rss_process"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_bytes = 0
        self.peak_bytes = 0

    def __enter__(self):
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        elif self.kind == "rss":
            self.start_bytes = self.peak_bytes = _rss_bytes() or 0
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            now = _rss_bytes() or 0
            if now > self.peak_bytes:
                self.peak_bytes = now

    def __exit__(self, *exc):
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "rss":
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() or 0)
        else:
            import resource

            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


# -- cases -----------------------------------------------------------------------------------------

def _noop() -> None:
    return None


@dataclass
class Case:
    name: str
    step: Callable[[], None]
    enter: Callable[[], None] = _noop
    leave: Callable[[], None] = _noop
    options: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds of each timed step
    peaks: list[int] = field(default_factory=list)
    deltas: list[int] = field(default_factory=list)
    flops: int | None = None
    flops_by: str = ""


@dataclass
class Setup:
    arch: str
    size: str
    resolution: int
    batch: int
    dtype: str
    rank: int
    device: torch.device
    unet: nn.Module
    x: torch.Tensor
    t: torch.Tensor
    ctx: torch.Tensor
    y: torch.Tensor | None
    added: dict | None
    target: torch.Tensor

    @property
    def amp(self) -> dict:
        return dict(device_type=self.device.type, dtype=DTYPES[self.dtype],
                    enabled=self.dtype != "fp32")


def make_setup(arch: str, size: str, resolution: int, batch: int, dtype: str, rank: int,
               device: str) -> Setup:
    dev = torch.device(device)
    unet = build_unet(arch, size, device=dev, seed=0).requires_grad_(False)
    spec = arch_spec(arch, size).unet
    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 77, spec.context_dim, generator=g)
    target = torch.randn(x.shape, generator=g)
    y, added = R.diffusers_inputs(arch, size, batch, g, resolution)
    to = (lambda v: None if v is None else v.to(dev))
    added = None if added is None else {k: v.to(dev) for k, v in added.items()}
    return Setup(arch, size, resolution, batch, dtype, rank, dev, unet, to(x), to(t), to(ctx),
                 to(y), added, to(target))


def _network(s: Setup, plain: tuple[str, ...] = ()) -> AdapterNetwork:
    net = build_network({"unet": s.unet}, s.arch,
                        NetworkConfig(rank=s.rank, alpha=s.rank, train_on="unet"),
                        seed=0).to(s.device)
    for a in net:
        if "fused_delta" in plain and isinstance(a, LoRAModule):
            a.fused_delta = False
        if "cache_alpha" in plain:
            a.cache_alpha = False
    return net.train()


def _ours_optimizer(params: list, plain: bool) -> torch.optim.Optimizer:
    before = O.FUSED_ADAM
    O.FUSED_ADAM = not plain
    try:
        return O.build_optimizer("AdamW", [{"params": params, "lr": LR}])
    finally:
        O.FUSED_ADAM = before


def bare_case(s: Setup) -> Case:
    def step():
        xi = s.x.clone().requires_grad_(True)
        with torch.autocast(**s.amp):
            out = s.unet(xi, s.t, context=s.ctx, y=s.y)
        out.float().square().mean().backward()
    return Case("bare", step)


def adapter_case(s: Setup, name: str = "adapter", plain: tuple[str, ...] = ()) -> Case:
    net = _network(s, plain)
    params = net.trainable_parameters()
    opt = _ours_optimizer(params, "fused_adam" in plain)

    def step():
        with torch.autocast(**s.amp):
            out = s.unet(s.x, s.t, context=s.ctx, y=s.y)
        loss = F.mse_loss(out.float(), s.target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
    options = {"modules": len(net), "fused_optimizer": all(O.uses_fused(opt))}
    if plain:
        options["levers_off"] = list(plain)
    conv_matmul = "conv_matmul" not in plain

    def enter():
        unet_module.CONV_AS_MATMUL = conv_matmul
        net.attach()

    def leave():
        net.detach()
        unet_module.CONV_AS_MATMUL = True
    return Case(name, step, enter=enter, leave=leave, options=options)


def reference_cases(s: Setup, wanted: list[str]) -> tuple[list[Case], dict[str, str]]:
    """diffusers_bare / peft / peft_fused, or {case: why skipped}."""
    try:
        model = R.diffusers_unet(s.unet, s.arch, s.size).to(s.device)
    except R.Unavailable as e:
        return [], {name: str(e) for name in wanted}
    cases, skipped = [], {}

    def forward(x):
        return model(x, s.t, encoder_hidden_states=s.ctx, added_cond_kwargs=s.added).sample

    params, version = [], ""
    if {"peft", "peft_fused"} & set(wanted):
        try:
            params, version = R.add_peft_lora(model, s.rank, s.rank)
        except R.Unavailable as e:
            skipped.update({n: str(e) for n in wanted if n != "diffusers_bare"})
    if "diffusers_bare" in wanted:
        def bare_step():
            xi = s.x.clone().requires_grad_(True)
            with torch.autocast(**s.amp):
                out = forward(xi)
            out.float().square().mean().backward()
        cases.append(Case("diffusers_bare", bare_step,
                          enter=lambda: R.set_peft_enabled(model, False),
                          leave=lambda: R.set_peft_enabled(model, True)))
    for name in ("peft", "peft_fused"):
        if name not in wanted or name in skipped:
            continue
        opt = torch.optim.AdamW(params, lr=LR, **({"fused": True} if name == "peft_fused" else {}))

        def step(opt=opt):
            with torch.autocast(**s.amp):
                out = forward(s.x)
            loss = F.mse_loss(out.float(), s.target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
        cases.append(Case(name, step, options={"modules": len(R.peft_modules(model)),
                                               "peft": version,
                                               "fused_optimizer": name == "peft_fused"}))
    return cases, skipped


# -- the trainer as a case -------------------------------------------------------------------------

def _bench_bundle(s: Setup) -> ModelBundle:
    """The trainer's bundle around this UNet. What runs only before the timed steps is small:
    the tiny VAE fills the latent cache (latents of the real shape: 4 channels, 1/8 the side)
    and the conditioning comes from a fixed table of the real shape, one row per caption, which
    the trainer caches like any text encoder's output."""
    vae = build_vae(s.arch, "tiny", device=s.device, seed=1).requires_grad_(False)
    scale = arch_spec(s.arch, "tiny").vae.scale_factor
    rows = {f"bench caption {i}": i for i in range(s.batch)}

    def encode(images):
        return vae.encode(images.to(s.device)).mode() * scale

    def condition(captions, sizes=None):
        idx = torch.tensor([rows.get(c, 0) for c in captions], device=s.device)
        if s.y is None:
            return s.ctx[idx]
        return {"crossattn": s.ctx[idx], "vector": s.y[idx]}

    def denoise(x, t, cond):
        if isinstance(cond, dict):
            return s.unet(x, t, context=cond["crossattn"], y=cond["vector"])
        return s.unet(x, t, context=cond)

    return ModelBundle(
        arch=s.arch, unet=s.unet, text_encoders={}, vae=vae, encode=encode, condition=condition,
        denoise=denoise, prediction=default_prediction(s.arch), alphas_cumprod=sd_alphas_cumprod(),
        model_name=f"bench-{s.arch}-{s.size}", model_hash="bench", resolution=s.resolution,
        device=s.device, vae_id=f"bench-{s.arch}-tiny-vae")


def _write_dataset(folder: str, s: Setup) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(s.batch):
        pixels = rng.integers(0, 256, (s.resolution, s.resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"bench caption {i}")


def _run_config(s: Setup, folder: str, steps: int) -> RunConfig:
    cfg = RunConfig()
    cfg.model.arch = s.arch
    cfg.network.rank = s.rank
    cfg.network.alpha = float(s.rank)
    cfg.data.dataset_dir = os.path.join(folder, "data")
    cfg.data.resolution = str(s.resolution)
    cfg.data.enable_buckets = False
    cfg.optim.optimizer = "AdamW"
    cfg.optim.lr = LR
    cfg.optim.max_grad_norm = MAX_GRAD_NORM
    cfg.train.max_steps = steps
    cfg.train.batch_size = s.batch
    cfg.train.grad_accum = 1
    cfg.train.dtype = s.dtype
    cfg.train.seed = 0
    cfg.save.output_dir = os.path.join(folder, "out")
    cfg.save.output_name = "bench"
    return cfg.validate()


# -- running ---------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(case: Case, device: torch.device) -> None:
    case.enter()
    try:
        _sync(device)
        with PeakMemory(device) as mem:
            c0, t0 = time.process_time(), time.perf_counter()
            case.step()
            _sync(device)
            case.times.append(time.perf_counter() - t0)
            case.cpu.append(time.process_time() - c0)
        case.peaks.append(mem.peak_bytes)
        case.deltas.append(max(0, mem.peak_bytes - mem.start_bytes))
    finally:
        case.leave()


def _warm(case: Case) -> None:
    case.enter()
    try:
        case.step()
    finally:
        case.leave()


def _count(case: Case, flops: bool) -> None:
    if not flops:
        return
    case.enter()
    try:
        case.flops, case.flops_by = count_flops(case.step)
    finally:
        case.leave()


def _rotated(cases: list[Case], r: int) -> list[Case]:
    if not cases:
        return []
    k = r % len(cases)
    return cases[k:] + cases[:k]


def run_cases(s: Setup, cases: list[Case], repeats: int, with_full: bool,
              flops: bool = True) -> Case | None:
    """Time the cases interleaved; with `with_full`, the trainer drives and is returned as a
    case too."""
    if not with_full:
        for c in cases:
            _warm(c)
        for r in range(repeats):
            for c in _rotated(cases, r):
                _timed(c, s.device)
        for c in cases:
            _count(c, flops)
        return None

    from ..core.trainer import Trainer

    full = Case("full", _noop)
    state = {"trainer": None, "mark": 0.0, "cpu_mark": 0.0, "mem": None, "flop_mode": None}
    counted_step = repeats + 2  # 1: warm-up, 2 .. repeats + 1: timed, then one counted

    def between_steps(event: Progress) -> None:
        if event.kind != "step":
            return
        _sync(s.device)
        now, cpu_now = time.perf_counter(), time.process_time()
        k = event.step
        mem = state.pop("mem", None)
        if mem is not None:
            mem.__exit__(None, None, None)
        if state.get("flop_mode") is not None:
            mode = state.pop("flop_mode")
            mode.__exit__(None, None, None)
            full.flops, full.flops_by = int(mode.get_total_flops()), "FlopCounterMode"
        if 2 <= k <= repeats + 1:
            full.times.append(now - state["mark"])
            full.cpu.append(cpu_now - state["cpu_mark"])
            full.peaks.append(mem.peak_bytes)
            full.deltas.append(max(0, mem.peak_bytes - mem.start_bytes))
        trainer = state["trainer"]
        trainer.network.detach()
        try:
            if k == 1:
                for c in cases:
                    _warm(c)
            elif k <= repeats + 1:
                for c in _rotated(cases, k):
                    _timed(c, s.device)
            if k == repeats + 1:
                for c in cases:
                    _count(c, flops)
        finally:
            trainer.network.attach()
        if k == repeats + 1 and flops:
            try:
                from torch.utils.flop_counter import FlopCounterMode

                try:
                    mode = FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping())
                except TypeError:
                    mode = FlopCounterMode(display=False)
                mode.__enter__()
                state["flop_mode"] = mode
            except ImportError:
                full.flops_by = "no torch.utils.flop_counter in this torch"
        if k <= repeats:
            state["mem"] = PeakMemory(s.device).__enter__()
        _sync(s.device)
        state["cpu_mark"], state["mark"] = time.process_time(), time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as folder:
        _write_dataset(os.path.join(folder, "data"), s)
        cfg = _run_config(s, folder, counted_step if flops else repeats + 1)
        control = TrainControl(between_steps)
        trainer = Trainer(_bench_bundle(s), cfg, control)
        state["trainer"] = trainer
        trainer.run()
        full.options = {"modules": len(trainer.network),
                        "fused_optimizer": all(O.uses_fused(trainer.optimizer)),
                        "trainer": "Trainer.run, latents and text from their caches, "
                                   f"optimizer {cfg.optim.optimizer}, scheduler "
                                   f"{cfg.optim.scheduler}, loss {cfg.loss.loss}"}
    return full


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _paired(a: Case, b: Case | None, what: str = "times"
            ) -> tuple[float | None, list[float] | None]:
    """Median and (min, max) of the per-round ratios a / b (rounds are interleaved)."""
    if b is None or not getattr(a, what) or not getattr(b, what):
        return None, None
    ratios = [x / y for x, y in zip(getattr(a, what), getattr(b, what)) if y > 0]
    if not ratios:
        return None, None
    return round(statistics.median(ratios), 3), [round(min(ratios), 3), round(max(ratios), 3)]


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        from ..core.device import _cpu_name

        env["cpu"] = _cpu_name()
        env["cores"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return env


def run(arch: str = "sd1", size: str = "real", resolution: int = 256, batch: int = 1,
        dtype: str = "fp32", rank: int = 16, device: str = "cpu", repeats: int = 5,
        cases: tuple[str, ...] = DEFAULT_CASES, plain: tuple[str, ...] = LEVERS,
        threads: int | None = None, flops: bool = True) -> list[dict]:
    """One dict per case (or a skip note), as the command line prints them."""
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {', '.join(ALL_CASES)}")
    if threads:
        torch.set_num_threads(int(threads))
    s = make_setup(arch, size, resolution, batch, dtype, rank, device)
    built: list[Case] = []
    if "bare" in cases:
        built.append(bare_case(s))
    if "adapter" in cases:
        built.append(adapter_case(s))
    if "adapter_plain" in cases:
        built.append(adapter_case(s, "adapter_plain", tuple(plain)))
    ref_wanted = [c for c in cases if c in ("diffusers_bare", "peft", "peft_fused")]
    skipped: dict[str, str] = {}
    if ref_wanted:
        ref, skipped = reference_cases(s, ref_wanted)
        built += ref
    env_before = environment(s.device)
    with torch.inference_mode(False), torch.enable_grad():
        full = run_cases(s, built, repeats, "full" in cases, flops)
    if full is not None:
        built.insert(0, full)
    by_name = {c.name: c for c in built}
    common = {"arch": arch, "size": size, "resolution": resolution, "batch": batch,
              "dtype": dtype, "device": str(s.device), "rank": rank, "repeats": repeats}
    env = environment(s.device)
    env["load_avg_1m_before"] = env_before.get("load_avg_1m")
    lines = []
    for name in cases:
        if name in skipped:
            lines.append({**common, "case": name, "skipped": skipped[name]})
            continue
        c = by_name[name]
        med = _median(c.times)
        ratio_bare, spread_bare = _paired(c, by_name.get("bare"))
        ratio_peft, spread_peft = _paired(c, by_name.get("peft"))
        cpu_bare, cpu_spread_bare = _paired(c, by_name.get("bare"), "cpu")
        cpu_peft, cpu_spread_peft = _paired(c, by_name.get("peft"), "cpu")
        lines.append({
            **common, "case": name, "options": c.options,
            "step_ms": round(med * 1e3, 1),
            "spread_ms": [round(min(c.times) * 1e3, 1), round(max(c.times) * 1e3, 1)],
            "images_per_s": round(batch / med, 3),
            "peak_mem_mib": round(max(c.peaks) / 2**20, 1) if c.peaks else None,
            "peak_mem_step_mib": round(max(c.deltas) / 2**20, 1) if c.deltas else None,
            "peak_mem_kind": PeakMemory(s.device).kind,
            "ratio_to_bare": ratio_bare, "ratio_to_bare_spread": spread_bare,
            "ratio_to_peft": ratio_peft, "ratio_to_peft_spread": spread_peft,
            "cpu_ms": round(_median(c.cpu) * 1e3, 1) if c.cpu else None,
            "cpu_spread_ms": [round(min(c.cpu) * 1e3, 1), round(max(c.cpu) * 1e3, 1)]
            if c.cpu else None,
            "cpu_ratio_to_bare": cpu_bare, "cpu_ratio_to_bare_spread": cpu_spread_bare,
            "cpu_ratio_to_peft": cpu_peft, "cpu_ratio_to_peft_spread": cpu_spread_peft,
            "gflop": None if c.flops is None else round(c.flops / 1e9, 3),
            "gflop_per_s": None if c.flops is None else round(c.flops / 1e9 / med, 2),
            "flops_by": c.flops_by, "env": env,
        })
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_train_ext.bench.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sdxl"))
    p.add_argument("--size", default="real", choices=("real", "tiny"))
    p.add_argument("--res", type=int, default=None,
                   help="image side in pixels (latents 1/8); default 256 (real), 64 (tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per case")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma-separated, from {', '.join(ALL_CASES)}")
    p.add_argument("--plain", default=",".join(LEVERS),
                   help="levers adapter_plain switches off: " + ", ".join(LEVERS))
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    args = p.parse_args(argv)
    resolution = args.res or (256 if args.size == "real" else 64)
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    plain = tuple(c.strip() for c in args.plain.split(",") if c.strip())
    bad = sorted(set(plain) - set(LEVERS))
    if bad:
        p.error(f"unknown levers {bad}; choose from {', '.join(LEVERS)}")
    try:
        lines = run(args.arch, args.size, resolution, args.batch, args.dtype, args.rank,
                    args.device, args.repeats, cases, plain, args.threads, not args.no_flops)
    except ValueError as e:
        p.error(str(e))
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
