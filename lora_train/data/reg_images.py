"""Regularization images (kohya `reg_data_dir`, `prior_loss_weight`), balanced as sd-scripts' DreamBoothDataset does.

The reg folder is read like a training folder (kohya `N_class` subfolders; an image without a caption file gets its
folder's class as caption). Balancing: with N = the number of training samples per epoch (images x repeats), the
reg images are registered in order with their own repeats until N is reached (so only as many reg images as
needed are used), then their repeats grow by one at a time, round robin, until the reg samples reach N. Each reg
sample's loss is multiplied by prior_loss_weight (the Trainer passes per-sample weights to the loss).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from .dataset import ImageDataset, Item, load_dataset


def balance(train_count: int, reg: List[Item]) -> List[Item]:
    """The reg items used, with their repeats set as kohya sets them (module docstring)."""
    if not reg or train_count <= 0:
        return []
    used: List[Item] = []
    n, first = 0, True
    while n < train_count:
        for it in reg:
            if first:
                used.append(it)
                n += it.repeats
            else:
                it.repeats += 1
                n += 1
            if n >= train_count:
                break
        first = False
    return used


def add_reg_images(ds: ImageDataset, reg_dir: str, resolution: int, caption_extension: str) -> Dict[str, Any]:
    """Load `reg_dir`, mark its items is_reg, balance them against ds and append them to ds.items.

    Returns {"n_images", "n_samples", "dirs": {class: {"n_repeats", "img_count"}}} for the metadata."""
    train_count = sum(it.repeats for it in ds.items if not it.is_reg)
    reg = load_dataset(reg_dir, resolution, "", caption_extension)
    for w in reg.warnings:
        ds.warnings.append(f"reg images: {w}")
    for it in reg.items:
        it.is_reg = True
    used = balance(train_count, reg.items)
    if len(used) < len(reg.items):
        ds.warnings.append(f"reg images: {len(used)} of the {len(reg.items)} reg images are used: as kohya does, only "
                           f"as many as there are training samples per epoch ({train_count}).")
    dirs: Dict[str, Dict[str, int]] = {}
    for it in used:
        d = dirs.setdefault(it.folder_name or os.path.basename(reg.root), {"n_repeats": 0, "img_count": 0})
        d["img_count"] += 1
        d["n_repeats"] = max(d["n_repeats"], it.repeats)
    ds.items.extend(used)
    return {"n_images": len(used), "n_samples": sum(it.repeats for it in used), "dirs": dirs}
