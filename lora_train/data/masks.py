"""Loss masks (kohya `masked_loss`): the image's alpha channel (`alpha_mask`) or a same-name grayscale image in
`mask_dir` (kohya's conditioning_data_dir), white = trained, black = not trained.

A mask goes through the item's own resize + crop (its bucket or the square resolution, as its pixels do), then is
averaged down to the latent size (area interpolation, as sd-scripts' apply_masked_loss); the loss of each latent
pixel is multiplied by it, so a fully black region gives no gradient. Reg images and images without a mask file
are trained everywhere (mask of ones).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .dataset import ImageDataset, resize_crop
from .folder import IMAGE_EXTS


def _mask_file(mask_dir: str, image_path: str) -> Optional[str]:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
        p = os.path.join(mask_dir, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def _open_oriented(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        try:
            return ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF: as the pixels (dataset._exif_transpose)
            return im.copy()


def pixel_mask(ds: ImageDataset, index: int, alpha_mask: bool, mask_dir: str) -> Optional[Image.Image]:
    """The item's mask as an 8-bit grayscale image at the file's size, or None (train everywhere)."""
    it = ds.items[index]
    if it.is_reg:
        return None
    if mask_dir:
        p = _mask_file(mask_dir, it.path)
        if p is None:
            return None
        return _open_oriented(p).convert("L")
    if alpha_mask:
        im = _open_oriented(it.path)
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            return im.convert("RGBA").getchannel("A")
    return None


def latent_mask(ds: ImageDataset, index: int, latent_hw: Tuple[int, int], alpha_mask: bool,
                mask_dir: str) -> Optional[torch.Tensor]:
    """(1, h, w) float mask in [0, 1] at latent size, through the item's resize + crop; None = all ones."""
    m = pixel_mask(ds, index, alpha_mask, mask_dir)
    if m is None:
        return None
    t = ds.transform(index)
    if m.size != t.original_size:  # a mask file of another size: stretched onto the image first
        m = m.resize(t.original_size, Image.BILINEAR)
    m = resize_crop(m, t)
    arr = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(arr, size=tuple(latent_hw), mode="area")[0]


def build(ds: ImageDataset, latent_shapes: Sequence[Tuple[int, ...]], alpha_mask: bool,
          mask_dir: str) -> Tuple[List[Optional[torch.Tensor]], List[str]]:
    """Masks of every item (None = no mask) and the warnings (training images without a mask)."""
    masks, missing = [], []
    for i, shape in enumerate(latent_shapes):
        mk = latent_mask(ds, i, tuple(shape[-2:]), alpha_mask, mask_dir)
        masks.append(mk)
        if mk is None and not ds.items[i].is_reg:
            missing.append(os.path.basename(ds.items[i].path))
    notes = []
    if missing:
        src = f"a same-name mask in '{mask_dir}'" if mask_dir else "an alpha channel"
        notes.append(f"masked_loss: {len(missing)} training image(s) have no {src} and are trained everywhere: "
                     f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}.")
    return masks, notes


def batch_masks(masks: List[Optional[torch.Tensor]], idx: Sequence[int], flips: Sequence[bool],
                shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """(B, 1, h, w) masks of a batch (ones where an item has none; mirrored where the sample is), or None when no
    item of the batch has a mask."""
    if not any(masks[i] is not None for i in idx):
        return None
    out = []
    for i, f in zip(idx, flips):
        m = masks[i] if masks[i] is not None else torch.ones((1,) + tuple(shape[-2:]))
        out.append(torch.flip(m, dims=[-1]) if f else m)
    return torch.stack(out)
