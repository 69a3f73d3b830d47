"""Chroma (8.9B, Flux.1-schnell lineage, T5 only): the tiny test model, diffusers ChromaPipeline folders.

BaseModel for kind "chroma": unet = ChromaTransformer2DModel (Flux's double / single blocks, no per-block modulation
Linears: the modulation comes from its `distilled_guidance_layer`), vae = AutoencoderKL (Flux's 16-channel VAE),
text_encoder = T5EncoderModel, tokenizer = T5 (no CLIP), noise_scheduler = FlowMatchEulerDiscreteScheduler
(Flux dev's dynamic shift); extra["variant"] "chroma".

Needs diffusers >= 0.35 (ChromaPipeline); `require()` says so by name.

`tiny-chroma` (random, seeded weights): transformer 2 double + 2 single blocks, 2 heads x 16, rope axes (4, 6, 6),
T5 width 32, approximator 1 layer 32 wide; the tiny Flux VAE and T5 of models/flux.py (T5 length 32).
"""
from __future__ import annotations

import os

from . import flow
from .base import BaseModel
from .base import require as base_require
from .tiny import seeded

TINY_SEED = 7171
TINY_RESOLUTION = 64
TINY_T5_LENGTH = 32
PIPELINES = ("ChromaPipeline", "ChromaImg2ImgPipeline")
#: the parts a folder may take from separate files (models/split_parts.py; qwen_image.py SPLIT_FILES)
SPLIT_FILES = {"vae": ("ae", "ae.safetensors"), "text_encoder": ("t5xxl", "t5xxl_fp16.safetensors")}
TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)


def require() -> None:
    """A ModelError naming the version when this environment's diffusers lacks Chroma."""
    base_require("Chroma", [("diffusers", ("ChromaPipeline", "ChromaTransformer2DModel"), "diffusers >= 0.35")])


def build_tiny_chroma(seed: int = TINY_SEED) -> BaseModel:
    """`tiny-chroma`: see the module docstring."""
    require()
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from .flux import SCHEDULER_DEV, TINY_FLOW_VAE, calibrate_vae, tiny_t5

    tr = seeded(seed, lambda: ChromaTransformer2DModel(**TINY_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKL(**TINY_FLOW_VAE))
    t5 = tiny_t5(seed + 2)
    calibrate_vae(vae)
    for m in (tr, vae, t5):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=t5, tokenizer=flow.t5_tokenizer(TINY_T5_LENGTH),
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_DEV), kind="chroma",
                     name="tiny-chroma", path="tiny-chroma", native_resolution=TINY_RESOLUTION,
                     extra={"variant": "chroma", "t5_default_length": TINY_T5_LENGTH})


def save_chroma_folder(model: BaseModel, folder: str) -> str:
    """Write a Chroma BaseModel as a diffusers ChromaPipeline folder."""
    from diffusers import ChromaPipeline

    ChromaPipeline(scheduler=model.noise_scheduler, vae=model.vae, text_encoder=model.text_encoder,
                   tokenizer=model.tokenizer, transformer=model.unet).save_pretrained(folder, safe_serialization=True)
    return folder


def load_chroma_folder(folder: str, transformer=None, single_files=None) -> BaseModel:
    """A diffusers ChromaPipeline folder (transformer/, vae/, text_encoder/ (T5), tokenizer/, scheduler/), offline;
    with `transformer` given (a single file's), the folder's own transformer/ is not read; `single_files`
    {"vae" / "text_encoder": file} take those parts' weights from separate files (SPLIT_FILES). A folder that is not a
    ChromaPipeline's (Forge Neo's bundled Chroma configs call themselves a FluxPipeline and carry Flux.1 schnell's
    unshifted scheduler) gets the scheduler Chroma is sampled with (Flux.1 dev's dynamic shift, as tiny-chroma)."""
    require()
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel, T5TokenizerFast

    from .diffusers_folder import load_components

    parts = [("vae", AutoencoderKL), ("text_encoder", T5EncoderModel), ("tokenizer", T5TokenizerFast),
             ("scheduler", FlowMatchEulerDiscreteScheduler)]
    if transformer is None:
        parts.insert(0, ("transformer", ChromaTransformer2DModel))
    own = _pipeline_class(folder) in PIPELINES
    if not own:
        parts = [p for p in parts if p[0] != "scheduler"]
    c = load_components(folder, parts, "Chroma diffusers folder",
                        "transformer/, vae/, text_encoder/ (T5), tokenizer/ and scheduler/ with their weights",
                        single_files)
    if not own:
        from .flux import SCHEDULER_DEV

        c["scheduler"] = FlowMatchEulerDiscreteScheduler(**SCHEDULER_DEV)
    tr, tok = c["transformer"] if transformer is None else transformer, c["tokenizer"]
    extra = {"variant": "chroma"}
    small = int(tr.config.num_layers) < 8
    if small:  # a tiny test model saved as a folder keeps its short T5 length
        extra["t5_default_length"] = int(tok.model_max_length) if tok.model_max_length < 512 else TINY_T5_LENGTH
    return BaseModel(unet=tr, vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=tok,
                     noise_scheduler=c["scheduler"], kind="chroma", name=os.path.basename(os.path.normpath(folder)),
                     path=os.path.abspath(folder), native_resolution=TINY_RESOLUTION if small else 1024, extra=extra)


def _pipeline_class(folder: str) -> str:
    import json

    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
            return str(json.load(fh).get("_class_name", ""))
    except (OSError, ValueError):
        return ""
