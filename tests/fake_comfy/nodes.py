"""Fake of ComfyUI's nodes.py: common_ksampler with the same signature and return shape.

Simplified "sampling": seeded noise (as comfy.sample.prepare_noise: torch.manual_seed(seed), randn on CPU)
shifted by the conditioning and by the model's LoRA patches, so a sample depends on seed, prompt and the
applied LoRA strength exactly like a real one does, and is identical when nothing is applied. Checks the
interrupt flag each step and drives a ProgressBar like the real sampler callback."""
import torch

import comfy.model_management
import comfy.utils


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
                    disable_noise=False, start_step=None, last_step=None, force_full_denoise=False):
    latent_image = latent["samples"]
    generator = torch.manual_seed(seed)
    noise = torch.randn(latent_image.size(), dtype=torch.float32, layout=latent_image.layout, generator=generator,
                        device="cpu")
    pbar = comfy.utils.ProgressBar(steps)
    for _ in range(steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update(1)
    pos, neg = positive[0][0], negative[0][0]
    shift = 0.1 * torch.tanh(pos.mean() - 0.01 * cfg * neg.mean()) + 0.3 * torch.tanh(torch.tensor(model.patch_effect()))
    out = latent.copy()
    out["samples"] = noise * 0.5 + shift
    return (out,)
