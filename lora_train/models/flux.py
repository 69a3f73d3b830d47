"""Flux.1 (dev, schnell): the tiny test models, diffusers FluxPipeline folders, BFL single files.

Tiny models (random, seeded weights, configs below; `tiny-flux` mimics flux-dev: guidance input;
`tiny-flux-schnell` mimics flux-schnell: no guidance input, unshifted scheduler):
  transformer  FluxTransformer2DModel: 2 double + 2 single blocks, 2 heads x 16, rope axes (4, 6, 6),
               joint_attention_dim 32 (= tiny T5 width), pooled_projection_dim 32 (= tiny CLIP-L width)
  vae          AutoencoderKL, 16 latent channels, 3 levels (factor 4: 64 px -> 16 x 16 latents -> 8 x 8 packed),
               no quant convs (as Flux's ae), scaling / shift factors calibrated on procedural images
  CLIP-L       CLIPTextModel 32 wide with the real CLIP vocabulary (bundled configs/clip_tokenizer)
  T5           T5EncoderModel 32 wide, gated-gelu (v1.1), real vocabulary (bundled configs/t5_tokenizer),
               default max token length 32 (the real models: dev 512, schnell 256)
"""
from __future__ import annotations

import json
import os

import torch

from .base import BaseModel, ModelError
from . import flow
from .tiny import seeded  # noqa: F401  (sd3.py takes it from here too)

TINY_RESOLUTION = 64
TINY_SEED = 4321
TINY_T5_LENGTH = 32

TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 6, 6))
TINY_FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32),
                     down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                     layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION, use_quant_conv=False,
                     use_post_quant_conv=False)
TINY_CLIP_L = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                   max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=32128,
               dropout_rate=0.0)
#: the released transformers' diffusers configs (black-forest-labs/FLUX.1-dev, -schnell: transformer/config.json)
FULL_TRANSFORMER = {
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
}
FULL_TRANSFORMER["flux-schnell"] = dict(FULL_TRANSFORMER["flux-dev"], guidance_embeds=False)
#: FlowMatchEulerDiscreteScheduler configs of the real repos (scheduler/scheduler_config.json)
SCHEDULER_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHEDULER_SCHNELL = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def clip_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **kw)


def tiny_t5(seed: int, **over):
    from transformers import T5Config, T5EncoderModel

    return seeded(seed, lambda: T5EncoderModel(T5Config(**dict(TINY_T5, **over))))


def calibrate_vae(vae) -> None:
    """shift_factor / scaling_factor that give the tiny VAE's latents zero mean and unit variance on structured test
    images (as the real Flux / SD3 VAEs' factors do for photos)."""
    import numpy as np

    from ..data.demo import procedural_images

    imgs = procedural_images(8, TINY_RESOLUTION, seed=7)
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1) for im in imgs])
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1.0 / lat.std().clamp_min(1e-6)))


def build_tiny_flux(schnell: bool = False, seed: int = TINY_SEED) -> BaseModel:
    """`tiny-flux` (flux-dev layout) or `tiny-flux-schnell`: see the module docstring."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tr = seeded(seed, lambda: FluxTransformer2DModel(guidance_embeds=not schnell, **TINY_FLUX_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKL(**TINY_FLOW_VAE))
    te = seeded(seed + 2, lambda: CLIPTextModel(clip_config(**TINY_CLIP_L)))
    t5 = tiny_t5(seed + 3)
    calibrate_vae(vae)
    for m in (tr, vae, te, t5):
        m.eval().requires_grad_(False)
    sched = FlowMatchEulerDiscreteScheduler(**(SCHEDULER_SCHNELL if schnell else SCHEDULER_DEV))
    name = "tiny-flux-schnell" if schnell else "tiny-flux"
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=flow.clip_tokenizer(), noise_scheduler=sched,
                     kind="flux", name=name, path=name, text_encoder_2=t5,
                     tokenizer_2=flow.t5_tokenizer(TINY_T5_LENGTH), native_resolution=TINY_RESOLUTION,
                     extra={"variant": "flux-schnell" if schnell else "flux-dev", "t5_default_length": TINY_T5_LENGTH})


# ----------------------------------------------------------------------------- diffusers folders
def variant_of(transformer) -> str:
    return "flux-dev" if getattr(transformer.config, "guidance_embeds", False) else "flux-schnell"


def native_resolution(vae, transformer) -> int:
    return 1024 if int(transformer.config.num_layers) >= 8 else TINY_RESOLUTION


def save_flux_folder(model: BaseModel, folder: str) -> str:
    """Write a Flux BaseModel as a diffusers FluxPipeline folder."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=model.noise_scheduler, vae=model.vae, text_encoder=model.text_encoder,
                        tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                        transformer=model.unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_flux_folder(folder: str) -> BaseModel:
    """A diffusers FluxPipeline folder (transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/,
    tokenizer_2/, scheduler/), offline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from .diffusers_folder import load_components

    c = load_components(folder, [("transformer", FluxTransformer2DModel), ("vae", AutoencoderKL),
                                 ("text_encoder", CLIPTextModel), ("tokenizer", CLIPTokenizer),
                                 ("text_encoder_2", T5EncoderModel), ("tokenizer_2", T5TokenizerFast),
                                 ("scheduler", FlowMatchEulerDiscreteScheduler)], "Flux diffusers folder",
                        "transformer/, vae/, text_encoder/ (CLIP-L), tokenizer/, text_encoder_2/ (T5), tokenizer_2/ "
                        "and scheduler/ with their weights")
    tr, vae, te, tok, t5, tok2, sched = (c[k] for k in ("transformer", "vae", "text_encoder", "tokenizer",
                                                        "text_encoder_2", "tokenizer_2", "scheduler"))
    extra = {"variant": variant_of(tr)}
    if int(tr.config.num_layers) < 8:  # a tiny test model saved as a folder keeps its short T5 length
        extra["t5_default_length"] = int(tok2.model_max_length) if tok2.model_max_length < 512 else TINY_T5_LENGTH
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=tok, noise_scheduler=sched, kind="flux",
                     name=os.path.basename(os.path.normpath(folder)), path=os.path.abspath(folder),
                     text_encoder_2=t5, tokenizer_2=tok2, native_resolution=native_resolution(vae, tr), extra=extra)


def read_index(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
        return json.load(fh)
