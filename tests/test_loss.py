"""Issue 15.3: one loss (loss.diffusion_loss) for the training loop, the validation loss and the LR finder; the
finder trains with the configured optimizer and objective (min-SNR)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import small_cfg
from lora_train.training import loss as loss_mod
from lora_train.networks import lora as L
from lora_train.tuning.lr_finder import lr_range_test
from lora_train.models.tiny import build_tiny
from lora_train.training.loss import fixed_noise_loss
from lora_train.training.trainer import Trainer

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes


def reference_loss(model, lat, cond, noise, t, gamma=None):
    """The objective written out on its own (epsilon or v target, per-sample MSE, min-SNR weights)."""
    sched = model.noise_scheduler
    ac = sched.alphas_cumprod.to(lat.device)[t].float().view(-1, 1, 1, 1)
    noisy = ac.sqrt() * lat + (1 - ac).sqrt() * noise
    target = noise if model.prediction_type == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * lat
    with torch.no_grad():
        pred = model.unet(noisy, t, cond).sample
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if gamma:
        snr = (ac / (1 - ac)).view(-1)
        w = torch.clamp(snr, max=gamma)
        per = per * (w / (snr + 1) if model.prediction_type == "v_prediction" else w / snr)
    return per


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("loss") / "data"), n=8, size=64)


def _inputs(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn((n, 4, 8, 8), generator=g)
    cond = torch.randn((n, 77, 32), generator=g)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.tensor([50, 400, 900][:n])
    return lat, cond, noise, t


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_diffusion_loss_is_the_objective_and_independent_of_the_batch_layout(kind, gamma):
    model = build_tiny(kind)
    lat, cond, noise, t = _inputs(model)
    with torch.no_grad():
        per = loss_mod.diffusion_loss(model, lat, cond, noise, t, min_snr_gamma=gamma, reduction="none")
        mean = loss_mod.diffusion_loss(model, lat, cond, noise, t, min_snr_gamma=gamma)
        one_by_one = torch.cat([loss_mod.diffusion_loss(model, lat[i:i + 1], cond[i:i + 1], noise[i:i + 1],
                                                        t[i:i + 1], min_snr_gamma=gamma, reduction="none")
                                for i in range(3)])
    ref = reference_loss(model, lat, cond, noise, t, gamma)
    assert torch.allclose(per, ref, rtol=1e-4, atol=1e-6)
    assert torch.allclose(one_by_one, per, rtol=1e-4, atol=1e-6)
    assert torch.allclose(mean, ref.mean(), rtol=1e-4)
    if gamma:  # min-SNR changes the loss (t=50 has SNR >> 5)
        plain = reference_loss(model, lat, cond, noise, t)
        assert not torch.allclose(plain, ref)


def test_validation_loss_is_the_training_loss_at_fixed_noise():
    model = build_tiny()
    lat, cond, _, _ = _inputs(model)
    got = fixed_noise_loss(model, lat, cond, seed=7, n_draws=2, min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(7)
    T = model.noise_scheduler.config.num_train_timesteps
    want = []
    for d in range(2):
        noise = torch.randn(lat.shape, generator=g)
        t = torch.full((3,), int((d + 0.5) * T / 2), dtype=torch.long)
        want.append(reference_loss(model, lat, cond, noise, t, 5.0))
    assert math.isclose(got, float(torch.cat(want).mean()), rel_tol=1e-4)


def _spy(monkeypatch):
    """Record every diffusion_loss call: (caller, its output, the reference on the same inputs and weights)."""
    import sys

    calls = []
    real = loss_mod.diffusion_loss

    def spy(model, lat, cond, noise, t, **kw):
        out = real(model, lat, cond, noise, t, **kw)
        unet, was = kw.get("unet") or model.unet, model.unet
        model.unet = unet
        try:
            ref = reference_loss(model, lat.float(), cond, noise, t, kw.get("min_snr_gamma"))
        finally:
            model.unet = was
        ref = ref if kw.get("reduction") == "none" else ref.mean()
        calls.append((sys._getframe(1).f_code.co_name, out.detach().clone(), ref, kw))
        return out
    monkeypatch.setattr(loss_mod, "diffusion_loss", spy)
    return calls


def test_loop_validation_and_finder_all_use_the_one_loss(data, tmp_path, monkeypatch):
    calls = _spy(monkeypatch)
    hooked = []
    # 6 training images, batch 2: 3 steps make epoch 1, then the validation loss of the 2 held-out images
    cfg = small_cfg(data, tmp_path, max_train_steps=3, batch_size=2, validation_split=0.25, min_snr_gamma=5.0,
                    noise_offset=0.1)

    def hook(k, loss):
        hooked.append(float(loss.detach()))
        return loss
    res = Trainer(cfg, model=build_tiny(), loss_hook=hook).run()
    assert len(res.val_losses) == 1
    n_run = len(calls)
    found = lr_range_test(cfg.replace(output_dir=str(tmp_path / "f")), model=build_tiny(), steps=2, probe_samples=2)
    assert len(found.lrs) == 2
    callers = [c[0] for c in calls]
    # the run's steps and the finder's steps and probes: the Trainer's one loss (`_loss`); validation too
    assert {"_loss", "fixed_noise_loss"} <= set(callers[:n_run]) and set(callers[n_run:]) == {"_loss"}, callers
    for caller, out, ref, kw in calls:
        assert kw.get("min_snr_gamma") == 5.0, caller
        assert torch.allclose(out.float(), ref, rtol=1e-4, atol=1e-6), caller
    # what the loss log shows is that loss
    loop = [float(out) for caller, out, _, _ in calls[:n_run] if caller == "_loss"]
    assert loop == pytest.approx(hooked) and res.losses == pytest.approx(loop)


def test_finder_uses_the_configured_optimizer_and_min_snr(data):
    base = small_cfg(data, "unused", max_train_steps=1)
    res = lr_range_test(base.replace(optimizer="Adafactor"), model=build_tiny(), steps=2, probe_samples=2)
    assert "Adafactor" in res.optimizer
    plain = lr_range_test(base, model=build_tiny(), steps=2, probe_samples=2)
    assert "AdamW" in plain.optimizer
    snr = lr_range_test(base.replace(min_snr_gamma=1.0), model=build_tiny(), steps=2, probe_samples=2)
    assert all(math.isfinite(x) for x in plain.losses + snr.losses)
    assert snr.losses[0] != pytest.approx(plain.losses[0], rel=1e-3)  # min-SNR changes the finder's loss
