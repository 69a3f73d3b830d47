"""`load_base_model(spec)`: a tiny demo model, a diffusers folder or a single-file checkpoint."""
from __future__ import annotations

import os
from typing import Dict, Optional

from ..family import TINY_FAMILIES
from .base import BaseModel, ModelError
from .diffusers_folder import load_diffusers_folder
from .single_file import load_single_file
from . import tiny as tiny_variants
from .tiny import build_tiny
from . import flow_loading
from .tiny_pixel import build_tiny_pixel


TINY_SPECS = tuple(TINY_FAMILIES)  # lora_train/family.py: the tiny demo models and their families


def load_base_model(spec: str, prediction_type: str = "auto", allow_pickle: bool = False,
                    files: Optional[Dict[str, str]] = None) -> BaseModel:
    """`tiny`, `tiny-v` (v-prediction), `tiny-sd2` (v) / `tiny-sd2-eps`, `tiny-sdxl` (demo models), a diffusers
    folder (SD1.x / SD2.x / SDXL base), or a single-file checkpoint (.safetensors; .ckpt/.pt pickles only with
    allow_pickle=True, then loaded with torch.load(weights_only=True)). Flux / SD3: `tiny-flux`, `tiny-flux-schnell`,
    `tiny-sd3`, their diffusers folders and single files; `files` names the separate component files
    ({"ae", "clip_l", "clip_g", "t5xxl", "components_folder"}: models/flow_loading.py)."""
    spec = (spec or "").strip()
    if spec in flow_loading.TINY_FLOW_SPECS or flow_loading.is_flow_spec(spec):  # Flux / SD3 (flow matching)
        return flow_loading.load_flow_model(spec, files)
    if spec in TINY_SPECS:
        if spec == "tiny-sdxl":
            model = tiny_variants.build_tiny_sdxl()
        elif spec == "tiny-pixel":  # the demo's model: pixels-as-latents VAE (models/pixel_vae.py)
            model = build_tiny_pixel()
        elif spec.startswith("tiny-sd2"):
            model = tiny_variants.build_tiny_sd2(v_prediction=spec == "tiny-sd2")
        else:
            model = build_tiny("v_prediction" if spec == "tiny-v" else "epsilon")
        if prediction_type not in ("auto", model.prediction_type):
            model.noise_scheduler.register_to_config(prediction_type=prediction_type)
        return model
    if not spec:
        raise ModelError("base_model is empty: set it to 'tiny' (demo) or a diffusers model folder.")
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise ModelError(f"base_model '{spec}' does not exist: give 'tiny', or the path of a diffusers folder "
                         f"(with model_index.json).")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelError(f"'{spec}' is a folder without model_index.json, so not a diffusers model. Point "
                             f"base_model at the folder that holds model_index.json.")
        model = load_diffusers_folder(path)
    else:
        model = load_single_file(path, allow_pickle=allow_pickle, prediction_type=prediction_type)
    if prediction_type != "auto" and prediction_type != model.prediction_type:
        model.noise_scheduler.register_to_config(prediction_type=prediction_type)
    return model
