import sys

import pytest
import torch

from lora_train_ext.core import optim
from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.presets import PRESETS
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.optim import (
    OPTIMIZERS, adaptive_warnings, available_optimizers, build_optimizer,
    canonical_name, effective_lrs, parse_optimizer_args, set_train_mode,
)

AVAILABLE = available_optimizers()


# -- parse_optimizer_args ------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("   ", {}),
    ("weight_decay=0.01", {"weight_decay": 0.01}),
    ("weight_decay=0.01 betas=0.9,0.999 decouple=True d_coef=2",
     {"weight_decay": 0.01, "betas": (0.9, 0.999), "decouple": True, "d_coef": 2}),
    ("weight_decay=0.01, betas=0.9,0.999, decouple=true",
     {"weight_decay": 0.01, "betas": (0.9, 0.999), "decouple": True}),
    ("weight_decay=0.01\nbetas=0.9, 0.999\nsafeguard_warmup=False",
     {"weight_decay": 0.01, "betas": (0.9, 0.999), "safeguard_warmup": False}),
    ("a=1; b=2", {"a": 1, "b": 2}),
    ("eps=1e-30,1e-3 beta1=None", {"eps": (1e-30, 1e-3), "beta1": None}),
    ("betas=(0.9, 0.99) x = 3", {"betas": (0.9, 0.99), "x": 3}),
    ("mode=fused name='a b' n=-3 f=-2.5e-4", {"mode": "fused", "name": "a b", "n": -3, "f": -2.5e-4}),
    ('--optimizer_args "decouple=True" "weight_decay=0.01" "betas=0.9,0.999"',
     {"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.999)}),
    ('"relative_step=True" "scale_parameter=True" "warmup_init=True"',
     {"relative_step": True, "scale_parameter": True, "warmup_init": True}),
    ("growth_rate=inf", {"growth_rate": float("inf")}),
])
def test_parse_optimizer_args(text, expected):
    got = parse_optimizer_args(text)
    assert got == expected
    for key, value in expected.items():
        assert type(got[key]) is type(value), key


@pytest.mark.parametrize("text", [
    "0.01", "weight_decay", "weight_decay=", "a=1 a=2", "x=1 2", "betas=0.9,,0.99",
    "junk a=1", "x=@@",
])
def test_parse_optimizer_args_rejects(text):
    with pytest.raises(UserError) as e:
        parse_optimizer_args(text)
    assert e.value.field == "optim.optimizer_args"


# -- registry ------------------------------------------------------------------------------------
def test_registry_names_and_lookup():
    expected = {"AdamW", "AdamW8bit", "Adam", "SGD", "SGDNesterov", "RMSprop", "Lion", "AdaFactor",
                "DAdaptAdam", "DAdaptLion", "DAdaptAdaGrad", "Prodigy", "AdamWScheduleFree",
                "SGDScheduleFree"}
    assert set(OPTIMIZERS) == expected
    assert canonical_name("prodigy") == "Prodigy"
    assert canonical_name("ADAMW8BIT") == "AdamW8bit"
    assert canonical_name("sgd_nesterov") == "SGDNesterov"
    assert canonical_name("DAdaptation") == "DAdaptAdam"
    assert {n for n, s in OPTIMIZERS.items() if s.adaptive} == {
        "DAdaptAdam", "DAdaptLion", "DAdaptAdaGrad", "Prodigy"}
    assert {n for n, s in OPTIMIZERS.items() if s.schedule_free} == {
        "AdamWScheduleFree", "SGDScheduleFree"}
    for name in ("AdamW", "Adam", "SGD", "SGDNesterov", "RMSprop"):
        assert AVAILABLE[name] == (True, "")
    assert set(AVAILABLE) == expected


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(UserError) as e:
        build_optimizer("Adamz", [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}], "")
    assert e.value.field == "optim.optimizer"
    assert "Prodigy" in str(e.value) and "AdamW" in str(e.value)


@pytest.mark.parametrize("name, module, hint", [
    ("Prodigy", "prodigyopt", "pip install prodigyopt"),
    ("DAdaptAdam", "dadaptation", "pip install dadaptation"),
    ("AdamWScheduleFree", "schedulefree", "pip install schedulefree"),
    ("AdamW8bit", "bitsandbytes", "pip install bitsandbytes"),
])
def test_missing_package_is_a_clear_user_error(monkeypatch, name, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    assert available_optimizers()[name] == (False, hint)
    with pytest.raises(UserError) as e:
        build_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}], "")
    assert e.value.field == "optim.optimizer"
    assert hint in str(e.value)


def test_lion_falls_back_and_reports_its_first_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    assert available_optimizers()["Lion"] == (False, "pip install lion-pytorch")
    with pytest.raises(UserError, match="pip install lion-pytorch"):
        build_optimizer("Lion", [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-4}], "")


def test_unknown_kwarg_is_named():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError) as e:
        build_optimizer("AdamW", [{"params": [p], "lr": 1e-3}], "weight_decay=0.1 d_coef=2")
    assert e.value.field == "optim.optimizer_args"
    assert "'d_coef'" in str(e.value) and "weight_decay" in str(e.value)
    with pytest.raises(UserError, match="lr"):
        build_optimizer("AdamW", [{"params": [p], "lr": 1e-3}], "lr=0.1")
    with pytest.raises(UserError, match="rejected"):
        build_optimizer("AdamW", [{"params": [p], "lr": 1e-3}], "betas=0.9,1.5")


# -- training a tiny problem ---------------------------------------------------------------------
LRS = {"SGD": 0.05, "SGDNesterov": 0.05, "RMSprop": 1e-2, "Lion": 1e-2, "SGDScheduleFree": 0.5,
       "AdamW8bit": 1e-2}
ARGS = {"AdaFactor": "relative_step=False scale_parameter=False"}


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    y = x @ torch.randn(6, 3, generator=g)
    w = torch.nn.Parameter(torch.zeros(6, 3))
    b = torch.nn.Parameter(torch.zeros(3))
    return x, y, w, b


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_installed_optimizer_trains(name):
    if not AVAILABLE[name][0]:
        pytest.skip(f"{name}: {AVAILABLE[name][1]}")
    if name == "AdamW8bit" and not torch.cuda.is_available():
        pytest.skip("bitsandbytes needs a GPU")
    device = "cuda" if name == "AdamW8bit" else "cpu"
    x, y, w, b = _problem()
    x, y = x.to(device), y.to(device)
    w.data, b.data = w.data.to(device), b.data.to(device)
    lr = 1.0 if OPTIMIZERS[name].adaptive else LRS.get(name, 5e-2)
    opt = build_optimizer(name, [{"params": [w], "lr": lr, "name": "unet"},
                                 {"params": [b], "lr": lr, "name": "te"}], ARGS.get(name, ""))
    assert [g["name"] for g in opt.param_groups] == ["unet", "te"]

    def loss():
        return ((x @ w + b - y) ** 2).mean()

    before = loss().item()
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    set_train_mode(opt, False)
    after = loss().item()
    assert after < before
    assert w.detach().abs().sum() > 0 and b.detach().abs().sum() > 0
    lrs = effective_lrs(opt)
    assert len(lrs) == 2 and all(v > 0 for v in lrs)
    if OPTIMIZERS[name].adaptive:
        g = opt.param_groups[0]
        assert lrs[0] == pytest.approx(g["d"] * g["lr"])
        assert g["d"] > g.get("d0", 1e-6)  # it has adapted
    elif name != "AdaFactor" and not OPTIMIZERS[name].schedule_free:
        assert lrs == [lr, lr]


@pytest.mark.skipif(not AVAILABLE["AdaFactor"][0], reason="transformers not installed")
def test_adafactor_relative_step():
    x, y, w, b = _problem()
    w.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    opt = build_optimizer("adafactor", [{"params": [w, b], "lr": 1e-4}],
                          "relative_step=True scale_parameter=True warmup_init=False")
    assert opt.defaults["lr"] is None
    first = effective_lrs(opt)[0]
    rms = w.detach().pow(2).mean().sqrt().item()
    assert first == pytest.approx(1e-2 * max(1e-3, rms), rel=1e-6)  # what step 1 will use
    before = ((x @ w + b - y) ** 2).mean().item()
    for _ in range(5):
        opt.zero_grad()
        ((x @ w + b - y) ** 2).mean().backward()
        opt.step()
    assert ((x @ w + b - y) ** 2).mean().item() < before
    assert effective_lrs(opt)[0] > 0


@pytest.mark.skipif(not AVAILABLE["DAdaptAdam"][0], reason="dadaptation not installed")
def test_same_lr_optimizers_refuse_mixed_lrs():
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError) as e:
        build_optimizer("DAdaptAdam", [{"params": [w], "lr": 1.0, "name": "unet"},
                                       {"params": [b], "lr": 0.5, "name": "te"}], "")
    assert "unet=1.0" in str(e.value) and "te=0.5" in str(e.value)
    # a frozen group (lr 0) is allowed
    build_optimizer("DAdaptAdam", [{"params": [w], "lr": 1.0}, {"params": [b], "lr": 0.0}], "")


@pytest.mark.skipif(not AVAILABLE["AdamWScheduleFree"][0], reason="schedulefree not installed")
def test_set_train_mode_switches_schedule_free_points():
    x, y, w, b = _problem()
    opt = build_optimizer("AdamWScheduleFree", [{"params": [w, b], "lr": 0.05}], "")
    assert opt.param_groups[0]["train_mode"]
    for _ in range(5):
        opt.zero_grad()
        ((x @ w + b - y) ** 2).mean().backward()
        opt.step()
    train_w = w.detach().clone()
    set_train_mode(opt, False)
    assert not opt.param_groups[0]["train_mode"]
    assert not torch.equal(train_w, w.detach())
    set_train_mode(opt, True)
    torch.testing.assert_close(w.detach(), train_w)


def test_set_train_mode_is_a_noop_for_plain_optimizers():
    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer("AdamW", [{"params": [p], "lr": 1e-3}], "")
    set_train_mode(opt, False)
    set_train_mode(opt, True)
    assert torch.equal(p.detach(), torch.ones(2))


def test_effective_lrs_reads_d_from_state_when_not_in_group():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.5}])
    opt.state[p]["d"] = torch.tensor(0.25)
    assert effective_lrs(opt) == [0.125]


# -- guardrails ----------------------------------------------------------------------------------
def _has(warnings, text):
    return any(text in w for w in warnings)


def test_adaptive_warnings():
    w = adaptive_warnings("DAdaptAdam", 0.5, 0.5, "constant", args_text="decouple=True")
    assert len(w) == 1 and _has(w, "1.0")
    w = adaptive_warnings("DAdaptAdam", 1.0, 0.5, "cosine")
    assert _has(w, "different UNet and TE") and _has(w, "constant scheduler") and _has(w, "decouple=True")
    w = adaptive_warnings("DAdaptAdaGrad", 1.0, 0.5, "constant")
    assert _has(w, "first LR only")
    w = adaptive_warnings("Prodigy", 1.0, 1.0, "constant_with_warmup", warmup_steps=100)
    assert _has(w, "safeguard_warmup=True")
    assert adaptive_warnings("Prodigy", 1.0, 1.0, "constant_with_warmup", warmup_steps=100,
                             args_text="safeguard_warmup=True") == []
    assert _has(adaptive_warnings("Prodigy", 1.0, 1.0, "constant", loraplus_ratio=16), "LoRA+")
    assert _has(adaptive_warnings("AdamWScheduleFree", 1e-3, None, "cosine"), "constant scheduler")
    assert _has(adaptive_warnings("AdaFactor", 1e-4, 1e-4, "constant"), "ignored")
    assert adaptive_warnings("AdaFactor", 1e-4, 1e-4, "cosine", args_text="relative_step=False") == []
    assert _has(adaptive_warnings("AdamW", 1.0, 1.0, "constant"), "adaptive")
    assert adaptive_warnings("AdamW", 1e-4, 5e-5, "cosine", warmup_steps=10) == []
    assert adaptive_warnings("Prodigy", 1.0, None, "constant") == []  # UNet only
    assert adaptive_warnings("no-such", 1.0, 1.0, "constant") == []


EASY = [k for k in PRESETS if k.startswith("easy-")]


@pytest.mark.parametrize("key", EASY)
def test_presets_are_valid_configs_without_warnings(key):
    preset = PRESETS[key]
    cfg = RunConfig.from_dict(preset).validate()
    assert cfg.optim.lr == cfg.unet_lr == cfg.te_lr == 1.0
    assert cfg.optim.scheduler == "constant"
    assert cfg.network.alpha == 1.0 and cfg.loss.min_snr_gamma == 5.0
    assert OPTIMIZERS[cfg.optim.optimizer].adaptive
    assert adaptive_warnings(cfg.optim.optimizer, cfg.unet_lr, cfg.te_lr, cfg.optim.scheduler,
                             args_text=cfg.optim.optimizer_args) == []
    args = parse_optimizer_args(cfg.optim.optimizer_args)
    assert args["decouple"] is True and args["weight_decay"] == 0.01
    assert args["betas"] == (0.9, 0.999)
    if AVAILABLE[cfg.optim.optimizer][0]:
        p = torch.nn.Parameter(torch.ones(2))
        build_optimizer(cfg.optim.optimizer, [{"params": [p], "lr": cfg.unet_lr}],
                        cfg.optim.optimizer_args)


@pytest.mark.parametrize("key", [k for k in PRESETS if k.startswith(("lowvram", "sdxl"))])
def test_low_vram_presets_are_valid_configs_without_warnings(key):
    cfg = RunConfig.from_dict(PRESETS[key]).validate()
    assert cfg.train.gradient_checkpointing and cfg.train.batch_size == 1
    assert cfg.data.cache_latents and 16 <= cfg.network.rank <= 32
    assert cfg.optim.optimizer == ("AdamW8bit" if AVAILABLE["AdamW8bit"][0] else "AdamW")
    assert adaptive_warnings(cfg.optim.optimizer, cfg.unet_lr, cfg.te_lr, cfg.optim.scheduler,
                             warmup_steps=cfg.optim.warmup_steps,
                             args_text=cfg.optim.optimizer_args) == []


def test_presets_cover_the_guide():
    assert PRESETS["easy-dadaptadam"]["optim"]["optimizer"] == "DAdaptAdam"
    assert parse_optimizer_args(PRESETS["easy-prodigy"]["optim"]["optimizer_args"])["d_coef"] == 2


# -- property: what a user can write, we read back -----------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

_keys = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda k: k not in ("true", "false", "none", "null", "inf", "nan", "infinity"))
_scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=False, allow_infinity=False, width=64))
_values = st.one_of(_scalars, st.tuples(_scalars, _scalars), st.tuples(_scalars, _scalars, _scalars))


def _fmt(value):
    if isinstance(value, tuple):
        return ",".join(_fmt(v) for v in value)
    return repr(value)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5), st.sampled_from([" ", ", ", "\n", "; "]))
def test_parse_round_trip(pairs, sep):
    text = sep.join(f"{k}={_fmt(v)}" for k, v in pairs.items())
    assert parse_optimizer_args(text) == pairs
