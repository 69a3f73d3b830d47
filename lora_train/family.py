"""Which model family a base model is, in one place: every front door's family list is FAMILIES, and `family_of`
tells a base-model spec's family without loading weights (a tiny demo spec, a diffusers folder's
model_index.json / UNet config, a .safetensors header's keys, else the file name's words)."""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Tuple

from . import families

FAMILIES = families.NAMES
#: the tiny demo models (models/loading.py builds them) and their families
TINY_FAMILIES = families.TINY_SPECS


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
    """The family a checkpoint's file name suggests (flux, sd3, qwen-image, xl / pony / illustrious, v2 / 768), or
    None (each family's `name_pattern`)."""
    n = os.path.basename(str(name or "")).lower()
    for fam in families.DETECT_ORDER:
        pattern = families.get(fam).name_pattern
        if pattern and re.search(pattern, n):
            return fam
    return None


def _tiny(spec: str) -> Optional[str]:
    return TINY_FAMILIES.get(spec)


def _of_folder(path: str) -> Tuple[str, str]:
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as fh:
        idx = json.load(fh)
    cls = str(idx.get("_class_name", ""))
    fam = families.by_pipeline_class(cls)
    if fam:
        return fam, f"model_index.json names {cls}"
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
    """The flow family of a transformer's state-dict keys (kohya / BFL / SAI / ComfyUI layouts), else None."""
    keys = list(keys)
    return next((f for f in families.FLOW if families.get(f).detect_keys(keys)), None)


def _of_file(path: str) -> Optional[Tuple[str, str]]:
    """From the file's header only (safetensors lists the keys without reading a tensor)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as fh:
            keys = list(fh.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file, unreadable: the family is told when it loads
        return None
    for fam in families.DETECT_ORDER:
        if families.get(fam).detect_keys(keys):
            return fam, families.get(fam).keys_reason
    return None
