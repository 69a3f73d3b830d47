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
from torch import nn

FLOW_KINDS = ("flux", "sd3")
VARIANTS = ("flux-dev", "flux-schnell", "sd3-medium", "sd35-medium", "sd35-large")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CLIP_TOKENIZER = os.path.join(CONFIGS, "clip_tokenizer")
T5_TOKENIZER = os.path.join(CONFIGS, "t5_tokenizer")
T5_MAX_LENGTH = {"flux-dev": 512, "flux-schnell": 256, "sd3-medium": 256, "sd35-medium": 256, "sd35-large": 256}


def is_flow(model) -> bool:
    return getattr(model, "kind", "") in FLOW_KINDS


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
    if model.kind == "flux":
        return [("te1", model.text_encoder)]
    return [("te1", model.text_encoder), ("te2", model.text_encoder_2)]


# ----------------------------------------------------------------------------- options
def variant(model) -> str:
    return str(model.extra.get("variant", "flux-dev" if model.kind == "flux" else "sd35-medium"))


def t5_max_length(model) -> int:
    asked = model.extra.get("t5xxl_max_token_length")
    return int(asked) if asked else int(model.extra.get("t5_default_length", T5_MAX_LENGTH.get(variant(model), 256)))


def configure(model, cfg) -> None:
    """Copy the conditioning options of a TrainConfig into model.extra (see the module docstring)."""
    if not is_flow(model):
        return
    model.extra["t5xxl_max_token_length"] = getattr(cfg, "t5xxl_max_token_length", None)
    model.extra["apply_t5_attn_mask"] = bool(getattr(cfg, "apply_t5_attn_mask", False))
    model.extra["guidance_scale"] = float(getattr(cfg, "guidance_scale", 1.0))


def encode_tag(model) -> str:
    """What changes the text conditioning besides the encoders' weights (part of the text cache's identity)."""
    if not is_flow(model):
        return ""
    return f"/t5len={t5_max_length(model)}/t5mask={bool(model.extra.get('apply_t5_attn_mask', False))}"


# ----------------------------------------------------------------------------- conditioning
def _dev(mod: nn.Module, fallback) -> torch.device:
    try:
        return next(mod.parameters()).device
    except StopIteration:
        return fallback


def _ids(tokenizer, captions: Sequence[str], max_length: int):
    return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt")


def _t5(model, te, tok, captions, out_device):
    enc = _ids(tok, captions, t5_max_length(model))
    mask = enc.attention_mask
    use_mask = bool(model.extra.get("apply_t5_attn_mask", False))
    dev = _dev(te, out_device)
    h = te(enc.input_ids.to(dev), attention_mask=mask.to(dev) if use_mask else None)[0]
    if use_mask:  # padded positions carry nothing (sd-scripts' apply_t5_attn_mask)
        h = h * mask.to(h.device, h.dtype).unsqueeze(-1)
    return h.to(out_device), mask.to(out_device)


def encode(model, captions: Sequence[str], device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Text conditioning of a flow model (module docstring); runs with grad when a CLIP encoder trains."""
    captions = list(captions)
    dev = device if device is not None else _dev(model.text_encoder, torch.device("cpu"))
    clip_ids = _ids(model.tokenizer, captions, model.tokenizer.model_max_length).input_ids
    if model.kind == "flux":
        pooled = model.text_encoder(clip_ids.to(_dev(model.text_encoder, dev)), output_hidden_states=False).pooler_output
        hidden, mask = _t5(model, model.text_encoder_2, model.tokenizer_2, captions, dev)
        return {"hidden": hidden, "pooled": pooled.to(dev), "mask": mask.to(hidden.dtype)}
    o1 = model.text_encoder(clip_ids.to(_dev(model.text_encoder, dev)), output_hidden_states=True)
    ids2 = _ids(model.tokenizer_2, captions, model.tokenizer_2.model_max_length).input_ids
    o2 = model.text_encoder_2(ids2.to(_dev(model.text_encoder_2, dev)), output_hidden_states=True)
    clip_h = torch.cat([o1.hidden_states[-2].to(dev), o2.hidden_states[-2].to(dev)], dim=-1)
    pooled = torch.cat([o1.text_embeds.to(dev), o2.text_embeds.to(dev)], dim=-1)
    width = int(model.unet.config.joint_attention_dim)
    if model.text_encoder_3 is not None:
        t5, _ = _t5(model, model.text_encoder_3, model.tokenizer_3, captions, dev)
    else:  # SD3 without T5: zeros, as diffusers' pipeline does
        t5 = torch.zeros(len(captions), t5_max_length(model), width, dtype=clip_h.dtype, device=dev)
    clip_h = torch.nn.functional.pad(clip_h, (0, t5.shape[-1] - clip_h.shape[-1]))
    return {"hidden": torch.cat([clip_h, t5.to(clip_h.dtype)], dim=-2), "pooled": pooled}


# ----------------------------------------------------------------------------- the denoiser's forward
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of size (h, w)."""
    b, _, ch = packed.shape
    x = packed.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed latents: diffusers' FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def predict(model, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Dict[str, Any]) -> torch.Tensor:
    """The transformer's velocity prediction for noisy latents (B, C, H, W) at timesteps in [0, 1000] (= sigma x
    1000), shaped like the latents. Flux: packed latents, position ids, dev's guidance input
    (model.extra["guidance_scale"], default 1.0), the T5 mask in attention when apply_t5_attn_mask is on."""
    dtype, dev = noisy.dtype, noisy.device
    hidden = cond["hidden"].to(dev, dtype)
    pooled = cond["pooled"].to(dev, dtype)
    t = timesteps.to(dev).float()
    if model.kind == "sd3":
        return transformer(hidden_states=noisy, timestep=t.to(dtype), encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]
    b, _, h, w = noisy.shape
    cfg = getattr(transformer, "config", None) or model.unet.config
    guidance = None
    if getattr(cfg, "guidance_embeds", False):
        guidance = torch.full((b,), float(model.extra.get("guidance_scale", 1.0)), device=dev, dtype=torch.float32)
    kwargs = {}
    if model.extra.get("apply_t5_attn_mask") and "mask" in cond:
        txt = cond["mask"].to(dev).bool()
        full = torch.cat([txt, torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool, device=dev)], dim=1)
        kwargs["joint_attention_kwargs"] = {"attention_mask": full[:, None, None, :]}
    out = transformer(hidden_states=pack_latents(noisy), timestep=t / 1000.0, guidance=guidance,
                      pooled_projections=pooled, encoder_hidden_states=hidden,
                      txt_ids=torch.zeros(hidden.shape[1], 3, device=dev, dtype=dtype),
                      img_ids=latent_image_ids(h, w, dev, dtype), return_dict=False, **kwargs)[0]
    return unpack_latents(out, h, w)
