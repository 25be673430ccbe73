"""Sparklines as SVG, drawn on the server: the dashboard's page then needs no
charting code at all, and what it shows is what a test can read back."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Final

__all__ = ["sparkline"]

_WIDTH: Final = 300
_HEIGHT: Final = 60
_PAD: Final = 2.0


def _fmt(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def sparkline(
    values: Sequence[float | None],
    *,
    label: str,
    color: str = "#2563eb",
    points: int | None = None,
    width: int = _WIDTH,
    height: int = _HEIGHT,
) -> str:
    """An SVG sparkline of ``values`` (oldest first; ``None`` is a gap), scaled
    from 0 to their maximum, right-aligned in a frame of ``points`` slots (so
    that a short history fills from the right as it grows). ``label`` becomes
    the chart's accessible name.
    """
    slots = max(points or len(values), len(values), 2)
    top = max((v for v in values if v is not None), default=0.0)
    scale = (height - 2 * _PAD) / top if top > 0 else 0.0
    step = (width - 2 * _PAD) / (slots - 1)
    offset = slots - len(values)
    runs: list[list[tuple[float, float]]] = [[]]
    for i, value in enumerate(values):
        if value is None:
            if runs[-1]:
                runs.append([])
            continue
        x = _PAD + (offset + i) * step
        y = height - _PAD - max(value, 0.0) * scale
        runs[-1].append((x, y))
    shapes: list[str] = []
    base = _fmt(height - _PAD)
    for run in runs:
        if not run:
            continue
        line = " ".join(f"{_fmt(x)},{_fmt(y)}" for x, y in run)
        area = f"{_fmt(run[0][0])},{base} {line} {_fmt(run[-1][0])},{base}"
        shapes.append(f'<polygon points="{area}" fill="{color}" fill-opacity="0.15"/>')
        shapes.append(
            f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5" '
            'stroke-linejoin="round" stroke-linecap="round"/>'
        )
        last_x, last_y = run[-1]
        shapes.append(f'<circle cx="{_fmt(last_x)}" cy="{_fmt(last_y)}" r="2.5" fill="{color}"/>')
    name = html.escape(label, quote=True)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'preserveAspectRatio="none" role="img" aria-label="{name}">'
        f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="#cbd5e1" stroke-width="1"/>'
        + "".join(shapes)
        + "</svg>"
    )
