"""Reading images the way a trainer needs them: EXIF orientation applied, transparency composited
on a chosen colour, palette / grey / 16-bit / CMYK inputs turned into 8-bit RGB.

Pillow only. Failures are `ImageReadError` (an OSError) with a message a user can act on, so the
scanner can record an `unreadable` problem instead of crashing.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageColor, ImageOps

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# EXIF orientations 5..8 are transposes / 90-degree rotations: width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112

# Decompression-bomb warnings are errors here: a 30000x30000 "image" is a bad file, not a sample.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 16384 * 16384)


class ImageReadError(OSError):
    """An image that cannot be decoded (truncated, not an image, unsupported mode)."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def parse_color(text: str, field: str = "data.background") -> tuple[int, int, int]:
    """'#ffffff', '#fff', 'white', 'rgb(0,0,0)' -> (r, g, b)."""
    try:
        rgb = ImageColor.getrgb(str(text).strip() or "#ffffff")
    except ValueError:
        raise UserError(field, f"{text!r} is not a colour; give e.g. #ffffff or white") from None
    return tuple(int(c) for c in rgb[:3])  # type: ignore[return-value]


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # broken EXIF blocks are common; they never make an image unreadable
        return 1


def _describe(error: Exception, path: str) -> str:
    """'UnidentifiedImageError: cannot identify image file' without repeating the full path."""
    text = str(error).replace(f"'{path}'", "").replace(path, "").strip() or "cannot decode"
    return f"{type(error).__name__}: {text}"


def inspect_image(path: str, decode: bool = True) -> tuple[int, int, bool]:
    """Return (width, height, has_alpha) as the image will be seen (after EXIF orientation).

    decode=True decodes the pixels too (at a reduced scale for JPEG, which is fast) so truncated
    or corrupt files are caught at scan time, not in the middle of a run.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if _orientation(img) in _SWAPPING_ORIENTATIONS:
                    w, h = h, w
                has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                    "transparency" in img.info)
                if decode:
                    if img.format == "JPEG":
                        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                    img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageReadError(_describe(e, path)) from None
    if w < 1 or h < 1:
        raise ImageReadError("image has no pixels")
    return w, h, has_alpha


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer / float single-channel modes ('I', 'I;16', 'F') -> 'L', scaled by their range."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return Image.fromarray(arr, "L")
    arr = arr.astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F" and top <= 1.0:
        arr = arr * 255.0
    elif img.mode.startswith("I;16") or top > 255.0:
        arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def load_image(path: str, background: tuple[int, int, int] = (255, 255, 255), *,
               expect_size: tuple[int, int] | None = None,
               reduce_to: tuple[int, int] | None = None,
               ) -> tuple[Image.Image, Image.Image | None]:
    """Decode to (RGB image, alpha or None). Transparent pixels are composited on `background`.

    The alpha ('L' image, same size) is returned so masked loss can use it.
    expect_size: (w, h) after orientation the scan saw; a different file raises ImageReadError.
    reduce_to: (w, h) the caller will scale to; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale
        where that stays at least this big (DCT-domain scaling: much faster for big photos, and
        an area-like filter). The returned image may then be smaller than the original.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as raw:
                swap = _orientation(raw) in _SWAPPING_ORIENTATIONS
                w, h = raw.size[::-1] if swap else raw.size
                if expect_size is not None and (w, h) != tuple(expect_size):
                    raise ImageReadError(f"size changed since the scan ({expect_size[0]}x"
                                         f"{expect_size[1]} -> {w}x{h})")
                if reduce_to is not None and raw.format == "JPEG" and raw.mode in ("RGB", "L"):
                    rw, rh = reduce_to[::-1] if swap else reduce_to
                    raw.draft(raw.mode, (max(1, int(rw)), max(1, int(rh))))
                raw.load()
                img = ImageOps.exif_transpose(raw)
                if img is raw:
                    img = raw.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(_describe(e, path)) from None
    try:
        return _to_rgb(img, background)
    except (OSError, ValueError) as e:
        raise ImageReadError(f"cannot convert mode {img.mode}: {e}") from None


def _to_rgb(img: Image.Image, background: tuple[int, int, int],
            ) -> tuple[Image.Image, Image.Image | None]:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        img = _to_8bit(img)
        mode = "L"
    if mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif mode != "RGBA" and mode != "RGB":
        img = img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV
    if img.mode == "RGBA":
        alpha = img.getchannel("A")
        if alpha.getextrema() == (255, 255):
            return img.convert("RGB"), None
        canvas = Image.new("RGBA", img.size, tuple(background) + (255,))
        canvas.alpha_composite(img)
        return canvas.convert("RGB"), alpha
    return img, None


def load_mask(path: str, size: tuple[int, int]) -> Image.Image:
    """A grey mask ('L', 255 = train on this pixel) resized to `size` (w, h) if it differs."""
    try:
        with Image.open(path) as raw:
            raw.load()
            img = ImageOps.exif_transpose(raw)
            if "A" in img.getbands() and img.mode != "LA" and len(img.getbands()) == 4:
                mask = img.getchannel("A")
            else:
                mask = _to_8bit(img) if img.mode in ("I", "F") or img.mode.startswith("I;") \
                    else img.convert("L")
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{type(e).__name__}: {e}") from None
    if mask.size != size:
        mask = mask.resize(size, Image.BILINEAR)
    return mask


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def stem_of(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
