"""FLUX.2 [klein] 4B / 9B (and the dev layout): the tiny test model, diffusers Flux2KleinPipeline folders.

BaseModel for kind "flux2": unet = Flux2Transformer2DModel, vae = AutoencoderKLFlux2 (32 latent channels, patchified
2x2 to 128 and normalised by its batch-norm running statistics), text_encoder = Qwen3ForCausalLM (klein 4B: Qwen3 4B,
9B: Qwen3 8B), tokenizer = Qwen2Tokenizer with Qwen3's chat template, noise_scheduler =
FlowMatchEulerDiscreteScheduler; extra["variant"] "flux2-klein-4b" | "flux2-klein-9b" | "flux2-dev" (told by the
transformer's width and depth), extra["text_layers"]: the Qwen3 hidden states the pipeline stacks ((9, 18, 27)).
Flux.2 dev's folders (Flux2Pipeline, Mistral Small 3.1 text encoder) are refused with a message: not yet.

Needs diffusers >= 0.37 (Flux2KleinPipeline) and transformers >= 4.51 (Qwen3); `require()` says so by name.

`tiny-flux2-klein` (random, seeded weights): transformer 2 double + 2 single blocks, 2 heads x 16, rope axes
(4, 4, 4, 4), text width 3 x 16; VAE 8 latent channels (32 after patchifying), 3 levels (factor 4 then the 2x2
patch: 64 px -> 8 x 8 tokens), batch-norm statistics measured on procedural images; Qwen3 16 wide, 3 layers (all
three stacked); the byte-level BPE tokenizer made here (models/qwen_image.py) with the tiny chat template.
"""
from __future__ import annotations

import os

from .base import BaseModel, ModelError
from .base import require as base_require
from .tiny import seeded

TINY_SEED = 9191
TINY_RESOLUTION = 64
PIPELINES = ("Flux2KleinPipeline",)
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)
TINY_TEXT_LAYERS = (1, 2, 3)
TINY_TRANSFORMER = dict(patch_size=1, in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
TINY_VAE = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=8, norm_num_groups=8,
                sample_size=TINY_RESOLUTION)
#: FLUX.2 [klein]'s scheduler (black-forest-labs/FLUX.2-klein-4B scheduler/scheduler_config.json)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def require() -> None:
    """A ModelError naming the versions when this environment's diffusers / transformers lack FLUX.2 [klein]."""
    base_require("FLUX.2", [("diffusers", ("AutoencoderKLFlux2", "Flux2KleinPipeline", "Flux2Transformer2DModel"),
                             "diffusers >= 0.37"), ("transformers", ("Qwen3ForCausalLM",), "transformers >= 4.51")])


def variant_of(transformer) -> str:
    c = transformer.config
    if int(c.num_attention_heads) >= 48:
        return "flux2-dev"
    return "flux2-klein-9b" if int(c.num_attention_heads) * int(c.attention_head_dim) >= 4096 else "flux2-klein-4b"


def calibrate_vae(vae) -> None:
    """The tiny VAE's batch-norm running statistics (over its patchified latents) from structured test images, as
    the released VAE carries them."""
    import numpy as np
    import torch

    from ..data.demo import procedural_images
    from ..families.flux2 import patchify

    imgs = procedural_images(8, TINY_RESOLUTION, seed=7)
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1) for im in imgs])
    with torch.no_grad():
        lat = patchify(vae.encode(x).latent_dist.mean)
        vae.bn.running_mean.copy_(lat.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(lat.var(dim=(0, 2, 3)))


def build_tiny_flux2_klein(seed: int = TINY_SEED) -> BaseModel:
    """`tiny-flux2-klein`: see the module docstring."""
    require()
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .z_image import tiny_tokenizer

    tok = tiny_tokenizer()
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    tr = seeded(seed, lambda: Flux2Transformer2DModel(**TINY_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKLFlux2(**TINY_VAE))
    te = seeded(seed + 2, lambda: Qwen3ForCausalLM(Qwen3Config(**TINY_TEXT, vocab_size=len(tok), pad_token_id=pad,
                                                               bos_token_id=pad, eos_token_id=pad)))
    calibrate_vae(vae)
    for m in (tr, vae, te):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=tok,
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), kind="flux2",
                     name="tiny-flux2-klein", path="tiny-flux2-klein", native_resolution=TINY_RESOLUTION,
                     extra={"variant": "flux2-klein-4b", "text_default_length": 64, "text_layers": TINY_TEXT_LAYERS})


def save_flux2_folder(model: BaseModel, folder: str) -> str:
    """Write a FLUX.2 [klein] BaseModel as a diffusers Flux2KleinPipeline folder."""
    from diffusers import Flux2KleinPipeline

    Flux2KleinPipeline(scheduler=model.noise_scheduler, vae=model.vae, text_encoder=model.text_encoder,
                       tokenizer=model.tokenizer, transformer=model.unet).save_pretrained(folder, safe_serialization=True)
    return folder


def load_flux2_folder(folder: str, transformer=None) -> BaseModel:
    """A diffusers Flux2KleinPipeline folder (transformer/, vae/, text_encoder/ (Qwen3), tokenizer/, scheduler/)."""
    require()
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from .diffusers_folder import load_components

    parts = [("vae", AutoencoderKLFlux2), ("text_encoder", Qwen3ForCausalLM), ("tokenizer", AutoTokenizer),
             ("scheduler", FlowMatchEulerDiscreteScheduler)]
    if transformer is None:
        parts.insert(0, ("transformer", Flux2Transformer2DModel))
    c = load_components(folder, parts, "FLUX.2 [klein] diffusers folder",
                        "transformer/, vae/, text_encoder/ (Qwen3), tokenizer/ and scheduler/ with their weights")
    tr, te = c["transformer"] if transformer is None else transformer, c["text_encoder"]
    if c["tokenizer"].chat_template is None:
        raise ModelError(f"the tokenizer in '{folder}' has no chat template: FLUX.2 [klein]'s prompts go through "
                         f"Qwen3's; use the tokenizer/ folder of the release.")
    small = int(tr.config.num_layers) < 4
    n = int(te.config.num_hidden_layers)
    extra = {"variant": variant_of(tr), "text_layers": TINY_TEXT_LAYERS if small else (9, 18, 27)}
    if small:
        extra["text_default_length"] = 64
    if n < max(extra["text_layers"]):
        raise ModelError(f"the text encoder in '{folder}' has {n} layers; FLUX.2 [klein] stacks hidden states "
                         f"{extra['text_layers']}: use the release's Qwen3 text encoder.")
    return BaseModel(unet=tr, vae=c["vae"], text_encoder=te, tokenizer=c["tokenizer"],
                     noise_scheduler=c["scheduler"], kind="flux2", name=os.path.basename(os.path.normpath(folder)),
                     path=os.path.abspath(folder), native_resolution=TINY_RESOLUTION if small else 1024, extra=extra)
