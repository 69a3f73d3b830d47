"""Latent / text-embedding caches: content-keyed, encoder never called on hits, one changed image re-encoded."""
import os
import shutil

import pytest
import torch
from PIL import Image

from lora_train.data.cache import (CacheError, CachingStopped, LatentCache, TextEmbeddingCache, latent_requests,
                                   module_identity)
from lora_train.data.dataset import load_dataset


class CountingEncoder:
    """Stand-in VAE: 8x average pool; counts calls and images."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, px):
        self.calls += 1
        self.images += px.shape[0]
        return torch.nn.functional.avg_pool2d(px, 8)


def _data(folder, n=4, sizes=None):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        size = sizes[i] if sizes else (64, 64)
        Image.new("RGB", size, (40 * i, 255 - 40 * i, 7)).save(os.path.join(folder, f"i{i}.png"))
    return folder


def _tmp_files(folder):
    return [f for _, _, fs in os.walk(folder) for f in fs if f.endswith(".tmp")]


def test_disk_cache_hits_never_call_encoder_and_one_change_reencodes_one(tmp_path):
    data, cdir = _data(str(tmp_path / "data")), str(tmp_path / "cache")
    enc = CountingEncoder()
    ds = load_dataset(data, 32)
    c1 = LatentCache(cdir, "vae-a")
    first = c1.get_or_encode(ds, enc, batch_size=3)
    assert enc.calls == 2 and enc.images == 4 and c1.stats.written == 4
    ref = [first[i].clone() for i in range(4)]
    assert ref[0].shape == (3, 4, 4) and all(p is not None for p in first.paths)  # disk store: paths, lazy

    # second run (new process-like state: fresh dataset + cache objects): all hits, zero encoder calls
    enc2 = CountingEncoder()
    ds2 = load_dataset(data, 32)
    c2 = LatentCache(cdir, "vae-a")
    second = c2.get_or_encode(ds2, enc2)
    assert enc2.calls == 0 and c2.stats.hits == 4 and c2.stats.encoded == 0
    assert all(torch.equal(second[i], ref[i]) for i in range(4))

    # touch mtime only, rename a file: still hits (content key, not path or mtime)
    os.utime(os.path.join(data, "i0.png"), (1, 1))
    shutil.move(os.path.join(data, "i3.png"), os.path.join(data, "renamed.png"))
    enc3 = CountingEncoder()
    LatentCache(cdir, "vae-a").get_or_encode(load_dataset(data, 32), enc3)
    assert enc3.calls == 0

    # change one image: exactly that one is re-encoded
    Image.new("RGB", (64, 64), (1, 2, 3)).save(os.path.join(data, "i1.png"))
    enc4 = CountingEncoder()
    ds4 = load_dataset(data, 32)
    c4 = LatentCache(cdir, "vae-a")
    fourth = c4.get_or_encode(ds4, enc4)
    assert enc4.calls == 1 and enc4.images == 1 and c4.stats.encoded == 1 and c4.stats.hits == 3
    i1 = [os.path.basename(it.path) for it in ds4.items].index("i1.png")
    assert not torch.equal(fourth[i1], ref[1])
    assert _tmp_files(cdir) == []


def test_key_covers_vae_size_crop_and_flip(tmp_path):
    data, cdir = _data(str(tmp_path / "data"), 2, sizes=[(64, 64), (96, 64)]), str(tmp_path / "cache")
    ds = load_dataset(data, 32)
    LatentCache(cdir, "vae-a").get_or_encode(ds, CountingEncoder())
    for change in ("vae", "resolution", "bucket", "flip"):
        enc = CountingEncoder()
        d = load_dataset(data, 48 if change == "resolution" else 32)
        if change == "bucket":
            d.make_buckets(step=8)
        LatentCache(cdir, "vae-b" if change == "vae" else "vae-a").get_or_encode(d, enc, flip=change == "flip")
        expect = 1 if change == "bucket" else 2  # the square image keeps its square bucket
        assert enc.images == expect, change
    flipped = LatentCache(cdir, "vae-a").get_or_encode(ds, CountingEncoder(), flip=True)
    plain = LatentCache(cdir, "vae-a").get_or_encode(ds, CountingEncoder())
    assert flipped.paths != plain.paths


def test_bucketed_batches_are_encoded_per_size(tmp_path):
    data = _data(str(tmp_path / "data"), 4, sizes=[(64, 64), (128, 64), (64, 64), (128, 64)])
    ds = load_dataset(data, 64)
    ds.make_buckets(step=16)
    seen = []

    def enc(px):
        seen.append(tuple(px.shape))
        return torch.nn.functional.avg_pool2d(px, 8)

    store = LatentCache(None, "v").get_or_encode(ds, enc, batch_size=8)
    assert len(seen) == 2 and len({s[2:] for s in seen}) == 2
    for i in range(4):
        w, h = ds.bucket_plan.bucket_of(i)
        assert store[i].shape == (3, h // 8, w // 8)


def test_memory_cache(tmp_path):
    ds = load_dataset(_data(str(tmp_path / "data"), 3), 32)
    cache = LatentCache(None, "vae")
    enc = CountingEncoder()
    s1 = cache.get_or_encode(ds, enc)
    s2 = cache.get_or_encode(ds, enc)
    assert enc.images == 3 and cache.stats.hits == 3 and s2.paths == [None] * 3
    assert torch.equal(s1.stack([0, 2]), s2.stack([0, 2]))
    assert not os.path.exists(tmp_path / "cache")
    LatentCache(None, "vae").get_or_encode(ds, enc)
    assert enc.images == 6  # a new in-memory cache starts empty


def test_damaged_entry_is_reencoded_and_duplicates_encoded_once(tmp_path):
    data, cdir = _data(str(tmp_path / "data"), 3), str(tmp_path / "cache")
    shutil.copy(os.path.join(data, "i0.png"), os.path.join(data, "copy.png"))  # same content twice
    ds = load_dataset(data, 32)
    enc = CountingEncoder()
    store = LatentCache(cdir, "v").get_or_encode(ds, enc)
    assert enc.images == 3 and len(store) == 4
    victim = store.paths[1]
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) - 5)
    enc = CountingEncoder()
    LatentCache(cdir, "v").get_or_encode(ds, enc)
    assert enc.images == 1


def test_nan_latents_are_refused_and_not_written(tmp_path):
    ds = load_dataset(_data(str(tmp_path / "data"), 2), 32)
    cdir = str(tmp_path / "cache")
    with pytest.raises(CacheError, match="NaN/Inf.*fp16"):
        LatentCache(cdir, "v").get_or_encode(ds, lambda px: torch.full((px.shape[0], 4, 4, 4), float("nan")))
    assert not os.path.exists(cdir) or not [f for _, _, fs in os.walk(cdir) for f in fs]
    with pytest.raises(CacheError, match="one latent per image"):
        LatentCache(None, "v").get_or_encode(ds, lambda px: px[:1])


def test_stop_keeps_what_was_written(tmp_path):
    ds = load_dataset(_data(str(tmp_path / "data"), 4), 32)
    cdir = str(tmp_path / "cache")
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    progress = []
    with pytest.raises(CachingStopped):
        LatentCache(cdir, "v").get_or_encode(ds, CountingEncoder(), batch_size=1, should_stop=stop,
                                             progress=lambda d, t: progress.append((d, t)))
    assert progress == [(0, 4), (1, 4), (2, 4)]
    enc = CountingEncoder()
    LatentCache(cdir, "v").get_or_encode(ds, enc)
    assert enc.images == 2


def test_requests_api(tmp_path):
    ds = load_dataset(_data(str(tmp_path / "data"), 2), 32)
    reqs = latent_requests(ds)
    assert reqs[0].content_hash == ds.items[0].content_hash and reqs[0].target_size == (32, 32)
    store = LatentCache(None, "v").get_or_encode(reqs, CountingEncoder())
    assert store[1].shape == (3, 4, 4)


def test_text_cache(tmp_path):
    cdir = str(tmp_path / "tcache")
    calls = []

    def enc(caps):  # SDXL-like: (hidden states, pooled)
        calls.append(list(caps))
        h = torch.stack([torch.full((3, 4), float(len(c))) for c in caps])
        return h, h[:, 0, :2].clone()

    caps = ["a cat", "a dog", "a cat", ""]
    s1 = TextEmbeddingCache(cdir, "te-1").get_or_encode(caps, enc, batch_size=2)
    assert calls == [["a cat", "a dog"], [""]] and len(s1) == 3
    h, pooled = s1.stack(["a dog", "a cat", ""])
    assert h.shape == (3, 3, 4) and pooled.shape == (3, 2) and h[0, 0, 0] == 5.0 and h[2, 0, 0] == 0.0
    calls.clear()
    c2 = TextEmbeddingCache(cdir, "te-1")
    s2 = c2.get_or_encode(caps + ["new one"], enc)
    assert calls == [["new one"]] and c2.stats.hits == 3
    assert torch.equal(s2["a cat"][0], s1["a cat"][0])
    calls.clear()
    TextEmbeddingCache(cdir, "te-2").get_or_encode(["a cat"], enc)
    assert calls == [["a cat"]]
    mem = TextEmbeddingCache(None, "te")
    m = mem.get_or_encode(["x"], lambda c: torch.ones(len(c), 2))
    assert torch.equal(m.stack(["x", "x"]), torch.ones(2, 2))
    m = mem.get_or_encode(["x"], lambda c: 1 / 0)
    assert mem.stats.hits == 1 and torch.equal(m["x"], torch.ones(2))
    d = TextEmbeddingCache(None, "te").get_or_encode(["q"], lambda c: {"a": torch.zeros(len(c), 1)})
    assert set(d["q"]) == {"a"}


def test_module_identity():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv2d(3, 4, 3))
    torch.manual_seed(0)
    b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv2d(3, 4, 3))
    assert module_identity(a) == module_identity(b)
    assert module_identity(a, extra="mean*0.18215") != module_identity(a)
    with torch.no_grad():
        b[0].weight.add_(1e-3)
    assert module_identity(a) != module_identity(b)
    before = module_identity(a)
    assert module_identity(a.half()) != before


@pytest.mark.slow
def test_module_identity_diffusers_vae_ignores_path():
    from diffusers import AutoencoderKL

    kw = dict(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
              latent_channels=4, norm_num_groups=4, layers_per_block=1)
    torch.manual_seed(0)
    v1 = AutoencoderKL(**kw)
    torch.manual_seed(0)
    v2 = AutoencoderKL(**kw)
    v2.register_to_config(_name_or_path="/somewhere/else")
    assert module_identity(v1) == module_identity(v2)
    v2.register_to_config(scaling_factor=0.13025)
    assert module_identity(v1) != module_identity(v2)


def test_module_identity_of_a_clip_l_sized_embedding():
    """37,945,344 elements: past float32's exact integers; every sampled index must stay in range."""
    import torch

    from lora_train.data.cache import module_identity

    emb = torch.nn.Embedding(49408, 768)
    a = module_identity(emb)
    with torch.no_grad():
        emb.weight[-1, -1] += 1.0  # the last element is sampled: a change there changes the identity
    assert module_identity(emb) != a
