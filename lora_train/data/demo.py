"""Procedural captioned dataset for the demo and the tests (no downloads, deterministic)."""
from __future__ import annotations

import os
import random
from typing import List, Sequence

from PIL import Image, ImageDraw

DEMO_TRIGGER = "lrtdemo"
_COLORS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 70, 220), "yellow": (235, 210, 40)}


def _draw(rng: random.Random, size: int, shape: str, fg: str, bg: str) -> Image.Image:
    im = Image.new("RGB", (size, size), _COLORS[bg])
    d = ImageDraw.Draw(im)
    if shape == "stripes":
        w = max(2, size // 8)
        off = rng.randrange(w)
        for x in range(-size, size * 2, w * 2):
            d.polygon([(x + off, 0), (x + off + w, 0), (x + off + w - size, size), (x + off - size, size)],
                      fill=_COLORS[fg])
    else:
        r = rng.uniform(0.22, 0.35) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        box = [cx - r, cy - r, cx + r, cy + r]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=_COLORS[fg])
    return im


def procedural_images(n: int, size: int, seed: int = 0) -> List[Image.Image]:
    rng = random.Random(seed)
    shapes, colors = ["circle", "square", "stripes"], list(_COLORS)
    out = []
    for i in range(n):
        fg = colors[i % len(colors)]
        bg = colors[(i + 1 + i // len(colors)) % len(colors)]
        out.append(_draw(rng, size, shapes[i % 3], fg, bg))
    return out


def write_demo_dataset(folder: str, n: int = 8, size: int = 64, seed: int = 0, trigger: str = DEMO_TRIGGER,
                       captions: bool = True, shapes: Sequence[str] = ("circle", "square", "stripes")) -> str:
    """A consistent 'style' (red shapes on blue, the shapes in turn) with captions that name the trigger word.

    captions=False writes the images only, named for what they show (`a_red_circle_on_a_blue_background_000.png`),
    for a captioning step to fill in. Existing files are never overwritten: a folder that already holds the
    dataset is reused.
    """
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        shape = shapes[i % len(shapes)]
        name = f"img_{i:03d}" if captions else f"a_red_{shape}_on_a_blue_background_{i:03d}"
        stem = os.path.join(folder, name)
        if os.path.exists(stem + ".png"):
            continue
        im = _draw(rng, size, shape, "red", "blue")
        im.save(stem + ".png")
        if captions:
            with open(stem + ".txt", "w", encoding="utf-8") as fh:
                fh.write(f"{trigger}, a red {shape} on a blue background")
    return folder
