"""Loading the flow-matching families (Flux.1, SD3 / SD3.5, Qwen-Image, Z-Image): tiny models, diffusers folders, single files.

`load_base_model(spec, files=...)` (models/loading.py) sends a spec here when it is a tiny flow model, a diffusers
folder whose model_index.json names a Flux / SD3 pipeline, or a .safetensors file whose keys are a Flux / SD3
transformer (see single-file loading below).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from .. import families
from .base import BaseModel, ModelError
from . import chroma as chroma_mod
from . import flux as flux_mod
from . import flux2 as flux2_mod
from . import qwen_image as qwen_mod
from . import sd3 as sd3_mod
from . import wan as wan_mod
from . import z_image as z_mod

#: tiny flow models by spec
TINY_BUILDERS = {"tiny-flux": flux_mod.build_tiny_flux, "tiny-flux-schnell": lambda: flux_mod.build_tiny_flux(True),
                 "tiny-sd3": sd3_mod.build_tiny_sd3, "tiny-qwen-image": qwen_mod.build_tiny_qwen_image,
                 "tiny-z-image": z_mod.build_tiny_z_image, "tiny-chroma": chroma_mod.build_tiny_chroma,
                 "tiny-wan": wan_mod.build_tiny_wan, "tiny-wan-a14b": wan_mod.build_tiny_wan_a14b,
                 "tiny-flux2-klein": flux2_mod.build_tiny_flux2_klein,
                 "tiny-flux2-dev": flux2_mod.build_tiny_flux2_dev}
TINY_FLOW_SPECS = tuple(TINY_BUILDERS)  # = families.TINY_FLOW_SPECS (a test holds them equal)
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
#: the pipeline classes of the flow families' folders start with these (families: pipeline_prefixes)
PIPELINE_PREFIXES = tuple(p for k in families.FLOW for p in families.get(k).pipeline_prefixes)
#: a diffusers folder's pipeline class (model_index.json) -> its loader
FOLDER_LOADERS = dict({c: flux_mod.load_flux_folder for c in FLUX_PIPELINES},
                      **{c: qwen_mod.load_qwen_image_folder for c in qwen_mod.PIPELINES},
                      **{c: z_mod.load_z_image_folder for c in z_mod.PIPELINES},
                      **{c: chroma_mod.load_chroma_folder for c in chroma_mod.PIPELINES},
                      **{c: wan_mod.load_wan_folder for c in wan_mod.PIPELINES},
                      **{c: flux2_mod.load_flux2_folder for c in flux2_mod.PIPELINES})


def _index(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def is_flow_spec(spec: str) -> bool:
    """A diffusers Flux / SD3 folder, or a single file holding a Flux / SD3 transformer."""
    path = os.path.expanduser(spec or "")
    if os.path.isdir(path):
        idx = _index(path) or {}
        return str(idx.get("_class_name", "")).startswith(PIPELINE_PREFIXES)
    if os.path.isfile(path) and path.lower().endswith(".safetensors"):
        from .flow_single_file import detect_family

        return detect_family(path) is not None
    return False


def load_flow_model(spec: str, files: Optional[Dict[str, str]] = None) -> BaseModel:
    """A tiny flow model, a diffusers folder of a flow family, or single files (flow_single_file)."""
    if spec in TINY_BUILDERS:
        return TINY_BUILDERS[spec]()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        idx = _index(path) or {}
        cls = str(idx.get("_class_name", ""))
        if cls in FOLDER_LOADERS:
            return FOLDER_LOADERS[cls](path)
        if cls in SD3_PIPELINES:
            return sd3_mod.load_sd3_folder(path, idx)
        fam = families.get(families.by_pipeline_class(cls) or "sd3")
        raise ModelError(f"'{spec}' is a {cls} folder (a {fam.title} variant with other inputs); this trainer "
                         f"trains the text-to-image models: use a {fam.pipeline_class} folder.")
    from .flow_single_file import load_flow_single_file

    return load_flow_single_file(path, files or {})


#: family -> the writer of its tiny model's diffusers pipeline folder
TINY_FOLDER_WRITERS = {"flux": flux_mod.save_flux_folder, "sd3": sd3_mod.save_sd3_folder,
                       "qwen_image": qwen_mod.save_qwen_image_folder, "z_image": z_mod.save_z_image_folder,
                       "chroma": chroma_mod.save_chroma_folder, "wan": wan_mod.save_wan_folder,
                       "flux2": flux2_mod.save_flux2_folder}


def save_tiny_flow_folder(spec: str, folder: str) -> str:
    """Write a tiny flow model (TINY_FLOW_SPECS) as its diffusers pipeline folder."""
    model = load_flow_model(spec)
    return TINY_FOLDER_WRITERS[model.kind](model, folder)
