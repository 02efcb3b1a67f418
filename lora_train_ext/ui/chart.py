"""A small inline SVG loss chart (raw and smoothed), so no plotting package is needed."""

from __future__ import annotations


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_chart_svg(history: list[tuple[int, float]], width: int = 420, height: int = 140) -> str:
    if not history:
        return ""
    steps = [s for s, _ in history]
    raw = [v for _, v in history]
    smoothed = smooth(raw)
    lo, hi = min(raw), max(raw)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    x0, x1 = steps[0], max(steps[-1], steps[0] + 1)
    pad = 28

    def point(step: int, value: float) -> str:
        x = pad + (step - x0) / (x1 - x0) * (width - pad - 6)
        y = 6 + (hi - value) / (hi - lo) * (height - 6 - 18)
        return f"{x:.1f},{y:.1f}"

    raw_pts = " ".join(point(s, v) for s, v in zip(steps, raw))
    smooth_pts = " ".join(point(s, v) for s, v in zip(steps, smoothed))
    return (
        f"<svg class='lora-train-chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}'"
        " xmlns='http://www.w3.org/2000/svg' role='img' aria-label='loss chart'>"
        f"<polyline fill='none' stroke='#9ab' stroke-width='1' points='{raw_pts}'/>"
        f"<polyline fill='none' stroke='#e55' stroke-width='2' points='{smooth_pts}'/>"
        f"<text x='2' y='12' font-size='10'>{hi:.3f}</text>"
        f"<text x='2' y='{height - 20}' font-size='10'>{lo:.3f}</text>"
        f"<text x='{pad}' y='{height - 4}' font-size='10'>step {steps[0]}</text>"
        f"<text x='{width - 70}' y='{height - 4}' font-size='10'>step {steps[-1]}</text>"
        "</svg>"
    )
