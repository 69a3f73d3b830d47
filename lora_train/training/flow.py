"""Flow matching (Flux.1, SD3 / SD3.5, Qwen-Image, Z-Image): timestep sampling, the loss, the metadata of such a run.

The objective is the one diffusers' FlowMatchEulerDiscreteScheduler defines (rectified flow):
    sigma in (0, 1), timestep = sigma x 1000
    noisy  = (1 - sigma) * latents + sigma * noise
    target = noise - latents            (the velocity the transformer predicts)
    loss   = mean over (C, H, W) of (pred - target)^2, times the weighting of `weighting_scheme` (diffusers'
             training_utils.compute_loss_weighting_for_sd3: sigma_sqrt, cosmap; 1 for the others)

Timestep sampling as sd-scripts (library/flux_train_utils.py get_noisy_model_input_and_timesteps):
    uniform     sigma = U(0, 1)
    sigmoid     sigma = sigmoid(sigmoid_scale * N(0, 1))
    shift       s = sigmoid(sigmoid_scale * N(0, 1)); sigma = s * shift / (1 + (shift - 1) * s)
                (shift = discrete_flow_shift)
    flux_shift  s = sigmoid(sigmoid_scale * N(0, 1)); mu = linear(256 -> 0.5, 4096 -> 1.15) of the packed
                image sequence length (h/2 * w/2), the end points from the model's scheduler config where it has
                them (Qwen-Image: 8192 -> 0.9); sigma = e^mu / (e^mu + 1/s - 1)
    sigma       u = diffusers' compute_density_for_timestep_sampling(weighting_scheme, logit_mean, logit_std,
                mode_scale) (logit_normal / mode / uniform); sigma = the scheduler's sigma at index u * 1000
                (the scheduler built with shift = discrete_flow_shift)
`auto`: the family's default (families/): Flux -> shift with discrete_flow_shift 3.1582 (sd-scripts'
        recommendation for Flux LoRAs); SD3 -> sigma with logit_normal (SD3's paper and diffusers' train script),
        shift 3.0; Qwen-Image -> shift 2.2, Z-Image -> shift 2.0 (musubi-tuner's).
"""
from __future__ import annotations

import contextlib
import importlib
import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..config import TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES  # noqa: F401  (the allowed values, with the config)
from .. import families
from ..models import flow
from ..networks import flow_names



def is_flow(model) -> bool:
    return flow.is_flow(model)


# ----------------------------------------------------------------------------- options
def resolve(cfg, model) -> Dict[str, Any]:
    """The timestep-sampling options of a run with `auto` resolved for the model's family."""
    fam = families.of(model)
    ts = getattr(cfg, "timestep_sampling", "auto") or "auto"
    ws = getattr(cfg, "weighting_scheme", "auto") or "auto"
    if ts == "auto":
        ts = fam.timestep_sampling
    if ws == "auto":
        ws = fam.weighting_for(ts)
    shift = getattr(cfg, "discrete_flow_shift", None)
    if shift is None:
        shift = fam.default_shift(model)
    return {"timestep_sampling": ts, "weighting_scheme": ws, "discrete_flow_shift": float(shift),
            "sigmoid_scale": float(getattr(cfg, "sigmoid_scale", 1.0)),
            "logit_mean": float(getattr(cfg, "logit_mean", 0.0)), "logit_std": float(getattr(cfg, "logit_std", 1.0)),
            "mode_scale": float(getattr(cfg, "mode_scale", 1.29)), "sigma_range": fam.timestep_range(model)}


def configure(model, cfg) -> Dict[str, Any]:
    """Put the run's conditioning and loss options into model.extra (models/flow.py reads the conditioning ones,
    `flow_matching_loss` the weighting); returns the resolved timestep options."""
    flow.configure(model, cfg)
    opts = resolve(cfg, model)
    model.extra["flow_options"] = opts
    return opts


# ----------------------------------------------------------------------------- timestep sampling
def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """Flux's resolution-dependent shift (BFL's sampling code, as sd-scripts uses it)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux_mu(image_seq_len: int, x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> float:
    m = (y2 - y1) / (x2 - x1)
    return image_seq_len * m + (y1 - m * x1)


def dynamic_mu(model, image_seq_len: int) -> float:
    """The resolution-dependent shift mu of the model's scheduler config (base / max image_seq_len and shift: Flux
    256 -> 0.5, 4096 -> 1.15, which are also the defaults; Qwen-Image 256 -> 0.5, 8192 -> 0.9), as its pipeline
    computes it."""
    conf = dict(getattr(getattr(model, "noise_scheduler", None), "config", None) or {})
    return flux_mu(image_seq_len, conf.get("base_image_seq_len", 256), conf.get("base_shift", 0.5),
                   conf.get("max_image_seq_len", 4096), conf.get("max_shift", 1.15))


def _scheduler(model, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cache = model.extra.setdefault("_flow_sched", {})
    if shift not in cache:
        conf = dict(model.noise_scheduler.config)
        if not conf.get("use_dynamic_shifting", False):
            conf["shift"] = shift
        cache[shift] = FlowMatchEulerDiscreteScheduler.from_config(conf)
    return cache[shift]


def sample_sigmas(opts: Dict[str, Any], n: int, latent_hw, generator: Optional[torch.Generator] = None,
                  model=None) -> torch.Tensor:
    """(n,) sigmas in (0, 1) drawn from `generator` (float32, CPU) as the module docstring says; with
    opts["sigma_range"] (low, high) only those in it, the distribution's shape kept (draws outside are dropped, as
    musubi-tuner's --preserve_distribution_shape with --min/max_timestep; after 100 rounds the rest is the draw
    mapped linearly into the range)."""
    rng = opts.get("sigma_range")
    if not rng:
        return _draw_sigmas(opts, n, latent_hw, generator, model)
    lo, hi = rng
    kept = torch.empty(0)
    for _ in range(100):
        s = _draw_sigmas(opts, n, latent_hw, generator, model)
        kept = torch.cat([kept, s[(s >= lo) & ((s < hi) | (hi >= 1.0))]])
        if len(kept) >= n:
            return kept[:n]
    rest = _draw_sigmas(opts, n - len(kept), latent_hw, generator, model)
    return torch.cat([kept, lo + rest * (hi - lo)])


def _draw_sigmas(opts: Dict[str, Any], n: int, latent_hw, generator: Optional[torch.Generator] = None,
                 model=None) -> torch.Tensor:
    ts = opts["timestep_sampling"]
    if ts == "uniform":
        return torch.rand(n, generator=generator)
    if ts in ("sigmoid", "shift", "flux_shift"):
        s = torch.sigmoid(opts["sigmoid_scale"] * torch.randn(n, generator=generator))
        if ts == "shift":
            shift = opts["discrete_flow_shift"]
            return (s * shift) / (1 + (shift - 1) * s)
        if ts == "flux_shift":
            h, w = latent_hw
            return time_shift(dynamic_mu(model, (h // 2) * (w // 2)), 1.0, s)
        return s
    if ts != "sigma":
        raise ValueError(f"timestep_sampling {ts!r} is not known: use one of {', '.join(TIMESTEP_SAMPLINGS)}.")
    compute_density_for_timestep_sampling = _training_utils().compute_density_for_timestep_sampling

    ws = opts["weighting_scheme"]
    state = torch.random.get_rng_state()
    try:  # diffusers draws from the global generator: seed it from ours so that a run stays reproducible
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
        u = compute_density_for_timestep_sampling(weighting_scheme=ws if ws in ("logit_normal", "mode") else "none",
                                                  batch_size=n, logit_mean=opts["logit_mean"],
                                                  logit_std=opts["logit_std"], mode_scale=opts["mode_scale"])
    finally:
        torch.random.set_rng_state(state)
    sched = _scheduler(model, opts["discrete_flow_shift"])
    T = int(sched.config.num_train_timesteps)
    idx = (u * T).long().clamp(0, T - 1)
    return sched.sigmas[idx].float()


def sample_timesteps(model, cfg, n: int, latent_hw, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n,) float timesteps (sigma x 1000) for a training batch; the options come from `configure`."""
    opts = model.extra.get("flow_options") or resolve(cfg, model)
    return sample_sigmas(opts, n, latent_hw, generator, model) * 1000.0


# ----------------------------------------------------------------------------- the loss
def _training_utils():
    """diffusers.training_utils (timestep densities, SD3 loss weights), or a clear error where it cannot be imported:
    diffusers 0.31 beside AUTOMATIC1111's transformers 4.30.2 fails on `transformers.integrations.deepspeed`."""
    try:
        # lazy (it imports transformers' integrations); import_module, not `from diffusers import`, so that the
        # answer comes from the import system even when the package attribute is already set
        training_utils = importlib.import_module("diffusers.training_utils")
    except (ImportError, AttributeError, RuntimeError) as exc:  # diffusers wraps import errors in RuntimeError
        import transformers

        raise RuntimeError(f"Flux / SD3 training needs diffusers.training_utils, which does not import beside "
                           f"transformers {transformers.__version__} ({exc}): AUTOMATIC1111's pinned transformers is "
                           f"too old for these models. Train Flux / SD3 in Forge, ComfyUI or `python -m lora_train` "
                           f"(transformers >= 4.44).") from None
    return training_utils


def flow_matching_loss(model, latents: torch.Tensor, cond: Any, noise: torch.Tensor, timesteps: torch.Tensor, *,
                       unet=None, in_dtype: Optional[torch.dtype] = None,
                       autocast: Callable[[], Any] = contextlib.nullcontext, reduction: str = "mean",
                       input_noise: Optional[torch.Tensor] = None, elementwise: Optional[Callable] = None,
                       mask: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flow-matching loss (module docstring) of a Flux / SD3 BaseModel; timesteps in [0, 1000] (sigma x 1000).
    Called through loss.diffusion_loss, with its arguments and reductions, and its kohya options: input_noise
    (ip_noise_gamma: the noisy latents, the target keeps `noise`), elementwise (loss_type), mask (masked_loss),
    weights (per-sample, prior_loss_weight)."""
    compute_loss_weighting_for_sd3 = _training_utils().compute_loss_weighting_for_sd3

    transformer = model.unet if unet is None else unet
    sigmas = (timesteps.float() / 1000.0).to(latents.device)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents.float() + s * (noise if input_noise is None else input_noise).float()
    target = noise.float() - latents.float()
    dtype = in_dtype or latents.dtype
    with autocast():
        pred = flow.predict(model, transformer, noisy.to(dtype), sigmas * 1000.0, cond)
    per_element = (F.mse_loss(pred.float(), target, reduction="none") if elementwise is None
                   else elementwise(pred.float(), target))
    if mask is not None:
        per_element = per_element * mask.to(per_element.device, per_element.dtype)
    loss = per_element.mean(dim=[1, 2, 3])
    if weights is not None:
        loss = loss * weights.to(loss.device, loss.dtype)
    ws = (model.extra.get("flow_options") or {}).get("weighting_scheme", "none")
    if ws in ("sigma_sqrt", "cosmap"):
        loss = loss * compute_loss_weighting_for_sd3(ws, sigmas).float().to(loss.device)
    if reduction == "none":
        return loss
    if reduction != "mean":
        raise ValueError(f"reduction = {reduction!r} is not valid: allowed mean, none.")
    return loss.mean()


# ----------------------------------------------------------------------------- metadata
def metadata(model, cfg) -> Dict[str, str]:
    """The ss_* / modelspec.* entries of a flow run (they replace the UNet families' values): the family's version,
    architecture and network module as sd-scripts writes them (networks/flow_names.metadata_for), and the timestep
    options the run resolved."""
    v = flow.variant(model)
    opts = model.extra.get("flow_options") or resolve(cfg, model)
    meta = flow_names.metadata_for(model.kind, v)
    meta.update({
        "ss_prediction_type": "flow",
        "ss_timestep_sampling": opts["timestep_sampling"],
        "ss_discrete_flow_shift": f"{opts['discrete_flow_shift']:g}",
        "ss_sigmoid_scale": f"{opts['sigmoid_scale']:g}",
        "ss_weighting_scheme": opts["weighting_scheme"],
        "ss_logit_mean": f"{opts['logit_mean']:g}", "ss_logit_std": f"{opts['logit_std']:g}",
        "ss_mode_scale": f"{opts['mode_scale']:g}",
        "ss_model_prediction_type": "raw",
        "ss_fp8_base": str(bool(getattr(cfg, "fp8_base", False))),
        "modelspec.prediction_type": "flow",
    })
    meta.update(families.of(model).run_metadata(model))  # T5 length and mask, Flux dev's guidance, ...
    return meta
