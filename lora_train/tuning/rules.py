"""The advisor's rules as data (docs/tuning.md gives each its reason and source figures): tasks and families,
the lr table and its rescaling by batch / accumulation, ranks per task, VRAM tiers, epochs and warm-up.

    lr_for_batch(batch, scaling) -> (lr, reason)
    rescale_lr(lr, old_batch, old_accum, new_batch, new_accum, scaling) -> (new_lr, reason)
    batch_change_offer(lr, (batch, accum), (batch, accum), scalings) -> [(scaling, lr, reason)]
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

from ..config import LR_BY_BATCH, learning_rate_for
from .. import families
from ..family import FAMILIES

# ----------------------------------------------------------------------------- the rules, as data
TASKS = ("style", "character", "face", "object", "concept", "other")
BASES = FAMILIES  # flux / sd3: tuning/flow_advice.py
SCALINGS = ("sqrt", "linear")
DETAILS = ("simple", "normal", "demanding")

#: LR_BY_BATCH (config.py): learning rate of the UNet LoRA by batch, alpha = rank, AdamW (practitioner table).
#: under SMALL_SET images the start is 1e-4..1.5e-4 (and more epochs).
SMALL_SET = 50
LARGE_SET = 200
LR_SMALL_SET = (1e-4, 1.5e-4)
#: demanding detail (faces, logos) at rank 16 may take 2.5e-4 (at batch 4, i.e. x1.25 of the table).
LR_DEMANDING_RANK16 = 2.5e-4
DEMANDING_FACTOR = LR_DEMANDING_RANK16 / LR_BY_BATCH[4]

#: rank per task for (simple, normal, demanding) detail.
RANK_BY_TASK: Dict[str, Tuple[int, int, int]] = {
    "style": (4, 8, 12),       # 4-6 simple style, 8-12 a specific style
    "character": (8, 12, 16),  # 8-12 faces / characters; 16 for demanding detail
    "face": (8, 12, 16),
    "object": (6, 8, 16),      # 16 for logos / fine printed detail
    "concept": (4, 8, 12),
    "other": (4, 8, 16),
}
RANK_UPPER = 16   # upper bound for most LoRAs
RANK_FLAG = 32    # above this: flagged
RANK_SHORT_VRAM = 8  # when VRAM is short, rank is lowered to this before the batch is touched

#: VRAM (GB) -> (smallest, largest) batch that fits, SD1 at 512 px. SDXL (and SD1/SD2 at >= 768 px) halve it.
#: The published tiers are <=8: 1-2, 12-16: 4-8, >20: 8-16; the gaps (8-12, 16-20) take the neighbouring
#: values: (lower bound exclusive, upper bound inclusive unless noted) -> range.
VRAM_TIERS: List[Tuple[str, Tuple[int, int]]] = [
    ("<=8 GB", (1, 2)),     # v <= 8
    ("8-12 GB", (2, 4)),    # 8 < v < 12
    ("12-16 GB", (4, 8)),   # 12 <= v <= 16
    ("16-20 GB", (4, 8)),   # 16 < v <= 20
    (">20 GB", (8, 16)),    # v > 20
]


def vram_tier(vram_gb: float) -> Tuple[str, Tuple[int, int]]:
    """The tier (name, SD1-at-512 batch range) of a card with `vram_gb` GB."""
    v = float(vram_gb)
    i = 0 if v <= 8 else 1 if v < 12 else 2 if v <= 16 else 3 if v <= 20 else 4
    return VRAM_TIERS[i]


VRAM_ASSUMED_UNKNOWN = 8.0  # VRAM unknown (no CUDA here, nothing passed): plan for the smallest tier

NATIVE_RESOLUTION = {n: families.get(n).native_resolution for n in families.NAMES}
#: total images seen (epochs x images x repeats) aimed at, and the epoch bounds, by dataset size.
TARGET_VIEWS_SMALL = 2000
TARGET_VIEWS = 1500
EPOCHS_SMALL = (10, 100)
EPOCHS_MEDIUM = (10, 30)
EPOCHS_LARGE = (5, 10)
#: warmup: 100 steps for runs of 1000-1999 steps, 200 from 2000 on; shorter runs warm up for 10%.
WARMUP = (100, 200)
WARMUP_FULL_FROM = 1000
WARMUP_LONG_FROM = 2000
WARMUP_SHORT_FRACTION = 0.1
#: check_config: an lr more than this factor away from the table (after accumulation rescaling) is flagged.
LR_FAR_FACTOR = 3.0


def _r3(x: float) -> float:
    """Round to 3 significant digits (lrs are shown and written like that)."""
    return float(f"{x:.3g}")


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


# ----------------------------------------------------------------------------- lr rules
def lr_for_batch(batch: int, scaling: str = "sqrt") -> Tuple[float, str]:
    """UNet lr for a per-step batch from the table; other batches scale from the largest table batch below."""
    _check_choice("accumulation_scaling", scaling, SCALINGS)
    if batch < 1:
        raise ValueError(f"batch size {batch} is not valid: use 1 or more.")
    if batch in LR_BY_BATCH:
        return LR_BY_BATCH[batch], f"batch {batch} -> {LR_BY_BATCH[batch]:.3g} (table 4: 2e-4, 2: 1.5e-4, 1: 1e-4)"
    anchor = max(b for b in LR_BY_BATCH if b <= batch)
    lr = learning_rate_for(batch, scaling)
    return lr, (f"batch {batch} is not in the table: {LR_BY_BATCH[anchor]:.3g} at batch {anchor} x {scaling}"
                f"({batch}/{anchor}) = {lr:.3g}")


def batch_change_offer(lr: float, old: Tuple[int, int], new: Tuple[int, int], scalings: Sequence[str] = ("sqrt",)
                       ) -> List[Tuple[str, float, str]]:
    """What every front door offers when batch x accumulation moved from `old` to `new` while the lr stayed:
    [(scaling, rescaled lr, why)] per scaling; empty when the effective batch or the lr does not change."""
    if tuple(old) == tuple(new):
        return []
    out = []
    for scaling in scalings:
        new_lr, why = rescale_lr(lr, old[0], old[1], new[0], new[1], scaling)
        if new_lr != lr:
            out.append((scaling, new_lr, why))
    return out


def rescale_lr(lr: float, old_batch: int, old_accum: int, new_batch: int, new_accum: int,
               scaling: str = "sqrt") -> Tuple[float, str]:
    """The lr to use when the batch size or gradient accumulation changes (what front ends offer).

    Effective batch = batch x accumulation steps; the lr follows its ratio by sqrt (default) or linearly.
    """
    _check_choice("scaling", scaling, SCALINGS)
    for name, v in (("old_batch", old_batch), ("old_accum", old_accum), ("new_batch", new_batch),
                    ("new_accum", new_accum)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} = {v!r} is not valid: use an integer >= 1.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr = {lr!r} is not valid: use a positive number.")
    old_eff, new_eff = old_batch * old_accum, new_batch * new_accum
    ratio = new_eff / old_eff
    factor = math.sqrt(ratio) if scaling == "sqrt" else ratio
    new_lr = _r3(lr * factor)
    if old_eff == new_eff:
        return float(lr), (f"effective batch stays {new_eff} ({new_batch} x {new_accum}): lr unchanged at "
                           f"{lr:.3g}")
    how = f"sqrt({new_eff}/{old_eff}) = {factor:.3g}" if scaling == "sqrt" else f"{new_eff}/{old_eff} = {factor:.3g}"
    return new_lr, (f"effective batch {old_batch} x {old_accum} = {old_eff} -> {new_batch} x {new_accum} = "
                    f"{new_eff}: lr {lr:.3g} x {how} ({scaling} scaling) = {new_lr:.3g}")

def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r} is not valid: allowed {', '.join(allowed)}.")
