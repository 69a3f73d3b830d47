"""Tiny SD2- and SDXL-architecture models (random, seeded weights, built from configs in code).

Like models.build_tiny (SD1), these are for tests, the demo and CI; they follow the real architectures
where it matters to the trainer and to the file layouts:
  build_tiny_sd2:  OpenCLIP-H-like text encoder (CLIPTextModel, gelu), linear transformer projections,
                   per-block head counts, tokenizer padding with "!", v-prediction by default.
  build_tiny_sdxl: UNet2DConditionModel with addition_embed_type "text_time" (pooled text embeds +
                   6 size/crop time ids), first level without attention, several transformer layers per
                   block, layers_per_block 2 (so the SGM block numbering is SDXL's); two text encoders,
                   CLIPTextModel (quick_gelu, 32 wide) + CLIPTextModelWithProjection (gelu, 48 wide,
                   projection 40); tokenizer_2 pads with "!".

SDXL conditioning for the tiny UNet (as for the real one):
  encoder_hidden_states = cat([te1(ids1, output_hidden_states=True).hidden_states[-2],
                               te2(ids2, output_hidden_states=True).hidden_states[-2]], dim=-1)  # (B, 77, 80)
  added_cond_kwargs = {"text_embeds": te2(ids2).text_embeds,                                     # (B, 40)
                       "time_ids": tensor([[orig_h, orig_w, crop_top, crop_left, target_h, target_w]])}  # (B, 6)
"""
from __future__ import annotations

import tempfile

import torch

from .models import (TINY_RESOLUTION, TINY_SEED, TINY_TEXT, TINY_UNET, TINY_VAE, BaseModel, _calibrate_vae_scale,
                     _tiny_scheduler_config, tiny_vocab_size, write_tiny_tokenizer)

TINY_SD2_UNET = dict(TINY_UNET, use_linear_projection=True, attention_head_dim=(4, 8))
TINY_SD2_TEXT = dict(TINY_TEXT, hidden_act="gelu")

TINY_SDXL_TEXT_1 = dict(TINY_TEXT)  # CLIP-L-like: quick_gelu
TINY_SDXL_TEXT_2 = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                        max_position_embeddings=77, projection_dim=40, hidden_act="gelu")  # bigG-like
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
    cross_attention_dim=TINY_SDXL_TEXT_1["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],  # 80
    addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=TINY_SDXL_TEXT_2["projection_dim"] + 6 * TINY_SDXL_TIME_EMBED_DIM,  # 88
)


def _tokenizer(pad_token=None):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp)
        kw = {"pad_token": pad_token} if pad_token else {}
        tok = CLIPTokenizer.from_pretrained(tmp, local_files_only=True, **kw)
        vocab = tiny_vocab_size(tmp)
    return tok, vocab


def _text_config(vocab: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                          **kw)


def _seeded(seed: int, fn):
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return fn()
    finally:
        torch.random.set_rng_state(state)


def _finish(vae, *mods):
    vae.register_to_config(scaling_factor=_calibrate_vae_scale(vae))
    for m in (vae, *mods):
        m.eval().requires_grad_(False)


def build_tiny_sd2(v_prediction: bool = True, seed: int = TINY_SEED + 100) -> BaseModel:
    """Tiny SD2-architecture model (kind "sd2"); v-prediction unless v_prediction=False."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer, vocab = _tokenizer(pad_token="!")
    unet = _seeded(seed, lambda: UNet2DConditionModel(**TINY_SD2_UNET))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE))
    te = _seeded(seed + 2, lambda: CLIPTextModel(_text_config(vocab, **TINY_SD2_TEXT)))
    _finish(vae, unet, te)
    sched = DDPMScheduler(**_tiny_scheduler_config("v_prediction" if v_prediction else "epsilon"))
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer, noise_scheduler=sched, kind="sd2",
                     name="tiny-sd2" + ("-v" if v_prediction else ""), path="tiny-sd2",
                     native_resolution=TINY_RESOLUTION)


def build_tiny_sdxl(seed: int = TINY_SEED + 200, prediction_type: str = "epsilon") -> BaseModel:
    """Tiny SDXL-architecture model (kind "sdxl"): see the module docstring for its conditioning."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = _tokenizer()
    tokenizer_2, _ = _tokenizer(pad_token="!")
    unet = _seeded(seed, lambda: UNet2DConditionModel(**TINY_SDXL_UNET))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE))
    te1 = _seeded(seed + 2, lambda: CLIPTextModel(_text_config(vocab, **TINY_SDXL_TEXT_1)))
    te2 = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(_text_config(vocab, **TINY_SDXL_TEXT_2)))
    _finish(vae, unet, te1, te2)
    sched = DDPMScheduler(**_tiny_scheduler_config(prediction_type))
    return BaseModel(unet=unet, vae=vae, text_encoder=te1, tokenizer=tokenizer, noise_scheduler=sched, kind="sdxl",
                     name="tiny-sdxl", path="tiny-sdxl", text_encoder_2=te2, tokenizer_2=tokenizer_2,
                     native_resolution=TINY_RESOLUTION)


def sdxl_time_ids(original_size, crop_top_left, target_size, batch: int = 1, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """The (B, 6) SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
    row = list(original_size) + list(crop_top_left) + list(target_size)
    return torch.tensor([row] * batch, dtype=dtype, device=device)


def sdxl_encode(model: BaseModel, prompts, device=None):
    """(encoder_hidden_states, pooled text_embeds) for an SDXL-kind BaseModel, as the SDXL pipeline makes them:
    penultimate hidden states of both encoders side by side, pooled projection of the second."""
    ids1 = model.tokenizer(list(prompts), padding="max_length", max_length=model.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    ids2 = model.tokenizer_2(list(prompts), padding="max_length", max_length=model.tokenizer_2.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    dev = device or next(model.text_encoder.parameters()).device
    o1 = model.text_encoder(ids1.to(dev), output_hidden_states=True)
    o2 = model.text_encoder_2(ids2.to(dev), output_hidden_states=True)
    hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    return hidden, o2.text_embeds
