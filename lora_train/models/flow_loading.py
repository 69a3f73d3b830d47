"""Loading the flow-matching families (Flux.1, SD3 / SD3.5): tiny models, diffusers folders, single files.

`load_base_model(spec, files=...)` (models/loading.py) sends a spec here when it is a tiny flow model, a diffusers
folder whose model_index.json names a Flux / SD3 pipeline, or a .safetensors file whose keys are a Flux / SD3
transformer (see single-file loading below).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from .base import BaseModel, ModelError
from . import flux as flux_mod
from . import sd3 as sd3_mod

TINY_FLOW_SPECS = ("tiny-flux", "tiny-flux-schnell", "tiny-sd3")
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")


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
        return str(idx.get("_class_name", "")).startswith(("Flux", "StableDiffusion3"))
    if os.path.isfile(path) and path.lower().endswith(".safetensors"):
        from .flow_single_file import detect_family

        return detect_family(path) is not None
    return False


def load_flow_model(spec: str, files: Optional[Dict[str, str]] = None) -> BaseModel:
    """A tiny flow model, a Flux / SD3 diffusers folder, or single files (flow_single_file)."""
    if spec == "tiny-flux":
        return flux_mod.build_tiny_flux()
    if spec == "tiny-flux-schnell":
        return flux_mod.build_tiny_flux(schnell=True)
    if spec == "tiny-sd3":
        return sd3_mod.build_tiny_sd3()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        idx = _index(path) or {}
        cls = str(idx.get("_class_name", ""))
        if cls.startswith("Flux"):
            if cls not in FLUX_PIPELINES:
                raise ModelError(f"'{spec}' is a {cls} folder (a Flux variant with other inputs); this trainer "
                                 f"trains Flux.1 dev / schnell base models: use a FluxPipeline folder.")
            return flux_mod.load_flux_folder(path)
        if cls not in SD3_PIPELINES:
            raise ModelError(f"'{spec}' is a {cls} folder; use a StableDiffusion3Pipeline folder (SD3 Medium, "
                             f"SD3.5 Medium / Large).")
        return sd3_mod.load_sd3_folder(path, idx)
    from .flow_single_file import load_flow_single_file

    return load_flow_single_file(path, files or {})


#: family -> the writer of its tiny model's diffusers pipeline folder
TINY_FOLDER_WRITERS = {"flux": flux_mod.save_flux_folder, "sd3": sd3_mod.save_sd3_folder}


def save_tiny_flow_folder(spec: str, folder: str) -> str:
    """Write `tiny-flux`, `tiny-flux-schnell` or `tiny-sd3` as its diffusers pipeline folder."""
    model = load_flow_model(spec)
    return TINY_FOLDER_WRITERS[model.kind](model, folder)
