"""Plots drawn with PIL only (no matplotlib needed inside a host): loss curve, generic line plot."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def ema(values: Sequence[float], beta: float = 0.9) -> List[float]:
    out, avg = [], None
    for i, v in enumerate(values):
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def line_plot(series: List[Tuple[Sequence[float], Sequence[float], Tuple[int, int, int], str]], title: str,
              xlabel: str, ylabel: str, size: Tuple[int, int] = (640, 400), log_x: bool = False,
              marker_x: Optional[float] = None) -> Image.Image:
    """series: [(xs, ys, rgb, label)]."""
    W, H = size
    L, R, T, B = 64, 16, 32, 44
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    f = _font(12)
    pts = [(x, y) for xs, ys, _, _ in series for x, y in zip(xs, ys) if math.isfinite(y) and math.isfinite(x)]
    d.text((L, 8), title, fill="black", font=_font(14))
    if not pts:
        d.text((L, H // 2), "no data yet", fill="gray", font=f)
        return im
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs_all = [tx(x) for x, _ in pts if (x > 0 or not log_x)]
    ys_all = [y for _, y in pts]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + abs(y0) * 0.1 + 1e-6
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return L + (tx(x) - x0) / (x1 - x0) * (W - L - R), T + (1 - (y - y0) / (y1 - y0)) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline=(120, 120, 120))
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yp = px(10 ** x0 if log_x else x0, yv)
        d.line([L, yp, W - R, yp], fill=(230, 230, 230))
        d.text((4, yp - 6), f"{yv:.3g}", fill="black", font=f)
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        xr = 10 ** xv if log_x else xv
        xp, _ = px(xr, y0)
        d.text((xp - 12, H - B + 4), f"{xr:.3g}", fill="black", font=f)
    d.text((W // 2 - 20, H - 18), xlabel, fill="black", font=f)
    d.text((4, T - 16), ylabel, fill="black", font=f)
    ly = T + 4
    for xs, ys, rgb, label in series:
        line = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and (x > 0 or not log_x)]
        if len(line) > 1:
            d.line(line, fill=rgb, width=2)
        elif line:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=rgb)
        if label:
            d.line([W - R - 110, ly + 6, W - R - 90, ly + 6], fill=rgb, width=2)
            d.text((W - R - 86, ly), label, fill="black", font=f)
            ly += 16
    if marker_x is not None and math.isfinite(marker_x):
        xp, _ = px(marker_x, y0)
        d.line([xp, T, xp, H - B], fill=(200, 0, 0), width=1)
    return im


def loss_plot(steps: Sequence[int], losses: Sequence[float], title: str = "training loss",
              val_steps: Sequence[int] = (), val_losses: Sequence[float] = ()) -> Image.Image:
    series = [(list(steps), list(losses), (170, 190, 230), "loss"),
              (list(steps), ema(losses), (20, 60, 200), "smoothed")]
    if val_losses:
        series.append((list(val_steps), list(val_losses), (220, 90, 20), "validation"))
    return line_plot(series, title, "step", "loss")
