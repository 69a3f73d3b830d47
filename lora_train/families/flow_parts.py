"""What the flow-matching families share (families/flux.py, sd3.py, qwen_image.py; torch is imported where used, so
that the families import without it, as the UI logic does): the T5 length per variant, tokenising and
encoding with T5, the parameters' device, and Flux's 2x2 latent packing (diffusers' FluxPipeline)."""
from __future__ import annotations

from typing import Sequence


#: the variant a model of the family is when its loader did not say (each family's `variants[0]`)
DEFAULT_VARIANT = {"flux": "flux-dev", "sd3": "sd35-medium", "qwen_image": "qwen-image",
                   "z_image": "z-image-turbo", "chroma": "chroma", "wan": "wan2.1-t2v",
                   "flux2": "flux2-klein-4b"}
IMPL_BFL = "https://github.com/black-forest-labs/flux"
T5_MAX_LENGTH = {"chroma": 512, "flux-dev": 512, "flux-schnell": 256, "sd3-medium": 256, "sd35-medium": 256,
                 "sd35-large": 256, "wan2.1-t2v": 512, "wan2.2-ti2v-5b": 512}


def variant(model) -> str:
    """The model's variant (extra["variant"], set by the loaders), else its family's most used one."""
    return str(model.extra.get("variant", DEFAULT_VARIANT.get(getattr(model, "kind", "flux"), "flux-dev")))


def t5_max_length(model) -> int:
    asked = model.extra.get("t5xxl_max_token_length")
    return int(asked) if asked else int(model.extra.get("t5_default_length", T5_MAX_LENGTH.get(variant(model), 256)))


def t5_run_metadata(model) -> dict:
    return {"ss_t5xxl_max_token_length": str(t5_max_length(model)),
            "ss_apply_t5_attn_mask": str(bool(model.extra.get("apply_t5_attn_mask", False)))}


def t5_conditioning_tag(model) -> str:
    return f"/t5len={t5_max_length(model)}/t5mask={bool(model.extra.get('apply_t5_attn_mask', False))}"


def param_device(mod, fallback):
    try:
        return next(mod.parameters()).device
    except StopIteration:
        return fallback


def token_ids(tokenizer, captions: Sequence[str], max_length: int):
    return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt")


def t5_encode(model, te, tok, captions, out_device):
    enc = token_ids(tok, captions, t5_max_length(model))
    mask = enc.attention_mask
    use_mask = bool(model.extra.get("apply_t5_attn_mask", False))
    dev = param_device(te, out_device)
    h = te(enc.input_ids.to(dev), attention_mask=mask.to(dev) if use_mask else None)[0]
    if use_mask:  # padded positions carry nothing (sd-scripts' apply_t5_attn_mask)
        h = h * mask.to(h.device, h.dtype).unsqueeze(-1)
    return h.to(out_device), mask.to(out_device)


def pack_latents(latents):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed, h: int, w: int):
    """The inverse of `pack_latents` for latents of size (h, w)."""
    b, _, ch = packed.shape
    x = packed.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=None):
    """(h/2 * w/2, 3) position ids of the packed latents: diffusers' FluxPipeline._prepare_latent_image_ids."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------- Wan's causal 3-D VAE (Qwen-Image's too)
def video_vae_latents(vae, pixels):
    """Latents (B, C, h, w) of pixels (B, 3, H, W) as one frame of a Wan-style 3-D VAE (AutoencoderKLWan,
    AutoencoderKLQwenImage): latent_dist.mean normalised per channel by its config's latents_mean / latents_std."""
    import torch

    lat = vae.encode(pixels.unsqueeze(2)).latent_dist.mean[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
    return (lat - mean) / std


def video_vae_factor(vae) -> int:
    """Pixels per latent of such a VAE: one halving per level after the first."""
    return 2 ** len(vae.config.temperal_downsample)
