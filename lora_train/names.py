"""The names of LoRAs and their files, in one place: what a LoRA name may be (`check_name` refuses, `clean_name`
makes one from any text), the epoch and step files a run writes (`epoch_file`, `step_file`, kohya's layout) and
how they are read back (`epoch_of`, `split_epoch`, `is_epoch_file`)."""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

from .config import DEFAULT_NAME

#: a LoRA name: a file stem that every host and OS takes, and that reads back from `<lora:name:w>`
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
EXT = ".safetensors"
_EPOCH = re.compile(r"^(?P<stem>.+)-(?P<epoch>\d{6})$")


def check_name(name: str) -> str:
    """The name as given (trimmed) when it is a usable LoRA name, else ValueError that says what to use."""
    stem = str(name or "").strip()
    if not NAME_RE.fullmatch(stem):
        raise ValueError(f"LoRA name '{stem}' is not valid: use letters, digits, '_', '-' or '.' (starting with a "
                         f"letter or digit), no spaces or slashes, e.g. {clean_name(stem)}.")
    return stem


def clean_name(text: str, default: str = DEFAULT_NAME) -> str:
    """A usable LoRA name from any text (a folder, a typed name, 'sub/x.safetensors'): no folder or extension,
    other characters as '_'; `default` when nothing is left."""
    stem = os.path.basename(str(text or "").strip().replace("\\", "/"))
    if stem.lower().endswith(EXT):
        stem = stem[: -len(EXT)]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem or default


def epoch_file(stem: str, epoch: int) -> str:
    """kohya's epoch file name: `name-000004.safetensors`."""
    return f"{stem}-{int(epoch):06d}{EXT}"


def step_file(stem: str, step: int) -> str:
    """kohya's name for a file saved every N steps: `name-step00000500.safetensors`."""
    return f"{stem}-step{int(step):08d}{EXT}"


def split_epoch(name: str) -> Tuple[str, Optional[int]]:
    """'x-000004' or 'x-000004.safetensors' (a path too) -> ('x', 4); other names -> (name, None)."""
    base = os.path.basename(name)
    if base.endswith(EXT):
        base = base[: -len(EXT)]
    m = _EPOCH.match(base)
    return (m.group("stem"), int(m.group("epoch"))) if m else (base, None)


def epoch_of(path: str, stem: Optional[str] = None) -> Optional[int]:
    """The epoch of an epoch file (of `stem`, when given), None for any other name."""
    s, e = split_epoch(path)
    return e if e is not None and (stem is None or s == stem) else None


def is_epoch_file(name: str) -> bool:
    return split_epoch(name)[1] is not None
