"""The speed benchmark (`lora_train_ext.bench.speed`) in its tiny mode: every case runs and
reports its fields, the FLOPs are counted (and equal a hand count), the reference UNet is ours.
No timing is asserted."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_train_ext.bench import reference as R
from lora_train_ext.bench import speed
from lora_train_ext.core.models.specs import arch_spec, build_unet

FIELDS = {"arch", "resolution", "batch", "dtype", "device", "options", "step_ms", "spread_ms",
          "images_per_s", "peak_mem_mib", "ratio_to_bare", "ratio_to_peft", "gflop", "flops_by"}


def _has(module: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(module)
        return True
    except Exception:
        return False


def test_tiny_side_by_side_reports_every_case():
    lines = speed.run("sd1", "tiny", 64, batch=1, dtype="fp32", rank=4, repeats=1,
                      cases=("bare", "adapter", "full", "peft"))
    by_case = {line["case"]: line for line in lines}
    assert list(by_case) == ["bare", "adapter", "full", "peft"]
    for name in ("bare", "adapter", "full"):
        line = by_case[name]
        assert FIELDS <= set(line), FIELDS - set(line)
        assert line["step_ms"] > 0 and line["images_per_s"] > 0 and line["peak_mem_mib"] > 0
        assert line["flops_by"] == "FlopCounterMode" and line["gflop"] > 0
    assert by_case["bare"]["ratio_to_bare"] == 1.0
    assert by_case["adapter"]["options"]["modules"] == 192  # kohya's SD1 targets
    assert by_case["full"]["options"]["modules"] == 192
    # the trainer's step does the adapter step's matrix work (its loss and logging add none)
    assert by_case["full"]["gflop"] == pytest.approx(by_case["adapter"]["gflop"], rel=1e-6)
    assert by_case["bare"]["gflop"] < by_case["adapter"]["gflop"]
    peft = by_case["peft"]
    if "skipped" in peft:
        assert not (_has("diffusers") and _has("peft")), peft["skipped"]
        assert "pip install" in peft["skipped"]
        assert by_case["adapter"]["ratio_to_peft"] is None
    else:
        assert peft["options"]["modules"] == 192 and peft["ratio_to_peft"] == 1.0
        # the same math on the same layers: the same FLOPs as ours
        assert peft["gflop"] == pytest.approx(by_case["adapter"]["gflop"], rel=1e-6)
        assert by_case["adapter"]["ratio_to_peft"] > 0


def test_command_line_prints_one_json_line_per_case(capsys):
    assert speed.main(["--size", "tiny", "--repeats", "1", "--cases", "bare,adapter_plain",
                       "--plain", "fused_delta", "--no-flops", "--rank", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [x["case"] for x in lines] == ["bare", "adapter_plain"]
    assert lines[1]["options"]["levers_off"] == ["fused_delta"]
    assert lines[1]["gflop"] is None


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit):
        speed.main(["--size", "tiny", "--cases", "bare,fastest"])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_counted_flops_equal_a_hand_count_of_the_tiny_unet(arch):
    """FlopCounterMode on the tiny UNet's forward = 2 x the multiply-adds of every Linear and
    Conv2d plus attention's two products, counted by hand from the shapes each module saw."""
    unet = build_unet(arch, "tiny", seed=0)
    spec = arch_spec(arch, "tiny").unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([1, 999])
    ctx = torch.randn(2, 77, spec.context_dim, generator=g)
    y = torch.randn(2, spec.adm_in_channels, generator=g) if spec.adm_in_channels else None

    def forward():
        with torch.no_grad():
            unet(x, t, context=ctx, y=y)
    counted, how = speed.count_flops(forward)
    assert how == "FlopCounterMode"
    assert counted == speed.hand_count_forward_flops(unet, forward)


def test_hand_count_of_one_small_module():
    lin = nn.Linear(8, 6)
    assert speed.hand_count_forward_flops(lin, lambda: lin(torch.randn(3, 5, 8))) == \
        2 * 15 * 8 * 6
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    # output 5x5 from 9x9: 2 x (2 * 6 * 5 * 5 outputs) x (4 * 3 * 3 multiply-adds each)
    assert speed.hand_count_forward_flops(conv, lambda: conv(torch.randn(2, 4, 9, 9))) == \
        2 * (2 * 6 * 5 * 5) * (4 * 3 * 3)
    assert speed.count_flops(lambda: conv(torch.randn(2, 4, 9, 9)))[0] == \
        2 * (2 * 6 * 5 * 5) * (4 * 3 * 3)


def test_attention_on_the_cpu_is_counted():
    """torch's counter has no formula for the CPU attention kernel; the benchmark adds torch's
    own (scores and weighted values: 2 x 2 x b h n m d)."""
    q = torch.randn(2, 3, 10, 8)
    k = torch.randn(2, 3, 7, 8)
    counted, _ = speed.count_flops(lambda: F.scaled_dot_product_attention(q, k, k))
    assert counted == 2 * 2 * 2 * 3 * 10 * 7 * 8


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_reference_unet_is_ours_on_the_same_tensors(arch):
    if not _has("diffusers"):
        pytest.skip("diffusers is a test-only dependency")
    unet = build_unet(arch, "tiny", seed=0).requires_grad_(False)
    try:
        model = R.diffusers_unet(unet, arch, "tiny")
    except R.Unavailable as e:
        pytest.skip(str(e))
    ours = dict(unet.named_parameters())
    shared = {p.data_ptr() for p in ours.values()}
    assert all(p.data_ptr() in shared for p in model.parameters())  # no second copy
    spec = arch_spec(arch, "tiny").unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([5, 600])
    ctx = torch.randn(2, 77, spec.context_dim, generator=g)
    y, added = R.diffusers_inputs(arch, "tiny", 2, g, 128)
    with torch.no_grad():
        a = unet(x, t, context=ctx, y=y)
        b = model(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert R.count_peft_targets(model) == (192 if arch == "sd1" else 722)
