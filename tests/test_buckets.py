"""Aspect-ratio buckets: ladder, assignment, resize/crop plan, and a batch sampler that never mixes buckets."""
import math
import os
from collections import Counter

import pytest
import torch
from PIL import Image

from lora_train.data.buckets import (BucketBatchSampler, BucketError, assign_buckets, make_buckets, nearest_bucket,
                                     no_upscale_bucket, plan_resize)
from lora_train.data.dataset import load_dataset

SIZES = [(64, 64), (128, 64), (64, 128), (96, 64), (200, 100), (50, 150), (300, 280), (70, 64), (40, 40)]


def _mixed(folder, sizes=SIZES, repeats_dir=None):
    os.makedirs(folder, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        im = Image.new("RGB", (w, h), (i * 25 % 256, 100, 200))
        im.putpixel((0, 0), (255, 255, 255))
        im.save(os.path.join(folder, f"img{i:02d}.png"))
    if repeats_dir:
        sub = os.path.join(folder, repeats_dir)
        os.makedirs(sub)
        Image.new("RGB", (150, 60), (1, 2, 3)).save(os.path.join(sub, "r.png"))
    return folder


@pytest.mark.parametrize("res,step,lo,hi", [(512, 64, None, None), (1024, 64, 256, 2048), (64, 8, None, None),
                                            (512, 32, 320, 768), (500, 64, None, None)])
def test_ladder_sizes_are_on_the_grid_and_within_area(res, step, lo, hi):
    b = make_buckets(res, lo, hi, step)
    lo_ = lo or res // 2
    hi_ = hi or res * 2
    assert len(b) == len(set(b)) and len(b) >= 1
    for w, h in b:
        assert w % step == 0 and h % step == 0
        assert w * h <= res * res
        assert lo_ - step < w <= hi_ and lo_ - step < h <= hi_
    sq = (res // step) * step
    assert (sq, sq) in b
    assert set(b) == {(h, w) for w, h in b}  # symmetric


def test_step_validation():
    for bad in (0, 4, 12, 63):
        with pytest.raises(BucketError, match="multiple of 8"):
            make_buckets(512, step=bad)
    assert make_buckets(64, step=8)
    with pytest.raises(BucketError, match="min bucket resolution"):
        make_buckets(512, 1024, 512, 64)


def test_nearest_bucket_and_crop_plan():
    b = make_buckets(512, step=64)
    assert b[nearest_bucket(1000, 1000, b)] == (512, 512)
    w, h = b[nearest_bucket(1920, 1080, b)]
    assert abs(math.log((w / h) / (1920 / 1080))) < 0.1 and w > h
    # 200x100 into 80x48: scale max(0.4, 0.48) -> 96x48, centre crop 8 px from the left
    assert plan_resize(200, 100, (80, 48)) == ((96, 48), (8, 0))
    assert plan_resize(100, 300, (64, 128)) == ((64, 192), (0, 32))


def test_no_upscale():
    for (w, h) in [(100, 70), (30, 200), (4000, 3000), (513, 511), (9, 9)]:
        bw, bh = no_upscale_bucket(w, h, 512, 64)
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        if w >= 64 and h >= 64:
            assert bw <= w and bh <= h  # never larger than the image
            (nw, nh), _ = plan_resize(w, h, (bw, bh))
            assert nw <= w and nh <= h  # only downscaled
    plan = assign_buckets([(100, 70), (4000, 3000)], 512, step=64, no_upscale=True)
    assert plan.bucket_of(0) == (64, 64) and plan.bucket_of(1) == (576, 448)


def test_dataset_batches_one_bucket_each_every_sample_once_deterministic(tmp_path):
    ds = load_dataset(_mixed(str(tmp_path / "d"), repeats_dir="3_rep"), 64)
    plan = ds.make_buckets(step=16)
    assert len(plan.buckets) >= 3
    expanded = ds.expanded()
    assert len(expanded) == len(SIZES) + 3
    s = BucketBatchSampler.from_dataset(ds, batch_size=2, seed=7)
    for epoch in (1, 2, 3):
        batches = s.batches(epoch)
        assert len(batches) == len(s)
        assert Counter(i for b in batches for i in b) == Counter(expanded)  # every (repeated) sample once
        for b in batches:
            assert 1 <= len(b) <= 2
            assert len({plan.item_bucket[i] for i in b}) == 1
            px = torch.stack([ds.load_pixels(i) for i in b])  # stackable: one size per batch
            w, h = plan.bucket_of(b[0])
            assert px.shape[1:] == (3, h, w) and w % 16 == 0 and h % 16 == 0
            assert w * h <= 64 * 64
    again = BucketBatchSampler.from_dataset(ds, batch_size=2, seed=7)
    assert again.batches(2) == s.batches(2)
    s.set_epoch(2)
    assert list(iter(s)) == again.batches(2)
    assert s.batches(1) != s.batches(2) or s.batches(1) != s.batches(3)
    other = BucketBatchSampler.from_dataset(ds, batch_size=2, seed=8)
    assert any(other.batches(e) != s.batches(e) for e in (1, 2, 3))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert s.batches(generator=g1) == s.batches(generator=g2)


def test_drop_last_and_no_shuffle():
    s = BucketBatchSampler([0, 0, 0, 1, 1, 2], batch_size=2, drop_last=True, shuffle=False)
    assert s.batches() == [[0, 1], [3, 4]] and len(s) == 2
    s = BucketBatchSampler([0, 0, 0, 1, 1, 2], batch_size=2, shuffle=False)
    assert s.batches() == [[0, 1], [2], [3, 4], [5]] and len(s) == 4


def test_works_as_dataloader_batch_sampler(tmp_path):
    ds = load_dataset(_mixed(str(tmp_path / "d")), 64)
    ds.make_buckets(step=16)
    s = BucketBatchSampler.from_dataset(ds, batch_size=3, seed=1)

    class PixelSet(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds.items)

        def __getitem__(self, i):
            return ds.load_pixels(i)

    dl = torch.utils.data.DataLoader(PixelSet(), batch_sampler=s)
    n = 0
    for x in dl:
        n += x.shape[0]
        assert x.shape[2] % 16 == 0 and x.shape[3] % 16 == 0
    assert n == len(ds.items)


def test_load_pixels_size_flip_and_default_square(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    im = Image.new("RGB", (200, 100), (0, 0, 255))
    for x in range(100):
        for y in range(100):
            im.putpixel((x, y), (255, 0, 0))  # left half red
    im.save(d / "a.png")
    ds = load_dataset(str(d), 64)
    assert tuple(ds.load_pixels(0).shape) == (3, 64, 64)  # no buckets: square resolution, as before
    px = ds.load_pixels(0, size=(96, 48))
    assert tuple(px.shape) == (3, 48, 96)
    assert px[0, 24, 2] > 0.9 and px[2, 24, 93] > 0.9  # red left, blue right
    fl = ds.load_pixels(0, size=(96, 48), flip=True)
    assert torch.equal(fl, px.flip(-1))
    t = ds.transform(0, (96, 48))
    assert t.original_size == (200, 100) and t.resized_size == (96, 48) and t.crop == (0, 0)
    ds.make_buckets(step=16)
    t = ds.transform(0)
    assert t.target_size == ds.bucket_plan.bucket_of(0) and t.crop_top_left == (t.crop[1], t.crop[0])
    assert tuple(ds.load_pixels(0).shape[1:]) == (t.target_size[1], t.target_size[0])


def test_exif_rotation_counts_for_bucket(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 120x60, shown 60x120
    Image.new("RGB", (120, 60), (9, 9, 9)).save(d / "r.jpg", exif=exif)
    ds = load_dataset(str(d), 64)
    assert (ds.items[0].width, ds.items[0].height) == (60, 120)
    ds.make_buckets(step=16)
    w, h = ds.bucket_plan.bucket_of(0)
    assert h > w
    assert tuple(ds.load_pixels(0).shape) == (3, h, w)
