"""Plots of benchmark results: decode step time against batch size, one line per determinism level (and the floor),
one panel per layer kind (`bench layer`) or per context (`bench model`). Plain SVG, no plotting library needed.

    python -m dsv4.benchmarks.plot RESULT.json OUT.svg
"""
from __future__ import annotations

import json
import math
import sys

COLOURS = {"fast": "#1f77b4", "batch-invariant": "#2ca02c", "exact": "#d62728", "floor": "#7f7f7f"}
PANEL_W, PANEL_H, MARGIN = 420, 300, 60


def _decode_series(rows: list[dict], time_key: str) -> dict[str, list[tuple[int, float]]]:
    """level -> [(batch, microseconds)] of decode rows, plus 'floor' -> [(batch, floor)] (from the fast rows)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(r["level"], []).append((r.get("size", r.get("batch")), r[time_key]))
        if r["level"] == "fast":
            series.setdefault("floor", []).append((r.get("size", r.get("batch")), r["floor_us"]))
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


def _svg(panels: list[list[str]], caption: str) -> str:
    width = PANEL_W * max(1, len(panels))
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H + 20}" '
                      'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>',
                      *(line for panel in panels for line in panel),
                      f'<text x="10" y="{PANEL_H + 12}" font-size="11">{caption}</text>', "</svg>"])


def layer_decode_svg(result: dict) -> str:
    """One panel per layer kind of a `bench layer` result: graph-replayed step time (GPU busy time where a step was
    not captured) against batch."""
    decode = [dict(r, step_us=r.get("graph_us") or r["gpu_us"]) for r in result["rows"] if r["phase"] == "decode"]
    layers = sorted({r["layer"] for r in decode})
    panels = [_panel(_decode_series([r for r in decode if r["layer"] == layer], "step_us"),
                     f"{layer} layer decode step", i * PANEL_W) for i, layer in enumerate(layers)]
    return _svg(panels, f"{result['preset']} on {result['device']}, torch {result['torch']}, triton "
                        f"{result['triton']}, {result['date']}; context {result['context']} tokens")


def model_decode_svg(result: dict) -> str:
    """One panel per context of a `bench model` result: time per output token against batch."""
    decode = [r for r in result["rows"] if r["phase"] == "decode"]
    contexts = sorted({r["context"] for r in decode if sum(d["context"] == r["context"] for d in decode) > 3})
    panels = [_panel(_decode_series([r for r in decode if r["context"] == c], "tpot_us"),
                     f"TPOT, context {c}", i * PANEL_W) for i, c in enumerate(contexts)]
    return _svg(panels, f"{result['layers']} {result['preset']} layers on {result['device']}, torch "
                        f"{result['torch']}, triton {result['triton']}, {result['date']}")


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    with open(source) as f:
        result = json.load(f)
    svg = model_decode_svg(result) if "layers" in result else layer_decode_svg(result)
    with open(target, "w") as f:
        f.write(svg)
