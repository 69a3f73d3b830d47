"""Image folders with captions: .txt sidecars, metadata.csv / metadata.jsonl, kohya `N_name` repeats."""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_RE = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The dataset cannot be used; the message says which path and what to do."""


@dataclass
class Item:
    path: str
    caption: str
    repeats: int = 1
    folder_name: str = ""
    caption_source: str = "txt"  # txt | metadata | fallback


@dataclass
class ImageDataset:
    root: str
    items: List[Item]
    resolution: int
    trigger_word: str = ""
    warnings: List[str] = field(default_factory=list)

    # ---------------------------------------------------------------- views
    @property
    def image_count(self) -> int:
        return len(self.items)

    def expanded(self) -> List[int]:
        """Item indices with kohya repeats applied (one entry per image per repeat)."""
        out: List[int] = []
        for i, it in enumerate(self.items):
            out.extend([i] * it.repeats)
        return out

    def __len__(self) -> int:
        return len(self.expanded())

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        """kohya `ss_tag_frequency`: {folder: {tag: count}} with comma-separated tags."""
        freq: Dict[str, Counter] = {}
        for it in self.items:
            c = freq.setdefault(it.folder_name or os.path.basename(self.root), Counter())
            for tag in split_tags(it.caption):
                c[tag] += 1
        return {k: dict(v) for k, v in freq.items()}

    def load_pixels(self, index: int) -> torch.Tensor:
        """CHW float tensor in [-1, 1], resized and centre-cropped to `resolution`."""
        im = load_image(self.items[index].path)
        im = resize_center_crop(im, self.resolution)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def split_tags(caption: str) -> List[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def load_image(path: str) -> Image.Image:
    """Open an image, apply EXIF orientation, composite alpha on white, return RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _read_caption(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    text = " ".join(text.split())
    return text or None


def _with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    if trigger.lower() in [t.lower() for t in split_tags(caption)] or caption.lower().startswith(trigger.lower()):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _read_metadata(folder: str) -> Optional[Dict[str, str]]:
    csv_path, jsonl_path = os.path.join(folder, "metadata.csv"), os.path.join(folder, "metadata.jsonl")
    rows: Dict[str, str] = {}
    if os.path.isfile(csv_path):
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file_name" not in reader.fieldnames or "text" not in reader.fieldnames:
                raise DatasetError(f"{csv_path}: needs the columns file_name,text (found "
                                   f"{','.join(reader.fieldnames or [])}). Fix the header line.")
            for row in reader:
                if row.get("file_name"):
                    rows[row["file_name"]] = row.get("text") or ""
        return rows
    if os.path.isfile(jsonl_path):
        with open(jsonl_path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{jsonl_path}, line {n}: not valid JSON ({exc}).") from exc
                if "file_name" not in row:
                    raise DatasetError(f"{jsonl_path}, line {n}: needs a 'file_name' field.")
                rows[row["file_name"]] = row.get("text") or ""
        return rows
    return None


def _scan_folder(folder: str, repeats: int, folder_name: str, caption_ext: str, trigger: str,
                 items: List[Item], missing: List[str]) -> None:
    meta = _read_metadata(folder)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.splitext(name)[1].lower() not in IMAGE_EXTS:
            continue
        caption = None
        source = "txt"
        if meta is not None and name in meta:
            caption, source = " ".join(meta[name].split()) or None, "metadata"
        if caption is None:
            caption = _read_caption(os.path.splitext(path)[0] + caption_ext)
            source = "txt"
        if caption is None:
            missing.append(path)
            caption, source = (trigger or folder_name), "fallback"
        items.append(Item(path=path, caption=_with_trigger(caption, trigger), repeats=repeats,
                          folder_name=folder_name, caption_source=source))


def load_dataset(root: str, resolution: int = 512, trigger_word: str = "", caption_extension: str = ".txt"
                 ) -> ImageDataset:
    if not root:
        raise DatasetError("train_data_dir is empty: set it to the folder that holds your images.")
    if not os.path.exists(root):
        raise DatasetError(f"dataset folder '{root}' does not exist: check the path (train_data_dir).")
    if not os.path.isdir(root):
        raise DatasetError(f"'{root}' is a file, not a folder: set train_data_dir to the folder that holds "
                           f"the images.")
    root = os.path.abspath(root)
    items: List[Item] = []
    missing: List[str] = []
    base_name = os.path.basename(root)
    _scan_folder(root, 1, base_name, caption_extension, trigger_word, items, missing)
    for sub in sorted(os.listdir(root)):
        full = os.path.join(root, sub)
        m = _REPEAT_RE.match(sub)
        if os.path.isdir(full) and m:
            _scan_folder(full, max(1, int(m.group(1))), m.group(2), caption_extension, trigger_word, items, missing)
    if not items:
        raise DatasetError(f"no images found in '{root}' (looked for {', '.join(IMAGE_EXTS)} in the folder and in "
                           f"kohya-style N_name subfolders). Put your images there.")
    ds = ImageDataset(root=root, items=items, resolution=resolution, trigger_word=trigger_word)
    if missing:
        shown = ", ".join(os.path.relpath(p, root) for p in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        msg = (f"{len(missing)} image(s) have no caption and use '{trigger_word or 'the folder name'}' instead: "
               f"{shown}{more}. Add {caption_extension} files (or run `python -m lora_train caption`).")
        ds.warnings.append(msg)
        log.warning(msg)
    return ds
