"""The tiny demo models (SD1, SD2, SDXL architectures; random, seeded weights, built from configs in code)
for the tests, the demo and CI, with their own tiny CLIP tokenizer.

Tiny SD2- and SDXL-architecture models (random, seeded weights, built from configs in code).

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

import json
import os

import torch
import tempfile

from .base import BaseModel
from ..data.demo import procedural_images

TINY_SEED = 1234
TINY_RESOLUTION = 64


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# A few merges so that common caption words become single tokens (kept small on purpose).
_TINY_WORDS = ["a", "of", "on", "the", "photo", "red", "green", "blue", "yellow", "circle", "square", "stripes",
               "background", "with", "and", "lrtdemo", "style", "image", "pattern", "dot", "dots", "white"]


def write_tiny_tokenizer(folder: str) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) with a small vocabulary made here."""
    os.makedirs(folder, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    seen = set(vocab)
    for word in _TINY_WORDS:  # greedy left-to-right merges that build each word
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merged = a + b
            if (a, b) not in merges:
                merges.append((a, b))
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({tok: i for i, tok in enumerate(vocab)}, fh, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
           "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, fh)


def tiny_vocab_size(folder: str) -> int:
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as fh:
        return len(json.load(fh))


# ----------------------------------------------------------------------------- tiny model
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")


def _tiny_scheduler_config(prediction_type: str = "epsilon") -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def _calibrate_vae_scale(vae) -> float:
    """Scaling factor that gives the tiny VAE's latents unit variance on structured test images."""
    imgs = procedural_images(8, TINY_RESOLUTION, seed=7)
    import numpy as np

    x = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1) for im in imgs])
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
    return float(1.0 / lat.std().clamp_min(1e-6))


def build_tiny(prediction_type: str = "epsilon", seed: int = TINY_SEED) -> BaseModel:
    """The tiny SD1-architecture demo model: fixed configs, seeded random weights, our own tokenizer."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
        vocab = tiny_vocab_size(tmp)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE)
        torch.manual_seed(seed + 2)
        te_cfg = CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                pad_token_id=vocab - 1, **TINY_TEXT)
        text_encoder = CLIPTextModel(te_cfg)
    finally:
        torch.random.set_rng_state(torch_state)
    vae.register_to_config(scaling_factor=_calibrate_vae_scale(vae))
    sched = DDPMScheduler(**_tiny_scheduler_config(prediction_type))
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=sched,
                     kind="sd1", name="tiny", path="tiny", native_resolution=TINY_RESOLUTION)





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


def seeded(seed: int, fn):
    """fn() with the global torch RNG seeded to `seed`, the RNG state restored after (tiny models' weights)."""
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
    unet = seeded(seed, lambda: UNet2DConditionModel(**TINY_SD2_UNET))
    vae = seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE))
    te = seeded(seed + 2, lambda: CLIPTextModel(_text_config(vocab, **TINY_SD2_TEXT)))
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
    unet = seeded(seed, lambda: UNet2DConditionModel(**TINY_SDXL_UNET))
    vae = seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE))
    te1 = seeded(seed + 2, lambda: CLIPTextModel(_text_config(vocab, **TINY_SDXL_TEXT_1)))
    te2 = seeded(seed + 3, lambda: CLIPTextModelWithProjection(_text_config(vocab, **TINY_SDXL_TEXT_2)))
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
