"""Atomic file writes (temp name in the same folder + rename) and non-clobbering paths."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Dict, Iterator, Optional


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed over `path`."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(tensors: Dict, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_image(image, path: str, pnginfo=None) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)


def next_free_name(folder: str, stem: str, exists: Optional[Callable[[str], bool]] = None) -> str:
    """`stem`, else `stem_v2`, `stem_v3`, ... whichever has no `.safetensors` in `folder`."""
    exists = exists or (lambda s: os.path.exists(os.path.join(folder, s + ".safetensors")))
    if not exists(stem):
        return stem
    n = 2
    while exists(f"{stem}_v{n}"):
        n += 1
    return f"{stem}_v{n}"
