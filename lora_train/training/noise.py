"""kohya's loss types and noise options, as sd-scripts defines them (library/train_util.py,
library/custom_train_functions.py):

- loss_type l2 (MSE), l1, huber, smooth_l1, per element (`elementwise_loss`), with the Huber threshold per sample
  from `huber_schedule` (`huber_c_for`):
    constant:     huber_c * huber_scale
    exponential:  exp(-alpha * t) * huber_scale, alpha = -ln(huber_c) / T      (huber_c at t = T, 1 at t = 0)
    snr:          (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - abar_t) / abar_t)
  huber:      2 c (sqrt(r^2 + c^2) - c)     (~ r^2 for |r| << c: MSE for small residuals)
  smooth_l1:  2 (sqrt(r^2 + c^2) - c)
- multires (pyramid) noise: noise + sum_i upsample(randn at size / r^i) * discount^i, r in [2, 4), rescaled to unit
  std; it replaces the noise (input and target).
- input perturbation (ip_noise_gamma): the noisy latents are made from noise + gamma * randn; the target stays
  the noise.
Draws come from the run's generator, so a run is reproducible and resumable.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def huber_c_for(loss_type: str, schedule: str, huber_c: float, huber_scale: float, timesteps: torch.Tensor,
                noise_scheduler) -> Optional[torch.Tensor]:
    """Per-sample Huber threshold (N,) for huber / smooth_l1 (None for l1 / l2); sd-scripts'
    get_huber_threshold_if_needed."""
    if loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.detach().cpu()
    if schedule == "exponential":
        alpha = -math.log(huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t.float()) * huber_scale
    if schedule == "snr":
        if getattr(noise_scheduler, "alphas_cumprod", None) is None:  # flow matching (Flux / SD3): t = sigma x 1000,
            s = (t.float() / 1000.0).clamp(0.0, 0.999)  # x_t = (1 - s) x0 + s noise: noise / signal = s / (1 - s)
            sigmas = s / (1.0 - s)
        else:
            ac = torch.index_select(noise_scheduler.alphas_cumprod.detach().cpu().float(), 0, t.long())
            sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return torch.full((t.shape[0],), huber_c * huber_scale)
    raise ValueError(f"huber_schedule '{schedule}' is not known: use constant, exponential or snr.")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-element loss of the kohya loss types (sd-scripts' conditional_loss with reduction none)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type} needs a Huber threshold per sample.")
    c = huber_c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    raise ValueError(f"loss_type '{loss_type}' is not known: use l1, l2, huber or smooth_l1.")


def loss_fn(cfg, timesteps: torch.Tensor, noise_scheduler) -> Optional[Callable[[torch.Tensor, torch.Tensor],
                                                                                  torch.Tensor]]:
    """The elementwise loss of the config for these timesteps, or None for plain MSE (the default path)."""
    if cfg.loss_type == "l2":
        return None
    c = huber_c_for(cfg.loss_type, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, timesteps, noise_scheduler)
    return lambda pred, target: elementwise_loss(pred, target, cfg.loss_type, c)


def pyramid_noise_like(noise: torch.Tensor, iterations: int, discount: float,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Multires noise (sd-scripts' pyramid_noise_like, with the draws from `generator`)."""
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        out += up(torch.randn((b, c, hn, wn), generator=generator)) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def input_noise(noise: torch.Tensor, gamma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The noise the noisy latents are made from with input perturbation (ip_noise_gamma)."""
    return noise + gamma * torch.randn(noise.shape, generator=generator)
