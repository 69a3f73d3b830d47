"""Live loss diagnosis (docs/tuning.md): oscillation, divergence, plateau, overfitting and non-finite loss, each
finding with the one knob to turn. The front doors attach a Diagnoser to a run (run.train_for_host).

    Diagnoser(cfg).update(step, loss, val_loss=None) -> [Finding, ...];  .summary() -> [Finding, ...]
    diagnose(losses, val=None, ...) -> [Finding, ...]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import kohya_advice
from .rules import LR_BY_BATCH, LR_DEMANDING_RANK16, WARMUP

# ----------------------------------------------------------------------------- live diagnosis
SEVERITIES = ("info", "warning", "error")


@dataclass
class Finding:
    """One diagnosis. `suggestion` names exactly one knob (`knob`, a TrainConfig key) to change."""

    kind: str       # non_finite | divergence | oscillation | plateau | overfitting
    severity: str   # info | warning | error
    message: str
    numbers: Dict[str, float]
    suggestion: str
    knob: str
    step: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message, "numbers": dict(self.numbers),
                "suggestion": self.suggestion, "knob": self.knob, "step": self.step}

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind} at step {self.step}: {self.message} -> {self.suggestion}"


def format_findings(findings: Sequence[Finding]) -> str:
    if not findings:
        return "diagnosis: nothing unusual in the loss curve."
    return "diagnosis:\n" + "\n".join(f"- {f}" for f in findings)


def _linfit(y: Sequence[float]) -> Tuple[float, float, List[float]]:
    """slope, t statistic of the slope, residuals of a least-squares line through y over 0..n-1."""
    n = len(y)
    xm = (n - 1) / 2.0
    ym = sum(y) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    slope = sum((i - xm) * (v - ym) for i, v in enumerate(y)) / sxx
    resid = [v - (ym + slope * (i - xm)) for i, v in enumerate(y)]
    dof = max(1, n - 2)
    se = math.sqrt(sum(r * r for r in resid) / dof / sxx)
    if se == 0:
        t = 0.0 if slope == 0 else math.copysign(float("inf"), slope)
    else:
        t = slope / se
    return slope, t, resid


def _var(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    m = sum(xs) / n
    return sum((x - m) ** 2 for x in xs) / (n - 1)


class Diagnoser:
    """Watches the loss (and validation loss) and reports what went wrong, with one knob to turn.

    Feed it every optimizer step: `update(step, loss, val_loss=None)` returns the findings new at this step;
    `summary()` returns every finding emitted so far. A kind is emitted once, then stays quiet until its
    condition has been false at `rearm` (10) consecutive block checks; a non-finite loss re-arms at the next
    finite one, overfitting at a new validation minimum, and an early plateau never.

    Diffusion loss jumps from step to step because the timestep is random, so the trend patterns are judged
    on block means (`block` = 10 steps each) over the last `window` = 20 blocks, checked at every block end, and a
    pattern must hold at CONFIRM consecutive checks (divergence 3, oscillation 2, plateau 3) before it is
    reported. Thresholds (see docs/tuning.md for how they were set):
      divergence:  over >= 10 blocks, fitted rise >= `divergence_rise` (30%) of the mean with slope t >=
                   `divergence_t` (4.5); or, at once, the last block mean >= `spike_factor` (3x) the median of the
                   blocks before it;
      oscillation: no trend (|t| < 2 or fitted change < `trend_flat` 10%), block means spread around the trend
                   line by >= `oscillation_cv` (20%) of their mean, and that spread >= `oscillation_excess` (4x)
                   what the noise inside blocks explains (so plain diffusion noise is not reported);
      plateau:     within the first `plateau_fraction` (30%) of the run (first 300 steps if the total is
                   unknown), after >= `plateau_min_steps` (80) steps, no significant trend (|t| < 2), less than
                   `plateau_gain` (5%) fitted fall since the start, and neither oscillation nor divergence;
      overfitting: >= 3 validation points, the latest >= (1 + `overfit_rise`) x the minimum (5%), the minimum at
                   least 2 points back, and the training loss lower after the minimum than before it.
    """

    CONFIRM = {"divergence": 3, "oscillation": 2, "plateau": 3}
    NO_REARM = ("plateau",)  # "early" happens once

    def __init__(self, cfg=None, total_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None,
                 learning_rate: Optional[float] = None, batch_size: Optional[int] = None,
                 lr_warmup_steps: Optional[int] = None, epochs: Optional[int] = None, block: int = 10,
                 window: int = 20, min_blocks: int = 5, rearm: int = 10, divergence_rise: float = 0.3,
                 divergence_t: float = 4.5, spike_factor: float = 3.0, trend_flat: float = 0.1,
                 oscillation_cv: float = 0.2, oscillation_excess: float = 4.0, plateau_fraction: float = 0.3,
                 plateau_unknown_steps: int = 300, plateau_min_steps: int = 80, plateau_gain: float = 0.05,
                 overfit_points: int = 3, overfit_rise: float = 0.05,
                 confirm: Optional[Dict[str, int]] = None):
        self.cfg = cfg  # the kohya options the overfitting advice names (kohya_advice.overfitting_hint)
        self.learning_rate = learning_rate if learning_rate is not None else getattr(cfg, "learning_rate", None)
        self.batch_size = batch_size if batch_size is not None else getattr(cfg, "batch_size", None)
        self.lr_warmup_steps = (lr_warmup_steps if lr_warmup_steps is not None
                                else getattr(cfg, "lr_warmup_steps", None))
        self.epochs = epochs if epochs is not None else getattr(cfg, "epochs", None)
        if total_steps is None and cfg is not None and getattr(cfg, "max_train_steps", None):
            total_steps = cfg.max_train_steps
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.block, self.window, self.min_blocks, self.rearm = int(block), int(window), int(min_blocks), int(rearm)
        self.divergence_rise, self.divergence_t = divergence_rise, divergence_t
        self.spike_factor, self.trend_flat = spike_factor, trend_flat
        self.oscillation_cv, self.oscillation_excess = oscillation_cv, oscillation_excess
        self.plateau_fraction, self.plateau_unknown_steps = plateau_fraction, plateau_unknown_steps
        self.plateau_min_steps, self.plateau_gain = plateau_min_steps, plateau_gain
        self.overfit_points, self.overfit_rise = overfit_points, overfit_rise
        self.confirm = dict(self.CONFIRM, **(confirm or {}))
        self.steps: List[int] = []
        self.losses: List[float] = []
        self.val: List[Tuple[int, float]] = []
        self.findings: List[Finding] = []
        self._active: Dict[str, bool] = {}
        self._streak: Dict[str, int] = {}
        self._quiet: Dict[str, int] = {}
        self._last_finite: Optional[Tuple[int, float]] = None
        self._overfit_min_step: Optional[int] = None

    # -------------------------------------------------------------- plumbing
    def handle_event(self, ev: Dict[str, Any]) -> List[Finding]:
        """Convenience for the trainer's event stream: reads `start` (total_steps, steps_per_epoch), `step`
        (step, loss), `val_loss` / `validation` (step, val_loss) and `nan` (step, value) events."""
        event = ev.get("kind")
        if event == "start":
            self.total_steps = ev.get("total_steps", self.total_steps)
            self.steps_per_epoch = ev.get("steps_per_epoch", self.steps_per_epoch)
            return []
        last = self.steps[-1] if self.steps else 0
        if event == "step" and ev.get("loss") is not None:
            return self.update(int(ev["step"]), ev.get("loss"), ev.get("val_loss"))
        if event in ("val_loss", "validation") and ev.get("val_loss") is not None:
            return self.update(int(ev.get("step", last)), None, ev["val_loss"])
        if event == "nan" and ev.get("value") is not None:
            value = float(ev["value"])
            if not math.isfinite(value):
                if ev.get("what") in ("val_loss", "validation"):
                    return self.update(int(ev.get("step", last)), None, value)
                return self.update(int(ev.get("step", last)), value)
        return []

    def summary(self) -> List[Finding]:
        """Every finding emitted so far, in order (each kind once per occurrence)."""
        return list(self.findings)

    def _judge(self, out: List[Finding], kind: str, holds: bool, make) -> None:
        """Emit `make()` when `holds` has been true at `confirm` consecutive checks and the kind is armed."""
        if holds:
            self._quiet[kind] = 0
            self._streak[kind] = self._streak.get(kind, 0) + 1
            if not self._active.get(kind) and self._streak[kind] >= self.confirm.get(kind, 1):
                self._fire(out, make())
        else:
            self._streak[kind] = 0
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            if self._active.get(kind) and self._quiet[kind] >= self.rearm and kind not in self.NO_REARM:
                self._active[kind] = False

    def _fire(self, out: List[Finding], f: Finding) -> None:
        self._active[f.kind] = True
        self.findings.append(f)
        out.append(f)

    # -------------------------------------------------------------- update
    def update(self, step: int, loss: Optional[float], val_loss: Optional[float] = None) -> List[Finding]:
        """Record one optimizer step (loss may be None when only a validation loss arrives)."""
        out: List[Finding] = []
        if loss is not None:
            loss = float(loss)
            if not math.isfinite(loss):
                self._non_finite(out, step, loss, "training")
            else:
                self._active["non_finite"] = False
                self._last_finite = (step, loss)
                self.steps.append(int(step))
                self.losses.append(loss)
                if len(self.losses) % self.block == 0:
                    self._check_trends(out, step)
        if val_loss is not None:
            val_loss = float(val_loss)
            if not math.isfinite(val_loss):
                self._non_finite(out, step, val_loss, "validation")
            else:
                self.val.append((int(step), val_loss))
                self._check_overfitting(out, step)
        return out

    def _non_finite(self, out: List[Finding], step: int, value: float, which: str) -> None:
        if self._active.get("non_finite"):
            return
        nums: Dict[str, float] = {"step": step, "loss": value}
        good = ""
        if self._last_finite is not None:
            nums["last_finite_step"], nums["last_finite_loss"] = self._last_finite
            good = f" (last finite loss {self._last_finite[1]:.4g} at step {self._last_finite[0]})"
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < WARMUP[0] and step <= 2 * WARMUP[0]:
            knob = "lr_warmup_steps"
            sugg = (f"set lr_warmup_steps to {WARMUP[0]} (now {self.lr_warmup_steps}): the loss broke in the first "
                    f"steps at full learning rate; resume from the last good checkpoint")
        else:
            lr = self.learning_rate
            knob = "learning_rate"
            sugg = ("halve learning_rate" + (f" ({lr:.3g} -> {lr / 2:.3g})" if lr else "")
                    + " and resume from the last good checkpoint")
        self._fire(out, Finding("non_finite", "error", f"{which} loss is {value} at step {step}{good}: the "
                                                       f"weights are being destroyed", nums, sugg, knob, step))

    def _blocks(self, last_n: Optional[int] = None) -> Tuple[List[float], List[float]]:
        """Means and variances of complete blocks (the last `last_n` blocks)."""
        nb = len(self.losses) // self.block
        first = 0 if last_n is None else max(0, nb - last_n)
        means, variances = [], []
        for b in range(first, nb):
            chunk = self.losses[b * self.block:(b + 1) * self.block]
            means.append(sum(chunk) / len(chunk))
            variances.append(_var(chunk))
        return means, variances

    def _check_trends(self, out: List[Finding], step: int) -> None:
        means, variances = self._blocks(self.window)
        n = len(means)
        if n < self.min_blocks:
            return
        mean = sum(means) / n
        if mean <= 0:
            return
        slope, t, resid = _linfit(means)
        rel = slope * (n - 1) / mean

        # divergence: a sustained significant rise over a full window, or a sudden jump
        prev = sorted(means[:-1])
        k = len(prev)
        median_prev = prev[k // 2] if k % 2 else 0.5 * (prev[k // 2 - 1] + prev[k // 2])
        spike = median_prev > 0 and means[-1] >= self.spike_factor * median_prev
        rising = n >= max(self.min_blocks, self.window // 2) and rel >= self.divergence_rise and t >= self.divergence_t
        if spike and not rising and not self._active.get("divergence"):
            self._streak["divergence"] = self.confirm["divergence"]  # a jump needs no confirmation

        def divergence() -> Finding:
            all_means, _ = self._blocks()
            best = min(all_means)
            lr = self.learning_rate
            sugg = ("halve learning_rate" + (f" ({lr:.3g} -> {lr / 2:.3g})" if lr else "")
                    + " and restart from the checkpoint before the rise")
            msg = (f"the loss is rising: block mean {means[-1]:.4g} vs best {best:.4g}; fitted change over the last "
                   f"{n * self.block} steps {rel:+.0%}" + (" (sudden jump)" if spike and not rising else ""))
            return Finding("divergence", "error" if means[-1] >= 2 * best else "warning", msg,
                           {"step": step, "rel_change": rel, "t": t, "last_block_mean": means[-1],
                            "best_block_mean": best, "window_steps": n * self.block}, sugg, "learning_rate", step)

        self._judge(out, "divergence", rising or spike, divergence)

        # oscillation: big spread of block means around the trend line, more than in-block noise explains
        no_trend = abs(t) < 2.0 or abs(rel) < self.trend_flat
        spread = math.sqrt(sum(r * r for r in resid) / max(1, n - 2))
        cv = spread / mean
        within = sum(variances) / len(variances)
        excess = (self.block * spread ** 2 / within) if within > 0 else (float("inf") if spread > 0 else 0.0)
        oscillating = no_trend and cv >= self.oscillation_cv and excess >= self.oscillation_excess

        def oscillation() -> Finding:
            lr, bs = self.learning_rate, self.batch_size
            if lr is not None and lr <= LR_BY_BATCH[1] and bs is not None:
                knob = "batch_size"
                sugg = (f"raise batch_size from {bs} to {bs * 2}: the learning rate ({lr:.3g}) is already at the low "
                        f"end of the table, a larger batch averages the swings out")
            else:
                knob = "learning_rate"
                sugg = ("lower learning_rate by half" + (f" ({lr:.3g} -> {lr / 2:.3g})" if lr else "")
                        + ": the steps overshoot")
            msg = (f"the loss swings without settling: block means spread {cv:.0%} of their mean around the trend, "
                   f"{excess:.1f}x what step noise explains, over the last {n * self.block} steps")
            return Finding("oscillation", "warning", msg,
                           {"step": step, "relative_spread": cv, "excess_over_noise": excess, "t": t,
                            "rel_change": rel, "window_steps": n * self.block}, sugg, knob, step)

        self._judge(out, "oscillation", oscillating and not (rising or spike), oscillation)
        self._check_plateau(out, step, blocked=oscillating or rising or spike)

    def _check_plateau(self, out: List[Finding], step: int, blocked: bool) -> None:
        limit = (self.plateau_fraction * self.total_steps) if self.total_steps else self.plateau_unknown_steps
        if step > limit or len(self.losses) < self.plateau_min_steps:
            return
        means, _ = self._blocks()
        n = len(means)
        if n < self.min_blocks or means[0] <= 0:
            return
        slope, t, _ = _linfit(means)
        fall = -slope * (n - 1) / means[0]
        flat = -2.0 < t < 2.0 and fall < self.plateau_gain and not blocked  # swinging or rising: lr is not low

        def plateau() -> Finding:
            lr = self.learning_rate
            if lr is None or lr < LR_DEMANDING_RANK16:
                knob = "learning_rate"
                sugg = ("raise learning_rate by 0.5e-4" + (f" ({lr:.3g} -> {lr + 0.5e-4:.3g})" if lr else "")
                        + "; check the samples first: diffusion loss often looks flat while the LoRA learns")
            else:
                knob = "epochs"
                more = f" ({self.epochs} -> {int(math.ceil(self.epochs * 1.5))})" if self.epochs else ""
                sugg = f"train more epochs{more}: the learning rate ({lr:.3g}) is already at the top of the usual range"
            msg = (f"the loss has not fallen in the first {len(self.losses)} steps: fitted fall {fall:.1%} "
                   f"(t = {t:.2f})")
            return Finding("plateau", "info", msg, {"step": step, "fall": fall, "t": t, "first_block_mean": means[0],
                                                    "last_block_mean": means[-1]}, sugg, knob, step)

        self._judge(out, "plateau", flat, plateau)

    def _check_overfitting(self, out: List[Finding], step: int) -> None:
        if len(self.val) < self.overfit_points:
            return
        vals = [v for _, v in self.val]
        i_min = min(range(len(vals)), key=lambda i: vals[i])
        s_min, v_min = self.val[i_min]
        if self._overfit_min_step is not None and s_min != self._overfit_min_step:
            self._active["overfitting"] = False  # a new minimum: re-armed
        if self._active.get("overfitting"):
            return
        latest = vals[-1]
        if not (len(vals) - 1 - i_min >= 2 and latest >= v_min * (1 + self.overfit_rise)):
            return
        before = [l for s, l in zip(self.steps, self.losses) if s <= s_min]
        after = [l for s, l in zip(self.steps, self.losses) if s > s_min]
        if not (before and after):
            return
        span = min(len(after), len(before))
        tb = sum(before[-span:]) / span
        ta = sum(after) / len(after)
        if not ta < tb:
            return
        self._overfit_min_step = s_min
        spe = self.steps_per_epoch
        if spe:
            best_epoch = max(1, int(math.ceil(s_min / spe)))
            knob = "epochs"
            now = f" (now {self.epochs})" if self.epochs else ""
            sugg = (f"set epochs to {best_epoch}{now}: validation was lowest at step {s_min}, epoch {best_epoch}; "
                    f"the epoch file of that epoch is the one to keep")
        else:
            knob = "max_train_steps"
            sugg = f"set max_train_steps to {s_min}: validation was lowest there"
        msg = (f"validation loss rose from {v_min:.4g} (step {s_min}) to {latest:.4g} while the training loss fell "
               f"({tb:.4g} -> {ta:.4g}): the LoRA is memorising the training images"
               f"{kohya_advice.overfitting_hint(self.cfg)}")
        self._fire(out, Finding("overfitting", "warning", msg,
                                {"step": step, "val_min": v_min, "val_min_step": s_min, "val_latest": latest,
                                 "train_before": tb, "train_after": ta}, sugg, knob, step))


def diagnose(losses: Sequence[float], val: Optional[Sequence[Tuple[int, float]]] = None, **kw: Any) -> List[Finding]:
    """Run a Diagnoser over a finished history: losses[i] is step i+1; val holds (step, val_loss) pairs."""
    d = Diagnoser(**kw)
    pending = sorted(val or [])
    j = 0
    for i, loss in enumerate(losses):
        step = i + 1
        d.update(step, loss)
        while j < len(pending) and pending[j][0] <= step:
            d.update(pending[j][0], None, pending[j][1])
            j += 1
    for s, v in pending[j:]:
        d.update(s, None, v)
    return d.summary()
