"""The live training curve as a small SVG (training loss and validation score against the step): drawn on the
server from the job's events, so the page needs no plotting library and nothing is fetched from the internet."""

from __future__ import annotations

from html import escape
from typing import List, Optional, Sequence, Tuple

Point = Tuple[float, float]


def _path(points: Sequence[Point], x_max: float, y_min: float, y_max: float, box: Tuple[int, int, int, int]) -> str:
    left, top, width, height = box
    span = (y_max - y_min) or 1.0
    coords = [(left + width * (x / x_max if x_max else 0.0), top + height * (1 - (y - y_min) / span)) for x, y in points]
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)


def curve_svg(losses: Sequence[Point], scores: Sequence[Point], steps: int, score_name: str = "val Dice",
              width: int = 300, height: int = 140) -> str:
    """Loss (blue, left scale) and validation score (orange, right scale, 0–1 for Dice) over ``steps``."""
    if not losses and not scores:
        return ""
    box = (34, 10, width - 68, height - 34)
    x_max = float(max([steps] + [p[0] for p in losses] + [p[0] for p in scores]) or 1)
    parts: List[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                        f'viewBox="0 0 {width} {height}" font-size="10" font-family="sans-serif">',
                        f'<rect x="{box[0]}" y="{box[1]}" width="{box[2]}" height="{box[3]}" fill="white" '
                        'stroke="#bbb"/>']
    if losses:
        low, high = min(p[1] for p in losses), max(p[1] for p in losses)
        low, high = (low - 0.05, high + 0.05) if high - low < 1e-9 else (low, high)
        parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" '
                     f'points="{_path(losses, x_max, low, high, box)}"/>')
        parts.append(f'<text x="2" y="{box[1] + 8}" fill="#1f77b4">{high:.3g}</text>')
        parts.append(f'<text x="2" y="{box[1] + box[3]}" fill="#1f77b4">{low:.3g}</text>')
    if scores:
        low, high = (0.0, 1.0) if all(0 <= p[1] <= 1 for p in scores) else (min(p[1] for p in scores),
                                                                              max(p[1] for p in scores) or 1.0)
        points = _path(scores, x_max, low, high, box)
        parts.append(f'<polyline fill="none" stroke="#ff7f0e" stroke-width="2" points="{points}"/>')
        for point in points.split(" "):  # a dot per validation: few of them, each one matters
            x, y = point.split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="#ff7f0e"/>')
        parts.append(f'<text x="{box[0] + box[2] + 3}" y="{box[1] + 8}" fill="#ff7f0e">{high:.3g}</text>')
        parts.append(f'<text x="{box[0] + box[2] + 3}" y="{box[1] + box[3]}" fill="#ff7f0e">{low:.3g}</text>')
    legend = f'<tspan fill="#1f77b4">— loss</tspan>  <tspan fill="#ff7f0e">— {escape(score_name)}</tspan>'
    parts.append(f'<text x="{box[0]}" y="{height - 6}">{legend}  step {int(x_max)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def last(points: Sequence[Point]) -> Optional[float]:
    return points[-1][1] if points else None
