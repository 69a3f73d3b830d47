"""The one denoising loss: the training loop, the validation loss and the LR finder all call `diffusion_loss`.

What it applies: the target of the model's prediction type (epsilon: the noise; v_prediction: the velocity), the
per-sample MSE, and min-SNR-gamma weighting (Hang et al. 2023; as kohya / diffusers' train scripts). The noise
offset is part of the noise (`offset_noise`, drawn by the caller from its generator so that the draw order of a
run stays the same); a deterministic loss (validation, the LR finder's fixed probe) passes plain noise.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .. import families
from ..models import conditioning
from ..models.base import BaseModel
from . import flow as flow_train


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio per timestep: diffusers' `training_utils.compute_snr`, or the same formula where that
    module cannot be imported (diffusers 0.31 beside the WebUI's transformers 4.30.2 fails on
    `transformers.integrations.deepspeed`)."""
    try:
        from diffusers.training_utils import compute_snr as _snr
    except (ImportError, AttributeError):
        _snr = None
    if _snr is not None:
        return _snr(noise_scheduler, timesteps)
    ac = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return ac / (1.0 - ac)  # (sqrt(ac) / sqrt(1 - ac))^2


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets."""
    snr = compute_snr(noise_scheduler, timesteps)
    w = torch.clamp(snr, max=gamma)
    return w / (snr + 1) if prediction_type == "v_prediction" else w / snr


def offset_noise(noise: torch.Tensor, noise_offset: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Noise plus `noise_offset` x a per-sample, per-channel constant (one more draw from `generator`)."""
    if not noise_offset:
        return noise
    n, c = noise.shape[0], noise.shape[1]
    return noise + noise_offset * torch.randn((n, c, 1, 1), generator=generator)


def diffusion_loss(model, latents: torch.Tensor, cond: Any, noise: torch.Tensor, timesteps: torch.Tensor, *,
                   unet=None, prediction_type: Optional[str] = None, min_snr_gamma: Optional[float] = None,
                   time_ids: Optional[torch.Tensor] = None, resolution: Optional[int] = None,
                   in_dtype: Optional[torch.dtype] = None, snr_timesteps: Optional[torch.Tensor] = None,
                   autocast: Callable[[], Any] = contextlib.nullcontext, reduction: str = "mean",
                   input_noise: Optional[torch.Tensor] = None, elementwise: Optional[Callable] = None,
                   mask: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Denoising loss of `model` (a BaseModel: its noise scheduler, and `unet` or model.unet for the forward).

    latents, noise: (N, C, H, W) on the device the UNet runs on; timesteps: (N,) there too; cond: the text
    conditioning (a tensor, or SDXL's {"hidden", "pooled"} with optional (N, 6) `time_ids`); resolution: pixel
    size for SDXL's default time ids. prediction_type: default the model's. in_dtype: the UNet's input dtype
    (default the latents'). snr_timesteps: a CPU copy of the timesteps for the min-SNR weights (no device sync).
    autocast: a context factory for the forward (accelerate's, or torch.autocast). reduction: "mean" (a scalar),
    or "none" (the (N,) per-sample losses, float32).
    kohya options (training/noise.py, training/kohya_extras.py): input_noise makes the noisy latents instead of
    `noise` (ip_noise_gamma; the target stays `noise`); elementwise(pred, target) replaces the per-element MSE
    (loss_type); mask (N, 1, h, w) weights the per-element loss per latent pixel (masked_loss); weights (N,) weight
    the per-sample losses (prior_loss_weight of reg images)."""
    fam = families.of(model)
    if fam.in_place:  # the host's own model and objective (ComfyUI in place: families/comfyui.py)
        return fam.loss(model, latents, cond, noise, timesteps, autocast=autocast, reduction=reduction,
                        input_noise=input_noise, elementwise=elementwise, mask=mask, weights=weights,
                        min_snr_gamma=min_snr_gamma, in_dtype=in_dtype)
    if flow_train.is_flow(model):  # Flux / SD3: flow matching (training/flow.py); timesteps = sigma x 1000
        return flow_train.flow_matching_loss(model, latents, cond, noise, timesteps, unet=unet, in_dtype=in_dtype,
                                             autocast=autocast, reduction=reduction, input_noise=input_noise,
                                             elementwise=elementwise, mask=mask, weights=weights)
    unet = model.unet if unet is None else unet
    sched = model.noise_scheduler
    ptype = prediction_type or model.prediction_type
    noisy = sched.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    target = noise if ptype == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    dtype = in_dtype or latents.dtype
    with autocast():
        ehs, added = conditioning.unet_inputs(model, cond, time_ids, dtype, latents.device, resolution)
        pred = unet(noisy.to(dtype), timesteps, ehs, added_cond_kwargs=added).sample
    per_element = (F.mse_loss(pred.float(), target.float(), reduction="none") if elementwise is None
                   else elementwise(pred.float(), target.float()))
    if mask is not None:
        per_element = per_element * mask.to(per_element.device, per_element.dtype)
    loss = per_element.mean(dim=[1, 2, 3])
    if weights is not None:
        loss = loss * weights.to(loss.device, loss.dtype)
    if min_snr_gamma:
        ts = snr_timesteps if snr_timesteps is not None else timesteps
        loss = loss * min_snr_weights(sched, ts, min_snr_gamma, ptype).to(loss.device)
    if reduction == "none":
        return loss
    if reduction != "mean":
        raise ValueError(f"reduction = {reduction!r} is not valid: allowed mean, none.")
    return loss.mean()


@torch.no_grad()
def fixed_noise_loss(model: BaseModel, latents: torch.Tensor, text_embeds, seed: int = 0,
                     n_draws: int = 4, time_ids: Optional[torch.Tensor] = None,
                     min_snr_gamma: Optional[float] = None) -> float:
    """The training loss (loss.diffusion_loss) with noise and timesteps held fixed by `seed` (deterministic
    validation loss), mean over images and draws.

    latents: (N, C, H, W) already scaled; text_embeds: (N, L, D), or for SDXL {"hidden", "pooled"} with optional
    (N, 6) `time_ids` (default: the latents' size uncropped). Each image gets `n_draws` noise draws at
    timesteps spread evenly over the schedule; min_snr_gamma weights them as the training loop does.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    T = model.noise_scheduler.config.num_train_timesteps
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    vae_factor = families.of(model).vae_factor(model.vae)
    lat = latents.float().to(device)
    total = 0.0
    for d in range(n_draws):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.full((latents.shape[0],), int((d + 0.5) * T / n_draws), dtype=torch.long)
        per_sample = diffusion_loss(model, lat, text_embeds, noise.to(device), t.to(device),
                                             min_snr_gamma=min_snr_gamma, time_ids=time_ids,
                                             resolution=latents.shape[-1] * vae_factor, in_dtype=dtype,
                                             snr_timesteps=t, reduction="none")
        total += float(per_sample.double().sum())
    return total / (n_draws * latents.shape[0])

