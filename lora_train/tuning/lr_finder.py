"""LR range test (Smith 2017, as fastai's lr_find): an exponential lr sweep on the real data and model.

`lr_range_test(cfg)` injects a fresh LoRA on the UNet exactly where the trainer puts it, trains it with the
configured optimizer (optim.make_optimizer, as the trainer) on the trainer's loss (loss.diffusion_loss: prediction
type, noise offset, min-SNR) while the lr grows exponentially from lr_min to lr_max, and records the loss. Two
smoothings of it:
- `ema`: bias-corrected exponential moving average (`smoothing`, 0.98 as fastai), online: the sweep stops when
  it passes `diverge_factor` (4) x its minimum, or at a non-finite loss;
- `smoothed`: a centred (zero-lag) moving average, on which the lr is suggested with a named heuristic:
  steepest descent (fallback: the lr at the minimum / 10). An EMA lags, and its steepest fall sits where the raw
  loss is already at its minimum, which would suggest too high an lr.
Afterwards the model is as it was: the adapter is removed and the wrapped layers unwrapped (same module tree and
state_dict), requires_grad, train/eval modes, devices, peft bookkeeping, a caller's optimizer and the python /
numpy / torch (CPU and CUDA) RNG states are restored.

The loss recorded at each step is, by default, that of a fixed probe batch (the first few images with fixed
noise and timesteps spread evenly over the schedule), measured after the step's update. Diffusion training
loss depends mostly on the random timestep, so a range test on it would chart the draw, not the lr; the fixed
probe (common random numbers) charts the lr. `probe="train"` records the training loss instead.
"""
from __future__ import annotations

import math
import random
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import TrainConfig
from ..data.dataset import load_dataset
from ..io_utils import save_image
from ..models import conditioning
from ..models.loading import load_base_model
from ..networks import lora as lora_mod
from ..networks import network
from ..plots import line_plot
from ..training import flow as flow_train
from ..training import loss as loss_mod
from ..training.optim import describe, make_optimizer
from ..training.trainer import resolve_device

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
        if self.has_peft_config:
            unet.peft_config = self.peft_config
        elif "peft_config" in vars(unet):
            del unet.peft_config
        for top, dev in zip(self.modules, self.devices):
            if dev is not None and _device_of(top) != dev:
                top.to(dev)
            for m in top.modules():
                if id(m) in self.training:
                    m.training = self.training[id(m)]
            for p in top.parameters():
                if id(p) in self.requires_grad:
                    p.requires_grad_(self.requires_grad[id(p)])
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
    ds = dataset if dataset is not None else load_dataset(cfg.train_data_dir, cfg.resolution, cfg.trigger_word,
                                                          cfg.caption_extension)
    if model is None:
        files = {k: getattr(cfg, k) for k in ("ae", "clip_l", "clip_g", "t5xxl") if getattr(cfg, k)}
        model = load_base_model(cfg.base_model, cfg.prediction_type, allow_pickle=cfg.allow_pickle,
                                **({"files": files} if files else {}))  # Flux / SD3 component files
    if flow_train.is_flow(model):  # Flux / SD3: the run's conditioning and timestep options
        flow_train.configure(model, cfg)
    pred_type = model.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
    device = resolve_device(cfg.device)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    use_amp = amp_dtype is not None and device.type == "cuda"

    opt_desc = ""
    rng = _rng_state()
    state = _ModelState(model, optimizer)
    adapter = ADAPTER
    existing = {a for _, m in _peft_layers(model.unet) for a in m.lora_A.keys()}
    n = 2
    while adapter in existing:
        adapter = f"{ADAPTER}_{n}"
        n += 1
    lrs_all = lr_schedule(lr_min, lr_max, steps)
    lrs: List[float] = []
    losses: List[float] = []
    stopped, reason = False, ""
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        unet = model.unet
        unet.to(device)
        for te in model.text_encoders:
            te.to(device)
        base_dtype = next(unet.parameters()).dtype
        sched = model.noise_scheduler
        T = int(sched.config.num_train_timesteps)
        expanded = ds.expanded()
        lat_cache: Dict[int, torch.Tensor] = {}
        txt_cache: Dict[str, Any] = {}

        @torch.no_grad()
        def latent(i: int) -> torch.Tensor:
            if i not in lat_cache:
                vae = model.vae
                if _device_of(vae) != device:
                    vae.to(device)
                px = ds.load_pixels(i).unsqueeze(0).to(device, dtype=next(vae.parameters()).dtype)
                lat_cache[i] = ((vae.encode(px).latent_dist.mean - model.vae_shift) * model.vae_scale)[0].float().cpu()
            return lat_cache[i]

        @torch.no_grad()
        def text(caption: str) -> torch.Tensor:
            if caption not in txt_cache:
                row = conditioning.rows(conditioning.encode(model, [caption], device))[0]
                txt_cache[caption] = conditioning.map_cond(row, lambda x: x.float().cpu())
            return txt_cache[caption]

        def autocast():
            return torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=use_amp)

        def unet_loss(idx: List[int], noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """The trainer's loss (loss.diffusion_loss: prediction type, min-SNR) of these items."""
            lat = torch.stack([latent(i) for i in idx]).to(device)
            cond = conditioning.map_cond(conditioning.stack([text(ds.items[i].caption) for i in idx]),
                                         lambda x: x.to(device))
            tids = (conditioning.time_ids_for_items(ds, idx, cfg.resolution)
                    if conditioning.is_sdxl(model) else None)
            return loss_mod.diffusion_loss(model, lat, cond, noise.to(device), t.to(device), unet=unet,
                                           prediction_type=pred_type, min_snr_gamma=cfg.min_snr_gamma,
                                           time_ids=tids, resolution=cfg.resolution,
                                           in_dtype=torch.float32 if use_amp else base_dtype, snr_timesteps=t,
                                           autocast=autocast)

        # the fixed probe: first images, fixed noise, timesteps spread evenly over the schedule
        n_img = min(PROBE_IMAGES, len(ds.items), max(1, probe_samples))
        probe_idx = [k % n_img for k in range(max(1, probe_samples))]
        pgen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        probe_noise = torch.randn((len(probe_idx),) + tuple(latent(0).shape), generator=pgen)
        probe_t = torch.tensor([int((k + 0.5) * T / len(probe_idx)) for k in range(len(probe_idx))], dtype=torch.long)
        # a no-grad forward holds far fewer activations than a training step: twice the batch on a GPU, all at
        # once on the CPU (where per-call overhead dominates)
        chunk = len(probe_idx) if device.type == "cpu" else max(1, 2 * cfg.batch_size)

        @torch.no_grad()
        def probe_loss() -> float:
            total = 0.0
            for a in range(0, len(probe_idx), chunk):
                b = min(len(probe_idx), a + chunk)
                total += float(unet_loss(probe_idx[a:b], probe_noise[a:b], probe_t[a:b])) * (b - a)
            return total / len(probe_idx)

        # the LoRA, as the trainer injects it (seeded), and only its weights train
        unet.requires_grad_(False)
        model.vae.requires_grad_(False)
        for te in model.text_encoders:
            te.requires_grad_(False)
        with warnings.catch_warnings():  # "already found a peft_config": a second adapter is what we want
            warnings.simplefilter("ignore")
            network.inject(unet, "unet", network.NetworkSpec.from_config(cfg, model.kind), adapter)  # the run's type
        lora_mod.activate(unet, adapter)
        unet.requires_grad_(False)
        params = lora_mod.lora_parameters(unet, adapter)
        for p in params:
            p.data = p.data.to(device).float()
            p.requires_grad_(True)
        # the optimizer the run will use (the trainer's factory, configured optimizer and arguments)
        groups = network.param_groups(unet, params, lr_min, network.NetworkSpec.from_config(cfg, model.kind), adapter)
        ratios = [g["lr"] / lr_min for g in groups]  # LoRA+: the up/B group keeps its ratio during the sweep
        opt = make_optimizer(cfg.optimizer, groups, device, cfg.weight_decay,
                             (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon, cfg.optimizer_args)
        opt_desc = describe(opt)
        unet.train()
        order: List[int] = []
        best = float("inf")
        avg = 0.0
        ema: List[float] = []
        for i, lr in enumerate(lrs_all):
            if stop_event is not None and stop_event.is_set():
                stopped, reason = True, "stopped by the user"
                break
            for g, ratio in zip(opt.param_groups, ratios):
                g["lr"] = lr * ratio
            train_losses = []
            for _ in range(cfg.gradient_accumulation_steps):
                if len(order) < cfg.batch_size:
                    order += [expanded[j] for j in torch.randperm(len(expanded), generator=gen).tolist()]
                idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
                shape = (len(idx),) + tuple(latent(idx[0]).shape)
                noise = loss_mod.offset_noise(torch.randn(shape, generator=gen), cfg.noise_offset, gen)
                if flow_train.is_flow(model):  # Flux / SD3: the run's timestep sampling (sigma x 1000)
                    t = flow_train.sample_timesteps(model, cfg, len(idx), shape[-2:], gen)
                else:
                    t = torch.randint(0, T, (len(idx),), generator=gen)
                loss = unet_loss(idx, noise, t)
                (loss / cfg.gradient_accumulation_steps).backward()
                train_losses.append(float(loss.detach()))
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = probe_loss() if probe == "fixed" else float(np.mean(train_losses))
            lrs.append(lr)
            losses.append(value)
            if math.isfinite(value):
                avg = smoothing * avg + (1 - smoothing) * value
                s = avg / (1 - smoothing ** (len(losses)))
            else:
                s = float("nan")
            ema.append(s)
            if callback is not None:
                callback({"kind": "lr_find", "step": i + 1, "total": steps, "lr": lr, "loss": value, "ema": s})
            if not math.isfinite(value):
                stopped, reason = True, f"non-finite loss at lr {lr:.3g}"
                break
            best = min(best, s)
            if i > 0 and s > diverge_factor * best:
                stopped, reason = True, f"smoothed loss {s:.4g} > {diverge_factor:g} x its minimum {best:.4g}"
                break
        del opt, params
    finally:
        state.restore(adapter)
        _set_rng_state(rng)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not lrs:
        raise RuntimeError("the LR range test was stopped before its first step: nothing to suggest.")
    smoothed = centred_average(losses, half_width_for(steps, probe))
    suggested, heuristic = suggest_lr(lrs, smoothed, lr_min, lr_max)
    notes = []
    if heuristic != "steepest descent":
        notes.append("the curve had no clear descent: the lr at its minimum / 10 is the safe pick")
    plot = plot_result(lrs, losses, smoothed, suggested, heuristic, diverge_factor)
    return LRFinderResult(lrs=lrs, losses=losses, smoothed=smoothed, suggested_lr=suggested, heuristic=heuristic,
                          plot=plot, stopped_early=stopped, stop_reason=reason, lr_min=float(lr_min),
                          lr_max=float(lr_max), probe=probe, notes=notes, ema=ema, optimizer=opt_desc)
