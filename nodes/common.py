"""What the ComfyUI node groups share: the config's defaults and choices, name and folder helpers."""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Sequence

from lora_train.config import PRECISIONS, TrainConfig


log = logging.getLogger("lora_train.comfyui")

CAPTION_BACKENDS = ("template", "transformers", "vlm", "wd14")  # lora_train.captions.BACKENDS minus the WebUI-only "host"
CAPTION_MODES = ("skip", "overwrite", "append")            # lora_train.captions.MODES
PRECISION_CHOICES = tuple(PRECISIONS)  # "auto" first: bf16 / fp16 on CUDA, fp32 on the CPU
#: every front door starts from the config's defaults (the advisor's starting point)
DEFAULTS = TrainConfig().validate()
INT_MAX = 0xFFFFFFFF


# ============================================================================= helpers
def folder_fingerprint(folder: str) -> str:
    """Changes when any file under `folder` is added, removed, renamed, resized or touched (IS_CHANGED)."""
    folder = os.path.abspath(os.path.expanduser(str(folder or "")))
    if not os.path.isdir(folder):
        return f"missing:{folder}"
    h = hashlib.sha256(folder.encode())
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for n in sorted(files):
            p = os.path.join(root, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            h.update(f"{os.path.relpath(p, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _values_hash(**kw: Any) -> str:
    return hashlib.sha256(repr(sorted((k, repr(v)) for k, v in kw.items())).encode()).hexdigest()


def clean_lora_name(name: str) -> str:
    """A file stem for a new LoRA from the node's text (lora_train.names.clean_name); empty is an error."""
    from lora_train.names import clean_name

    stem = clean_name(name, default="")
    if not stem:
        raise ValueError("lora_name is empty: type a name for the new LoRA file, e.g. my_style.")
    return stem


def lora_stem(name: str) -> str:
    """'sub/x.safetensors' (as ComfyUI lists it) -> 'x' (as written in <lora:x:1> tags)."""
    base = os.path.basename(str(name or "").strip().replace("\\", "/"))
    return base[: -len(".safetensors")] if base.lower().endswith(".safetensors") else base


def _contact_sheet(paths: Sequence[str], size: int = 128, cols: int = 4):
    from PIL import Image, ImageOps

    from lora_train.data.dataset import load_image

    thumbs = []
    for p in list(paths)[: cols * 2]:
        try:
            im = load_image(p, draft_size=(size, size))
            thumbs.append(ImageOps.fit(im, (size, size)))
        except Exception:  # noqa: BLE001 - a preview never fails the node
            continue
    if not thumbs:
        return None
    rows = (len(thumbs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size, rows * size), "white")
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * size, (i // cols) * size))
    return sheet
