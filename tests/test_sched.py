import math

import pytest
import torch

from lora_train_ext.core.errors import UserError
from lora_train_ext.core.sched import LR_END, SCHEDULERS, build_scheduler, lr_factor, warmup_steps_for

TOTAL, WARMUP = 100, 10


def _expected(name, step, cycles=1, power=1.0, lr_init=1.0):
    """Closed forms written out independently of sched.py."""
    if name == "constant":
        return 1.0
    if step < WARMUP:
        return step / WARMUP
    p = (step - WARMUP) / (TOTAL - WARMUP)
    return {
        "constant_with_warmup": 1.0,
        "linear": 1.0 - p,
        "cosine": (1 + math.cos(math.pi * p)) / 2,
        "cosine_with_restarts": 0.0 if p >= 1 else (1 + math.cos(math.pi * ((cycles * p) % 1))) / 2,
        "polynomial": ((lr_init - LR_END) * (1 - p) ** power + LR_END) / lr_init,
    }[name]


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("step", [0, 1, 5, 10, 11, 32, 55, 77, 99, 100])
def test_lr_factor_closed_form(name, step):
    got = lr_factor(name, step, TOTAL, WARMUP, cycles=3, power=2.0, lr_init=1e-3)
    assert got == pytest.approx(_expected(name, step, cycles=3, power=2.0, lr_init=1e-3), abs=1e-12)


@pytest.mark.parametrize("name, step, value", [
    ("linear", 55, 0.5),                      # halfway through the decay
    ("cosine", 55, 0.5),
    ("cosine", 100, 0.0),
    ("cosine_with_restarts", 40, 1.0),        # 3 cycles of 30 steps: restart at 40 and 70
    ("cosine_with_restarts", 70, 1.0),
    ("cosine_with_restarts", 25, 0.5),        # middle of the first cycle
    ("constant_with_warmup", 5, 0.5),
    ("constant", 0, 1.0),                     # kohya: constant ignores warmup
])
def test_lr_factor_landmarks(name, step, value):
    assert lr_factor(name, step, TOTAL, WARMUP, cycles=3) == pytest.approx(value, abs=1e-12)


def test_polynomial_ends_at_lr_end_and_power_one_is_linear_to_it():
    lr = 1e-4
    assert lr_factor("polynomial", 100, 100, 0, lr_init=lr) * lr == pytest.approx(LR_END)
    assert lr_factor("polynomial", 150, 100, 0, lr_init=lr) * lr == pytest.approx(LR_END)
    mid = lr_factor("polynomial", 50, 100, 0, power=1.0, lr_init=lr) * lr
    assert mid == pytest.approx((lr + LR_END) / 2)
    assert lr_factor("polynomial", 50, 100, 0, power=2.0, lr_init=0.0) == pytest.approx(0.25)


def test_warmup_ratio():
    assert warmup_steps_for(1000, 0, 0.1) == 100
    assert warmup_steps_for(100, 0, 0.29) == 29
    assert warmup_steps_for(1000, 7, 0.5) == 7  # steps win


def _optimizer(lrs=(1e-3, 5e-4)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_build_scheduler_follows_lr_factor_per_group(name):
    opt = _optimizer()
    sched = build_scheduler(name, opt, TOTAL, warmup_steps=WARMUP, cycles=2, power=2.0)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    for step in range(TOTAL + 1):
        for group, base in zip(opt.param_groups, (1e-3, 5e-4)):
            expected = base * lr_factor(name, step, TOTAL, WARMUP, 2, 2.0, lr_init=base)
            assert group["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


@pytest.mark.parametrize("name", ["cosine_with_restarts", "polynomial", "linear"])
def test_state_dict_round_trip_resumes_exactly(name):
    opt = _optimizer()
    sched = build_scheduler(name, opt, 50, warmup_ratio=0.1, cycles=3, power=1.5)
    for _ in range(17):
        opt.step()
        sched.step()
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    assert sched_state["last_epoch"] == 17

    # a resumed run builds with different (wrong) settings; the state must win
    opt2 = _optimizer()
    sched2 = build_scheduler("constant", opt2, 999)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for _ in range(40):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_bad_inputs():
    opt = _optimizer()
    with pytest.raises(UserError) as e:
        build_scheduler("cosine_annealing", opt, 10)
    assert e.value.field == "optim.scheduler"
    with pytest.raises(UserError):
        build_scheduler("linear", opt, 0)
    with pytest.raises(UserError):
        lr_factor("nope", 0, 10)
    # total <= warmup does not divide by zero
    assert lr_factor("linear", 10, 10, 10) == 0.0
    assert lr_factor("cosine", 10, 10, 10) == 1.0
