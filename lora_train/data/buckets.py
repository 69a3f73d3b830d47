"""Aspect-ratio buckets: bucket sizes, per-image assignment (resize + crop plan) and a batch sampler
whose batches never mix buckets.

Sizes are (width, height) in pixels throughout. Host-free: only math and torch.

diffusers.training_utils has `find_nearest_bucket` / `generate_aspect_ratio_buckets` in recent releases
but not in 0.31 (Forge / A1111 pin) and without min/max/step/no-upscale, so the few lines live here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

Size = Tuple[int, int]  # (width, height)

DEFAULT_STEP = 64
MIN_STEP = 8


class BucketError(ValueError):
    """Bucket settings that cannot work; the message says which knob and what to use."""


def validate_step(step: int) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < MIN_STEP or step % MIN_STEP:
        raise BucketError(f"bucket step {step!r} must be a multiple of {MIN_STEP} and at least {MIN_STEP} "
                          f"(the VAE downsamples by 8); use {DEFAULT_STEP}.")
    return step


def default_min_max(resolution: int, step: int, min_res: Optional[int] = None,
                    max_res: Optional[int] = None) -> Tuple[int, int]:
    """kohya-like defaults: min = resolution / 2, max = resolution * 2, both on the step grid."""
    lo = min_res if min_res else resolution // 2
    hi = max_res if max_res else resolution * 2
    lo = max(step, int(math.ceil(lo / step)) * step)
    hi = max(lo, (hi // step) * step)
    return lo, hi


def make_buckets(resolution: int, min_res: Optional[int] = None, max_res: Optional[int] = None,
                 step: int = DEFAULT_STEP) -> List[Size]:
    """All (w, h) with w, h multiples of `step` in [min_res, max_res], w*h <= resolution^2, and for each width
    the tallest such height (kohya's scheme), plus the square bucket. Sorted by aspect ratio (w/h)."""
    validate_step(step)
    if resolution < step:
        raise BucketError(f"resolution {resolution} is smaller than the bucket step {step}: lower the step "
                          f"(minimum {MIN_STEP}) or raise the resolution.")
    if min_res and max_res and min_res > max_res:
        raise BucketError(f"min bucket resolution {min_res} > max bucket resolution {max_res}: swap them.")
    if min_res and min_res > resolution:
        raise BucketError(f"min bucket resolution {min_res} > resolution {resolution}: no bucket fits the area "
                          f"resolution^2; use at most {resolution} (default: resolution / 2).")
    lo, hi = default_min_max(resolution, step, min_res, max_res)
    max_area = resolution * resolution
    out = set()
    sq = min(hi, (resolution // step) * step)
    out.add((sq, sq))
    w = lo
    while w <= hi:
        h = min(hi, (max_area // w) // step * step)
        if h >= lo:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log space, so 2:1 and 1:2 are symmetric);
    ties go to the larger area."""
    if not buckets:
        raise BucketError("no buckets to choose from")
    ar = math.log(width / height)
    best, best_key = 0, None
    for i, (bw, bh) in enumerate(buckets):
        key = (round(abs(math.log(bw / bh) - ar), 12), -bw * bh)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def no_upscale_bucket(width: int, height: int, resolution: int, step: int = DEFAULT_STEP,
                      max_res: Optional[int] = None) -> Size:
    """kohya `bucket_no_upscale`: a bucket of about the image's own aspect ratio, no larger than the image (it is
    only shrunk, to fit resolution^2 and max_res), on the step grid (never below one step)."""
    validate_step(step)
    hi = max_res or resolution * 2
    area = resolution * resolution
    s = min(1.0, math.sqrt(area / (width * height)), hi / width, hi / height)
    w2, h2 = width * s, height * s
    fw, fh = int(w2 + 1e-6) // step * step, int(h2 + 1e-6) // step * step
    best, best_key = None, None
    for bw, bh in ((fw, fh), (fw + step, fh), (fw, fh + step)):
        if bw < step or bh < step or bw > width or bh > height or bw * bh > area or bw > hi or bh > hi:
            continue
        key = (round(abs(math.log((bw / bh) / (width / height))), 9), -bw * bh)
        if best_key is None or key < best_key:
            best, best_key = (bw, bh), key
    return best or (max(step, fw), max(step, fh))


def plan_resize(width: int, height: int, target: Size) -> Tuple[Size, Tuple[int, int]]:
    """Scale (w, h) to cover `target` keeping the aspect ratio, then centre-crop.

    Returns ((resized_w, resized_h), (crop_left, crop_top)) in resized pixels."""
    tw, th = target
    scale = max(tw / width, th / height)
    nw, nh = max(tw, int(round(width * scale))), max(th, int(round(height * scale)))
    return (nw, nh), ((nw - tw) // 2, (nh - th) // 2)


@dataclass(frozen=True)
class SampleTransform:
    """How one image becomes a training sample (also what SDXL's size/crop conditioning needs)."""
    original_size: Size        # after EXIF orientation
    resized_size: Size
    crop: Tuple[int, int]      # (left, top) in resized pixels
    target_size: Size          # the bucket

    @property
    def crop_top_left(self) -> Tuple[int, int]:
        """(top, left), the order SDXL's add_time_ids uses."""
        return self.crop[1], self.crop[0]


def square_transform(width: int, height: int, resolution: int) -> SampleTransform:
    resized, crop = plan_resize(width, height, (resolution, resolution))
    return SampleTransform((width, height), resized, crop, (resolution, resolution))


@dataclass
class BucketPlan:
    resolution: int
    step: int
    min_res: int
    max_res: int
    no_upscale: bool
    buckets: List[Size]                 # buckets in use, sorted by aspect ratio
    item_bucket: List[int]              # per item: index into `buckets`
    transforms: List[SampleTransform]   # per item
    candidates: List[Size] = field(default_factory=list)  # the full ladder (empty with no_upscale)

    def bucket_of(self, item: int) -> Size:
        return self.buckets[self.item_bucket[item]]

    def counts(self, expanded: Optional[Sequence[int]] = None) -> Dict[Size, int]:
        """Samples per bucket (items, or repeated samples when `expanded` is given)."""
        idx = list(expanded) if expanded is not None else range(len(self.item_bucket))
        out: Dict[Size, int] = {}
        for i in idx:
            b = self.buckets[self.item_bucket[i]]
            out[b] = out.get(b, 0) + 1
        return out

    def summary(self, expanded: Optional[Sequence[int]] = None) -> str:
        c = self.counts(expanded)
        parts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(c.items(), key=lambda kv: kv[0][0] / kv[0][1]))
        mode = "no upscale" if self.no_upscale else f"{self.min_res}..{self.max_res} px"
        return f"{len(c)} aspect bucket(s) (step {self.step}, {mode}): {parts}"


def assign_buckets(sizes: Sequence[Size], resolution: int, step: int = DEFAULT_STEP, min_res: Optional[int] = None,
                   max_res: Optional[int] = None, no_upscale: bool = False) -> BucketPlan:
    """Assign each (w, h) image size to a bucket and plan its resize + centre crop."""
    validate_step(step)
    lo, hi = default_min_max(resolution, step, min_res, max_res)
    ladder: List[Size] = [] if no_upscale else make_buckets(resolution, min_res, max_res, step)
    chosen: List[Size] = []
    for (w, h) in sizes:
        if w <= 0 or h <= 0:
            raise BucketError(f"image size {w}x{h} is not valid")
        chosen.append(no_upscale_bucket(w, h, resolution, step, hi) if no_upscale else ladder[nearest_bucket(w, h, ladder)])
    used = sorted(set(chosen), key=lambda s: (s[0] / s[1], s[0]))
    pos = {b: i for i, b in enumerate(used)}
    transforms = []
    for (w, h), b in zip(sizes, chosen):
        resized, crop = plan_resize(w, h, b)
        transforms.append(SampleTransform((w, h), resized, crop, b))
    return BucketPlan(resolution=resolution, step=step, min_res=lo, max_res=hi, no_upscale=no_upscale, buckets=used,
                      item_bucket=[pos[b] for b in chosen], transforms=transforms, candidates=ladder)


class BucketBatchSampler:
    """Batches of item indices, each batch from one bucket; every (repeated) sample exactly once per epoch.

    The order is a pure function of (seed, epoch): `batches(epoch)` gives the same list in any process, so a
    resumed run needs only the epoch and the position inside it. Usable as a DataLoader `batch_sampler`
    (call `set_epoch` before iterating), or directly via `batches(epoch)`.
    """

    def __init__(self, item_bucket: Sequence[int], batch_size: int, seed: int = 0,
                 expanded: Optional[Sequence[int]] = None, shuffle: bool = True, drop_last: bool = False):
        if batch_size < 1:
            raise BucketError(f"batch size {batch_size} must be at least 1")
        self.item_bucket = list(item_bucket)
        self.samples = list(expanded) if expanded is not None else list(range(len(self.item_bucket)))
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 1
        self._groups: Dict[int, List[int]] = {}
        for s in self.samples:
            self._groups.setdefault(self.item_bucket[s], []).append(s)

    @classmethod
    def from_dataset(cls, ds, batch_size: int, seed: int = 0, shuffle: bool = True,
                     drop_last: bool = False) -> "BucketBatchSampler":
        """From an ImageDataset: its bucket plan when `make_buckets` was called, else one bucket for all."""
        plan = getattr(ds, "bucket_plan", None)
        item_bucket = plan.item_bucket if plan is not None else [0] * len(ds.items)
        return cls(item_bucket, batch_size, seed=seed, expanded=ds.expanded(), shuffle=shuffle, drop_last=drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = 0
        for g in self._groups.values():
            n += len(g) // self.batch_size if self.drop_last else -(-len(g) // self.batch_size)
        return n

    def batches(self, epoch: Optional[int] = None, generator: Optional[torch.Generator] = None) -> List[List[int]]:
        """The batches of `epoch` (default: the one set by `set_epoch`). A `generator` replaces the seed."""
        e = self.epoch if epoch is None else int(epoch)
        g = generator
        if g is None:
            g = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + e) % (2 ** 63))
        out: List[List[int]] = []
        for b in sorted(self._groups):
            members = self._groups[b]
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            for k in range(0, len(members), self.batch_size):
                chunk = members[k:k + self.batch_size]
                if self.drop_last and len(chunk) < self.batch_size:
                    continue
                out.append(chunk)
        if self.shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches())
