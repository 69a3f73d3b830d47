"""LR range test (Smith 2017, as fastai's lr_find): an exponential lr sweep on the real data and model.

`lr_range_test(cfg)` drives the Trainer itself (`Trainer.prepare()` / `step(lr)` / `probe_loss`): the sweep is
the run it advises, with every option the run uses (network type and targets, block-wise lr / dims, text-encoder
training, clip_skip and long captions, caption shuffling, loss type / Huber, multires and input-perturbation
noise, masks, reg images, min-SNR, the optimizer and its arguments), for `steps` steps while the lr grows
exponentially from lr_min to lr_max (`sweep_config` says what differs: constant lr set per step, no validation
split, nothing written). Two smoothings of the recorded loss:
- `ema`: bias-corrected exponential moving average (`smoothing`, 0.98 as fastai), online: the sweep stops when
  it passes `diverge_factor` (4) x its minimum, or at a non-finite loss;
- `smoothed`: a centred (zero-lag) moving average, on which the lr is suggested with a named heuristic:
  steepest descent (fallback: the lr at the minimum / 10). An EMA lags, and its steepest fall sits where the raw
  loss is already at its minimum, which would suggest too high an lr.
A model handed over is as it was afterwards: the adapter is removed and the wrapped layers unwrapped (same module
tree and state_dict), requires_grad, train/eval modes, devices, peft bookkeeping, a caller's optimizer and the
python / numpy / torch (CPU and CUDA) RNG states are restored.

The loss recorded at each step is, by default, that of a fixed probe batch (the first few images with fixed
noise and timesteps spread evenly over the schedule, through `Trainer.probe_loss`: the run's loss), measured
after the step's update. Diffusion training loss depends mostly on the random timestep, so a range test on it
would chart the draw, not the lr; the fixed probe (common random numbers) charts the lr. `probe="train"`
records the training loss of each step instead.
"""
from __future__ import annotations

import math
import random
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import TrainConfig
from ..io_utils import save_image
from ..networks import lora as lora_mod
from ..plots import line_plot
from ..training.device import resolve_device
from ..training.trainer import Trainer

ADAPTER = "lr_finder"
PROBE_SAMPLES = 8  # fixed probe: up to 4 images x 2 noise draws, timesteps spread over the schedule
PROBE_IMAGES = 4

Callback = Callable[[Dict[str, Any]], None]


@dataclass
class LRFinderResult:
    lrs: List[float]
    losses: List[float]
    smoothed: List[float]
    suggested_lr: float
    heuristic: str          # "steepest descent" | "minimum / 10"
    plot: Any               # PIL image
    stopped_early: bool
    stop_reason: str = ""
    lr_min: float = 1e-6
    lr_max: float = 1e-1
    probe: str = "fixed"
    notes: List[str] = field(default_factory=list)
    ema: List[float] = field(default_factory=list)  # causal bias-corrected EMA (`smoothing`): the stop rule's
    optimizer: str = ""  # optim.describe() of the sweep's optimizer: the configured one, as the run uses

    @property
    def min_loss_lr(self) -> float:
        finite = [(s, lr) for s, lr in zip(self.smoothed, self.lrs) if math.isfinite(s)]
        return min(finite)[1] if finite else float("nan")

    def save_plot(self, path: str, overwrite: bool = False) -> str:
        """Write the plot as PNG (atomic); refuses to replace an existing file unless `overwrite`."""
        import os

        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"'{path}' exists already: choose another path.")
        save_image(self.plot, path)
        return path

    def summary(self) -> str:
        how = f"stopped early ({self.stop_reason})" if self.stopped_early else "full sweep"
        return (f"suggested learning_rate: {self.suggested_lr:.3g} ({self.heuristic}); lowest smoothed loss at "
                f"lr {self.min_loss_lr:.3g}; {len(self.lrs)} steps from {self.lr_min:.3g} to {self.lr_max:.3g}, "
                f"{how}")


# ----------------------------------------------------------------------------- pure parts
def lr_schedule(lr_min: float, lr_max: float, steps: int) -> List[float]:
    """Exponential sweep: lr_i = lr_min * (lr_max / lr_min) ** (i / (steps - 1))."""
    if steps == 1:
        return [float(lr_min)]
    return [float(lr_min * (lr_max / lr_min) ** (i / (steps - 1))) for i in range(steps)]


def smooth(losses: Sequence[float], beta: float = 0.98) -> List[float]:
    """Bias-corrected exponential moving average (fastai's lr_find smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def centred_average(values: Sequence[float], half_width: int) -> List[float]:
    """Zero-lag smoothing: the mean of the finite values within +-half_width points (shrinking at the ends)."""
    out: List[float] = []
    n = len(values)
    for i in range(n):
        win = [v for v in values[max(0, i - half_width):min(n, i + half_width + 1)] if math.isfinite(v)]
        out.append(sum(win) / len(win) if win and math.isfinite(values[i]) else float("nan"))
    return out


def half_width_for(steps: int, probe: str = "fixed") -> int:
    """Half-width of the centred average: ~4% of the sweep for the fixed probe, ~10% for the noisy train loss."""
    return max(1, steps // 25) if probe == "fixed" else max(2, steps // 10)


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float], lr_min: Optional[float] = None,
               lr_max: Optional[float] = None, min_drop: float = 0.01) -> Tuple[float, str]:
    """(lr, heuristic). Steepest descent: the lr where the smoothed loss falls fastest per decade of lr, looked
    for between the first 10% of the points and the minimum. Fallback when the curve has no real descent (less
    than `min_drop` relative fall before its minimum, or too few points): the lr at the minimum / 10.
    `smoothed` must not lag (use centred_average, not an EMA: an EMA falls fastest where the raw loss is already
    at its minimum, which would push the pick too high)."""
    pts = [(lr, s) for lr, s in zip(lrs, smoothed) if math.isfinite(s) and lr > 0]
    lo = lr_min if lr_min is not None else (min(lrs) if lrs else 1e-6)
    hi = lr_max if lr_max is not None else (max(lrs) if lrs else 1e-1)

    def clamp(x: float) -> float:
        return float(min(hi, max(lo, x)))

    if not pts:
        return clamp(lo), "minimum / 10"
    xs = np.log10(np.array([p[0] for p in pts], dtype=np.float64))
    ys = np.array([p[1] for p in pts], dtype=np.float64)
    i_min = int(np.argmin(ys))
    fallback = clamp(pts[i_min][0] / 10), "minimum / 10"
    if len(pts) < 5 or i_min < 2 or ys[0] <= 0 or (ys[0] - ys[i_min]) / ys[0] < min_drop:
        return fallback
    grad = np.gradient(ys, xs)
    start = max(1, len(pts) // 10)
    if start >= i_min:
        start = 0
    seg = grad[start:i_min + 1]
    j = int(np.argmin(seg)) + start
    if not grad[j] < 0:
        return fallback
    return clamp(pts[j][0]), "steepest descent"


def plot_result(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggested: float,
                heuristic: str, diverge_factor: float = 4.0):
    fin = [s for s in smoothed if math.isfinite(s)]
    cap = diverge_factor * 1.25 * min(fin) if fin and min(fin) > 0 else float("inf")
    clip = [min(v, cap) if math.isfinite(v) else float("nan") for v in losses]
    clip_s = [min(v, cap) if math.isfinite(v) else float("nan") for v in smoothed]
    series = [(list(lrs), clip, (170, 190, 230), "loss"), (list(lrs), clip_s, (20, 60, 200), "smoothed")]
    return line_plot(series, f"LR range test: suggested {suggested:.2e} ({heuristic})", "learning rate (log)",
                     "loss", log_x=True, marker_x=suggested)


# ----------------------------------------------------------------------------- state snapshot / restore
def _rng_state() -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


def _device_of(module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    return None


class _ModelState:
    """What the sweep may change on a BaseModel, taken before and put back after."""

    def __init__(self, model, optimizer=None):
        self.model = model
        unet = model.unet
        self.modules = [m for m in (model.unet, model.vae, *model.text_encoders) if m is not None]
        self.devices = [_device_of(m) for m in self.modules]
        self.training = {id(m): m.training for top in self.modules for m in top.modules()}
        self.requires_grad = {id(p): p.requires_grad for top in self.modules for p in top.parameters()}
        self.pre_wrapped = {name for name, _ in _peft_layers(unet)}
        self.active = {}
        for name, m in _peft_layers(unet):
            self.active[name] = (getattr(m, "_active_adapter", None), getattr(m, "_disable_adapters", None))
        self.vars = set(vars(unet))  # accelerate's mixed-precision wrap sets forward / _original_forward on it
        self.dtypes = {id(p): p.dtype for top in self.modules for p in top.parameters()}
        self.checkpointing = getattr(unet, "is_gradient_checkpointing", False)
        self.has_peft_config = "peft_config" in vars(unet)
        self.peft_config = dict(unet.peft_config) if self.has_peft_config else None
        self.optimizer = optimizer
        self.optimizer_state = _clone(optimizer.state_dict()) if optimizer is not None else None
        self._lora = lora_mod

    def restore(self, adapter: str) -> None:
        unet = self.model.unet
        with warnings.catch_warnings():  # peft announces which adapter it re-activates: put back below anyway
            warnings.simplefilter("ignore")
            self._lora.remove_adapter(unet, adapter)
        for name, m in list(_peft_layers(unet)):
            if name in self.pre_wrapped:
                act, dis = self.active[name]
                if act is not None:
                    m._active_adapter = act
                if dis is not None:
                    m._disable_adapters = dis
        # unwrap the layers that the sweep wrapped (deepest first)
        wrapped = [(n, m) for n, m in unet.named_modules() if hasattr(m, "base_layer") and n not in self.pre_wrapped
                   and not _has_adapters(m)]
        for name, m in sorted(wrapped, key=lambda nm: -nm[0].count(".")):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, m.base_layer)
        for k in set(vars(unet)) - self.vars:  # accelerate's marks and wrapped forward, a mode set on the instance
            delattr(unet, k)
        if not self.checkpointing and getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        if self.has_peft_config:
            unet.peft_config = self.peft_config
        elif "peft_config" in vars(unet):
            del unet.peft_config
        for top, dev in zip(self.modules, self.devices):
            if dev is not None and _device_of(top) != dev:
                top.to(dev)
            for m in top.modules():
                if id(m) in self.training and m.training != self.training[id(m)]:
                    m.training = self.training[id(m)]
            for p in top.parameters():
                if id(p) in self.requires_grad:
                    p.requires_grad_(self.requires_grad[id(p)])
                if id(p) in self.dtypes and p.dtype != self.dtypes[id(p)]:
                    p.data = p.data.to(self.dtypes[id(p)])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer_state)


def _peft_layers(module):
    for name, m in module.named_modules():
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict):
            yield name, m


def _has_adapters(m) -> bool:
    la = getattr(m, "lora_A", None)
    return isinstance(la, torch.nn.ModuleDict) and len(la) > 0


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- the sweep
def sweep_config(cfg: TrainConfig, steps: int, lr_min: float, out_dir: str, handed: bool) -> Tuple[TrainConfig, List[str]]:
    """The run's config as the sweep trains it: the same data, network, loss, text and noise options; `steps`
    steps at a constant lr (set per step), every image in (no validation split), nothing written but into
    `out_dir`, no EMA / tracking / samples; a non-finite step ends the sweep. A model handed over (the host's)
    keeps its weights: no fp8 re-storing and no bf16 storage on the CPU (both would change them for good)."""
    notes: List[str] = []
    change = dict(output_dir=out_dir, max_train_steps=steps, learning_rate=lr_min, lr_scheduler="constant",
                  lr_warmup_steps=0, validation_split=0.0, save_every_n_epochs=0, save_every_n_steps=0,
                  save_state=False, save_state_every_n_steps=0, save_state_every_n_epochs=0, sample_every_n_steps=0,
                  sample_every_n_epochs=0, ema_decay=0.0, log_with="", nan_policy="stop")
    if handed and cfg.fp8_base:
        change["fp8_base"] = False
        notes.append("the sweep ran without fp8_base (it would re-store the host's model weights in fp8)")
    if handed and cfg.mixed_precision == "bf16" and resolve_device(cfg.device).type == "cpu":
        change["mixed_precision"] = "no"
    return cfg.replace(**change).validate(), notes


def _probe(tr: Trainer, n_samples: int) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
    """The fixed probe: the first images (by latent size of the first), fixed noise, timesteps spread evenly."""
    n_samples = max(1, n_samples)
    first = tuple(tr.latents[0].shape)
    same = [i for i in range(len(tr.dataset.items)) if tuple(tr.latents[i].shape) == first]
    n_img = min(PROBE_IMAGES, len(same), n_samples)
    items = [same[k % n_img] for k in range(n_samples)]
    gen = torch.Generator(device="cpu").manual_seed(tr.cfg.seed + 1)
    noise = torch.randn((n_samples,) + first, generator=gen)
    T = int(tr.model.noise_scheduler.config.num_train_timesteps)
    t = torch.tensor([int((k + 0.5) * T / n_samples) for k in range(n_samples)], dtype=torch.long)
    return items, noise, t


def _probe_loss(tr: Trainer, items: List[int], noise: torch.Tensor, t: torch.Tensor) -> float:
    """The probe's mean loss: all at once on the CPU (per-call overhead dominates), twice the batch on a GPU."""
    chunk = len(items) if tr.device.type == "cpu" else max(1, 2 * tr.cfg.batch_size)
    total = 0.0
    for a in range(0, len(items), chunk):
        b = min(len(items), a + chunk)
        total += tr.probe_loss(items[a:b], noise[a:b], t[a:b]) * (b - a)
    return total / len(items)


def lr_range_test(cfg: TrainConfig, model=None, lr_min: float = 1e-6, lr_max: float = 1e-1, steps: int = 100,
                  smoothing: float = 0.98, callback: Optional[Callback] = None, dataset=None,
                  diverge_factor: float = 4.0, probe: str = "fixed", probe_samples: int = PROBE_SAMPLES, optimizer=None,
                  stop_event: Optional[threading.Event] = None) -> LRFinderResult:
    """Exponential lr sweep on cfg's data and base model (or `model`/`dataset` handed over), no side effects.

    callback receives {"kind": "lr_find", "step", "total", "lr", "loss", "ema"} after each step.
    probe / probe_samples: "fixed" (default) records the loss of `probe_samples` fixed (image, noise, timestep)
    samples after each update; "train" records the step's training loss.
    optimizer: a caller's optimizer whose state is snapshotted and restored (the sweep makes its own, of cfg's kind).
    stop_event: set it to end the sweep early (the result covers the steps done; the model is restored).
    """

    if not (isinstance(lr_min, (int, float)) and isinstance(lr_max, (int, float)) and 0 < lr_min < lr_max
            and math.isfinite(lr_max)):
        raise ValueError(f"lr range {lr_min!r}..{lr_max!r} is not valid: use 0 < lr_min < lr_max, e.g. 1e-6..1e-1.")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps = {steps!r} is not valid: use an integer >= 2 (about 100 is usual).")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing = {smoothing!r} is not valid: use a number in [0, 1), e.g. 0.98.")
    if probe not in ("fixed", "train"):
        raise ValueError(f"probe = {probe!r} is not valid: allowed fixed, train.")
    cfg = cfg.validate()
    handed = model is not None
    rng = _rng_state()
    state = _ModelState(model, optimizer) if handed else None
    if handed and list(lora_mod.lora_layers(model.unet, lora_mod.DEFAULT_ADAPTER)):
        raise ValueError(f"the model already carries a LoRA adapter named '{lora_mod.DEFAULT_ADAPTER}' (a run in "
                         f"progress?): run the LR range test on the base model, or after that run.")
    lrs: List[float] = []
    losses: List[float] = []
    ema: List[float] = []
    stopped, reason, opt_desc = False, "", ""
    with tempfile.TemporaryDirectory(prefix="lr_finder_") as tmp:
        sweep_cfg, notes = sweep_config(cfg, steps, lr_min, tmp, handed)
        tr = Trainer(sweep_cfg, model=model, dataset=dataset, stop_event=stop_event)
        try:
            if not tr.prepare():
                raise RuntimeError("the LR range test was stopped while caching: nothing to suggest.")
            opt_desc = tr.optimizer_desc
            probe_items, probe_noise, probe_t = _probe(tr, probe_samples)
            best, avg = float("inf"), 0.0
            for i, lr in enumerate(lr_schedule(lr_min, lr_max, steps)):
                if tr.stop_event.is_set():
                    stopped, reason = True, "stopped by the user"
                    break
                train_loss = tr.step(lr)  # the run's own step: every option the run uses applies here
                if train_loss is None:
                    value = float("nan")
                elif probe == "fixed":
                    value = _probe_loss(tr, probe_items, probe_noise, probe_t)
                else:
                    value = train_loss
                lrs.append(lr)
                losses.append(value)
                if math.isfinite(value):
                    avg = smoothing * avg + (1 - smoothing) * value
                    sm = avg / (1 - smoothing ** (len(losses)))
                else:
                    sm = float("nan")
                ema.append(sm)
                if callback is not None:
                    callback({"kind": "lr_find", "step": i + 1, "total": steps, "lr": lr, "loss": value, "ema": sm})
                if not math.isfinite(value):
                    stopped, reason = True, f"non-finite loss at lr {lr:.3g}"
                    break
                best = min(best, sm)
                if i > 0 and sm > diverge_factor * best:
                    stopped, reason = True, f"smoothed loss {sm:.4g} > {diverge_factor:g} x its minimum {best:.4g}"
                    break
        finally:
            tr.release()
            del tr
            if state is not None:
                state.restore(lora_mod.DEFAULT_ADAPTER)
            _set_rng_state(rng)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    if not lrs:
        raise RuntimeError("the LR range test was stopped before its first step: nothing to suggest.")
    smoothed = centred_average(losses, half_width_for(steps, probe))
    suggested, heuristic = suggest_lr(lrs, smoothed, lr_min, lr_max)
    if heuristic != "steepest descent":
        notes.append("the curve had no clear descent: the lr at its minimum / 10 is the safe pick")
    plot = plot_result(lrs, losses, smoothed, suggested, heuristic, diverge_factor)
    return LRFinderResult(lrs=lrs, losses=losses, smoothed=smoothed, suggested_lr=suggested, heuristic=heuristic,
                          plot=plot, stopped_early=stopped, stop_reason=reason, lr_min=float(lr_min),
                          lr_max=float(lr_max), probe=probe, notes=notes, ema=ema, optimizer=opt_desc)
