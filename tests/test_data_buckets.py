"""Aspect-ratio buckets and the four resize modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from lora_train_ext.core.data.buckets import (BucketRules, apply_placement, make_buckets,
                                              plan_placement)


@pytest.mark.parametrize("res, lo, hi, step", [
    ((512, 512), 256, 1024, 64), ((768, 512), 256, 1024, 64), ((1024, 1024), 256, 2048, 64),
    ((512, 512), 320, 768, 32),
])
def test_bucket_list_invariants(res, lo, hi, step):
    buckets = make_buckets(res, lo, hi, step)
    assert len(buckets) == len(set(buckets))
    assert (res[0] // step * step, res[1] // step * step) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= res[0] * res[1]
        assert (h, w) in buckets or (w, h) == (res[0], res[1])


@pytest.mark.parametrize("size, bucket", [
    ((512, 512), (512, 512)),
    ((1000, 1000), (512, 512)),
    ((4000, 100), (1024, 256)),     # extreme wide -> widest bucket
    ((100, 4000), (256, 1024)),     # extreme tall -> tallest bucket
    ((1920, 1080), (640, 384)),
    ((1080, 1920), (384, 640)),
    ((3000, 2000), (640, 384)),     # 3:2 -> 1.67 is nearer than 1.29 in log ratio
    ((1, 1000), (256, 1024)),
])
def test_bucket_for_aspect_ratio(size, bucket):
    assert BucketRules((512, 512)).bucket_for(size) == bucket


@pytest.mark.parametrize("size, bucket", [
    ((300, 200), (256, 192)),       # smaller than the resolution: kept, trimmed to the step
    ((2000, 2000), (512, 512)),     # bigger: scaled down to the area
    ((600, 500), (512, 448)),
    ((4000, 100), (1024, 64)),      # max side respected
    ((10, 10), (64, 64)),           # never below one step
])
def test_no_upscale_buckets(size, bucket):
    rules = BucketRules((512, 512), no_upscale=True)
    assert rules.bucket_for(size) == bucket
    assert plan_placement(size, bucket).scale <= 1.0 or size == (10, 10)


def test_buckets_disabled_use_the_resolution():
    rules = BucketRules((768, 512), enable=False)
    assert rules.buckets() == [(768, 512)]
    assert rules.bucket_for((100, 4000)) == (768, 512)


def _image(size):
    w, h = size
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8))


SIZES = [(640, 480), (480, 640), (300, 300), (2000, 300), (100, 900)]


@pytest.mark.parametrize("mode", ["crop", "stretch", "pad", "none"])
@pytest.mark.parametrize("size", SIZES)
def test_each_mode_outputs_the_bucket_size(mode, size):
    rules = BucketRules((512, 512), min_side=128, max_side=1024, mode=mode)
    bucket = rules.bucket_for(size)
    placement = plan_placement(size, bucket, mode)
    out = apply_placement(_image(size), placement, (255, 255, 255))
    assert out.size == bucket
    if mode == "none":  # 1:1 pixels, a window of the image
        assert placement.resized == size and bucket[0] <= size[0] and bucket[1] <= size[1]
        assert bucket[0] * bucket[1] <= 512 * 512
    if mode == "stretch":
        assert placement.resized == bucket
    if mode == "pad":
        rw, rh = placement.resized
        assert rw <= bucket[0] and rh <= bucket[1]
        assert rw == bucket[0] or rh == bucket[1]  # touches two sides
        assert math.isclose(rw / rh, size[0] / size[1], rel_tol=0.05)
    if mode == "crop":
        rw, rh = placement.resized
        assert rw >= bucket[0] and rh >= bucket[1] and (rw == bucket[0] or rh == bucket[1])


def test_pad_fills_with_background_and_mask_zero():
    placement = plan_placement((200, 100), (128, 128), "pad")
    assert placement.resized == (128, 64) and placement.pad == (0, 32)
    out = apply_placement(Image.new("RGB", (200, 100), (0, 0, 0)), placement, (10, 20, 30))
    assert out.getpixel((64, 5)) == (10, 20, 30) and out.getpixel((64, 64)) == (0, 0, 0)
    mask = apply_placement(Image.new("L", (200, 100), 255), placement, 0)
    assert mask.getpixel((64, 5)) == 0 and mask.getpixel((64, 64)) == 255


@pytest.mark.parametrize("fraction, crop", [
    ((0.5, 0.5), (128, 0)), ((0.0, 0.0), (0, 0)), ((1.0, 1.0), (256, 0)),
    ((0.25, 0.9), (64, 0)),
])
def test_crop_window(fraction, crop):
    placement = plan_placement((384, 128), (128, 128), "crop", fraction)
    assert placement.resized == (384, 128) and placement.crop == crop


def test_sdxl_size_tuple():
    placement = plan_placement((1000, 500), (512, 256), "crop", (0.0, 0.0))
    assert placement.sdxl_size() == (500, 1000, 0, 0, 256, 512)
    wide = plan_placement((1000, 400), (512, 256), "crop", (0.0, 0.0))
    assert wide.resized == (640, 256)
    assert wide.sdxl_size(flipped=True) == (400, 1000, 0, 128, 256, 512)


def test_signature_changes_with_every_field():
    base = plan_placement((640, 480), (512, 384), "crop")
    others = [plan_placement((640, 481), (512, 384), "crop"),
              plan_placement((640, 480), (576, 448), "crop"),
              plan_placement((640, 480), (512, 384), "stretch"),
              plan_placement((640, 480), (512, 384), "pad"),
              plan_placement((640, 480), (512, 320), "crop", (0.0, 0.0))]
    sigs = {base.signature()} | {p.signature() for p in others}
    assert len(sigs) == 1 + len(others)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 6000), h=st.integers(1, 6000),
       mode=st.sampled_from(["crop", "stretch", "pad", "none"]),
       no_upscale=st.booleans(), enable=st.booleans(),
       fx=st.floats(0, 1), fy=st.floats(0, 1))
def test_placement_invariants(w, h, mode, no_upscale, enable, fx, fy):
    rules = BucketRules((512, 512), 256, 1024, 64, enable=enable, no_upscale=no_upscale,
                        mode=mode)
    bw, bh = rules.bucket_for((w, h))
    assert bw % 64 == 0 and bh % 64 == 0 and bw >= 64 and bh >= 64
    assert bw * bh <= 512 * 512
    p = plan_placement((w, h), (bw, bh), mode, (fx, fy))
    rw, rh = p.resized
    if mode in ("crop", "none"):
        left, top = p.crop
        assert 0 <= left and left + bw <= rw and 0 <= top and top + bh <= rh
    if mode == "pad":
        left, top = p.pad
        assert 0 <= left and left + rw <= bw and 0 <= top and top + rh <= bh
    if mode == "stretch":
        assert p.resized == (bw, bh)
    if mode == "none" and w >= 64 and h >= 64:
        assert p.resized == (w, h)  # never resampled
    if no_upscale and enable and mode != "none" and w >= 64 and h >= 64:
        assert p.scale <= 1.0 + 1e-9
