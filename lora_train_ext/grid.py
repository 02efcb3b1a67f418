"""A labelled image grid (rows x columns) drawn with Pillow, for the test panel."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def labelled_grid(images: list, rows: list[str], cols: list[str], pad: int = 4) -> Image.Image:
    """images in row-major order; a label column on the left and a label row on top."""
    if len(images) != len(rows) * len(cols):
        raise ValueError(f"{len(images)} images for a {len(rows)}x{len(cols)} grid")
    w, h = images[0].size
    font = ImageFont.load_default()
    label_h = max(18, h // 8)
    label_w = max(60, w // 3)
    grid = Image.new("RGB", (label_w + len(cols) * (w + pad), label_h + len(rows) * (h + pad)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(cols):
        draw.text((label_w + c * (w + pad) + 4, 3), text, fill="black", font=font)
    for r, text in enumerate(rows):
        draw.text((4, label_h + r * (h + pad) + h // 2 - 6), text, fill="black", font=font)
        for c in range(len(cols)):
            img = images[r * len(cols) + c].convert("RGB")
            grid.paste(img, (label_w + c * (w + pad), label_h + r * (h + pad)))
    return grid
