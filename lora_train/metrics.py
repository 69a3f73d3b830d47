"""Image measures for grids: how close generated pictures are to the training images in colour.

`colour_histogram` counts each pixel in a coarse RGB cube (`levels` per channel, 3 -> 27 bins: dark, middle, bright) and normalises;
`histogram_distance` is the total-variation distance between two such histograms (half the L1 distance: 0 =
the same colours in the same proportions, 1 = no colour in common). Used by the demo to show in one number that
the LoRA moved the pictures toward the training set (`learning_figure`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

import numpy as np
from PIL import Image


def colour_histogram(images: Iterable[Image.Image], levels: int = 3) -> np.ndarray:
    """The normalised (levels**3,) RGB histogram of all pixels of `images` together."""
    counts = np.zeros(levels ** 3, dtype=np.float64)
    for im in images:
        a = np.asarray(im.convert("RGB"), dtype=np.int64) * levels // 256  # 0..levels-1 per channel
        idx = (a[..., 0] * levels + a[..., 1]) * levels + a[..., 2]
        counts += np.bincount(idx.reshape(-1), minlength=levels ** 3)
    total = counts.sum()
    if total == 0:
        raise ValueError("no pixels: give at least one image")
    return counts / total


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two normalised histograms, in [0, 1]."""
    return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


@dataclass
class LearningFigure:
    """Colour-histogram distance to the training set of each grid column, per seed and over all seeds."""

    columns: List[str]                  # e.g. ["base (0)", "0.5", "1"]
    per_seed: Dict[int, List[float]]    # seed -> distance per column
    pooled: List[float]                 # distance per column, all seeds' images together

    def margin(self, col: int = -1) -> float:
        """How much closer column `col` is than the base column (pooled): base - col (> 0 = learned)."""
        return self.pooled[0] - self.pooled[col]

    def worst_seed_margin(self, col: int = -1) -> float:
        return min(d[0] - d[col] for d in self.per_seed.values())

    def summary(self, col: int = -1) -> str:
        cols = ", ".join(f"{c}: {d:.3f}" for c, d in zip(self.columns, self.pooled))
        return (f"colour-histogram distance to the training images (0 = same colours, 1 = none shared; "
                f"{len(self.per_seed)} seeds): {cols}; strength {self.columns[col]} is {self.margin(col):.3f} "
                f"closer than the base (worst seed {self.worst_seed_margin(col):.3f})")


def learning_figure(train_images: Sequence[Image.Image], grid_cells, columns: Sequence[str],
                    seeds: Sequence[int], levels: int = 3) -> LearningFigure:
    """grid_cells: `sampler.Cell`s of a strength x seed grid (row r = seeds[r], column c = columns[c])."""
    ref = colour_histogram(train_images, levels)
    by = {(c.row, c.col): c.image for c in grid_cells}
    per_seed = {int(s): [histogram_distance(colour_histogram([by[(r, c)]], levels), ref) for c in range(len(columns))]
                for r, s in enumerate(seeds)}
    pooled = [histogram_distance(colour_histogram([by[(r, c)] for r in range(len(seeds))], levels), ref)
              for c in range(len(columns))]
    return LearningFigure(columns=list(columns), per_seed=per_seed, pooled=pooled)
