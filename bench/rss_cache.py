"""Peak RSS of latent caching + one epoch of iteration: 2,000 tiny images vs 20, with the on-disk cache
(and the in-memory cache for contrast). A cheap stand-in encoder (8x average pool + a 4th channel) replaces the
VAE, so this runs on CPU in seconds.

    python bench/rss_cache.py [--n 20 2000] [--size 128] [--modes disk memory]
    python bench/rss_cache.py --trainer --size 64 --modes disk    # the real Trainer, tiny model, VAE caching

Each measurement runs in its own subprocess (peak RSS is per process); the dataset folders are made by the
parent. Prints one line per (mode, n) and the disk-cache difference 2000 vs 20.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb(peak: bool = True) -> float:
    if peak:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def make_dataset(folder: str, n: int, size: int) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    shapes = [(size, size), (size * 3 // 2, size), (size, size * 3 // 2)]
    for i in range(n):
        w, h = shapes[i % 3]
        im = Image.new("RGB", (w, h), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        im.putpixel((i % w, (i // w) % h), (255, 255, 255))  # unique content per image
        im.save(os.path.join(folder, f"img_{i:05d}.png"))
        with open(os.path.join(folder, f"img_{i:05d}.txt"), "w") as fh:
            fh.write(f"tok, image {i}")


def child(data: str, cache_dir: str, mode: str, size: int, batch: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    from lora_train.data.buckets import BucketBatchSampler
    from lora_train.data.cache import LatentCache
    from lora_train.data.dataset import load_dataset

    torch.set_num_threads(1)
    base = _rss_mb()

    def encode(px):
        lat = torch.nn.functional.avg_pool2d(px, 8)
        return torch.cat([lat, lat.mean(1, keepdim=True)], 1)  # (B, 4, H/8, W/8) like a VAE

    t0 = time.time()
    ds = load_dataset(data, size, trigger_word="tok")
    ds.make_buckets(step=16, min_res=size // 2, max_res=size * 2)
    t_load = time.time() - t0
    cache = LatentCache(cache_dir if mode == "disk" else None, "bench-avgpool-v1")
    t0 = time.time()
    store = cache.get_or_encode(ds, encode, batch_size=8)
    t_cache = time.time() - t0
    after_cache = _rss_mb()
    sampler = BucketBatchSampler.from_dataset(ds, batch, seed=0)
    t0 = time.time()
    total, seen = 0.0, 0
    for epoch in (1, 2):
        for idx in sampler.batches(epoch):
            lat = store.stack(idx)
            total += float(lat.sum())
            seen += len(idx)
    t_iter = time.time() - t0
    # a second run over the same folder: all hits, the encoder is never called
    calls = {"n": 0}

    def never(px):
        calls["n"] += 1
        return encode(px)

    if mode == "disk":  # (a new in-memory cache starts empty by design)
        LatentCache(cache_dir, "bench-avgpool-v1").get_or_encode(ds, never)
    return dict(n=len(ds.items), mode=mode, baseline_mb=round(base, 1), after_cache_mb=round(after_cache, 1),
                peak_mb=round(_rss_mb(), 1), load_s=round(t_load, 2), cache_s=round(t_cache, 2),
                iter_s=round(t_iter, 2), samples=seen, encoded=cache.stats.encoded,
                second_run_encoder_calls=calls["n"], buckets=len(ds.bucket_plan.buckets))


def child_trainer(data: str, cache_dir: str, mode: str, size: int, batch: int) -> dict:
    """The real Trainer on the tiny model: caching every image through its VAE, buckets, a few optimizer steps."""
    sys.path.insert(0, ROOT)
    import torch

    from lora_train.config import TrainConfig
    from lora_train.training.trainer import Trainer

    torch.set_num_threads(1)
    base = _rss_mb()
    out = os.path.join(os.path.dirname(cache_dir), f"out_{os.path.basename(cache_dir)}")
    cfg = TrainConfig(train_data_dir=data, output_dir=out, output_name="rss", base_model="tiny", resolution=size,
                      batch_size=batch, max_train_steps=4, lr_warmup_steps=0, latent_cache=mode, text_cache=mode,
                      cache_dir=cache_dir, enable_bucket=True, bucket_reso_steps=16, save_every_n_epochs=0,
                      save_state_every_n_epochs=0, device="cpu")
    tr = Trainer(cfg)
    t0 = time.time()
    res = tr.run()
    st = tr.cache_stats["latents"]
    return dict(n=len(tr.dataset.items), mode=mode, baseline_mb=round(base, 1), after_cache_mb=0.0,
                peak_mb=round(_rss_mb(), 1), load_s=0.0, cache_s=round(time.time() - t0, 2), iter_s=0.0,
                samples=res.steps * batch, encoded=st.encoded, second_run_encoder_calls=0,
                buckets=len(tr.dataset.bucket_plan.buckets))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[20, 2000])
    ap.add_argument("--size", type=int, default=128, help="training resolution; images are about this size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["disk", "memory"], choices=["disk", "memory"])
    ap.add_argument("--trainer", action="store_true",
                    help="measure the real Trainer on the tiny model (VAE caching + 4 steps) instead of the cache alone")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "CACHE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = child_trainer if args.trainer else child
        print(json.dumps(fn(args.child[0], args.child[1], args.child[2], args.size, args.batch)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="rss_cache_") as tmp:
        for n in args.n:
            data = os.path.join(tmp, f"data_{n}")
            t0 = time.time()
            make_dataset(data, n, args.size)
            print(f"made {n} images of ~{args.size} px in {time.time() - t0:.1f} s", flush=True)
            for mode in args.modes:
                cache = os.path.join(tmp, f"cache_{n}_{mode}")
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--size", str(args.size), "--batch",
                                      str(args.batch), *(["--trainer"] if args.trainer else []),
                                      "--child", data, cache, mode],
                                     capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    sys.exit(f"child failed for n={n} {mode}:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[(mode, n)] = r
                print(f"{mode:6s} n={r['n']:5d}: peak RSS {r['peak_mb']:7.1f} MB (after imports {r['baseline_mb']:.1f}, "
                      f"after caching {r['after_cache_mb']:.1f}); load+check {r['load_s']} s, encode {r['cache_s']} s, "
                      f"2 epochs {r['iter_s']} s ({r['samples']} samples, {r['buckets']} buckets)"
                      + (f"; second run encoder calls: {r['second_run_encoder_calls']}" if mode == "disk" else ""),
                      flush=True)
    for mode in args.modes:
        ns = sorted(n for (m, n) in results if m == mode)
        if len(ns) >= 2:
            lo, hi = results[(mode, ns[0])], results[(mode, ns[-1])]
            print(f"{mode}: peak RSS n={ns[-1]} minus n={ns[0]}: {hi['peak_mb'] - lo['peak_mb']:+.1f} MB "
                  f"(growth above the after-imports baseline: {hi['peak_mb'] - hi['baseline_mb']:.1f} vs "
                  f"{lo['peak_mb'] - lo['baseline_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
