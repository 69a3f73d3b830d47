"""Image measures for grids: how close generated pictures are to the training images in colour.

`colour_distance` is the sliced Wasserstein-1 distance between the RGB colour distributions of two sets of images
(every pixel a point in the unit cube, projected on 32 fixed directions; the mean over directions of the distance
between the projected distributions' quantiles): 0 = the same colours in the same proportions, larger = further.
Unlike a binned histogram it has no bin edges, so a muddy blue counts as close to a pure blue and a saturated noise
of every colour does not. Used by the demo to show in one number that the LoRA moved the pictures toward the
training set (`learning_figure`) and by auto mode to pick a strength.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

import numpy as np
from PIL import Image

_DIRECTIONS = np.random.default_rng(0).normal(size=(32, 3))
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)
_QUANTILES = np.linspace(0.0, 1.0, 257)


def _pixels(images: Iterable[Image.Image]) -> np.ndarray:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0 for im in images]
    if not arrays or not sum(len(a) for a in arrays):
        raise ValueError("no pixels: give at least one image")
    return np.concatenate(arrays)


def colour_distance(images: Iterable[Image.Image], reference: Iterable[Image.Image]) -> float:
    """Sliced Wasserstein-1 distance between the pixel colours of `images` and of `reference` (RGB in [0, 1])."""
    qa = np.quantile(_pixels(images) @ _DIRECTIONS.T, _QUANTILES, axis=0)
    qb = np.quantile(_pixels(reference) @ _DIRECTIONS.T, _QUANTILES, axis=0)
    return float(np.abs(qa - qb).mean())


@dataclass
class LearningFigure:
    """Colour distance (colour_distance) to the training set of each grid column, per seed and over all seeds."""

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
        return (f"colour distance to the training images (sliced Wasserstein, 0 = the same colours in the same "
                f"proportions; {len(self.per_seed)} seeds): {cols}; strength {self.columns[col]} is "
                f"{self.margin(col):.3f} closer than the base (worst seed {self.worst_seed_margin(col):.3f})")


def learning_figure(train_images: Sequence[Image.Image], grid_cells, columns: Sequence[str],
                    seeds: Sequence[int]) -> LearningFigure:
    """grid_cells: `sampler.Cell`s of a strength x seed grid (row r = seeds[r], column c = columns[c])."""
    ref = list(train_images)
    by = {(c.row, c.col): c.image for c in grid_cells}
    per_seed = {int(s): [colour_distance([by[(r, c)]], ref) for c in range(len(columns))]
                for r, s in enumerate(seeds)}
    pooled = [colour_distance([by[(r, c)] for r in range(len(seeds))], ref) for c in range(len(columns))]
    return LearningFigure(columns=list(columns), per_seed=per_seed, pooled=pooled)


def main_colours(images: Iterable[Image.Image], n: int = 2) -> List[np.ndarray]:
    """The n most common colours over the images (RGB in [0, 1], quantised to 1/16), most common first: for the
    demo's flat pictures, the background and then the shape."""
    px = np.round(_pixels(images) * 15) / 15
    colours, counts = np.unique(px, axis=0, return_counts=True)
    return [colours[i] for i in np.argsort(-counts)[:n]]


@dataclass
class Composition:
    """How one picture matches "a shape of colour fg on a background of colour bg" (see `composition`)."""

    fg: float         # share of pixels near the shape colour
    bg: float         # share of pixels near the background colour
    roundness: float  # IoU of the fg pixels with the disc of the same area at their centroid (1 = a disc)

    #: measured on the demo (8 seeds, two training seeds): trained strength-1 cells fg >= 0.20, bg >= 0.50,
    #: roundness >= 0.66; base cells (shapes of any colour) fail at least one of these
    MIN_FG, MAX_FG, MIN_BG, MIN_ROUND = 0.08, 0.6, 0.4, 0.6

    @property
    def shown(self) -> bool:
        return self.MIN_FG <= self.fg <= self.MAX_FG and self.bg >= self.MIN_BG and self.roundness >= self.MIN_ROUND

    def __str__(self) -> str:
        return f"shape {self.fg:.2f}, background {self.bg:.2f}, roundness {self.roundness:.2f}"


def composition(image: Image.Image, fg, bg, tolerance: float = 0.3) -> Composition:
    """The demo's second measure: does `image` show a disc of colour fg on a background of colour bg (RGB in
    [0, 1])? A pixel counts for a colour when it is nearer to it than to the other and within `tolerance`
    (Euclidean, RGB in [0, 1]). Measured at 64 x 64."""
    x = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float64) / 255.0
    dfg, dbg = (np.linalg.norm(x - np.asarray(c, dtype=np.float64), axis=-1) for c in (fg, bg))
    is_fg, is_bg = (dfg < dbg) & (dfg < tolerance), (dbg <= dfg) & (dbg < tolerance)
    roundness = 0.0
    if is_fg.sum() >= 20:
        yy, xx = np.mgrid[:64, :64]
        cy, cx, r2 = yy[is_fg].mean(), xx[is_fg].mean(), is_fg.sum() / np.pi
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r2
        roundness = float((disc & is_fg).sum() / (disc | is_fg).sum())
    return Composition(fg=float(is_fg.mean()), bg=float(is_bg.mean()), roundness=roundness)
