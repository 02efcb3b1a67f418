import math

import pytest
import torch

from lora_train_ext.core import loss as L
from lora_train_ext.core.config import LossConfig
from lora_train_ext.core.errors import UserError


def _ddpm_alphas_cumprod(steps=1000):
    """SD's scaled-linear schedule, float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


AC = _ddpm_alphas_cumprod()
SMALL_AC = torch.tensor([0.9, 0.5, 0.2, 0.0], dtype=torch.float64)  # snr 9, 1, 0.25, 0


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- schedule ------------------------------------------------------------------------------------
def test_snr_formula():
    t = torch.tensor([0, 1, 2, 3])
    assert torch.allclose(L.snr(SMALL_AC, t), torch.tensor([9.0, 1.0, 0.25, 0.0], dtype=torch.float64))
    assert L.snr(AC, t).dtype == torch.float64


def test_noisy_latents_and_targets():
    x = torch.tensor([[[[2.0]]], [[[-1.0]]]])
    n = torch.tensor([[[[0.5]]], [[[3.0]]]])
    t = torch.tensor([1, 2])  # a = 0.5, 0.2
    noisy = L.noisy_latents(x, n, t, SMALL_AC)
    expected = torch.tensor([math.sqrt(0.5) * 2 + math.sqrt(0.5) * 0.5,
                             math.sqrt(0.2) * -1 + math.sqrt(0.8) * 3.0])
    torch.testing.assert_close(noisy.flatten(), expected)
    assert L.target_for("epsilon", x, n, t, SMALL_AC) is n
    v = L.target_for("v", x, n, t, SMALL_AC)
    expected_v = torch.tensor([math.sqrt(0.5) * 0.5 - math.sqrt(0.5) * 2,
                               math.sqrt(0.2) * 3.0 - math.sqrt(0.8) * -1])
    torch.testing.assert_close(v.flatten(), expected_v)
    with pytest.raises(UserError):
        L.target_for("x0", x, n, t, SMALL_AC)


def test_v_target_is_consistent_with_noising():
    """x0 = sqrt(a) x_t - sqrt(1-a) v: the v target reconstructs the clean latents."""
    x = torch.randn(3, 4, 5, 5, generator=_gen(1))
    n = torch.randn(3, 4, 5, 5, generator=_gen(2))
    t = torch.tensor([0, 500, 999])
    xt = L.noisy_latents(x, n, t, AC)
    v = L.target_for("v", x, n, t, AC)
    a = AC[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x, atol=1e-5, rtol=1e-5)


def test_zero_terminal_snr():
    out = L.zero_terminal_snr(AC)
    assert out.dtype == AC.dtype and out.shape == AC.shape
    assert out[-1] == 0.0
    assert out[0].item() == pytest.approx(AC[0].item(), rel=1e-12)
    assert torch.all(out[1:] <= out[:-1])  # still decreasing
    assert L.snr(out, torch.tensor([999])).item() == 0.0


# -- noise ---------------------------------------------------------------------------------------
def test_make_noise_is_deterministic_and_shaped():
    latents = torch.zeros(2, 4, 16, 12)
    for kw in ({}, {"noise_offset": 0.1}, {"noise_offset": 0.1, "noise_offset_random_strength": True},
               {"multires_iterations": 6, "multires_discount": 0.3},
               {"noise_offset": 0.05, "multires_iterations": 3}):
        a = L.make_noise(latents, _gen(7), **kw)
        b = L.make_noise(latents, _gen(7), **kw)
        c = L.make_noise(latents, _gen(8), **kw)
        assert a.shape == latents.shape and a.dtype == latents.dtype
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert torch.isfinite(a).all()


def test_plain_noise_is_randn_and_offset_is_per_channel():
    latents = torch.zeros(2, 3, 8, 8)
    plain = L.make_noise(latents, _gen(3))
    torch.testing.assert_close(plain, torch.randn(2, 3, 8, 8, generator=_gen(3)))
    offset = L.make_noise(latents, _gen(3), noise_offset=0.5)
    shift = offset - plain  # the same first draw, then a (B, C, 1, 1) shift
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)
    assert shift[..., 0, 0].std() > 0


def test_multires_noise_is_renormalised():
    noise = L.make_noise(torch.zeros(4, 4, 32, 32), _gen(0), multires_iterations=6,
                         multires_discount=0.4)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)


def test_input_perturbation():
    n = torch.randn(2, 4, 4, 4, generator=_gen(0))
    assert L.input_perturbation(n, 0.0, _gen(1)) is n
    p = L.input_perturbation(n, 0.1, _gen(1))
    torch.testing.assert_close(p, n + 0.1 * torch.randn(2, 4, 4, 4, generator=_gen(1)))


def test_sample_timesteps():
    u = L.sample_timesteps(4096, _gen(0), 100, 200)
    assert u.dtype == torch.long and u.min() >= 100 and u.max() <= 199
    assert torch.equal(u, L.sample_timesteps(4096, _gen(0), 100, 200))
    ln = L.sample_timesteps(4096, _gen(0), 0, 1000, "logit_normal", 0.0, 1.0)
    assert ln.min() >= 0 and ln.max() <= 999
    assert abs(ln.float().median().item() - 500) < 30
    # logit-normal favours the middle compared with uniform
    middle = ((ln >= 250) & (ln < 750)).float().mean().item()
    assert middle > 0.6
    assert L.sample_timesteps(8, _gen(0), 0, 1000, "logit_normal", mean=3.0).float().mean() > 800
    with pytest.raises(UserError):
        L.sample_timesteps(1, _gen(0), sampling="beta")


# -- element losses ------------------------------------------------------------------------------
def test_elementwise_losses_by_hand():
    pred = torch.tensor([0.0, 1.0, -2.0])
    target = torch.tensor([0.0, 0.0, 1.0])  # diff 0, 1, -3
    assert L.elementwise_loss(pred, target, "mse").tolist() == [0.0, 1.0, 9.0]
    assert L.elementwise_loss(pred, target, "l1").tolist() == [0.0, 1.0, 3.0]
    c = 0.5
    huber = [2 * c * (math.sqrt(d * d + c * c) - c) for d in (0.0, 1.0, -3.0)]
    smooth = [2 * (math.sqrt(d * d + c * c) - c) for d in (0.0, 1.0, -3.0)]
    torch.testing.assert_close(L.elementwise_loss(pred, target, "huber", c), torch.tensor(huber))
    torch.testing.assert_close(L.elementwise_loss(pred, target, "smooth_l1", c), torch.tensor(smooth))
    with pytest.raises(UserError):
        L.elementwise_loss(pred, target, "hinge")


def test_huber_per_sample_c_broadcasts():
    pred = torch.ones(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    c = torch.tensor([1.0, 0.1])
    out = L.elementwise_loss(pred, target, "huber", c)
    assert out[0].unique().item() == pytest.approx(2 * 1.0 * (math.sqrt(2) - 1))
    assert out[1].unique().item() == pytest.approx(2 * 0.1 * (math.sqrt(1.01) - 0.1))
    assert out.dtype == torch.float32


def test_huber_c_schedules():
    t = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(L.huber_c(t, "constant", 0.1, SMALL_AC), torch.full((4,), 0.1))
    k = -math.log(0.1) / 4
    torch.testing.assert_close(L.huber_c(t, "exponential", 0.1, SMALL_AC),
                               torch.tensor([math.exp(-k * i) for i in range(4)]))
    expected = []
    for a in (0.9, 0.5, 0.2, 0.0):
        sigma = math.inf if a == 0 else math.sqrt((1 - a) / a)
        expected.append((1 - 0.1) / (1 + sigma) ** 2 + 0.1)
    torch.testing.assert_close(L.huber_c(t, "snr", 0.1, SMALL_AC), torch.tensor(expected))
    # with 1000 steps: exponential is 1 at t=0 and reaches delta at T
    assert L.huber_c(torch.tensor([0]), "exponential", 0.1, AC).item() == pytest.approx(1.0)
    with pytest.raises(UserError):
        L.huber_c(t, "cosine", 0.1, SMALL_AC)


# -- weights -------------------------------------------------------------------------------------
def test_min_snr_weights():
    t = torch.tensor([0, 1, 2, 3])  # snr 9, 1, 0.25, 0
    eps = L.loss_weights(t, SMALL_AC, "epsilon", min_snr_gamma=5.0)
    torch.testing.assert_close(eps, torch.tensor([5 / 9, 1.0, 1.0, 1.0]))
    v = L.loss_weights(t, SMALL_AC, "v", min_snr_gamma=5.0)
    torch.testing.assert_close(v, torch.tensor([5 / 10, 1 / 2, 0.25 / 1.25, 0.0]))
    assert torch.equal(L.loss_weights(t, SMALL_AC, "epsilon"), torch.ones(4))


def test_debiased_weights():
    t = torch.tensor([0, 1, 2, 3])
    eps = L.loss_weights(t, SMALL_AC, "epsilon", debiased=True)
    torch.testing.assert_close(eps, torch.tensor([1 / 3, 1.0, 2.0, math.sqrt(1000)]))
    v = L.loss_weights(t, SMALL_AC, "v", debiased=True)
    torch.testing.assert_close(v, torch.tensor([1 / 10, 1 / 2, 1 / 1.25, 1.0]))
    # kohya's clamp: snr above 1000 counts as 1000
    near_one = torch.tensor([1 - 1e-6], dtype=torch.float64)  # snr ~ 1e6
    assert L.loss_weights(torch.tensor([0]), near_one, "epsilon", debiased=True).item() == \
        pytest.approx(1 / math.sqrt(1000), rel=1e-6)
    both = L.loss_weights(t[:3], SMALL_AC, "epsilon", min_snr_gamma=5.0, debiased=True)
    torch.testing.assert_close(both, torch.tensor([5 / 9 / 3, 1.0, 2.0]))


# -- compute_loss --------------------------------------------------------------------------------
def test_compute_loss_mean_weighted_and_masked():
    pred = torch.zeros(2, 2, 2, 2)
    target = torch.zeros(2, 2, 2, 2)
    target[0] = 1.0                        # sample 0: mse 1 everywhere
    target[1, :, 0, :] = 2.0               # sample 1: mse 4 on the top row, 0 below
    t = torch.tensor([1, 1])
    cfg = LossConfig()
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon").item() == pytest.approx((1 + 2) / 2)

    mask = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])  # (B, H, W)
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", mask=mask).item() == \
        pytest.approx((1 + 4) / 2)
    zero_mask = torch.zeros(2, 1, 2, 2)
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", mask=zero_mask).item() == 0.0
    # an image-size mask is averaged down to the latent grid
    big = mask.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2).unsqueeze(1)
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", mask=big).item() == \
        pytest.approx((1 + 4) / 2)

    weight = torch.tensor([1.0, 0.5])
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", sample_weight=weight).item() == \
        pytest.approx((1 + 2 * 0.5) / 2)

    snr_cfg = LossConfig(min_snr_gamma=5.0)
    t2 = torch.tensor([0, 1])  # eps weights 5/9, 1
    assert L.compute_loss(pred, target, t2, snr_cfg, SMALL_AC, "epsilon").item() == \
        pytest.approx((5 / 9 + 2) / 2)


def test_compute_loss_huber_and_dtype():
    pred = torch.full((1, 1, 2, 2), 3.0, dtype=torch.bfloat16)
    target = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    cfg = LossConfig(loss="huber", huber_schedule="constant", huber_delta=0.1)
    out = L.compute_loss(pred, target, torch.tensor([2]), cfg, SMALL_AC, "v")
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(2 * 0.1 * (math.sqrt(9.01) - 0.1), rel=1e-6)


def test_compute_loss_is_finite_on_zero_terminal_snr_schedule():
    ac = L.zero_terminal_snr(AC)
    t = torch.tensor([0, 999])
    pred = torch.randn(2, 4, 4, 4, generator=_gen(0), requires_grad=True)
    target = torch.randn(2, 4, 4, 4, generator=_gen(1))
    for prediction in ("epsilon", "v"):
        cfg = LossConfig(loss="smooth_l1", min_snr_gamma=5.0, debiased_estimation=True)
        out = L.compute_loss(pred, target, t, cfg, ac, prediction)
        assert torch.isfinite(out)
        out.backward()
        assert torch.isfinite(pred.grad).all()


# -- masked loss: the area outside the mask ------------------------------------------------------
def test_masked_loss_weighs_the_unmasked_area_by_hand():
    """One sample, 2x2 latent, squared errors 1, 4, 9, 16, a mask of only the first element.
    Weights are w + (1 - w) * mask: 1 inside, w outside; the loss is the weighted mean."""
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    t = torch.tensor([1])
    cfg = LossConfig()
    assert cfg.masked_loss_unmasked_weight == 0.0
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", mask=mask).item() == 1.0
    cfg.masked_loss_unmasked_weight = 0.25
    expected = (1 * 1 + 0.25 * (4 + 9 + 16)) / (1 + 3 * 0.25)  # 8.25 / 1.75
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", mask=mask).item() == \
        pytest.approx(expected, rel=1e-6)
    # a half-grey mask element: weight 0.25 + 0.75 * 0.5
    grey = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    w = [1.0, 0.25 + 0.75 * 0.5, 0.25, 0.25]
    expected = sum(wi * e for wi, e in zip(w, (1, 4, 9, 16))) / sum(w)
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", mask=grey).item() == \
        pytest.approx(expected, rel=1e-6)
    # weight 1: the mask no longer matters, the plain mean
    cfg.masked_loss_unmasked_weight = 1.0
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon", mask=mask).item() == \
        pytest.approx(7.5, rel=1e-6)
    # an all-black mask with weight w > 0: every element weighs w, again the plain mean
    cfg.masked_loss_unmasked_weight = 0.1
    assert L.compute_loss(pred, target, t, cfg, SMALL_AC, "epsilon",
                          mask=torch.zeros(1, 1, 2, 2)).item() == pytest.approx(7.5, rel=1e-6)


# -- timestep distributions ----------------------------------------------------------------------
def _cdf(sampling: str, f: float, mean=0.0, std=1.0, scale=1.29) -> float:
    """P(fraction < f) of each distribution, from its definition."""
    if f <= 0:
        return 0.0
    if f >= 1:
        return 1.0
    if sampling == "uniform":
        return f
    if sampling == "logit_normal":
        z = (math.log(f / (1 - f)) - mean) / std
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))
    if sampling == "cosmap":  # f = 1 - 1 / (tan(pi u / 2) + 1)  <=>  u = 2/pi atan(f / (1 - f))
        return 2 / math.pi * math.atan(f / (1 - f))
    if sampling == "mode":  # f(u) decreases from 1 to 0: P(f(u) < x) = 1 - f^-1(x), by bisection
        def fm(u):
            return 1 - u - scale * (math.cos(math.pi / 2 * u) ** 2 - 1 + u)
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fm(mid) > f else (lo, mid)
        return 1 - lo
    raise AssertionError(sampling)


@pytest.mark.parametrize("sampling, extra", [
    ("uniform", {}), ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.8}),
    ("mode", {"mode_scale": 1.29}), ("mode", {"mode_scale": -0.8}), ("cosmap", {})])
def test_timestep_histogram_follows_the_distribution(sampling, extra):
    cfg = LossConfig(timestep_sampling=sampling, **extra)
    n, bins = 100000, 20
    hist = L.timestep_histogram(cfg, bins=bins, n=n)
    assert len(hist.counts) == bins and len(hist.edges) == bins + 1 and sum(hist.counts) == n
    assert hist.edges[0] == 0 and hist.edges[-1] == 1000
    assert hist == L.timestep_histogram(cfg, bins=bins, n=n)  # a fixed preview
    # bins of 50 steps: t = floor(1000 f) is in bin j exactly when j/20 <= f < (j+1)/20
    kw = dict(mean=cfg.logit_mean, std=cfg.logit_std, scale=cfg.mode_scale)
    expected = [n * (_cdf(sampling, (j + 1) / bins, **kw) - _cdf(sampling, j / bins, **kw))
                for j in range(bins)]
    for got, want in zip(hist.counts, expected):
        assert abs(got - want) <= 5 * math.sqrt(want) + 5, (sampling, hist.counts, expected)
    if sampling in ("logit_normal", "cosmap") or extra.get("mode_scale", 0) > 0:
        assert hist.counts[bins // 2] > 1.5 * hist.counts[0]  # the middle favoured
    if extra.get("mode_scale", 0) < 0:
        assert hist.counts[0] > 1.5 * hist.counts[bins // 2]  # both ends favoured


def test_timestep_histogram_takes_a_run_config_and_its_range():
    from lora_train_ext.core.config import RunConfig

    cfg = RunConfig()
    cfg.loss.timestep_min, cfg.loss.timestep_max, cfg.loss.timestep_sampling = 200, 600, "cosmap"
    hist = L.timestep_histogram(cfg, bins=8, n=5000)
    assert hist.edges == [200 + 50 * i for i in range(9)] and sum(hist.counts) == 5000
    t = L.timesteps_for(5000, _gen(0), cfg.loss)
    assert t.min() >= 200 and t.max() <= 599
    assert L.timestep_histogram(cfg, bins=1, n=10).counts == [10]
    # mode with scale 0 is uniform: f = 1 - u
    t = L.sample_timesteps(4, _gen(1), 0, 1000, "mode", mode_scale=0.0)
    u = torch.rand(4, generator=_gen(1)).double()
    assert torch.equal(t, ((1.0 - u) * 1000).floor().long().clamp(0, 999))
