"""How much memory a run will take, before it starts (SPEC U3).

The estimate adds up, for the run's device (a GPU's memory, or the process's resident memory on
the CPU):

- base weights: every parameter and buffer of the UNet, text encoders and VAE, at their dtype
  (the loaded model's own, or `model.base_dtype` for the headless trainer); with
  `train.offload_frozen` the VAE and the cached text encoders count on the CPU, not the GPU;
- the adapter: its parameters, their gradients and the optimizer's state (AdamW two copies,
  8-bit optimizers a quarter of that, Prodigy / DAdapt more), an EMA copy;
- activations kept for the backward pass: measured by running the UNet's forward on the `meta`
  device (no memory, no arithmetic) with the adapter attached and counting every tensor autograd
  saves, at the run's batch and resolution and in its precision; with gradient checkpointing
  only the blocks' inputs and the largest block's own saved tensors count; when a text encoder
  is trained its forward is traced too;
- what the backward pass holds besides (gradients of the largest activations, kernels'
  workspace): a multiple of the largest saved tensor;
- caches: the latents of every training image, the text encoders' outputs per caption, one
  batch of decoded images.

`model_bytes` (already resident before the run: the host's loaded model) and `run_bytes` (what
the run adds) are given apart; the tests compare `run_bytes` with a run's measured RSS growth on
the CPU, the memory bench the total with a real-size model's peak RSS.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MiB = 2**20
GiB = 2**30

# bytes of optimizer state per adapter parameter byte (fp32 parameters)
OPTIMIZER_STATE = {"adamw": 2.0, "adam": 2.0, "adamw8bit": 0.5, "adam8bit": 0.5,
                   "pagedadamw8bit": 0.5, "lion": 1.0, "lion8bit": 0.25, "sgd": 1.0,
                   "sgdnesterov": 1.0, "adafactor": 0.1, "prodigy": 4.0, "dadaptation": 3.0,
                   "dadaptadam": 3.0, "dadaptlion": 2.0, "adamwschedulefree": 2.0,
                   "sgdschedulefree": 1.0, "came": 2.0}
# Fitted to measured peaks (docs/PERFORMANCE.md, "Memory"): what a step holds at its peak is
# the saved tensors plus the gradients flowing back through them (SAVED_FACTOR x the traced
# saved bytes; in half precision more, as measured: autocast keeps some tensors in fp32 and
# casts of the inputs that the trace, all in the half type, does not see); with checkpointing the blocks' inputs stay and one block at a time is recomputed,
# its saved tensors and their gradients (RECOMPUTE_FACTOR x the largest block's).
SAVED_FACTOR = {"fp32": 1.4, "half": 1.7}  # fp32 steps; bf16 / fp16 autocast steps
RECOMPUTE_FACTOR = 3.5
# Caching latents runs the VAE's encoder without gradients on a chunk of images: its peak is a
# few activations of the full-resolution layers (VAE_FACTOR x one of them) and, on the CPU,
# where the attention of its middle block keeps its (tokens x tokens) weights, those weights
# (VAE_ATTENTION_FACTOR x one image's; tokens = latent pixels).
VAE_FACTOR = 4.8
VAE_ATTENTION_FACTOR = 1.2
RUN_OVERHEAD = {"cpu": 16 * MiB, "cuda": 64 * MiB}  # data loader, allocator, kernels


@dataclass
class MemoryEstimate:
    device: str
    kind: str  # "VRAM" | "RSS"
    parts: dict[str, int] = field(default_factory=dict)  # bytes per component
    model_bytes: int = 0  # base weights on the device (resident before the run)
    run_bytes: int = 0  # what the run adds at its peak
    free_bytes: int | None = None  # the device's free memory now (None: unknown)
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.model_bytes + self.run_bytes

    @property
    def fits(self) -> bool | None:
        """None when the free memory is unknown. The loaded model already counts as used, so
        what the run adds is compared with the free memory."""
        if self.free_bytes is None:
            return None
        return self.run_bytes <= self.free_bytes

    def text(self) -> str:
        gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        when = "caching latents" if self.parts.get("phase") else "training steps"
        line = (f"Memory estimate ({self.kind}, {self.device}): peak {gib(self.peak_bytes)} = "
                f"model {gib(self.model_bytes)} + run {gib(self.run_bytes)} (peak while "
                f"{when}; activations {gib(self.parts.get('activations', 0))}, adapter + "
                f"optimizer {gib(self.parts.get('adapter', 0))})")
        if self.free_bytes is not None:
            line += f"; free {gib(self.free_bytes)}"
            if not self.fits:
                line += " - does not fit" + (": try " + "; ".join(self.suggestions)
                                             if self.suggestions else "")
        return line

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(peak_bytes=self.peak_bytes, fits=self.fits, text=self.text())
        return out


# -- tracing the forward on the meta device --------------------------------------------------------

def meta_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `module` whose tensors live on the meta device (no memory). Each module is
    copied shallowly, with its parameters, buffers and plain tensor attributes (such as a Lora
    extension's backups) replaced by meta tensors and its children copied the same way; every
    other attribute is shared, never copied, so nothing the host hangs on its modules (a reference
    to the whole model, a tuple of backups) is copied for real. The host's hooks (the WebUI's
    --lowvram) and an instance-level forward (checkpointing) stay out of the copy."""
    done: dict[int, Any] = {}

    def meta(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in done:
            dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
            m = torch.empty(t.shape, dtype=dt, device="meta")
            done[id(t)] = nn.Parameter(m, requires_grad=False) if param else m
        return done[id(t)]

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        new = copy.copy(m)  # a new __dict__ holding the same values
        done[id(m)] = new
        state = vars(new)
        for name, value in list(state.items()):
            if isinstance(value, torch.Tensor):
                state[name] = meta(value, False)
            elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
                state[name] = tuple(meta(v, False) if isinstance(v, torch.Tensor) else v
                                    for v in value)
            elif name.endswith("hooks") and isinstance(value, dict):
                state[name] = type(value)()
        new._parameters = {k: None if p is None else meta(p, True)
                           for k, p in m._parameters.items()}
        new._buffers = {k: None if b is None else meta(b, False) for k, b in m._buffers.items()}
        new._modules = {k: None if c is None else clone(c) for k, c in m._modules.items()}
        state.pop("forward", None)
        return new

    return clone(module)


class _SavedCounter:
    """Counts the bytes of tensors autograd saves (each tensor object once), and which top-level
    block was running when it was saved."""

    def __init__(self):
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # keeps ids unique while counting
        self.total = 0
        self.largest = 0
        self.block: int | None = None
        self.per_block: dict[int, int] = {}
        self.block_inputs: dict[int, int] = {}

    @staticmethod
    def key(t: torch.Tensor) -> int:
        """The tensor's storage: views of one tensor (a weight's transpose, an activation's
        reshape) are counted once, as the storage they share."""
        return t.untyped_storage()._cdata

    def add(self, t: torch.Tensor) -> None:
        if t.device.type != "meta":
            return
        key = self.key(t)
        if key in self.seen:  # weights are there from the start: they are not activations
            return
        self.seen.add(key)
        self.keep.append(t)
        n = t.untyped_storage().nbytes()
        self.total += n
        self.largest = max(self.largest, n)
        if self.block is not None:
            self.per_block[self.block] = self.per_block.get(self.block, 0) + n

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t


def _flash_attention(counter: _SavedCounter):
    """Attention as the memory-efficient kernels keep it: q, k, v, the output and one float per
    query row and head (the log-sum-exp), never the (N x N) weights."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.device.type != "meta":  # another thread's real attention (a generation)
            return original(q, k, v, *args, **kwargs)
        out = (q[..., :1] * 0).expand(*q.shape[:-1], v.shape[-1]) + v.sum(-2, keepdim=True)
        out = out + k.sum(-2, keepdim=True)[..., :1] * 0
        out = out.contiguous()
        for t in (q, k, v, out):
            counter.add(t)
        counter.add(torch.empty(q.shape[:-1], dtype=torch.float32, device="meta"))
        return out
    return sdpa


@contextlib.contextmanager
def _patched_sdpa(fn):
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fn
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _unet_inputs(unet: nn.Module, batch: int, h: int, w: int, tokens: int,
                 dtype: torch.dtype) -> tuple[tuple, dict]:
    ctx_dim, adm = None, None
    for name, m in unet.named_modules():
        if ctx_dim is None and name.endswith("attn2.to_k") and isinstance(m, nn.Linear):
            ctx_dim = m.in_features
    label = getattr(unet, "label_emb", None)
    if label is not None:
        first = next(m for m in label.modules() if isinstance(m, nn.Linear))
        adm = first.in_features
    in_ch = getattr(unet.input_blocks[0][0], "in_channels", 4)
    x = torch.empty(batch, in_ch, h // 8, w // 8, dtype=dtype, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    kwargs = {"context": torch.empty(batch, tokens, ctx_dim or 768, dtype=dtype, device="meta")}
    if adm is not None:
        kwargs["y"] = torch.empty(batch, adm, dtype=dtype, device="meta")
    return (x, t), kwargs


def trace_unet(unet: nn.Module, arch: str, network_cfg, *, batch: int, height: int, width: int,
               tokens: int = 77, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Saved-for-backward bytes of one training forward of `unet` with the run's adapter, on the
    meta device: {'total', 'largest', 'kept' (with gradient checkpointing: outside the blocks
    and the blocks' inputs), 'max_block' (the largest block's own), 'blocks'}."""
    from .networks import build_network

    copy_ = meta_copy(unet, dtype)
    with torch.device("meta"):
        net = build_network({"unet": copy_}, arch, _unet_only(network_cfg), seed=0, dtype=dtype)
    _real_scalars(net)
    net.attach()
    counter = _SavedCounter()
    for module in (copy_, net):
        for w in list(module.parameters()) + list(module.buffers()):
            counter.seen.add(counter.key(w))
            counter.keep.append(w)
    blocks = [*copy_.input_blocks, copy_.middle_block, *copy_.output_blocks]
    handles = []
    for i, block in enumerate(blocks):
        def pre(_m, args, i=i):
            counter.block = i
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                counter.block_inputs[i] = x.numel() * x.element_size()
        handles.append(block.register_forward_pre_hook(pre))
        handles.append(block.register_forward_hook(
            lambda _m, _a, _o: setattr(counter, "block", None)))
    args, kwargs = _unet_inputs(copy_, batch, height, width, tokens, dtype)
    try:
        with torch.enable_grad(), _patched_sdpa(_flash_attention(counter)), \
                torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            copy_(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        net.detach()
    inside = sum(counter.per_block.values())
    return {"total": counter.total, "largest": counter.largest,
            "kept": counter.total - inside + sum(counter.block_inputs.values()),
            "max_block": max(counter.per_block.values(), default=0), "blocks": len(blocks)}


def _real_scalars(net: nn.Module) -> None:
    """Scalar buffers (alpha) read as numbers in the forward: on the CPU (their value does not
    matter to the memory)."""
    for m in net.modules():
        for name, b in list(m._buffers.items()):
            if b is not None and b.device.type == "meta" and b.numel() == 1:
                m._buffers[name] = torch.ones(b.shape, dtype=b.dtype)


_TRACES: dict[tuple, dict[str, int]] = {}


def _cached_trace(unet, arch, network_cfg, batch, height, width, tokens, dtype) -> dict:
    """trace_unet, remembered per model and options (a trace of a real-size UNet takes
    seconds; the tab asks again for every status update)."""
    from dataclasses import astuple

    shapes = sum(p.numel() for p in unet.parameters())
    key = (id(unet), shapes, arch, astuple(network_cfg), batch, height, width, tokens, dtype)
    if key not in _TRACES:
        if len(_TRACES) > 64:
            _TRACES.clear()
        _TRACES[key] = trace_unet(unet, arch, network_cfg, batch=batch, height=height,
                                  width=width, tokens=tokens, dtype=dtype)
    return _TRACES[key]


def _unet_only(network_cfg):
    cfg = copy.copy(network_cfg)
    cfg.train_on = "unet"
    return cfg


def _param_bytes(module: nn.Module | None, dtype: torch.dtype | None = None) -> int:
    if module is None:
        return 0
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and \
            t.is_floating_point() else t.element_size()
        n += t.numel() * size
    return n


def adapter_parameters(roots: dict[str, nn.Module], arch: str, network_cfg) -> dict[str, int]:
    """Adapter parameter count per part ('unet', 'te', ...), from a network built on meta."""
    from .networks import build_network, part_of

    metas = {k: meta_copy(v) for k, v in roots.items()}
    with torch.device("meta"):
        net = build_network(metas, arch, network_cfg, seed=0)
    counts: dict[str, int] = {}
    for a in net:
        part = part_of(a.name)
        counts[part] = counts.get(part, 0) + sum(p.numel() for p in a.parameters()
                                                 if p.requires_grad)
    return counts


def _trace_te(te: nn.Module, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Saved bytes of a text encoder's forward, approximated from its Linear layers: each keeps
    its input (tokens x in_features) for the adapter's gradient, plus attention's q, k, v, out."""
    n = 0
    for m in te.modules():
        if isinstance(m, nn.Linear):
            n += batch * tokens * (m.in_features + m.out_features)
    return n * torch.empty((), dtype=dtype).element_size()


# -- the estimate ----------------------------------------------------------------------------------

def estimate(cfg, *, arch: str, unet: nn.Module, text_encoders: dict[str, nn.Module],
             vae: nn.Module | None, device: torch.device | str, base_dtype: torch.dtype | None =
             None, images: int | None = None, captions: int | None = None,
             free_bytes: int | None = None, with_suggestions: bool = True) -> MemoryEstimate:
    """The run's peak memory on `device`. `unet`, `text_encoders`, `vae` may be the loaded
    modules or meta ones (their dtype replaced by `base_dtype` when given); `images` / `captions`:
    how many latents / text outputs the run caches (unknown: the batch size)."""
    from .config import parse_resolution
    from .dtypes import TORCH_DTYPES

    device = torch.device(device)
    on_gpu = device.type != "cpu"
    t, d, n = cfg.train, cfg.data, cfg.network
    compute = TORCH_DTYPES[t.dtype]
    width, height = parse_resolution(d.resolution)
    batch = t.batch_size
    tokens = 77 * max(1, (d.max_token_length + 74) // 75)
    te_parts = [p for p in text_encoders] if n.train_on in ("both", "te") else []
    te_trained = bool(te_parts) and cfg.te_lr > 0
    parts: dict[str, int] = {}
    notes: list[str] = []

    unet_b = _param_bytes(unet, base_dtype)
    te_b = sum(_param_bytes(m, base_dtype) for m in text_encoders.values())
    vae_b = _param_bytes(vae, base_dtype)
    offload_te = t.offload_frozen and not te_trained and d.cache_text
    if t.offload_frozen and not offload_te:
        notes.append("train.offload_frozen: the text encoder stays on the device (it is "
                     "trained, or data.cache_text is off)")
    offload_vae = t.offload_frozen and d.cache_latents
    model = unet_b + te_b + vae_b
    if on_gpu:  # offloaded parts live in the CPU's memory during the run
        model -= (te_b if offload_te else 0) + (vae_b if offload_vae else 0)
    parts["unet_weights"], parts["te_weights"], parts["vae_weights"] = unet_b, te_b, vae_b

    counts = adapter_parameters({"unet": unet, **text_encoders}, arch, n)
    trained = sum(c for p, c in counts.items() if (p == "unet" and cfg.unet_lr > 0)
                  or (p != "unet" and cfg.te_lr > 0))
    p_size = 2 if t.adapter_dtype == "bf16" else 4
    state = OPTIMIZER_STATE.get(cfg.optim.optimizer.lower().replace("_", ""), 2.0)
    adapter = trained * p_size * (2 + state)  # weights, gradients, optimizer state
    if t.ema:
        adapter += trained * 4 if (on_gpu and not t.ema_on_cpu) or not on_gpu else 0
    parts["adapter"] = adapter

    traced = _cached_trace(unet, arch, n, batch, height, width, tokens, compute)
    factor = SAVED_FACTOR["fp32" if compute == torch.float32 else "half"]
    if t.gradient_checkpointing:
        step = factor * traced["kept"] + RECOMPUTE_FACTOR * traced["max_block"]
    else:
        step = factor * traced["total"]
    if te_trained:
        step += factor * sum(_trace_te(m, batch, tokens, compute)
                                   for m in text_encoders.values())
    parts["activations"] = int(step)

    latent = 4 * (height // 8) * (width // 8) * 4
    parts["latent_cache"] = latent * (images if images is not None else batch) \
        if d.cache_latents else 0
    ctx = tokens * _context_width(unet) * 4
    parts["text_cache"] = ctx * (captions if captions is not None else batch) \
        if d.cache_text and not te_trained else 0
    parts["batch"] = batch * 3 * height * width * 4
    encode = VAE_FACTOR * batch * _vae_width(vae) * height * width * 4
    if not on_gpu:
        encode += VAE_ATTENTION_FACTOR * batch * ((height // 8) * (width // 8)) ** 2 * 4
    encode = int(encode)
    parts["overhead"] = RUN_OVERHEAD["cpu" if not on_gpu else "cuda"]
    kept = parts["latent_cache"] + parts["text_cache"] + parts["overhead"]
    # the peak is the training step's, or caching the latents' (the VAE at full resolution)
    train_peak = kept + parts["adapter"] + parts["activations"] + parts["batch"] + \
        (encode if not d.cache_latents else 0)
    setup_peak = kept + encode + parts["batch"] if d.cache_latents else 0
    parts["vae_encode"] = encode
    parts["phase"] = 1 if setup_peak > train_peak else 0  # 1: caching latents is the peak
    run = max(train_peak, setup_peak)
    est = MemoryEstimate(device=str(device), kind="VRAM" if on_gpu else "RSS", parts=parts,
                         model_bytes=model, run_bytes=run, free_bytes=free_bytes, notes=notes)
    if with_suggestions and est.fits is False:
        est.suggestions = _suggestions(cfg, est, arch=arch, unet=unet,
                                       text_encoders=text_encoders, vae=vae, device=device,
                                       base_dtype=base_dtype, images=images, captions=captions)
    return est


def _vae_width(vae: nn.Module | None) -> int:
    """Channels of the VAE encoder's full-resolution layers (its first conv's output)."""
    if vae is not None:
        for m in vae.modules():
            if isinstance(m, nn.Conv2d):
                return m.out_channels
    return 128


def _context_width(unet: nn.Module) -> int:
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(m, nn.Linear):
            return m.in_features
    return 768


def _suggestions(cfg, est: MemoryEstimate, **kw) -> list[str]:
    """Options, one at a time and then together, that bring the run under the free memory,
    each with the peak it gives."""
    from .config import RunConfig

    changes: list[tuple[str, dict]] = []
    t = cfg.train
    if not t.gradient_checkpointing:
        changes.append(("train.gradient_checkpointing = true", {"train.gradient_checkpointing": True}))
    if not t.offload_frozen and est.kind == "VRAM":
        changes.append(("train.offload_frozen = true", {"train.offload_frozen": True}))
    if t.batch_size > 1:
        changes.append((f"train.batch_size = 1 (train.grad_accum = {t.batch_size * t.grad_accum} "
                        f"keeps the effective batch)",
                        {"train.batch_size": 1, "train.grad_accum": t.batch_size * t.grad_accum}))
    if cfg.optim.optimizer.lower() in ("adamw", "adam"):
        changes.append(("optim.optimizer = AdamW8bit (with bitsandbytes)",
                        {"optim.optimizer": "AdamW8bit"}))
    if t.dtype == "fp32" and est.kind == "VRAM":
        changes.append(("train.dtype = bf16 (or fp16)", {"train.dtype": "bf16"}))
    width, height = _res(cfg)
    if max(width, height) > 512:
        changes.append(("data.resolution = 512", {"data.resolution": "512"}))
    out, together = [], {}
    for label, change in changes:
        together.update(change)
        try:
            trial = RunConfig.from_dict(_applied(cfg, change))
            e = estimate(trial, with_suggestions=False, free_bytes=est.free_bytes, **kw)
        except Exception:
            continue
        if e.fits:
            out.append(f"{label} (run {e.run_bytes / GiB:.2f} GiB)")
    if not out and together:
        try:
            e = estimate(RunConfig.from_dict(_applied(cfg, together)), with_suggestions=False,
                         free_bytes=est.free_bytes, **kw)
            labels = ", ".join(label for label, _ in changes)
            out.append(f"all of {labels} (run {e.run_bytes / GiB:.2f} GiB"
                       f"{'' if e.fits else ', still too much: a smaller resolution'})")
        except Exception:
            pass
    return out


def _res(cfg) -> tuple[int, int]:
    from .config import parse_resolution

    return parse_resolution(cfg.data.resolution)


def _applied(cfg, change: dict) -> dict:
    data = cfg.to_dict()
    for key, value in change.items():
        section, name = key.split(".")
        data[section][name] = value
    return data


def device_free_bytes(device: torch.device | str) -> int | None:
    """Free memory of `device` now: the GPU's (driver's view), the CPU's available RAM."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        if device.type == "cpu":
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:
        return None
    return None
