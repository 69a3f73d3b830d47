"""Wan (2.1 T2V, 2.2 TI2V-5B): the tiny test model, diffusers WanPipeline folders. LoRAs train on images (one latent
frame); video datasets are not read here.

BaseModel for kind "wan": unet = WanTransformer3DModel, vae = AutoencoderKLWan (causal 3-D VAE, one frame; latents
normalised by its config's latents_mean / latents_std), text_encoder = UMT5EncoderModel, tokenizer = its T5 tokenizer,
noise_scheduler = FlowMatchEulerDiscreteScheduler with the folder's flow_shift (the release ships UniPC with
flow_shift; training and our grids use flow-matching Euler at the same shift); extra["variant"] "wan2.1-t2v" (16
latent channels: 1.3B, 14B) | "wan2.2-ti2v-5b" (48). Wan 2.2 A14B folders (two experts, transformer_2) are refused
with a message: which expert a LoRA should train is not decided here yet.

Needs diffusers >= 0.33 (WanPipeline) and transformers >= 4.40 (UMT5); `require()` says so by name.

`tiny-wan` (random, seeded weights): transformer 2 blocks, 2 heads x 16, text width 32, ffn 64; VAE base_dim 8,
3 levels (factor 4: 64 px -> 16 x 16 latents), latents_mean / latents_std measured on procedural images; UMT5 32
wide, 2 layers, with the bundled T5 tokenizer (configs/t5_tokenizer; length 32).
"""
from __future__ import annotations

import json
import os

from . import flow
from .base import BaseModel, ModelError
from .base import require as base_require
from .tiny import seeded

TINY_SEED = 8181
TINY_RESOLUTION = 64
TINY_T5_LENGTH = 32
PIPELINES = ("WanPipeline",)
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                scale_factor_spatial=4)
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=32128,
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)
#: the releases' flow_shift (Wan-AI/Wan2.1-T2V-*, Wan2.2-TI2V-5B scheduler configs: 3.0 at 480p, 5.0 at 720p)
FLOW_SHIFT = 3.0


def require() -> None:
    """A ModelError naming the versions when this environment's diffusers / transformers lack Wan."""
    base_require("Wan", [("diffusers", ("AutoencoderKLWan", "WanPipeline", "WanTransformer3DModel"),
                          "diffusers >= 0.33"), ("transformers", ("UMT5EncoderModel",), "transformers >= 4.40")])


def scheduler(shift: float = FLOW_SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def calibrate_vae(vae) -> None:
    """latents_mean / latents_std of the tiny VAE on structured test images (what the released config states)."""
    from .qwen_image import calibrate_vae as calibrate_3d

    calibrate_3d(vae)


def variant_of(transformer) -> str:
    return "wan2.2-ti2v-5b" if int(transformer.config.in_channels) == 48 else "wan2.1-t2v"


def build_tiny_wan(seed: int = TINY_SEED) -> BaseModel:
    """`tiny-wan`: see the module docstring."""
    require()
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tr = seeded(seed, lambda: WanTransformer3DModel(**TINY_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKLWan(**TINY_VAE))
    te = seeded(seed + 2, lambda: UMT5EncoderModel(UMT5Config(**TINY_UMT5)))
    calibrate_vae(vae)
    for m in (tr, vae, te):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=flow.t5_tokenizer(TINY_T5_LENGTH),
                     noise_scheduler=scheduler(), kind="wan", name="tiny-wan", path="tiny-wan",
                     native_resolution=TINY_RESOLUTION,
                     extra={"variant": "wan2.1-t2v", "t5_default_length": TINY_T5_LENGTH})


def save_wan_folder(model: BaseModel, folder: str) -> str:
    """Write a Wan BaseModel as a diffusers WanPipeline folder."""
    from diffusers import WanPipeline

    WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                scheduler=model.noise_scheduler, transformer=model.unet).save_pretrained(folder, safe_serialization=True)
    return folder


def load_wan_folder(folder: str, transformer=None) -> BaseModel:
    """A diffusers WanPipeline folder (transformer/, vae/, text_encoder/ (UMT5), tokenizer/, scheduler/), offline;
    with `transformer` given (a single file's), the folder's own transformer/ is not read."""
    require()
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from .diffusers_folder import index_has, load_components

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    if index_has(index, "transformer_2"):
        raise ModelError(f"'{folder}' is a Wan 2.2 A14B folder (two experts: transformer for high noise, "
                         f"transformer_2 for low noise); training them is not supported yet. Use a Wan 2.1 T2V or "
                         f"Wan 2.2 TI2V-5B folder.")
    parts = [("vae", AutoencoderKLWan), ("text_encoder", UMT5EncoderModel), ("tokenizer", AutoTokenizer)]
    if transformer is None:
        parts.insert(0, ("transformer", WanTransformer3DModel))
    c = load_components(folder, parts, "Wan diffusers folder", "transformer/, vae/, text_encoder/ (UMT5), tokenizer/ and scheduler/")
    shift = FLOW_SHIFT
    try:
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as fh:
            conf = json.load(fh)
        shift = float(conf.get("flow_shift") or conf.get("shift") or FLOW_SHIFT)
    except (OSError, ValueError):
        pass
    tr = c["transformer"] if transformer is None else transformer
    small = int(tr.config.num_layers) < 8
    extra = {"variant": variant_of(tr)}
    if small:
        extra["t5_default_length"] = TINY_T5_LENGTH
    return BaseModel(unet=tr, vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                     noise_scheduler=scheduler(shift), kind="wan", name=os.path.basename(os.path.normpath(folder)),
                     path=os.path.abspath(folder), native_resolution=TINY_RESOLUTION if small else 832, extra=extra)
