"""Atomic file writes (temp name in the same folder + rename) and non-clobbering paths."""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import Callable, Dict, Iterator, Optional


def _create_temp(folder: str, base: str) -> str:
    """Create an empty, new temp file beside the target with mode 0o666 minus the umask (what a plain `open(path,
    "w")` gives: 0644 under umask 022), not mkstemp's 0600 -- LoRA files, configs and logs are for other programs
    (the WebUI, ComfyUI, a file server) too. O_EXCL keeps it race-free; the kernel applies the umask, so no
    process-wide `os.umask` flip is needed (that is not thread-safe)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temp file beside '{os.path.join(folder, base)}'")


def follow_umask(tree: str) -> None:
    """Give a folder written through private temp files (mkdtemp: 0700, safetensors: 0600) the modes plain writes
    would have: files 0o666 & ~umask, folders 0o777 & ~umask (read from a probe file, no `os.umask` flip)."""
    probe = _create_temp(tree, "mode")
    try:
        file_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.unlink(probe)
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r is allowed
    for root, dirs, files in os.walk(tree):
        os.chmod(root, dir_mode)
        for f in files:
            os.chmod(os.path.join(root, f), file_mode)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed over `path`. The file ends up with the
    mode a plain write would give (0o666 & ~umask), never mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    tmp = _create_temp(folder, base)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 & ~umask, as the kernel made it
    try:
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the temp file (safetensors: 0600)
            os.chmod(tmp, mode)
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


def atomic_copy(src: str, dest: str, overwrite: bool = False) -> str:
    """Copy `src` to `dest` via a temp file + rename in dest's folder (mode 0o666 & ~umask); an existing `dest` is
    kept (FileExistsError) unless `overwrite`, also when it appears while copying."""
    import shutil

    if not overwrite and os.path.exists(dest):
        raise FileExistsError(f"'{dest}' exists already and is not overwritten.")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        if not overwrite and os.path.exists(dest):
            raise FileExistsError(f"'{dest}' appeared while copying; it is kept and the copy is dropped.")
    return dest


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


def hf_cache_dir() -> str:
    """The local Hugging Face hub cache (HF_HUB_CACHE / HF_HOME as huggingface_hub reads them)."""
    try:
        from huggingface_hub import constants

        return getattr(constants, "HF_HUB_CACHE", None) or getattr(constants, "HUGGINGFACE_HUB_CACHE")
    except Exception:  # pragma: no cover - hub missing or very old
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")
