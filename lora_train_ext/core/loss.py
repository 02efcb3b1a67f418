"""Diffusion training loss: noise, timesteps, targets, per-element losses and SNR weights.

Shapes: latents, noise, pred, target (B, C, H, W); timesteps (B,) long; alphas_cumprod (T,)
float64 (the model's DDPM schedule, `T` usually 1000). Every random draw takes an explicit
`torch.Generator` so a seed reproduces a run. Random numbers are drawn on the generator's
device and moved to the latents' device, so a CPU generator gives the same noise on any GPU.
The loss itself is computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from .config import HUBER_SCHEDULES, LOSSES, TIMESTEP_SAMPLING  # the settings table names them
from .errors import UserError

if TYPE_CHECKING:
    from .config import LossConfig, RunConfig


PREDICTIONS = ("epsilon", "v")
SNR_CLAMP = 1000.0  # debiased estimation: kohya limits the SNR to 1000 (t=0 is nearly inf)


# -- schedule ------------------------------------------------------------------------------------
def _gather(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] as float64 on the timesteps' device, (B,)."""
    ac = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    return ac[timesteps.long()]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) in `like`'s dtype and device, for broadcasting."""
    shape = (values.shape[0],) + (1,) * (like.dim() - 1)
    return values.reshape(shape).to(device=like.device, dtype=like.dtype)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a / (1 - a) with a = alphas_cumprod[t]: (B,) float64.
    0 at a zero-terminal-SNR last step."""
    a = _gather(alphas_cumprod, timesteps)
    return a / (1.0 - a)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(a) * x_0 + sqrt(1 - a) * noise, in latents' dtype."""
    a = _gather(alphas_cumprod, timesteps)
    signal = _per_sample(a.sqrt(), latents)
    sigma = _per_sample((1.0 - a).sqrt(), latents)
    return signal * latents + sigma * noise.to(latents.dtype)


def target_for(prediction: str, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the model should predict: the noise (epsilon) or v = sqrt(a) * noise - sqrt(1-a) * x_0.

    `noise` is the clean noise even when input perturbation noised the latents with more."""
    prediction = _prediction(prediction)
    if prediction == "epsilon":
        return noise
    a = _gather(alphas_cumprod, timesteps)
    signal, sigma = _per_sample(a.sqrt(), noise), _per_sample((1.0 - a).sqrt(), noise)
    return signal * noise - sigma * latents.to(noise.dtype)


def _prediction(prediction: str) -> str:
    if prediction in ("v", "v_prediction"):
        return "v"
    if prediction in ("epsilon", "eps"):
        return "epsilon"
    raise UserError("model.prediction", f"{prediction!r} is not valid; choose epsilon or v")


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale the schedule so the last step is pure noise (Lin et al. 2023, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed"): shift sqrt(alphas_cumprod) so its last
    value is 0 and scale it so its first value is unchanged. Same as rescaling the betas.
    Returns (T,) in the input's dtype (computed in float64)."""
    root = alphas_cumprod.to(torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return (root ** 2).to(alphas_cumprod.dtype)


# -- noise and timesteps -------------------------------------------------------------------------
def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)


def make_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0,
               noise_offset_random_strength: bool = False, multires_iterations: int = 0,
               multires_discount: float = 0.3) -> torch.Tensor:
    """Gaussian noise like `latents`, with optional offset noise and pyramid (multires) noise.

    Offset noise adds `noise_offset * randn(B, C, 1, 1)` (a per-channel shift that lets the model
    learn overall brightness); with random strength each sample's offset is scaled by U(0, 1).
    Pyramid noise then adds, for i = 0 .. iterations - 1, noise drawn at the size divided by
    r**i (r random in [2, 4)) and upsampled bilinearly, weighted by discount**i, stopping once
    a side reaches 1, and divides the sum by its standard deviation (kohya's pyramid noise).
    """
    b, c, h, w = latents.shape
    noise = _randn((b, c, h, w), generator)
    if noise_offset:
        offset = _randn((b, c, 1, 1), generator) * float(noise_offset)
        if noise_offset_random_strength:
            offset = offset * _rand((b, 1, 1, 1), generator)
        noise = noise + offset
    if multires_iterations > 0:
        for i in range(int(multires_iterations)):
            r = float(_rand((1,), generator).item()) * 2.0 + 2.0
            hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
            low = _randn((b, c, hn, wn), generator)
            noise = noise + F.interpolate(low, size=(h, w), mode="bilinear",
                                          align_corners=False) * (multires_discount ** i)
            if hn == 1 or wn == 1:
                break
        noise = noise / noise.std()
    return noise.to(device=latents.device, dtype=latents.dtype)


def input_perturbation(noise: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """Noise to noise the latents with: noise + gamma * randn (Ning et al. 2023). The target
    stays the original `noise`, so the model learns to undo a slightly wrong input."""
    if not gamma:
        return noise
    extra = _randn(tuple(noise.shape), generator).to(device=noise.device, dtype=noise.dtype)
    return noise + float(gamma) * extra


def sample_timesteps(batch: int, generator: torch.Generator, t_min: int = 0, t_max: int = 1000,
                     sampling: str = "uniform", mean: float = 0.0, std: float = 1.0,
                     device: torch.device | str | None = None,
                     mode_scale: float = 1.29) -> torch.Tensor:
    """(batch,) long timesteps in [t_min, t_max).

    uniform: every step equally likely. The others draw a fraction f in [0, 1] and take
    t = floor(t_min + f * (t_max - t_min)):
    logit_normal: f = sigmoid(mean + std * N(0, 1)), which favours the middle steps (SD3's
    logit-normal sampling).
    mode: u ~ U(0, 1), f = 1 - u - s * (cos^2(pi/2 * u) - 1 + u) with s = mode_scale (SD3's
    "mode sampling with heavy tails", section 3.1 of Esser et al. 2024): s = 0 is uniform,
    s > 0 favours the middle, s < 0 both ends; monotone (a proper distribution) for
    -1 <= s <= 2 / (pi - 2).
    cosmap: u ~ U(0, 1), f = 1 - 1 / (tan(pi/2 * u) + 1) (SD3's CosMap): density
    1 / (pi/2 * (f^2 + (1 - f)^2)), highest in the middle, with longer tails than logit_normal.
    """
    if not 0 <= t_min < t_max:
        raise UserError("loss.timestep_max",
                        f"need 0 <= timestep_min < timestep_max, got {t_min}, {t_max}")
    if sampling == "uniform":
        t = torch.randint(int(t_min), int(t_max), (batch,), generator=generator,
                          device=generator.device)
    else:
        if sampling == "logit_normal":
            f = torch.sigmoid(float(mean) + float(std) * _randn((batch,), generator).double())
        elif sampling == "mode":
            u = _rand((batch,), generator).double()
            f = 1.0 - u - float(mode_scale) * (torch.cos(math.pi / 2 * u) ** 2 - 1.0 + u)
        elif sampling == "cosmap":
            u = _rand((batch,), generator).double()
            f = 1.0 - 1.0 / (torch.tan(math.pi / 2 * u) + 1.0)
        else:
            raise UserError("loss.timestep_sampling", f"{sampling!r} is not valid; choose one of "
                                                      f"{', '.join(TIMESTEP_SAMPLING)}")
        t = (t_min + f * (t_max - t_min)).floor().long().clamp(t_min, t_max - 1)
    return t.to(device if device is not None else generator.device)


def timesteps_for(batch: int, generator: torch.Generator, cfg: "LossConfig") -> torch.Tensor:
    """sample_timesteps with a LossConfig's range and distribution (on the generator's device)."""
    return sample_timesteps(batch, generator, cfg.timestep_min, cfg.timestep_max,
                            cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std,
                            mode_scale=cfg.mode_scale)


class TimestepHistogram(NamedTuple):
    """counts[i]: draws with edges[i] <= t < edges[i + 1] (len(edges) == len(counts) + 1)."""
    counts: list[int]
    edges: list[float]


def timestep_histogram(cfg: "RunConfig | LossConfig", bins: int = 20,
                       n: int = 100000) -> TimestepHistogram:
    """A preview of the timestep distribution a config trains with: `n` draws (a generator
    seeded with 0, so the preview is the same each time) counted in `bins` equal bins over
    [timestep_min, timestep_max)."""
    lc = cfg if hasattr(cfg, "timestep_sampling") else cfg.loss
    if bins < 1 or n < 1:
        raise ValueError(f"need bins >= 1 and n >= 1, got {bins}, {n}")
    t_min, t_max = int(lc.timestep_min), int(lc.timestep_max)
    t = timesteps_for(int(n), torch.Generator().manual_seed(0), lc)
    index = ((t - t_min).double() * bins / (t_max - t_min)).floor().long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    edges = [t_min + (t_max - t_min) * i / bins for i in range(bins + 1)]
    return TimestepHistogram([int(c) for c in counts], edges)


# -- per-element loss ----------------------------------------------------------------------------
def huber_c(timesteps: torch.Tensor, schedule: str, delta: float,
            alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample Huber threshold c, (B,) float32 (kohya's schedules, huber_scale 1).

    constant: delta. exponential: exp(-k t) with k = -ln(delta) / T, so c is 1 at t=0 and
    delta at t=T. snr: (1 - delta) / (1 + sigma)^2 + delta with sigma = sqrt((1 - a) / a), so
    c is near 1 (L2-like) at low noise and delta (L1-like, robust) at high noise.
    """
    t = timesteps.to(torch.float64)
    if schedule == "constant":
        c = torch.full_like(t, float(delta))
    elif schedule == "exponential":
        k = -math.log(delta) / alphas_cumprod.shape[0]
        c = torch.exp(-k * t)
    elif schedule == "snr":
        a = _gather(alphas_cumprod, timesteps)
        sigma = ((1.0 - a) / a).sqrt()
        c = (1.0 - delta) / (1.0 + sigma) ** 2 + delta
    else:
        raise UserError("loss.huber_schedule",
                        f"{schedule!r} is not valid; choose one of {', '.join(HUBER_SCHEDULES)}")
    return c.to(torch.float32)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                     huber_c: torch.Tensor | float | None = None) -> torch.Tensor:
    """Loss per element in fp32, same shape as pred.

    mse (x^2), l1 (|x|), huber: kohya's pseudo-Huber 2c(sqrt(x^2 + c^2) - c) (~x^2 for |x| << c,
    ~2c|x| for |x| >> c), smooth_l1: kohya's 2(sqrt(x^2 + c^2) - c) (~x^2/c, then ~2|x|).
    `huber_c` is a float or (B,) per sample (`huber_c()`); needed for huber and smooth_l1.
    """
    diff = pred.float() - target.float()
    if kind == "mse":
        return diff ** 2
    if kind == "l1":
        return diff.abs()
    if kind not in ("huber", "smooth_l1"):
        raise UserError("loss.loss", f"{kind!r} is not valid; choose one of {', '.join(LOSSES)}")
    if huber_c is None:
        raise ValueError(f"{kind} loss needs huber_c")
    if torch.is_tensor(huber_c):
        if huber_c.dim() > 0:
            c = _per_sample(huber_c.reshape(-1), diff)
        else:
            c = huber_c.float().to(diff.device)
    else:
        c = torch.tensor(float(huber_c), device=diff.device)
    soft = torch.sqrt(diff ** 2 + c ** 2) - c
    return 2.0 * c * soft if kind == "huber" else 2.0 * soft


# -- weights -------------------------------------------------------------------------------------
def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str,
                 min_snr_gamma: float = 0.0, debiased: bool = False) -> torch.Tensor:
    """Per-sample weights (B,) float32; ones when both are off, the product when both are on.

    min-SNR (Hang et al. 2023): epsilon min(snr, g) / snr, v min(snr, g) / (snr + 1).
    Debiased estimation (Yu et al. 2023) as kohya: snr clamped to <= 1000, then epsilon
    1 / sqrt(snr), v 1 / (snr + 1). At a zero-terminal-SNR step (snr = 0) the epsilon weights
    use their limits instead of dividing by 0: min-SNR 1, debiased 1 / sqrt(1 / 1000).
    """
    prediction = _prediction(prediction)
    s = snr(alphas_cumprod, timesteps)
    weight = torch.ones_like(s)
    if min_snr_gamma and min_snr_gamma > 0:
        clipped = torch.clamp(s, max=float(min_snr_gamma))
        if prediction == "v":
            weight = weight * clipped / (s + 1.0)
        else:
            weight = weight * torch.where(s > 0, clipped / s.clamp(min=1e-30), torch.ones_like(s))
    if debiased:
        clamped = torch.clamp(s, min=1.0 / SNR_CLAMP, max=SNR_CLAMP)
        if prediction == "v":
            weight = weight / (torch.clamp(s, max=SNR_CLAMP) + 1.0)
        else:
            weight = weight / clamped.sqrt()
    return weight.to(torch.float32)


# -- all together --------------------------------------------------------------------------------
def compute_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 cfg: "LossConfig", alphas_cumprod: torch.Tensor, prediction: str,
                 mask: torch.Tensor | None = None,
                 sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar fp32 loss: element loss, mean over (C, H, W) per sample (a masked mean when
    `mask` is given), times the SNR weights and `sample_weight` (B,) (e.g. prior loss weight),
    mean over the batch.

    `mask`: (B, H, W), (B, 1, H, W) or (B, C, H, W) in 0..1, at latent or image size (resized
    to the latent size by area averaging). With `cfg.masked_loss_unmasked_weight` w > 0 each
    element's weight is w + (1 - w) * mask, so the area outside the mask counts w as much
    (w = 1: the plain mean). A sample whose weights are all 0 contributes 0.
    """
    kind = cfg.loss
    c = None
    if kind in ("huber", "smooth_l1"):
        c = huber_c(timesteps, cfg.huber_schedule, cfg.huber_delta, alphas_cumprod)
    loss = elementwise_loss(pred, target, kind, c)
    if mask is None:
        per_sample = loss.mean(dim=tuple(range(1, loss.dim())))
    else:
        m = _latent_mask(mask, loss)
        outside = float(getattr(cfg, "masked_loss_unmasked_weight", 0.0) or 0.0)
        if outside > 0:
            m = outside + (1.0 - outside) * m
        dims = tuple(range(1, loss.dim()))
        total = (loss * m).sum(dim=dims)
        count = m.expand_as(loss).sum(dim=dims)
        per_sample = torch.where(count > 0, total / count.clamp(min=1e-12), torch.zeros_like(total))
    weight = loss_weights(timesteps, alphas_cumprod, prediction, cfg.min_snr_gamma,
                          cfg.debiased_estimation).to(per_sample.device)
    if sample_weight is not None:
        weight = weight * sample_weight.to(device=per_sample.device, dtype=torch.float32).reshape(-1)
    return (per_sample * weight).mean()


def _latent_mask(mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    m = mask.to(device=loss.device, dtype=torch.float32)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.dim() != 4 or m.shape[0] != loss.shape[0]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit loss {tuple(loss.shape)}")
    if m.shape[-2:] != loss.shape[-2:]:
        m = F.interpolate(m, size=loss.shape[-2:], mode="area")
    return m
