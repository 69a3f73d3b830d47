"""diffusers model folders (model_index.json): save and load, offline (`local_files_only=True`)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from .base import BaseModel, ModelError


def save_diffusers_folder(model: BaseModel, folder: str) -> str:
    """Write the bundle as a diffusers StableDiffusionPipeline folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------- loading
def index_has(index: dict, key: str) -> bool:
    """model_index.json lists a component (diffusers writes [null, null] for an absent one)."""
    v = index.get(key)
    return bool(v) and not (isinstance(v, (list, tuple)) and all(x is None for x in v))


def load_components(folder: str, parts: Sequence[Tuple[str, Any]], what: str, needs: str,
                    single_files: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """{subfolder: loaded} for [(subfolder, class with from_pretrained)] of a diffusers folder, offline; models come
    back in eval mode and frozen. A ModelError says what the folder (`what`) `needs` when one does not load.
    `single_files` {subfolder: a .safetensors file}: those parts take the file's weights over the folder's
    <subfolder>/config.json (models/split_parts.py: ComfyUI's and Forge Neo's separate VAE / text encoder files)."""
    out: Dict[str, Any] = {}
    single_files = {k: v for k, v in (single_files or {}).items() if v}
    try:
        for sub, cls in parts:
            if sub in single_files:
                from .file_weights import read_file
                from .split_parts import load_part

                path = single_files[sub]
                out[sub] = load_part(cls, folder, sub, read_file(path, sub.replace("_", " ")),
                                     f"the {sub.replace('_', ' ')} file '{os.path.basename(path)}'")
            else:
                out[sub] = cls.from_pretrained(folder, subfolder=sub, local_files_only=True)
    except ModelError:
        raise  # a separate file that does not fit: its message names it
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the {what} '{folder}': {exc}. It needs {needs}.") from exc
    for m in out.values():
        if hasattr(m, "requires_grad_"):
            m.eval().requires_grad_(False)
    return out


def load_diffusers_folder(folder: str) -> BaseModel:
    """An SD1.x / SD2.x (StableDiffusionPipeline) or SDXL base (StableDiffusionXLPipeline) diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    cls_name = index.get("_class_name", "")
    supported = "Use an SD1.x, SD2.x or SDXL base diffusers folder."
    if index_has(index, "transformer") or not index_has(index, "unet"):
        raise ModelError(f"'{folder}' is a {cls_name or 'non-UNet'} folder (a transformer model, not a Stable "
                         f"Diffusion UNet); this version trains SD1.x, SD2.x and SDXL. {supported}")
    xl = index_has(index, "text_encoder_2")
    if xl and not index_has(index, "text_encoder"):
        raise ModelError(f"'{folder}' is the SDXL refiner (no first text encoder); train on an SDXL base model. "
                         f"{supported}")
    if "Inpaint" in cls_name:
        raise ModelError(f"'{folder}' is an inpainting model; train on the regular checkpoint. {supported}")
    parts = [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
             ("tokenizer", CLIPTokenizer), ("scheduler", DDPMScheduler)]
    if xl:
        parts += [("text_encoder_2", CLIPTextModelWithProjection), ("tokenizer_2", CLIPTokenizer)]
    subs = "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/" if xl else "text_encoder/, tokenizer/"
    c = load_components(folder, parts, "diffusers folder", f"unet/, vae/, {subs} and scheduler/ subfolders with "
                                                          f"their weights")
    unet, vae, text_encoder, sched = c["unet"], c["vae"], c["text_encoder"], c["scheduler"]
    tokenizer, te2, tok2 = c["tokenizer"], c.get("text_encoder_2"), c.get("tokenizer_2")
    if int(unet.config.in_channels) != 4:
        raise ModelError(f"'{folder}' has a UNet with {unet.config.in_channels} input channels (inpainting or "
                         f"another special model). {supported}")
    if xl:
        kind = "sdxl"
    else:  # SD2's OpenCLIP-H: 1024 wide, gelu (CLIP-L of SD1: 768, quick_gelu)
        te_cfg = text_encoder.config
        kind = "sd2" if te_cfg.hidden_size == 1024 or getattr(te_cfg, "hidden_act", "") == "gelu" else "sd1"
    native = int(unet.config.sample_size) * (2 ** (len(vae.config.block_out_channels) - 1))
    name = os.path.basename(os.path.normpath(folder))
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=sched,
                     kind=kind, name=name, path=os.path.abspath(folder), native_resolution=native,
                     text_encoder_2=te2, tokenizer_2=tok2)
