"""SD3 Medium, SD3.5 Medium and Large: the tiny test model, diffusers StableDiffusion3Pipeline folders, single files.

`tiny-sd3` mimics SD3.5 Medium (extra["variant"] "sd35-medium"): dual-attention (attn2) in block 0, RMS qk-norm.
  transformer  SD3Transformer2DModel: 2 joint blocks, 4 heads x 8 (inner 32), patch 2, pos_embed_max_size 32,
               joint_attention_dim 64 (= tiny T5 width), pooled_projection_dim 56 (= 24 + 32)
  vae          the tiny 16-channel VAE of models/flux.py (factor 4), factors calibrated
  CLIP-L       CLIPTextModelWithProjection 24 wide, 3 heads (projection 24), real CLIP vocabulary
  CLIP-G       CLIPTextModelWithProjection 32 wide, gelu, projection 32, tokenizer padding with "!"
  T5           T5EncoderModel 64 wide, default max token length 32 (the real models: 256)
Conditioning as diffusers' StableDiffusion3Pipeline: models/flow.py.
"""
from __future__ import annotations

import os

from .base import BaseModel, ModelError
from . import flow
from .flux import TINY_FLOW_VAE, TINY_RESOLUTION, TINY_T5_LENGTH, calibrate_vae, clip_config, seeded, tiny_t5

TINY_SEED = 5321
TINY_SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                            caption_projection_dim=32, pooled_projection_dim=56, pos_embed_max_size=32,
                            dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_SD3_CLIP_L = dict(hidden_size=24, intermediate_size=48, num_attention_heads=3, num_hidden_layers=2,
                       max_position_embeddings=77, projection_dim=24, hidden_act="quick_gelu")
TINY_SD3_CLIP_G = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                       max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
#: the released transformers' diffusers configs (stabilityai/stable-diffusion-3-medium-diffusers,
#: stable-diffusion-3.5-medium, stable-diffusion-3.5-large: transformer/config.json)
_SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048)
FULL_TRANSFORMER = {
    "sd3-medium": dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd35-medium": dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd35-large": dict(_SD3_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                       pos_embed_max_size=192, qk_norm="rms_norm"),
}
#: FlowMatchEulerDiscreteScheduler of the SD3 / SD3.5 repos
SCHEDULER_SD3 = dict(num_train_timesteps=1000, shift=3.0)


def build_tiny_sd3(seed: int = TINY_SEED) -> BaseModel:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tr = seeded(seed, lambda: SD3Transformer2DModel(**TINY_SD3_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKL(**TINY_FLOW_VAE))
    te1 = seeded(seed + 2, lambda: CLIPTextModelWithProjection(clip_config(**TINY_SD3_CLIP_L)))
    te2 = seeded(seed + 3, lambda: CLIPTextModelWithProjection(clip_config(**TINY_SD3_CLIP_G)))
    t5 = tiny_t5(seed + 4, d_model=64, d_kv=16, d_ff=128)
    calibrate_vae(vae)
    for m in (tr, vae, te1, te2, t5):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=te1, tokenizer=flow.clip_tokenizer(),
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_SD3), kind="sd3", name="tiny-sd3",
                     path="tiny-sd3", text_encoder_2=te2, tokenizer_2=flow.clip_tokenizer(pad_token="!"),
                     text_encoder_3=t5, tokenizer_3=flow.t5_tokenizer(TINY_T5_LENGTH),
                     native_resolution=TINY_RESOLUTION,
                     extra={"variant": "sd35-medium", "t5_default_length": TINY_T5_LENGTH})


def variant_of(transformer) -> str:
    """sd3-medium (24 blocks, no qk norm), sd35-medium (dual attention blocks), sd35-large (38 blocks, qk norm)."""
    c = transformer.config
    if tuple(getattr(c, "dual_attention_layers", ()) or ()):
        return "sd35-medium"
    if getattr(c, "qk_norm", None) or int(c.num_layers) >= 38:
        return "sd35-large"
    return "sd3-medium"


def save_sd3_folder(model: BaseModel, folder: str) -> str:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=model.unet, scheduler=model.noise_scheduler, vae=model.vae,
                                    text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                    text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                                    text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_sd3_folder(folder: str, index: dict) -> BaseModel:
    """A diffusers StableDiffusion3Pipeline folder (transformer/, vae/, text_encoder/, text_encoder_2/, optional
    text_encoder_3/ with tokenizers, scheduler/), offline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from .diffusers_folder import index_has, load_components

    parts = [("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL),
             ("text_encoder", CLIPTextModelWithProjection), ("tokenizer", CLIPTokenizer),
             ("text_encoder_2", CLIPTextModelWithProjection), ("tokenizer_2", CLIPTokenizer),
             ("scheduler", FlowMatchEulerDiscreteScheduler)]
    if index_has(index, "text_encoder_3"):
        parts += [("text_encoder_3", T5EncoderModel), ("tokenizer_3", T5TokenizerFast)]
    c = load_components(folder, parts, "SD3 diffusers folder",
                        "transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G), tokenizer/, "
                        "tokenizer_2/, scheduler/ and optionally text_encoder_3/ + tokenizer_3/ (T5), with their "
                        "weights")
    tr, vae, te1, tok1, te2, tok2, sched = (c[k] for k in ("transformer", "vae", "text_encoder", "tokenizer",
                                                           "text_encoder_2", "tokenizer_2", "scheduler"))
    t5, tok3 = c.get("text_encoder_3"), c.get("tokenizer_3")
    extra = {"variant": variant_of(tr)}
    small = int(tr.config.num_layers) < 8
    if small:
        extra["t5_default_length"] = TINY_T5_LENGTH
    return BaseModel(unet=tr, vae=vae, text_encoder=te1, tokenizer=tok1, noise_scheduler=sched, kind="sd3",
                     name=os.path.basename(os.path.normpath(folder)), path=os.path.abspath(folder),
                     text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3,
                     native_resolution=TINY_RESOLUTION if small else 1024, extra=extra)
