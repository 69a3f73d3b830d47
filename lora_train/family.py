"""Which model family a base model is, in one place: every front door's family list is FAMILIES, and `family_of`
tells a base-model spec's family without loading weights (a tiny demo spec, a diffusers folder's
model_index.json / UNet config, a .safetensors header's keys, else the file name's words)."""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Tuple

FAMILIES = ("sd1", "sd2", "sdxl", "flux", "sd3")
#: the tiny demo models (models/loading.py builds them) and their families
TINY_FAMILIES = {"tiny": "sd1", "tiny-v": "sd1", "tiny-pixel": "sd1", "tiny-sd2": "sd2", "tiny-sd2-eps": "sd2",
                 "tiny-sdxl": "sdxl", "tiny-flux": "flux", "tiny-flux-schnell": "flux", "tiny-sd3": "sd3"}


def family_of(spec: Optional[str]) -> Tuple[str, str]:
    """(family, how it was told) for a base-model spec; unknown specs are assumed SD1.x, and the reason says so."""
    s = os.path.expanduser(str(spec or "").strip())
    told = told_by_spec(s)
    if told:
        return told
    by_name = family_of_name(s)
    if by_name:
        return by_name, f"the name '{os.path.basename(s)}' reads as {by_name}"
    return "sd1", "not recognised without loading it: assumed SD1.x (set the family)"


def told_by_spec(spec: Optional[str]) -> Optional[Tuple[str, str]]:
    """(family, how) when the spec itself tells it: a tiny demo spec, a diffusers folder, a .safetensors header;
    None otherwise (a name, a missing or unreadable file)."""
    s = os.path.expanduser(str(spec or "").strip())
    tiny = _tiny(s)
    if tiny:
        return tiny, f"the tiny demo model '{s}'"
    if os.path.isdir(s) and os.path.isfile(os.path.join(s, "model_index.json")):
        return _of_folder(s)
    if os.path.isfile(s) and s.lower().endswith((".safetensors", ".sft")):
        return _of_file(s)
    return None


def family_of_name(name: str) -> Optional[str]:
    """The family a checkpoint's file name suggests (flux, sd3, xl / pony / illustrious, v2 / 768), or None."""
    n = os.path.basename(str(name or "")).lower()
    if "flux" in n:
        return "flux"
    if re.search(r"(^|[^a-z])sd_?3", n):
        return "sd3"
    if "xl" in n or "pony" in n or "illustrious" in n:
        return "sdxl"
    if re.search(r"(^|[^0-9])(v?2[-_.]?[01]|768)([^0-9]|$)", n):
        return "sd2"
    return None


def _tiny(spec: str) -> Optional[str]:
    return TINY_FAMILIES.get(spec)


def _of_folder(path: str) -> Tuple[str, str]:
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as fh:
        idx = json.load(fh)
    cls = str(idx.get("_class_name", ""))
    if cls.startswith("Flux"):
        return "flux", f"model_index.json names {cls}"
    if cls.startswith("StableDiffusion3"):
        return "sd3", f"model_index.json names {cls}"
    if "text_encoder_2" in idx or "XL" in cls:
        return "sdxl", "model_index.json has two text encoders"
    try:
        with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as fh:
            if json.load(fh).get("cross_attention_dim") == 1024:
                return "sd2", "the UNet's cross-attention width is 1024 (OpenCLIP-H)"
    except OSError:
        pass
    return "sd1", "a diffusers SD folder with one text encoder"


def family_of_keys(keys) -> Optional[str]:
    """"flux" / "sd3" for a transformer's state-dict keys (kohya / BFL / SAI layouts), else None."""
    keys = list(keys)
    if any("double_blocks." in k for k in keys) and any("single_blocks." in k for k in keys):
        return "flux"
    if any("joint_blocks." in k for k in keys):
        return "sd3"
    return None


def _of_file(path: str) -> Optional[Tuple[str, str]]:
    """From the file's header only (safetensors lists the keys without reading a tensor)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as fh:
            keys = list(fh.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file, unreadable: the family is told when it loads
        return None
    flow = family_of_keys(keys)
    if flow:
        return flow, f"the file's keys are {'Flux' if flow == 'flux' else 'SD3'}'s transformer blocks"
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl", "the checkpoint has SDXL's second text encoder"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2", "the checkpoint has an OpenCLIP text encoder"
    if any(k.startswith("cond_stage_model.transformer.") or k.startswith("model.diffusion_model.") for k in keys):
        return "sd1", "the checkpoint has a CLIP-L text encoder"
    return None
