"""`tiny-pixel`, the demo's model: the tiny SD1 model with a pixels-as-latents VAE and a briefly trained UNet.

The plain tiny model (random UNet, random VAE) turns any prompt into coloured noise, so a demo grid could not show
what a LoRA learned. Here:

- the VAE is `PixelVAE` (models/pixel_vae.py): latents are a fixed, nearly invertible rearrangement of pixels;
- the UNet (same config and seed as `tiny`) is first trained for `PRETRAIN["steps"]` full steps (v-prediction on a
  zero-terminal-SNR schedule, see PRETRAIN) to denoise generic procedural pictures (shapes and stripes in every
  colour on every background, `data.demo.procedural_images`) under captions that say nothing about them (random
  words). So the base model draws coloured shapes whose colours do not follow the prompt, and a LoRA trained on
  red circles on blue visibly moves them there.

That brief training is this module's recipe (seeded, CPU, under two minutes on 2 cores), run on first use and kept in
a cache file (`LORA_TRAIN_CACHE`, default `~/.cache/lora_train`; the file name holds the recipe's hash, so a changed
recipe retrains). Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

from .base import BaseModel
from .tiny import TINY_RESOLUTION, TINY_SEED, _TINY_WORDS, _calibrate_vae_scale, build_tiny
from ..data.demo import procedural_images
from ..io_utils import save_safetensors

#: v-prediction on a zero-terminal-SNR schedule (diffusers' rescale_betas_zero_snr, "trailing" sampling steps, as in
#: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): at epsilon prediction the last
#: timestep keeps some signal, the first noise fixes each picture's overall colour, and a briefly trained LoRA could
#: not move it (measured: 0 of 4 seeds showed the trained red circle on blue); here the model chooses the colours
#: itself and every seed did (8 of 8; bench/demo figure in README).
PRETRAIN = dict(steps=400, batch=8, lr=2e-3, images=96, image_seed=11, seed=5, captions=24, version=2,
                prediction="v_prediction", zero_snr=True)


def cache_dir() -> str:
    return os.environ.get("LORA_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_train")


def _recipe_hash() -> str:
    return hashlib.sha256(json.dumps(PRETRAIN, sort_keys=True).encode()).hexdigest()[:12]


def _pretrain(model: BaseModel, progress=None) -> None:
    """Full-UNet denoising steps on generic procedural images with uninformative captions (the recipe above)."""
    p = PRETRAIN
    ims = procedural_images(p["images"], TINY_RESOLUTION, seed=p["image_seed"])
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1) for im in ims])
    with torch.no_grad():
        lat = model.vae.encode(x).latent_dist.mean * model.vae_scale
    rng = random.Random(p["seed"])
    caps = [" ".join(rng.choice(_TINY_WORDS) for _ in range(rng.randint(1, 6))) for _ in range(p["captions"])]
    ids = model.tokenizer(caps, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = model.text_encoder(ids)[0]
    unet, sched = model.unet, model.noise_scheduler
    state = torch.random.get_rng_state()
    try:
        gen = torch.Generator().manual_seed(p["seed"])
        unet.train().requires_grad_(True)
        opt = torch.optim.AdamW(unet.parameters(), lr=p["lr"])
        for step in range(p["steps"]):
            for g in opt.param_groups:  # cosine decay to 0
                g["lr"] = p["lr"] * 0.5 * (1 + np.cos(np.pi * step / p["steps"]))
            i = torch.randint(0, len(lat), (p["batch"],), generator=gen)
            c = torch.randint(0, len(caps), (p["batch"],), generator=gen)
            noise = torch.randn(lat[i].shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (p["batch"],), generator=gen)
            target = sched.get_velocity(lat[i], noise, t) if p["prediction"] == "v_prediction" else noise
            loss = F.mse_loss(unet(sched.add_noise(lat[i], noise, t), t, emb[c]).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress:
                progress(step + 1, p["steps"], float(loss.detach()))
    finally:
        torch.random.set_rng_state(state)
        unet.eval().requires_grad_(False)


def build_tiny_pixel(seed: int = TINY_SEED, progress=None) -> BaseModel:
    """The demo model (see the module docstring). progress(step, total, loss) is called while the UNet is trained
    on first use."""
    from safetensors.torch import load_file  # light, but only needed here

    from .pixel_vae import PixelVAE  # subclasses diffusers' ModelMixin: diffusers loads only when a model is built

    from diffusers import DDPMScheduler

    model = build_tiny(PRETRAIN["prediction"], seed)
    model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config,
                                                      rescale_betas_zero_snr=PRETRAIN["zero_snr"],
                                                      timestep_spacing="trailing" if PRETRAIN["zero_snr"] else "leading")
    vae = PixelVAE(sample_size=TINY_RESOLUTION)
    vae.register_to_config(scaling_factor=_calibrate_vae_scale(vae))
    model.vae = vae.eval().requires_grad_(False)
    model.name = model.path = "tiny-pixel"
    path = cached_path(seed)
    if os.path.isfile(path):
        model.unet.load_state_dict(load_file(path))
    else:
        _pretrain(model, progress)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_safetensors({k: v.contiguous() for k, v in model.unet.state_dict().items()}, path,
                         {"recipe": json.dumps(PRETRAIN, sort_keys=True)})
    return model


DEMO_MODEL = "tiny-pixel"


def cached_path(seed: int = TINY_SEED) -> str:
    return os.path.join(cache_dir(), f"tiny-pixel-unet-{PRETRAIN['prediction']}-{seed}-{_recipe_hash()}.safetensors")


def is_cached(seed: int = TINY_SEED) -> bool:
    return os.path.isfile(cached_path(seed))
