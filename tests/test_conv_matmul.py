"""The in-code UNet's Conv3x3: wide 3x3 convolutions on small maps run as one matrix product on
the CPU, with the same results and gradients as torch's convolution."""

import pytest
import torch
import torch.nn.functional as F

from lora_train_ext.core.models import unet as U


def _pair(cin, cout, stride, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = U.Conv3x3(cin, cout, 3, stride=stride, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.02)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return conv.requires_grad_(False), g


@pytest.mark.parametrize("cin,cout,size,stride", [(1280, 1280, 4, 1), (2560, 1280, 4, 1),
                                                  (1280, 1280, 8, 2)])
def test_matmul_path_equals_convolution(cin, cout, size, stride):
    conv, g = _pair(cin, cout, stride)
    x = torch.randn(2, cin, size, size, generator=g)
    assert conv._as_matmul(x)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    out = conv(xa)
    ref = F.conv2d(xb, conv.weight, conv.bias, conv.stride, conv.padding)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref.backward(grad)
    assert torch.allclose(xa.grad, xb.grad, atol=2e-5, rtol=1e-5)
    assert xa.grad.abs().max() > 0


def test_matmul_path_only_where_it_is_faster():
    conv, g = _pair(1280, 1280, 1)
    assert conv._as_matmul(torch.zeros(1, 1280, 8, 8))
    assert not conv._as_matmul(torch.zeros(1, 1280, 16, 16))  # over 8x8 outputs
    assert not conv._as_matmul(torch.zeros(1, 1280, 8, 8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv._as_matmul(torch.zeros(1, 1280, 8, 8))
    small, _ = _pair(640, 640, 1)
    assert not small._as_matmul(torch.zeros(1, 640, 8, 8))
    before = U.CONV_AS_MATMUL
    U.CONV_AS_MATMUL = False
    try:
        assert not conv._as_matmul(torch.zeros(1, 1280, 8, 8))
    finally:
        U.CONV_AS_MATMUL = before


def test_state_dict_keys_unchanged():
    conv = U.Conv3x3(8, 8, 3, padding=1)
    plain = torch.nn.Conv2d(8, 8, 3, padding=1)
    assert list(conv.state_dict()) == list(plain.state_dict())
    assert isinstance(conv, torch.nn.Conv2d)
