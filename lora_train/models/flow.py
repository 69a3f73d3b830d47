"""What the flow-matching families (Flux.1, SD3 / SD3.5) share: bundled tokenizers, the LoRA targets of their
transformers, the text conditioning and the denoiser's forward.

BaseModel for these kinds (the contract with networks/ and the front doors):
  kind "flux": unet = FluxTransformer2DModel, text_encoder = CLIP-L (CLIPTextModel), tokenizer = CLIP,
               text_encoder_2 = T5EncoderModel, tokenizer_2 = T5; extra["variant"] "flux-dev" | "flux-schnell".
  kind "sd3":  unet = SD3Transformer2DModel, text_encoder = CLIP-L, text_encoder_2 = CLIP-G (both
               CLIPTextModelWithProjection), text_encoder_3 = T5; extra["variant"] "sd3-medium" | "sd35-medium" |
               "sd35-large".
  noise_scheduler = FlowMatchEulerDiscreteScheduler; the VAE has 16 latent channels and a shift_factor.

Conditioning (`encode`), as diffusers' FluxPipeline / StableDiffusion3Pipeline make it:
  flux: {"hidden": T5 last hidden state (B, L, D), "pooled": CLIP-L pooler_output (B, P),
         "mask": T5 attention mask (B, L) (1 = token, 0 = padding)}
  sd3:  {"hidden": cat([pad(cat([CLIP-L, CLIP-G] penultimate), T5 width), T5], dim=1) (B, 77 + L, D),
         "pooled": cat([CLIP-L text_embeds, CLIP-G text_embeds]) (B, P)}
Options that change the conditioning sit in model.extra (set from the TrainConfig by `configure`):
  "t5xxl_max_token_length" (default per variant: flux-dev 512, flux-schnell 256, sd3 256; tiny models 32),
  "apply_t5_attn_mask" (False), "guidance_scale" (Flux dev's guidance input, 1.0 for training).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import families
from ..families.flow_parts import (T5_MAX_LENGTH, latent_image_ids, pack_latents, param_device,  # noqa: F401
                                   t5_encode, t5_max_length, token_ids, unpack_latents, variant)

FLOW_KINDS = families.FLOW
VARIANTS = tuple(v for k in families.FLOW for v in families.get(k).variants)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CLIP_TOKENIZER = os.path.join(CONFIGS, "clip_tokenizer")
T5_TOKENIZER = os.path.join(CONFIGS, "t5_tokenizer")


def is_flow(model) -> bool:
    return families.is_flow(model)


# ----------------------------------------------------------------------------- tokenizers (bundled, offline)
def clip_tokenizer(pad_token: Optional[str] = None):
    """The CLIP BPE tokenizer bundled in configs/clip_tokenizer (CLIP-L; pad "!" for CLIP-G as SD3 uses)."""
    from transformers import CLIPTokenizer

    kw = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, local_files_only=True, **kw)


def t5_tokenizer(max_length: int = 512):
    """The T5 v1.1 tokenizer bundled in configs/t5_tokenizer (see its NOTICE)."""
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(T5_TOKENIZER, local_files_only=True)
    tok.model_max_length = max_length
    return tok


def text_encoder_components(model) -> List[tuple]:
    """[(component, encoder)] of the text encoders a LoRA may train: CLIP-L (te1) for Flux, CLIP-L and CLIP-G
    (te1, te2) for SD3; T5 is never trained."""
    return families.of(model).text_encoder_components(model)


# ----------------------------------------------------------------------------- options
def configure(model, cfg) -> None:
    """Copy the conditioning options of a TrainConfig into model.extra (see the module docstring)."""
    if not is_flow(model):
        return
    model.extra["t5xxl_max_token_length"] = getattr(cfg, "t5xxl_max_token_length", None)
    model.extra["apply_t5_attn_mask"] = bool(getattr(cfg, "apply_t5_attn_mask", False))
    model.extra["guidance_scale"] = float(getattr(cfg, "guidance_scale", 1.0))
    families.of(model).configure(model, cfg)


def encode_tag(model) -> str:
    """What changes the text conditioning besides the encoders' weights (part of the text cache's identity)."""
    if not is_flow(model):
        return ""
    return families.of(model).conditioning_tag(model)


# ----------------------------------------------------------------------------- conditioning
def encode(model, captions: Sequence[str], device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Text conditioning of a flow model (module docstring; the family's `encode`); runs with grad when a CLIP encoder
    trains."""
    dev = device if device is not None else param_device(model.text_encoder, torch.device("cpu"))
    return families.of(model).encode(model, list(captions), dev)


# ----------------------------------------------------------------------------- the denoiser's forward
def predict(model, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Dict[str, Any]) -> torch.Tensor:
    """The transformer's velocity prediction for noisy latents (B, C, H, W) at timesteps in [0, 1000] (= sigma x
    1000), shaped like the latents (the family's `forward`)."""
    return families.of(model).forward(model, transformer, noisy, timesteps, cond)
