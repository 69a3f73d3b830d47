"""Image folders with captions: .txt sidecars, metadata.csv / metadata.jsonl, kohya `N_name` repeats.

The folder is listed by `lora_train.data.folder.scan_folder` (the one reader, shared with the caption table, so the
tab shows exactly the captions that are trained); this module validates the images and loads pixels.

Loading validates every image (opened and decoded once, in a few threads) so a bad file is skipped with a
message before training starts, never in the middle of it. Nothing in the user's folder is ever written.

Decisions for inputs that could go either way (each one is warned about, naming the files):
- caption not UTF-8: the caption is NOT used (no guessing of the encoding: a wrong guess would train
  garbage); the image gets the fallback caption (trigger word / folder name). UTF-8 with a BOM and UTF-16
  with a BOM (Windows Notepad "Unicode"), LE or BE, are decoded properly. Hidden files (`.name`) are not read.
- two images with one stem (a.png + a.jpg): both are kept and both use a.txt.
- animated GIF / WebP / PNG: the first frame is used.
- metadata rows that are malformed, name unknown files or leave the folder: the row is ignored, the image
  (if any) falls back to its .txt caption. A metadata header without file_name/text is an error.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings as _warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .buckets import BucketPlan, SampleTransform, assign_buckets, plan_resize, square_transform
from .folder import IMAGE_EXTS, FolderError, FolderScan, rel, scan_folder, split_tags

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 8  # one latent pixel; anything smaller has nothing to learn from
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
_FLIP_LR = getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT
_SHOW = 20  # files listed per warning


class DatasetError(ValueError):
    """The dataset cannot be used; the message says which path and what to do."""


@dataclass
class Item:
    path: str
    caption: str
    repeats: int = 1
    folder_name: str = ""
    caption_source: str = "txt"  # txt | metadata | fallback
    width: int = 0               # after EXIF orientation; 0 = not probed yet
    height: int = 0
    content_hash: str = ""       # sha256 of the file bytes; "" = not computed yet
    frames: int = 1
    is_reg: bool = False         # a regularization image (reg_data_dir; data/reg_images.py)


@dataclass
class ImageDataset:
    root: str
    items: List[Item]
    resolution: int
    trigger_word: str = ""
    warnings: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason) of image files not used
    bucket_plan: Optional[BucketPlan] = None

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
        return sum(it.repeats for it in self.items)

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        """kohya `ss_tag_frequency`: {folder: {tag: count}} with comma-separated tags."""
        freq: Dict[str, Counter] = {}
        for it in self.items:
            c = freq.setdefault(it.folder_name or os.path.basename(self.root), Counter())
            for tag in split_tags(it.caption):
                c[tag] += 1
        return {k: dict(v) for k, v in freq.items()}

    # ---------------------------------------------------------------- sizes, hashes, buckets
    def image_size(self, index: int) -> Tuple[int, int]:
        """(width, height) after EXIF orientation."""
        it = self.items[index]
        if not it.width or not it.height:
            it.width, it.height = probe_size(it.path)
        return it.width, it.height

    def content_hash(self, index: int) -> str:
        it = self.items[index]
        if not it.content_hash:
            it.content_hash = file_sha256(it.path)
        return it.content_hash

    def make_buckets(self, step: int = 64, min_res: Optional[int] = None, max_res: Optional[int] = None,
                     no_upscale: bool = False) -> BucketPlan:
        """Assign every item to an aspect-ratio bucket (kept in `bucket_plan`; `load_pixels(i)` then gives the
        bucket-sized crop). Area <= resolution^2, sides multiples of `step` in [min_res, max_res]."""
        sizes = [self.image_size(i) for i in range(len(self.items))]
        self.bucket_plan = assign_buckets(sizes, self.resolution, step=step, min_res=min_res, max_res=max_res,
                                          no_upscale=no_upscale)
        return self.bucket_plan

    def transform(self, index: int, size: Optional[Tuple[int, int]] = None) -> SampleTransform:
        """The resize + crop of item `index`: to `size` (w, h) if given, else its bucket, else the square
        `resolution`."""
        w, h = self.image_size(index)
        if size is not None:
            resized, crop = plan_resize(w, h, (int(size[0]), int(size[1])))
            return SampleTransform((w, h), resized, crop, (int(size[0]), int(size[1])))
        if self.bucket_plan is not None:
            return self.bucket_plan.transforms[index]
        return square_transform(w, h, self.resolution)

    def load_pixels(self, index: int, size: Optional[Tuple[int, int]] = None, flip: bool = False) -> torch.Tensor:
        """CHW float tensor in [-1, 1]: resized to cover and centre-cropped to `size` (w, h) if given, else to the
        item's bucket (after `make_buckets`), else to the square `resolution`. `flip` mirrors left-right."""
        t = self.transform(index, size)
        im = load_image(self.items[index].path, draft_size=t.resized_size)
        (ow, oh), (w, h) = t.original_size, im.size
        if abs(w * oh - h * ow) > 0.02 * ow * oh and (size is not None or self.bucket_plan is None):
            # the file changed since it was probed: plan again (a bucket's target size never changes)
            self.items[index].width, self.items[index].height = probe_size(self.items[index].path)
            t = self.transform(index, size)
        im = resize_crop(im, t)
        if flip:
            im = im.transpose(_FLIP_LR)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# -------------------------------------------------------------------- images
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _orientation_swaps(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # malformed EXIF: exif_transpose is skipped too
        return False


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not cost the image
        return im.copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), alpha / transparency composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64) / 257.0  # 16-bit PNG: 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: str, draft_size: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Open an image (first frame if animated), apply EXIF orientation, composite alpha on white, return RGB.

    `draft_size` (w, h, after orientation) lets a JPEG decode at a reduced DCT scale no smaller than that size.
    A file that cannot be decoded raises DatasetError naming it."""
    try:
        with Image.open(path) as im:
            if draft_size and im.format == "JPEG":
                dw, dh = draft_size
                if _orientation_swaps(im):
                    dw, dh = dh, dw
                if dw * 2 <= im.size[0] and dh * 2 <= im.size[1]:
                    im.draft(im.mode, (dw, dh))
            im.load()
            return _to_rgb(_exif_transpose(im))
    except DatasetError:
        raise
    except Exception as exc:  # OSError, SyntaxError, DecompressionBombError, ValueError ...
        raise DatasetError(f"{path}: cannot be read now ({type(exc).__name__}: {exc}). It was checked when the "
                           f"dataset was loaded: was it changed, moved or deleted during training? Restore it "
                           f"or remove it and start again.") from exc


def probe_size(path: str) -> Tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        return (h, w) if _orientation_swaps(im) else (w, h)


def resize_crop(im: Image.Image, t: SampleTransform) -> Image.Image:
    if im.size != t.resized_size:
        im = im.resize(t.resized_size, _LANCZOS)
    left, top = t.crop
    tw, th = t.target_size
    return im.crop((left, top, left + tw, top + th))


class _quiet_bomb_warning(_warnings.catch_warnings):
    """Images over Image.MAX_IMAGE_PIXELS are refused by our own check with a clear message; Pillow's
    DecompressionBombWarning would only repeat it. The global limit is never changed."""

    def __enter__(self):
        r = super().__enter__()
        _warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return r


@dataclass
class _Probe:
    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    sha: str = ""
    frames: int = 1


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)


def check_image(path: str, min_side: int = MIN_IMAGE_SIDE) -> _Probe:
    """Open and decode one image file; never raises. `reason` names what is wrong and what to do."""
    fix = "re-export or re-download it, or remove it from the folder"
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return _Probe(False, f"cannot be read ({exc.strerror or exc}): check that it exists and that you may read it")
    if not data:
        return _Probe(False, f"is an empty file (0 bytes): {fix}")
    sha = hashlib.sha256(data).hexdigest()
    limit = Image.MAX_IMAGE_PIXELS
    bomb = (f"is larger than Pillow's safety limit of {limit or 0:,} pixels (a decompression-bomb guard): "
            f"downscale it (e.g. to 4096 px on the long side) and save it again")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return _Probe(False, bomb)
    except UnidentifiedImageError:
        what = "is a text file, not an image" if _looks_like_text(data) else "is not an image Pillow can read"
        ext = os.path.splitext(path)[1]
        return _Probe(False, f"{what} (despite its {ext} name): {fix}")
    except Exception as exc:
        return _Probe(False, f"cannot be opened ({type(exc).__name__}: {exc}): {fix}")
    with im:
        w, h = im.size
        if limit and w * h > limit:
            return _Probe(False, bomb.replace("is larger", f"is {w}x{h} = {w * h:,} pixels, larger"))
        if _orientation_swaps(im):
            w, h = h, w
        if min(w, h) < min_side:
            return _Probe(False, f"is {w}x{h} px, too small: the minimum is {min_side} px on each side (use images "
                                 f"of at least a quarter of the training resolution), or remove it")
        frames = int(getattr(im, "n_frames", 1) or 1)
        try:
            if im.format == "JPEG":  # decode at 1/8 DCT scale: still reads every byte, catches truncation
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
            _to_rgb(_exif_transpose(im))
        except Exception as exc:
            msg = str(exc)
            kind = "is truncated" if "truncated" in msg.lower() else "is damaged"
            return _Probe(False, f"{kind} ({type(exc).__name__}: {msg}): {fix}")
    return _Probe(True, width=w, height=h, sha=sha, frames=frames)


# -------------------------------------------------------------------- captions
def _with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    if trigger.lower() in [t.lower() for t in split_tags(caption)] or caption.lower().startswith(trigger.lower()):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


# -------------------------------------------------------------------- scanning (lora_train.data.folder reads the folder)
@dataclass
class _Cand:
    path: str
    caption: Optional[str]
    source: str
    repeats: int
    folder_name: str
    caption_problem: str = ""    # caption file present but unusable
    caption_file: str = ""


def _cands(scan: FolderScan) -> List[_Cand]:
    return [_Cand(path=r.path, caption=r.caption, source="metadata" if r.source == "metadata" else "txt",
                  repeats=r.repeats, folder_name=r.folder_name, caption_problem=r.problem,
                  caption_file=r.caption_file if r.source != "metadata" else "") for r in scan.rows]


def _listing(paths: Sequence[str], more_hint: str = "") -> str:
    shown = ", ".join(paths[:_SHOW])
    if len(paths) > _SHOW:
        shown += f" and {len(paths) - _SHOW} more{more_hint}"
    return shown


def _validate(cands: List[_Cand], min_side: int) -> List[_Probe]:
    if not cands:
        return []
    workers = max(1, min(8, os.cpu_count() or 1, len(cands)))
    with _quiet_bomb_warning():
        if workers == 1:
            return [check_image(c.path, min_side) for c in cands]
        with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow decodes without the GIL
            return list(pool.map(lambda c: check_image(c.path, min_side), cands))


def load_dataset(root: str, resolution: int = 512, trigger_word: str = "", caption_extension: str = ".txt",
                 min_image_side: int = MIN_IMAGE_SIDE) -> ImageDataset:
    """Read `root` (and its kohya `N_name` subfolders), check every image, and return the usable ones.

    Unusable files are skipped and listed in `.skipped` and one summary in `.warnings`; DatasetError only when
    the folder itself is wrong or no usable image remains."""
    if not root:
        raise DatasetError("train_data_dir is empty: set it to the folder that holds your images.")
    if not os.path.exists(root):
        if os.path.islink(root):
            raise DatasetError(f"dataset folder '{root}' is a broken or looping symbolic link: point "
                               f"train_data_dir at the real folder.")
        raise DatasetError(f"dataset folder '{root}' does not exist: check the path (train_data_dir).")
    if not os.path.isdir(root):
        raise DatasetError(f"'{root}' is a file, not a folder: set train_data_dir to the folder that holds "
                           f"the images.")
    root = os.path.abspath(root)
    try:
        st = scan_folder(root, caption_extension)
    except FolderError as exc:
        raise DatasetError(str(exc)) from exc
    cands = _cands(st)
    probes = _validate(cands, min_image_side)
    items: List[Item] = []
    skipped: List[Tuple[str, str]] = list(st.broken)
    missing, bad_caps, animated, small = [], [], [], []
    for c, p in zip(cands, probes):
        if not p.ok:
            skipped.append((c.path, p.reason))
            continue
        caption, source = c.caption, c.source
        if caption is None:
            if c.caption_problem:
                bad_caps.append(f"{rel(root, c.caption_file)} ({c.caption_problem})")
            else:
                missing.append(c.path)
            caption, source = (trigger_word or c.folder_name), "fallback"
        if p.frames > 1:
            animated.append(f"{rel(root, c.path)} ({p.frames} frames)")
        if min(p.width, p.height) * 4 < resolution:
            small.append(f"{rel(root, c.path)} ({p.width}x{p.height})")
        items.append(Item(path=c.path, caption=_with_trigger(caption, trigger_word), repeats=c.repeats,
                          folder_name=c.folder_name, caption_source=source, width=p.width, height=p.height,
                          content_hash=p.sha, frames=p.frames))

    n_files = len(cands) + len(st.broken)
    if not items:
        if n_files == 0:
            hint = ""
            if st.unused_dirs:
                hint = (f" Subfolder(s) {', '.join(st.unused_dirs[:5])} hold images but are not read: only the folder "
                        f"itself and kohya-style N_name subfolders are (rename e.g. '{st.unused_dirs[0]}' to "
                        f"'1_{st.unused_dirs[0]}').")
            raise DatasetError(f"no images found in '{root}' (looked for {', '.join(IMAGE_EXTS)} in the folder and in "
                               f"kohya-style N_name subfolders). Put your images there.{hint}")
        lines = "\n".join(f"  - {rel(root, p)}: {r}" for p, r in skipped[:_SHOW])
        more = f"\n  ... and {len(skipped) - _SHOW} more" if len(skipped) > _SHOW else ""
        raise DatasetError(f"no usable images in '{root}': all {n_files} image file(s) were skipped:\n{lines}{more}\n"
                           f"Fix or replace these files and try again.")

    ds = ImageDataset(root=root, items=items, resolution=resolution, trigger_word=trigger_word, skipped=skipped)
    msgs: List[str] = []
    if skipped:
        lines = "\n".join(f"  - {rel(root, p)}: {r}" for p, r in skipped[:_SHOW])
        more = f"\n  ... and {len(skipped) - _SHOW} more (all listed in dataset.skipped)" if len(skipped) > _SHOW else ""
        msgs.append(f"skipped {len(skipped)} of {n_files} image file(s); training goes on with the other "
                    f"{len(items)}:\n{lines}{more}")
    if missing:
        shown = _listing([rel(root, p) for p in missing])
        msgs.append(f"{len(missing)} image(s) have no caption and use '{trigger_word or 'the folder name'}' instead: "
                    f"{shown}. Add {caption_extension} files (or run `python -m lora_train caption`).")
    if bad_caps:
        msgs.append(f"{len(bad_caps)} caption file(s) could not be used, so their images use the fallback caption "
                    f"'{trigger_word or 'the folder name'}': {_listing(bad_caps)}. The caption is not guessed from "
                    f"another encoding: open the file and save it as UTF-8.")
    if st.orphans:
        msgs.append(f"{len(st.orphans)} caption file(s) have no image of the same name and are not used: "
                    f"{_listing(st.orphans)}. A caption must share its image's name (cat.png + cat"
                    f"{caption_extension}); rename or remove them.")
    if st.shared:
        msgs.append(f"{len(st.shared)} name(s) are shared by several images, which are all kept: "
                    f"{'; '.join(st.shared[:_SHOW])}. Rename one if they need different captions, or remove the "
                    f"duplicate so that it does not count twice.")
    if st.meta_problems:
        msgs.append(f"{len(st.meta_problems)} metadata row(s) ignored: {'; '.join(st.meta_problems[:_SHOW])}"
                    + (f"; and {len(st.meta_problems) - _SHOW} more" if len(st.meta_problems) > _SHOW else "") + ".")
    if animated:
        msgs.append(f"{len(animated)} animated image(s): only the first frame is used: {_listing(animated)}. Export "
                    f"the frame you want as PNG to choose another.")
    if small:
        msgs.append(f"{len(small)} image(s) are smaller than a quarter of the resolution ({resolution} px) and are "
                    f"upscaled a lot (blurry training data): {_listing(small)}.")
    if st.unused_dirs:
        msgs.append(f"subfolder(s) {', '.join(st.unused_dirs[:_SHOW])} hold images that are not used: only kohya-"
                    f"style N_name subfolders are read (rename e.g. '{st.unused_dirs[0]}' to '1_{st.unused_dirs[0]}').")
    msgs.extend(st.notes)
    for msg in msgs:
        ds.warnings.append(msg)
        log.warning(msg)
    return ds
