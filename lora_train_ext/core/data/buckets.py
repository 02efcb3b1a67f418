"""Aspect-ratio buckets and how an image is fitted into its bucket.

Buckets (kohya-like): every (w, h) with sides multiples of `step` in [min_side, max_side] and
area <= the resolution's area, built by walking the width and taking the tallest height that
fits. An image goes to the bucket whose aspect ratio is nearest (in log space, so 1:4 and 4:1 are
treated alike). With `no_upscale` an image no bigger than the resolution keeps its own size
(trimmed to the step); a bigger one is scaled down to the resolution's area first (min_side
does not apply then, as in kohya; max_side does). Buckets off: every image trains at the
resolution itself (no_upscale needs buckets).

Resize modes (ComfyUI's loaders), all ending at exactly the bucket size:
  crop     scale to cover the bucket, then cut the overhang (center or random)
  stretch  scale each side to the bucket (aspect ratio not kept)
  pad      scale to fit inside the bucket, fill the rest with the background colour
  none     never resample: the bucket is the image's own size (trimmed to the step, and cut to a
           window of the resolution's area for big images), cut out at 1:1 pixels

Everything here is pure arithmetic on sizes except `apply_placement`, which uses Pillow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

Size = tuple[int, int]  # (width, height) everywhere in this module


def floor_to(value: float, step: int) -> int:
    return max(step, int(value) // step * step)


def make_buckets(resolution: Size, min_side: int, max_side: int, step: int) -> list[Size]:
    """All bucket sizes (w, h) for a base resolution; sorted by aspect ratio (w / h)."""
    res_w, res_h = resolution
    max_area = res_w * res_h
    min_side = max(step, math.ceil(min_side / step) * step)
    max_side = max(min_side, max_side // step * step)
    found: set[Size] = set()
    base = (min(floor_to(res_w, step), max_side), min(floor_to(res_h, step), max_side))
    found.add(base)
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            found.add((width, height))
            found.add((height, width))
        width += step
    return sorted(found, key=lambda s: (s[0] / s[1], s[0] * s[1]))


@dataclass(frozen=True)
class BucketRules:
    resolution: Size
    min_side: int = 256
    max_side: int = 1024
    step: int = 64
    enable: bool = True
    no_upscale: bool = False
    mode: str = "crop"  # crop | stretch | pad | none

    def buckets(self) -> list[Size]:
        if not self.enable:
            return [self.resolution]
        return make_buckets(self.resolution, self.min_side, self.max_side, self.step)

    def bucket_for(self, size: Size, buckets: list[Size] | None = None) -> Size:
        """The bucket an image of `size` (w, h) trains at."""
        w, h = size
        res_w, res_h = self.resolution
        step = self.step
        # shrink (never enlarge) to the resolution's area
        scale = min(1.0, math.sqrt(res_w * res_h / (w * h)))
        if self.mode == "none":  # a 1:1 window of the image, trimmed to the step
            if self.enable:
                return (min(floor_to(w * scale, step), floor_to(self.max_side, step)),
                        min(floor_to(h * scale, step), floor_to(self.max_side, step)))
            return min(floor_to(w, step), floor_to(res_w, step)), \
                min(floor_to(h, step), floor_to(res_h, step))
        if self.no_upscale and self.enable:
            scale = min(scale, self.max_side / w, self.max_side / h)
            return floor_to(w * scale, step), floor_to(h * scale, step)
        if not self.enable:
            return self.resolution
        candidates = buckets if buckets is not None else self.buckets()
        target = math.log(w / h)
        return min(candidates,
                   key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


@dataclass(frozen=True)
class Placement:
    """How one image is fitted into its bucket. Sizes are (w, h); offsets are (left, top).

    resized: the size the image is scaled to; crop: the bucket-sized window cut from the resized
    image (crop / none modes); pad: where the resized image sits on the bucket canvas (pad mode).
    """

    original: Size
    bucket: Size
    resized: Size
    crop: tuple[int, int] = (0, 0)
    pad: tuple[int, int] = (0, 0)
    mode: str = "crop"

    @property
    def scale(self) -> float:
        """How much the image is enlarged (>1) or shrunk (<1), the larger of the two sides."""
        return max(self.resized[0] / self.original[0], self.resized[1] / self.original[1])

    def signature(self) -> str:
        """A stable text naming everything that changes the pixels (for cache keys)."""
        return (f"{self.mode}:o{self.original[0]}x{self.original[1]}:b{self.bucket[0]}x"
                f"{self.bucket[1]}:r{self.resized[0]}x{self.resized[1]}:c{self.crop[0]},"
                f"{self.crop[1]}:p{self.pad[0]},{self.pad[1]}")

    def sdxl_size(self, flipped: bool = False) -> tuple[int, int, int, int, int, int]:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w) for SDXL's conditioning."""
        left, top = self.crop
        if flipped:
            left = self.resized[0] - self.bucket[0] - left if self.mode != "pad" else left
        return (self.original[1], self.original[0], top, left, self.bucket[1], self.bucket[0])


def plan_placement(original: Size, bucket: Size, mode: str = "crop",
                   crop_fraction: tuple[float, float] | None = (0.5, 0.5)) -> Placement:
    """Fit an image of size `original` into `bucket`.

    crop_fraction (x, y) in [0, 1] places the crop window along the overhang: (0.5, 0.5) is a
    center crop, random fractions make a random crop.
    """
    w, h = original
    bw, bh = bucket
    fx, fy = crop_fraction if crop_fraction is not None else (0.5, 0.5)
    if mode == "stretch":
        return Placement(original, bucket, (bw, bh), mode=mode)
    if mode == "pad":
        scale = min(bw / w, bh / h)
        rw, rh = min(bw, max(1, round(w * scale))), min(bh, max(1, round(h * scale)))
        return Placement(original, bucket, (rw, rh), pad=((bw - rw) // 2, (bh - rh) // 2),
                         mode=mode)
    if mode == "none":
        rw, rh = w, h
        if rw < bw or rh < bh:  # only for images smaller than one step: enlarge minimally
            scale = max(bw / w, bh / h)
            rw, rh = max(bw, math.ceil(w * scale)), max(bh, math.ceil(h * scale))
    else:  # crop
        scale = max(bw / w, bh / h)
        rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left = int(round((rw - bw) * min(max(fx, 0.0), 1.0)))
    top = int(round((rh - bh) * min(max(fy, 0.0), 1.0)))
    return Placement(original, bucket, (rw, rh), crop=(left, top), mode=mode)


def _resample_for(src: Size, dst: Size) -> int:
    shrinking = dst[0] * dst[1] < src[0] * src[1]
    return Image.LANCZOS if shrinking else Image.BICUBIC


def apply_placement(img: Image.Image, placement: Placement, fill: tuple[int, ...] | int,
                    resample: int | None = None) -> Image.Image:
    """Scale / crop / pad `img` (already oriented) to the bucket size.

    img: the image at its original size, or a uniformly reduced copy of it (a JPEG decoded at
    1/2..1/8 scale): it is scaled to `placement.resized` either way.
    `fill` is the pad colour (an int for 'L' masks: 0 = ignore the padded area).
    """
    ow, oh = placement.original
    if img.size[0] > ow or img.size[1] > oh:
        raise ValueError(f"image is {img.size}, placement is for {placement.original}")
    out = img
    if placement.resized != img.size:
        method = resample if resample is not None else _resample_for(img.size, placement.resized)
        out = img.resize(placement.resized, method, reducing_gap=3.0 if method == Image.LANCZOS
                         else None)
    bw, bh = placement.bucket
    if placement.mode == "pad":
        canvas = Image.new(img.mode, (bw, bh), fill)
        canvas.paste(out, placement.pad)
        return canvas
    left, top = placement.crop
    if out.size != (bw, bh):
        out = out.crop((left, top, left + bw, top + bh))
    return out
