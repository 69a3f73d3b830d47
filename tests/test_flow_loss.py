"""Flow matching (issue #16): the loss and the timestep sampling against diffusers' own formulas."""
import math

import pytest
import torch
from torch import nn

from lora_train.config import ConfigError, TrainConfig
from lora_train.models.flux import build_tiny_flux
from lora_train.models.sd3 import build_tiny_sd3
from lora_train.training import flow as ft
from lora_train.training.loss import diffusion_loss


class Recorder(nn.Module):
    """A stand-in transformer: records its inputs and predicts a fixed tensor."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, {}
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        self.seen = dict(x=hidden_states, t=timestep)
        return (self.out + 0 * self.w,)


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3()


def test_loss_is_diffusers_flow_matching(sd3):
    """noisy = scheduler.scale_noise (sigma * noise + (1 - sigma) * x0), target = noise - x0, MSE per sample."""
    g = torch.Generator().manual_seed(0)
    lat, noise, pred = (torch.randn(3, 16, 8, 8, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    cond = {"hidden": torch.zeros(3, 5, 64), "pooled": torch.zeros(3, 56)}
    rec = Recorder(pred)
    per = diffusion_loss(sd3, lat, cond, noise, sigmas * 1000, unet=rec, reduction="none")
    for i in range(3):
        assert torch.allclose(rec.seen["x"][i], sigmas[i] * noise[i] + (1 - sigmas[i]) * lat[i], atol=1e-6)
    assert torch.allclose(rec.seen["t"], sigmas * 1000)
    ref = ((pred - (noise - lat)) ** 2).mean(dim=[1, 2, 3])
    assert torch.allclose(per, ref, atol=1e-6)
    assert math.isclose(float(diffusion_loss(sd3, lat, cond, noise, sigmas * 1000, unet=rec).detach()), float(ref.mean()),
                        rel_tol=1e-6)


def test_noisy_matches_scheduler_scale_noise(sd3):
    """diffusers' FlowMatchEulerDiscreteScheduler.scale_noise at one of its own timesteps gives our noisy latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    lat, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    t = sched.timesteps[3:4]
    ref = sched.scale_noise(lat, t, noise)
    rec = Recorder(torch.zeros_like(lat))
    cond = {"hidden": torch.zeros(1, 5, 64), "pooled": torch.zeros(1, 56)}
    diffusion_loss(sd3, lat, cond, noise, t, unet=rec)
    assert torch.allclose(rec.seen["x"], ref, atol=1e-5)


def test_loss_weighting_sigma_sqrt(sd3):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    g = torch.Generator().manual_seed(0)
    lat, noise, pred = (torch.randn(2, 16, 8, 8, generator=g) for _ in range(3))
    sig = torch.tensor([0.3, 0.8])
    cond = {"hidden": torch.zeros(2, 5, 64), "pooled": torch.zeros(2, 56)}
    plain = diffusion_loss(sd3, lat, cond, noise, sig * 1000, unet=Recorder(pred), reduction="none")
    sd3.extra["flow_options"] = ft.resolve(TrainConfig(weighting_scheme="sigma_sqrt"), sd3)
    try:
        w = diffusion_loss(sd3, lat, cond, noise, sig * 1000, unet=Recorder(pred), reduction="none")
    finally:
        sd3.extra.pop("flow_options")
    assert torch.allclose(w, plain * compute_loss_weighting_for_sd3("sigma_sqrt", sig), rtol=1e-5)


def _opts(**kw):
    base = dict(timestep_sampling="uniform", weighting_scheme="none", discrete_flow_shift=3.1582, sigmoid_scale=1.0,
                logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    base.update(kw)
    return base


def test_timestep_sampling_formulas():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    n = 64
    u = ft.sample_sigmas(_opts(), n, (16, 16), torch.Generator().manual_seed(3))
    assert torch.equal(u, torch.rand(n, generator=torch.Generator().manual_seed(3)))
    s = torch.sigmoid(1.5 * torch.randn(n, generator=torch.Generator().manual_seed(3)))
    got = ft.sample_sigmas(_opts(timestep_sampling="sigmoid", sigmoid_scale=1.5), n, (16, 16),
                           torch.Generator().manual_seed(3))
    assert torch.allclose(got, s)
    # shift: the mapping diffusers' scheduler applies to its sigmas with shift=3.1582
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.1582)
    s0 = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(3)))
    got = ft.sample_sigmas(_opts(timestep_sampling="shift"), n, (16, 16), torch.Generator().manual_seed(3))
    sh = 3.1582
    assert torch.allclose(got, sh * s0 / (1 + (sh - 1) * s0))
    assert torch.allclose(sh * plain.sigmas / (1 + (sh - 1) * plain.sigmas), shifted.sigmas, atol=1e-6)
    # flux_shift: diffusers' calculate_shift (mu from the packed sequence length) + exponential time shift
    h = w = 128  # 1024 px Flux latents
    mu = calculate_shift((h // 2) * (w // 2), 256, 4096, 0.5, 1.15)
    got = ft.sample_sigmas(_opts(timestep_sampling="flux_shift"), n, (h, w), torch.Generator().manual_seed(3))
    ref = math.e ** mu / (math.e ** mu + (1 / s0 - 1))  # diffusers' _time_shift_exponential(mu, 1.0, t)
    assert torch.allclose(got, ref.float(), atol=1e-6)
    if hasattr(plain, "_time_shift_exponential"):
        assert torch.allclose(got, plain._time_shift_exponential(mu, 1.0, s0).float(), atol=1e-6)
    assert got.mean() > s0.mean()  # high resolution shifts towards noise


def test_sigma_sampling_logit_normal(sd3):
    """`sigma`: indices from diffusers' compute_density_for_timestep_sampling, sigmas from the scheduler's table;
    reproducible from our generator and not touching the global RNG."""
    opts = _opts(timestep_sampling="sigma", weighting_scheme="logit_normal", discrete_flow_shift=3.0)
    before = torch.random.get_rng_state()
    a = ft.sample_sigmas(opts, 256, (8, 8), torch.Generator().manual_seed(5), sd3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = ft.sample_sigmas(opts, 256, (8, 8), torch.Generator().manual_seed(5), sd3)
    assert torch.equal(a, b)
    table = set(ft._scheduler(sd3, 3.0).sigmas.tolist())
    assert all(v in table for v in a.tolist())
    # logit-normal puts more mass in the middle than uniform sampling does
    uni = ft.sample_sigmas(_opts(timestep_sampling="sigma", weighting_scheme="none", discrete_flow_shift=3.0), 256,
                           (8, 8), torch.Generator().manual_seed(5), sd3)
    assert (a - a.median()).abs().mean() < (uni - uni.median()).abs().mean()


def test_auto_options_per_family(sd3):
    flux = build_tiny_flux()
    o = ft.resolve(TrainConfig(), flux)
    assert o["timestep_sampling"] == "shift" and o["discrete_flow_shift"] == pytest.approx(3.1582)
    o = ft.resolve(TrainConfig(), sd3)
    assert o["timestep_sampling"] == "sigma" and o["weighting_scheme"] == "logit_normal"
    assert o["discrete_flow_shift"] == 3.0


@pytest.mark.parametrize("key,value", [("timestep_sampling", "cosine"), ("weighting_scheme", "x"),
                                       ("discrete_flow_shift", -1.0), ("blocks_to_swap", -2),
                                       ("t5xxl_max_token_length", 0)])
def test_bad_flow_options(key, value):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({key: value})
    assert key in str(e.value)
