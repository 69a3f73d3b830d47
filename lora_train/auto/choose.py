"""Choosing the epoch to publish from the recorded validation losses (no torch: plain numbers in and out).

Rule (stated in every report):
  candidates = the epochs that have a file (the epoch files the run kept, and the last epoch, the final file)
               and a validation loss;
  noise      = sigma, the scatter of one validation measurement, estimated from the whole per-epoch validation
               curve: median |second difference| / 0.6745 / sqrt(6) (a second difference removes a linear trend;
               for independent noise of std s its std is s * sqrt(6); the median ignores the few bends of the
               curve); 0 with fewer than 3 epochs;
  tolerance  = `tolerance` when given (0 = plain argmin), else sigma;
  chosen     = the EARLIEST candidate whose loss is within the tolerance of the lowest candidate loss (a tie, or a
               difference the noise can explain, goes to the earlier epoch: it has trained less and usually
               generalises at least as well);
  runner-up  = of the remaining candidates, the one with the lowest loss (earlier first on an exact tie).
With tolerance 0 the chosen epoch is exactly the argmin of the candidates' losses (earliest on ties).
"""
from __future__ import annotations

import csv
import math
import statistics
from ..names import epoch_of
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

RULE = ("the earliest epoch whose validation loss is within one noise sigma of the lowest (sigma estimated from "
        "the validation curve's second differences); a tie or a difference the noise explains goes to the "
        "earlier epoch")


@dataclass
class EpochChoice:
    chosen: int
    runner_up: Optional[int]
    losses: Dict[int, float]          # every epoch's recorded validation loss
    candidates: List[int]             # epochs that have a file
    sigma: float
    tolerance: float
    best_loss_epoch: int              # plain argmin among the candidates
    why: str = ""
    notes: List[str] = field(default_factory=list)


class NoCandidate(ValueError):
    """No epoch has both a file and a validation loss."""


def noise_sigma(values: Sequence[float]) -> float:
    """Scatter of one point of a curve, from its second differences (see the module docstring)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if len(v) < 3:
        return 0.0
    d2 = [abs(v[i - 1] - 2 * v[i] + v[i + 1]) for i in range(1, len(v) - 1)]
    return statistics.median(d2) / 0.6745 / math.sqrt(6)


def choose_epoch(losses: Dict[int, float], candidates: Sequence[int], tolerance: Optional[float] = None
                 ) -> EpochChoice:
    """Apply the rule of the module docstring. losses: epoch -> validation loss (every epoch that has one);
    candidates: epochs with a file. tolerance None = sigma."""
    cands = sorted(e for e in set(candidates) if e in losses and math.isfinite(losses[e]))
    if not cands:
        raise NoCandidate("no epoch has both a file and a validation loss: keep a validation split "
                          "(validation_split > 0) and epoch files (save_every_n_epochs >= 1).")
    sigma = noise_sigma([losses[e] for e in sorted(losses)])
    tol = sigma if tolerance is None else float(tolerance)
    if tol < 0:
        raise ValueError(f"tolerance {tolerance!r} is negative: give 0 (plain argmin) or a positive loss difference.")
    best = min(cands, key=lambda e: (losses[e], e))
    lowest = losses[best]
    chosen = next(e for e in cands if losses[e] <= lowest + tol)
    rest = [e for e in cands if e != chosen]
    runner = min(rest, key=lambda e: (losses[e], e)) if rest else None
    if chosen == best:
        why = f"epoch {chosen} has the lowest validation loss ({lowest:.5g}) of the {len(cands)} epochs with a file"
    else:
        why = (f"epoch {chosen} (validation loss {losses[chosen]:.5g}) is within the noise ({tol:.2g}) of the lowest, "
               f"epoch {best} ({lowest:.5g}), and earlier")
    if runner is not None:
        why += f"; runner-up: epoch {runner} ({losses[runner]:.5g})"
    return EpochChoice(chosen=chosen, runner_up=runner, losses=dict(losses), candidates=cands, sigma=sigma,
                       tolerance=tol, best_loss_epoch=best, why=why)


def last_state(losses: Dict[int, float], last: int, why: str) -> EpochChoice:
    """The choice when the validation losses cannot choose: the run's last file, with the reason."""
    return EpochChoice(chosen=last, runner_up=None, losses=dict(losses), candidates=[last], sigma=0.0, tolerance=0.0,
                       best_loss_epoch=last, why=why)


def read_val_losses(loss_csv: str) -> Dict[int, float]:
    """epoch -> validation loss as the trainer recorded it in its loss CSV (the row of the epoch's last step)."""
    out: Dict[int, float] = {}
    with open(loss_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("val_loss"):
                out[int(row["epoch"])] = float(row["val_loss"])
    return out


def files_by_epoch(epoch_files: Sequence[str], final: Optional[str], stem: str, epochs_done: int
                   ) -> Dict[int, str]:
    """epoch -> file of that epoch (the final file is the last epoch's)."""
    out: Dict[int, str] = {}
    for p in epoch_files:
        e = epoch_of(p, stem)
        if e is not None:
            out[e] = p
    if final:
        out[int(epochs_done)] = final
    return out


def pairs(d: Dict[int, float]) -> List[Tuple[int, float]]:
    return sorted(d.items())
