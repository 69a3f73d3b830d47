"""Plots drawn with PIL only (no matplotlib needed inside a host): loss curve, generic line plot."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12):
    """A scalable font: Pillow's own (10.1+), else DejaVu Sans where the system or matplotlib has it, else
    Pillow's small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        pass
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> List[float]:
    """About `n` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]; whole numbers only when
    `integer` (a step axis: 1, 2, 3, 4 for four steps, never 1.75)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    span = hi - lo
    if span == 0:
        return [round(lo) if integer else lo]
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(float(round(v)) if integer else round(v, 12))
        v += step
    return out


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
              marker_x: Optional[float] = None, integer_x: bool = False) -> Image.Image:
    """series: [(xs, ys, rgb, label)]. Drawn at twice the size and scaled down (smooth lines and text);
    `integer_x`: whole-number ticks on the x axis (steps, epochs)."""
    k = 2  # supersampling
    W, H = size[0] * k, size[1] * k
    L, R, T, B = 70 * k, 18 * k, 34 * k, 46 * k
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    f = _font(12 * k)
    pts = [(x, y) for xs, ys, _, _ in series for x, y in zip(xs, ys) if math.isfinite(y) and math.isfinite(x)]
    d.text((L, 8 * k), title, fill="black", font=_font(14 * k))
    if not pts:
        d.text((L, H // 2), "no data yet", fill="gray", font=f)
        return im.resize(size, Image.LANCZOS)
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs_all = [tx(x) for x, _ in pts if (x > 0 or not log_x)]
    ys_all = [y for _, y in pts]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 == x0:
        x0, x1 = (x0 - 1, x1 + 1) if integer_x else (x0, x0 + 1)
    if y1 == y0:
        y1 = y0 + abs(y0) * 0.1 + 1e-6
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return L + (tx(x) - x0) / (x1 - x0) * (W - L - R), T + (1 - (y - y0) / (y1 - y0)) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline=(120, 120, 120), width=k)
    for yv in nice_ticks(y0, y1, 6):
        _, yp = px(10 ** x0 if log_x else x0, yv)
        d.line([L, yp, W - R, yp], fill=(230, 230, 230), width=k)
        label = f"{yv:.3g}"
        d.text((L - 6 * k - d.textlength(label, font=f), yp - 7 * k), label, fill="black", font=f)
    x_ticks = ([10 ** v for v in nice_ticks(x0, x1, 5, integer=True)] if log_x else
               [v for v in nice_ticks(x0, x1, 6, integer=integer_x)])
    for xr in x_ticks:
        xp, _ = px(xr, y0)
        if not (L - 1 <= xp <= W - R + 1):
            continue
        label = f"{int(xr)}" if integer_x else f"{xr:.3g}"
        d.line([xp, H - B, xp, H - B + 4 * k], fill=(120, 120, 120), width=k)
        d.text((xp - d.textlength(label, font=f) / 2, H - B + 6 * k), label, fill="black", font=f)
    d.text(((L + W - R) / 2 - d.textlength(xlabel, font=f) / 2, H - 20 * k), xlabel, fill="black", font=f)
    d.text((6 * k, T - 18 * k), ylabel, fill="black", font=f)
    ly = T + 6 * k
    for xs, ys, rgb, label in series:
        line = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and (x > 0 or not log_x)]
        if len(line) > 1:
            d.line(line, fill=rgb, width=2 * k, joint="curve")
        if len(line) <= 12:  # few points: mark each one
            for xp, yp in line:
                d.ellipse([xp - 3 * k, yp - 3 * k, xp + 3 * k, yp + 3 * k], fill=rgb)
        if label:
            d.line([W - R - 120 * k, ly + 7 * k, W - R - 98 * k, ly + 7 * k], fill=rgb, width=2 * k)
            d.text((W - R - 92 * k, ly), label, fill="black", font=f)
            ly += 17 * k
    if marker_x is not None and math.isfinite(marker_x):
        xp, _ = px(marker_x, y0)
        d.line([xp, T, xp, H - B], fill=(200, 0, 0), width=k)
    return im.resize(size, Image.LANCZOS)


def loss_plot(steps: Sequence[int], losses: Sequence[float], title: str = "training loss",
              val_steps: Sequence[int] = (), val_losses: Sequence[float] = ()) -> Image.Image:
    """The training loss (and its moving average from 10 points on) and the validation loss per step, with
    whole-number step ticks."""
    series = [(list(steps), list(losses), (150, 175, 225), "loss")]
    if len(losses) >= 10:
        series.append((list(steps), ema(losses), (20, 60, 200), "smoothed"))
    if val_losses:
        series.append((list(val_steps), list(val_losses), (220, 90, 20), "validation"))
    return line_plot(series, title, "step", "loss", size=(640, 320), integer_x=True)
