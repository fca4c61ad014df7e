"""Plot of a `dsv4 bench layer` result: GPU time of a decode step against batch size, one line per determinism level
(and the weight-read floor), one panel per layer kind. Plain SVG, no plotting library needed.

    python -m dsv4.benchmarks.plot RESULT.json OUT.svg
"""
from __future__ import annotations

import json
import math
import sys

COLOURS = {"fast": "#1f77b4", "batch-invariant": "#2ca02c", "exact": "#d62728", "floor": "#7f7f7f"}
PANEL_W, PANEL_H, MARGIN = 420, 300, 60


def _decode_series(result: dict, layer: str) -> dict[str, list[tuple[int, float]]]:
    """level -> [(batch, GPU microseconds)], plus 'floor' -> [(batch, weight-read floor)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if r["layer"] == layer and r["phase"] == "decode":
            series.setdefault(r["level"], []).append((r["size"], r["gpu_us"]))
            if r["level"] == "fast":
                series.setdefault("floor", []).append((r["size"], r["floor_us"]))
    return {k: sorted(v) for k, v in series.items()}


def _panel(series: dict[str, list[tuple[int, float]]], title: str, x0: int) -> list[str]:
    """One log-log panel at horizontal offset x0: axes, decade ticks, a polyline per series, a legend."""
    points = [p for line in series.values() for p in line if p[1] > 0]
    lx = [math.log10(b) for b, _ in points]
    ly = [math.log10(us) for _, us in points]
    x_lo, x_hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
    y_lo, y_hi = math.floor(min(ly)), math.ceil(max(ly))

    def px(batch: float, us: float) -> tuple[float, float]:
        x = x0 + MARGIN + (math.log10(batch) - x_lo) / (x_hi - x_lo) * (PANEL_W - 2 * MARGIN)
        y = PANEL_H - MARGIN - (math.log10(us) - y_lo) / (y_hi - y_lo) * (PANEL_H - 2 * MARGIN)
        return x, y

    out = [f'<text x="{x0 + PANEL_W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{x0 + MARGIN}" y1="{PANEL_H - MARGIN}" x2="{x0 + PANEL_W - MARGIN}" y2="{PANEL_H - MARGIN}" '
           'stroke="black"/>',
           f'<line x1="{x0 + MARGIN}" y1="{MARGIN}" x2="{x0 + MARGIN}" y2="{PANEL_H - MARGIN}" stroke="black"/>',
           f'<text x="{x0 + PANEL_W / 2}" y="{PANEL_H - 15}" text-anchor="middle" font-size="12">decode batch</text>']
    for batch in sorted({b for b, _ in points}):
        x, _ = px(batch, 10 ** y_lo)
        out.append(f'<text x="{x:.1f}" y="{PANEL_H - MARGIN + 15}" text-anchor="middle" font-size="11">{batch}</text>')
    for decade in range(y_lo, y_hi + 1):
        _, y = px(10 ** x_lo, 10 ** decade)
        label = f"{10 ** decade / 1000:g} ms"
        out.append(f'<text x="{x0 + MARGIN - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    for i, (name, line) in enumerate(series.items()):
        colour = COLOURS.get(name, "black")
        dash = ' stroke-dasharray="4 3"' if name == "floor" else ""
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (px(b, us) for b, us in line if us > 0))
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}>'
                   f'<title>{name}</title></polyline>')
        out.append(f'<text x="{x0 + MARGIN + 10}" y="{MARGIN + 14 * i}" font-size="11" fill="{colour}">{name}</text>')
    return out


def layer_decode_svg(result: dict) -> str:
    """The SVG document: one panel per layer kind of the result."""
    layers = sorted({r["layer"] for r in result["rows"] if r["phase"] == "decode"})
    body = []
    for i, layer in enumerate(layers):
        body += _panel(_decode_series(result, layer), f"{layer} layer decode step, GPU time", i * PANEL_W)
    caption = (f"{result['preset']} on {result['device']}, torch {result['torch']}, triton {result['triton']}, "
               f"{result['date']}; context {result['context']} tokens")
    width = PANEL_W * max(1, len(layers))
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H + 20}" '
                      'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>', *body,
                      f'<text x="10" y="{PANEL_H + 12}" font-size="11">{caption}</text>', "</svg>"])


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    with open(source) as f:
        svg = layer_decode_svg(json.load(f))
    with open(target, "w") as f:
        f.write(svg)
