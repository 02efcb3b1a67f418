"""Small inline SVG line charts with axes, labels and a legend, so no plotting package is needed
(the tab refreshes them every second while a run trains)."""

from __future__ import annotations

import html
import math

COLOURS = ("#e55", "#37c", "#2a7", "#c80", "#85c", "#999")



def _frame(css: str, width: int, height: int, left: float, top: float, plot_w: float,
           plot_h: float, title: str) -> list[str]:
    """The opening <svg> tag, the title and the two axes every chart starts with."""
    return [
        f"<svg class='{css}' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg' role='img' "
        f"aria-label='{html.escape(title)}'>",
        f"<text x='{left}' y='13' font-size='11' font-weight='bold'>{html.escape(title)}</text>",
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{top + plot_h}' stroke='#888'/>",
        f"<line x1='{left}' y1='{top + plot_h}' x2='{left + plot_w}' y2='{top + plot_h}' "
        "stroke='#888'/>",
    ]

def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.3g}"


def line_chart_svg(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step",
                   y_label: str = "", width: int = 420, height: int = 160,
                   styles: dict[str, str] | None = None) -> str:
    """One chart of named series of (x, y) points: title, y axis with its label and range, x axis
    with its label and range, a legend naming each line. Non-finite points are left out."""
    series = {name: [(x, y) for x, y in pts if math.isfinite(y)] for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return ""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    lo, hi = min(ys), max(ys)
    if x1 - x0 < 1e-12:
        x1 = x0 + 1
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    left, right, top, bottom = 52, 8, 22, 30
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float, y: float) -> str:
        return (f"{left + (x - x0) / (x1 - x0) * plot_w:.1f},"
                f"{top + (hi - y) / (hi - lo) * plot_h:.1f}")

    parts = _frame("lora-train-chart", width, height, left, top, plot_w, plot_h, title) + [
        f"<text x='{left - 4}' y='{top + 8}' font-size='9' text-anchor='end'>{_fmt(hi)}</text>",
        f"<text x='{left - 4}' y='{top + plot_h}' font-size='9' text-anchor='end'>{_fmt(lo)}</text>",
        f"<text x='10' y='{top + plot_h / 2:.0f}' font-size='9' text-anchor='middle' "
        f"transform='rotate(-90 10 {top + plot_h / 2:.0f})'>{html.escape(y_label)}</text>",
        f"<text x='{left}' y='{height - 14}' font-size='9'>{_fmt(x0)}</text>",
        f"<text x='{left + plot_w}' y='{height - 14}' font-size='9' text-anchor='end'>"
        f"{_fmt(x1)}</text>",
        f"<text x='{left + plot_w / 2:.0f}' y='{height - 3}' font-size='9' text-anchor='middle'>"
        f"{html.escape(x_label)}</text>",
    ]
    legend_x = left + 8
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        style = (styles or {}).get(name, "")
        width_ = "1" if style == "thin" else "2"
        points = " ".join(px(x, y) for x, y in pts)
        parts.append(f"<polyline class='series' data-name='{html.escape(name)}' fill='none' "
                     f"stroke='{colour}' stroke-width='{width_}' points='{points}'/>")
        if style == "points":  # few, spaced-out values: mark each one
            for point in points.split():
                cx, cy = point.split(",")
                parts.append(f"<circle class='point' data-name='{html.escape(name)}' cx='{cx}' "
                             f"cy='{cy}' r='2.5' fill='{colour}'/>")
        parts.append(f"<rect x='{legend_x}' y='{top + 2}' width='10' height='3' fill='{colour}'/>")
        parts.append(f"<text class='legend' x='{legend_x + 13}' y='{top + 7}' font-size='9'>"
                     f"{html.escape(name)}</text>")
        legend_x += 20 + 6 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def loss_chart_svg(history: list[tuple[int, float]], width: int = 420, height: int = 160,
                   validation: list[tuple[int, float]] | None = None) -> str:
    """Loss per step, raw (thin) and smoothed, with the validation loss (its own points, each
    marked) on the same axes when the run measures one."""
    if not history and not validation:
        return ""
    raw = [v for _, v in history]
    steps = [s for s, _ in history]
    series = {"raw": list(zip(steps, raw)), "smoothed": list(zip(steps, smooth(raw)))}
    if validation:
        series["validation"] = [(s, v) for s, v in validation]
    return line_chart_svg("Loss", series, y_label="loss", width=width, height=height,
                          styles={"raw": "thin", "validation": "points"})


def _edge(v: float) -> str:
    """A bin edge: whole numbers as they are (timestep 1000, not 1.00e+03)."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e9 else _fmt(v)


def histogram_svg(title: str, counts: list[int], edges: list[float], x_label: str = "",
                  width: int = 420, height: int = 140) -> str:
    """Bars of `counts` over the bins `edges` (len(edges) == len(counts) + 1), heights as the
    share of all draws; each bar carries its count (`data-count`) and range in a tooltip."""
    if not counts or len(edges) != len(counts) + 1:
        return ""
    total = sum(counts) or 1
    top_share = max(counts) / total or 1.0
    left, right, top, bottom = 52, 8, 22, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / len(counts)
    parts = _frame("lora-train-chart lora-train-histogram", width, height, left, top, plot_w,
                   plot_h, title) + [
        f"<text x='{left - 4}' y='{top + 8}' font-size='9' text-anchor='end'>"
        f"{100 * top_share:.1f}%</text>",
        f"<text x='{left - 4}' y='{top + plot_h}' font-size='9' text-anchor='end'>0</text>",
        f"<text x='{left}' y='{height - 14}' font-size='9'>{_edge(edges[0])}</text>",
        f"<text x='{left + plot_w}' y='{height - 14}' font-size='9' text-anchor='end'>"
        f"{_edge(edges[-1])}</text>",
        f"<text x='{left + plot_w / 2:.0f}' y='{height - 3}' font-size='9' text-anchor='middle'>"
        f"{html.escape(x_label)}</text>",
    ]
    for i, count in enumerate(counts):
        h = plot_h * (count / total) / top_share
        parts.append(
            f"<rect class='bar' data-count='{count}' x='{left + i * bar_w + 0.5:.1f}' "
            f"y='{top + plot_h - h:.1f}' width='{max(bar_w - 1, 0.5):.1f}' height='{h:.1f}' "
            f"fill='{COLOURS[1]}'><title>{_edge(edges[i])}-{_edge(edges[i + 1])}: "
            f"{100 * count / total:.1f}%</title></rect>")
    parts.append("</svg>")
    return "".join(parts)
