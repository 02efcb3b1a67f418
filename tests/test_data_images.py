"""Image decoding: EXIF orientation, transparency, grey / palette / 16-bit / CMYK inputs."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_train_ext.core.data.images import (ImageReadError, inspect_image, load_image,
                                             parse_color)
from lora_train_ext.core.errors import UserError


def png16_rgb(path, arr: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB PNG by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                         0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def exif_jpeg(path, orientation: int, size=(64, 32)) -> None:
    """Left half red, right half blue, stored with an EXIF orientation tag."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0)
    arr[:, size[0] // 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=95)


@pytest.mark.parametrize("orientation, size, red_at", [
    (1, (64, 32), (2, 16)),    # no rotation: red on the left
    (3, (64, 32), (61, 16)),   # 180 degrees: red on the right
    (6, (32, 64), (16, 2)),    # 90 CW: red at the top
    (8, (32, 64), (16, 61)),   # 90 CCW: red at the bottom
])
def test_exif_orientation(tmp_path, orientation, size, red_at):
    path = tmp_path / "x.jpg"
    exif_jpeg(path, orientation)
    assert inspect_image(str(path))[:2] == size
    img, alpha = load_image(str(path))
    assert img.size == size and alpha is None
    r, g, b = img.getpixel(red_at)
    assert r > 200 and b < 60


def test_rgba_composited_on_background(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., :3] = (10, 200, 10)
    arr[:, :4, 3] = 255  # left opaque, right fully transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    w, h, has_alpha = inspect_image(str(tmp_path / "a.png"))
    assert (w, h, has_alpha) == (8, 8, True)
    img, alpha = load_image(str(tmp_path / "a.png"), background=(255, 0, 255))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (10, 200, 10)
    assert img.getpixel((6, 1)) == (255, 0, 255)
    assert alpha is not None and alpha.getpixel((6, 1)) == 0 and alpha.getpixel((1, 1)) == 255


def test_opaque_rgba_has_no_alpha(tmp_path):
    Image.new("RGBA", (4, 4), (1, 2, 3, 255)).save(tmp_path / "a.png")
    img, alpha = load_image(str(tmp_path / "a.png"))
    assert alpha is None and img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("make, expect", [
    (lambda p: Image.new("L", (6, 4), 77).save(p / "g.png"), (77, 77, 77)),
    (lambda p: Image.new("1", (6, 4), 1).save(p / "g.png"), (255, 255, 255)),
    (lambda p: Image.new("LA", (6, 4), (77, 0)).save(p / "g.png"), (0, 0, 0)),  # on black
    (lambda p: Image.new("RGB", (6, 4), (9, 8, 7)).convert(
        "P", palette=Image.ADAPTIVE).save(p / "g.png"), (9, 8, 7)),
    (lambda p: Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(p / "g.png"),
     (156, 156, 156)),  # 16-bit grey: 40000 / 257
    (lambda p: png16_rgb(p / "g.png", np.tile(np.array([65535, 32896, 0], np.uint16),
                                                 (4, 6, 1))), (255, 128, 0)),  # 16-bit RGB
    (lambda p: Image.new("CMYK", (6, 4), (0, 0, 0, 0)).save(p / "g.jpg"), (255, 255, 255)),
    (lambda p: Image.new("RGB", (6, 4), (200, 100, 50)).save(p / "g.webp", lossless=True),
     (200, 100, 50)),
    (lambda p: Image.new("RGB", (6, 4), (200, 100, 50)).save(p / "g.bmp"), (200, 100, 50)),
])
def test_modes_become_8bit_rgb(tmp_path, make, expect):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    img, _ = load_image(str(path), background=(0, 0, 0))
    assert img.mode == "RGB" and img.size == (6, 4)
    got = img.getpixel((3, 2))
    assert all(abs(a - b) <= 2 for a, b in zip(got, expect)), (got, expect)


def test_palette_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "p.png", transparency=1)
    rgb, alpha = load_image(str(tmp_path / "p.png"), background=(0, 0, 255))
    assert rgb.getpixel((0, 0)) == (0, 0, 255)  # the transparent index shows the background
    assert rgb.getpixel((1, 1)) == (255, 0, 0)
    assert alpha is not None


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_raises_image_read_error(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a truncated PNG: header fine, pixels cut off
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError):
        inspect_image(str(path))
    with pytest.raises(ImageReadError):
        load_image(str(path))


def test_parse_color():
    assert parse_color("#ffffff") == (255, 255, 255)
    assert parse_color("#000") == (0, 0, 0)
    assert parse_color("white") == (255, 255, 255)
    with pytest.raises(UserError) as e:
        parse_color("nope")
    assert e.value.field == "data.background"


def test_jpeg_reduced_decode_matches_full_decode(tmp_path):
    from lora_train_ext.core.data.buckets import apply_placement, plan_placement

    yy, xx = np.mgrid[0:1024, 0:1536]
    arr = np.stack([xx % 256, yy % 256, (xx // 6) % 256], -1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    placement = plan_placement((1536, 1024), (192, 128), "crop")
    full, _ = load_image(str(tmp_path / "big.jpg"))
    small, _ = load_image(str(tmp_path / "big.jpg"), reduce_to=placement.resized,
                          expect_size=(1536, 1024))
    assert full.size == (1536, 1024) and small.size == (192, 128)  # 1/8 scale
    a = np.asarray(apply_placement(full, placement, (0, 0, 0)), np.float32)
    b = np.asarray(apply_placement(small, placement, (0, 0, 0)), np.float32)
    assert np.abs(a - b).mean() < 3  # DCT scaling is close to a full decode + LANCZOS
    with pytest.raises(ImageReadError, match="size changed"):
        load_image(str(tmp_path / "big.jpg"), expect_size=(1024, 1536))
