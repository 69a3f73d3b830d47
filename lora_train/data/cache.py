"""Latent and text-embedding caches, in memory or on disk (one safetensors file per entry).

Latent keys are content-based: sha256 of the image bytes, the target (bucket) size, the resize and crop, the
flip flag and a caller-given VAE identity (see `module_identity`) -- never the path or the mtime. So a changed
image is re-encoded and nothing else; a renamed or moved image is still a hit. Text keys: caption text + text
encoder identity.

The disk cache writes each entry atomically (temp + rename) and reads lazily: a store holds only file paths,
so memory stays flat however large the dataset. Nothing is ever written next to the user's images: the caller
chooses the folder (e.g. `<output_dir>/cache` or a per-user cache folder).

Typical use (trainer):

    vae_id = module_identity(vae, extra=f"latent_dist.mean*{scale}")
    latents = LatentCache(cache_dir_or_None, vae_id).get_or_encode(ds, encode_fn, batch_size=4)
    lat = latents.stack(batch_item_indices)            # (B, 4, h/8, w/8), all from one bucket
    emb = TextEmbeddingCache(dir_or_None, module_identity(text_encoder)).get_or_encode(captions, encode_prompts_fn)
    ehs = emb.stack([ds.items[i].caption for i in batch_item_indices])
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..io_utils import save_safetensors

CACHE_FORMAT = "lora_train-cache/1"
# Bump when the pixel pipeline (decode, resize, crop, normalisation) changes: every latent is then re-encoded.
PREPROCESS_VERSION = "rgb-white-alpha/lanczos-cover/center-crop/v1"

Tensors = Union[torch.Tensor, Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]
Progress = Optional[Callable[[int, int], None]]
ShouldStop = Optional[Callable[[], bool]]


_MEM_META = {"format": CACHE_FORMAT, "kind": "latent"}


class CacheError(RuntimeError):
    """A cache entry cannot be produced or read; the message names the file and what to do."""


class CachingStopped(RuntimeError):
    """`should_stop()` returned True while encoding; what was encoded so far is kept on disk."""


# -------------------------------------------------------------------- identities and keys
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _config_dict(module) -> Dict[str, Any]:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    try:
        cfg = dict(cfg)
    except (TypeError, ValueError):
        return {"repr": repr(cfg)}
    # paths and library versions do not change what the module computes
    return {k: v for k, v in cfg.items() if not k.startswith("_") and not k.endswith("_version")}


@torch.no_grad()
def module_identity(module: torch.nn.Module, extra: str = "", samples_per_tensor: int = 16) -> str:
    """A short, device-independent fingerprint of a model: class, config (minus paths and versions), every
    tensor's name, shape and dtype, and `samples_per_tensor` evenly spaced values of each. Put what the encode
    function adds (mean vs sample, scaling factor, ...) in `extra`."""
    parts: List[Any] = [type(module).__name__, _config_dict(module), extra]
    picks = []
    for name, t in module.state_dict().items():
        parts.append((name, tuple(t.shape), str(t.dtype)))
        if t.is_meta or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        k = min(samples_per_tensor, flat.numel())
        # integer spacing: float32 linspace overshoots the last index above 2^24 elements (CLIP-L's embedding)
        idx = (torch.arange(k, dtype=torch.long, device=flat.device) * (flat.numel() - 1)) // max(k - 1, 1)
        picks.append(flat.index_select(0, idx).float())
    h = hashlib.sha256(_digest(parts).encode("ascii"))
    if picks:
        h.update(torch.cat([p.cpu() for p in picks]).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class LatentRequest:
    content_hash: str
    target_size: Tuple[int, int]    # (w, h) pixels fed to the VAE
    resized_size: Tuple[int, int]
    crop: Tuple[int, int]           # (left, top)
    flip: bool
    load: Callable[[], torch.Tensor] = field(compare=False, repr=False)  # CHW pixels in [-1, 1]
    label: str = field(default="", compare=False)                          # for messages (the image path)


def latent_requests(ds, flip: bool = False) -> List[LatentRequest]:
    """One request per item of an ImageDataset, using its bucket plan (or square resolution)."""
    out = []
    for i, it in enumerate(ds.items):
        t = ds.transform(i)
        out.append(LatentRequest(ds.content_hash(i), tuple(t.target_size), tuple(t.resized_size), tuple(t.crop),
                                 bool(flip), partial(ds.load_pixels, i, flip=bool(flip)), label=it.path))
    return out


@dataclass
class CacheStats:
    requested: int = 0       # entries asked for (duplicates included)
    hits: int = 0            # found in the cache
    encoded: int = 0         # entries computed
    encode_calls: int = 0    # calls of encode_fn (batches)
    written: int = 0         # files written (disk cache)


def _entry_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, key[:2], key + ".safetensors")


def _valid_header(path: str, key: str) -> Optional[Dict[str, str]]:
    """Cheap integrity check without reading the tensors: the header parses, names `key` and the file is
    complete. Returns the entry's metadata, or None (missing, damaged or another entry: re-encode)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                return None
            n = struct.unpack("<Q", raw)[0]
            if n > 1 << 24 or 8 + n > size:
                return None
            hdr = json.loads(fh.read(n))
        meta = hdr.get("__metadata__") or {}
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None
        ends = [v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__"]
        return meta if ends and size == 8 + n + max(ends) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None


def _load_entry(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:
        raise CacheError(f"cache file {path} is missing or damaged ({type(exc).__name__}: {exc}). Delete it (or "
                         f"its cache folder) and start again: it will be re-encoded.") from exc


class _Base:
    kind = ""

    def __init__(self, cache_dir: Optional[str], model_id: str):
        if not model_id:
            raise ValueError("a model identity is needed (see module_identity) so that a different model never "
                             "reuses these entries")
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else None
        self.model_id = model_id
        self.stats = CacheStats()
        self._mem: Dict[str, Dict[str, torch.Tensor]] = {}
        self._mem_meta: Dict[str, Dict[str, str]] = {}

    @property
    def on_disk(self) -> bool:
        return self.cache_dir is not None

    def _lookup(self, key: str) -> Optional[Dict[str, str]]:
        """The entry's metadata if it is cached, else None."""
        if self.cache_dir is None:
            return self._mem_meta.get(key)
        return _valid_header(_entry_path(self.cache_dir, key), key)

    def _put(self, key: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        meta = {**{k: str(v) for k, v in meta.items()}, "format": CACHE_FORMAT, "key": key, "kind": self.kind,
                "model_id": self.model_id}
        if self.cache_dir is None:
            self._mem[key], self._mem_meta[key] = tensors, meta
            return
        save_safetensors(tensors, _entry_path(self.cache_dir, key), metadata=meta)
        self.stats.written += 1

    def _ref(self, key: str):
        return self._mem[key] if self.cache_dir is None else _entry_path(self.cache_dir, key)


def _check_finite(t: torch.Tensor, what: str, advice: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CacheError(f"{what}: the encoder returned NaN/Inf values, which are never cached. {advice}")


# -------------------------------------------------------------------- latents
class LatentStore(Sequence):
    """Latents by request position (= item index for a dataset). Disk stores load each entry when asked."""

    def __init__(self, refs: List[Any]):
        self._refs = refs

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ref = self._refs[i]
        if isinstance(ref, tuple):  # in memory: (slab, row)
            return ref[0][ref[1]]
        return _load_entry(ref)["latent"]

    def stack(self, indices: Iterable[int]) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])

    @property
    def paths(self) -> List[Optional[str]]:
        return [r if isinstance(r, str) else None for r in self._refs]


class LatentCache(_Base):
    """`LatentCache(dir or None, vae_id).get_or_encode(dataset or requests, encode_fn)`.

    encode_fn(pixels: (B, 3, H, W) float in [-1, 1], one size per call) -> latents (B, C, H/8, W/8)."""
    kind = "latent"

    def key(self, r: LatentRequest) -> str:
        return _digest([CACHE_FORMAT, self.kind, PREPROCESS_VERSION, self.model_id, r.content_hash,
                        list(r.target_size), list(r.resized_size), list(r.crop), bool(r.flip)])

    def get_or_encode(self, source, encode_fn: Callable[[torch.Tensor], torch.Tensor], flip: bool = False,
                      batch_size: int = 4, progress: Progress = None, should_stop: ShouldStop = None) -> LatentStore:
        """Latents for every request (or every item of an ImageDataset, with `flip`); encodes only the misses,
        `batch_size` images of one size per encode_fn call. progress(done, to_encode) after each call."""
        reqs: Sequence[LatentRequest] = latent_requests(source, flip) if hasattr(source, "items") else list(source)
        keys = [self.key(r) for r in reqs]
        self.stats.requested += len(reqs)
        todo: Dict[str, LatentRequest] = {}
        for k, r in zip(keys, reqs):
            if k in todo:
                continue
            if self._lookup(k) is not None:
                self.stats.hits += 1
            else:
                todo[k] = r
        self.stats.hits += sum(1 for k in keys if k in todo) - len(todo)  # duplicates of a miss reuse it
        groups: Dict[Tuple[int, int], List[str]] = {}
        for k, r in todo.items():
            groups.setdefault(tuple(r.target_size), []).append(k)
        done, total = 0, len(todo)
        if progress and total:
            progress(0, total)
        for size in sorted(groups):
            ks = groups[size]
            slab: Optional[torch.Tensor] = None
            for b in range(0, len(ks), max(1, batch_size)):
                if should_stop is not None and should_stop():
                    raise CachingStopped(f"latent caching stopped after {done} of {total} image(s); the "
                                         f"{'files written are kept' if self.on_disk else 'in-memory cache is lost'}.")
                chunk = ks[b:b + max(1, batch_size)]
                pixels = torch.stack([todo[k].load() for k in chunk])
                with torch.no_grad():
                    lat = encode_fn(pixels)
                self.stats.encode_calls += 1
                if not isinstance(lat, torch.Tensor) or lat.shape[0] != len(chunk):
                    raise CacheError(f"encode_fn returned {type(lat).__name__} "
                                     f"{tuple(getattr(lat, 'shape', ()))} for a batch of {len(chunk)}; it must return "
                                     f"a tensor with one latent per image")
                if self.cache_dir is None:
                    # in memory, one block per bucket: thousands of small tensors would fragment the heap (the
                    # bench measured ~30x the latents' size in RSS that way)
                    if slab is None:
                        slab = torch.empty((len(ks),) + tuple(lat.shape[1:]), dtype=lat.dtype)
                    if tuple(lat.shape[1:]) != tuple(slab.shape[1:]):
                        raise CacheError(f"encode_fn returned latents of shape {tuple(lat.shape[1:])} and "
                                         f"{tuple(slab.shape[1:])} for images of one size {size}")
                for j, k in enumerate(chunk):
                    r = todo[k]
                    _check_finite(lat[j], f"latent of {r.label or r.content_hash}",
                                  "With an fp16 VAE (notably SDXL's) encode in fp32 or use the fp16-fix VAE.")
                    if slab is not None:
                        slab[b + j].copy_(lat[j].detach())
                        self._mem[k], self._mem_meta[k] = (slab, b + j), _MEM_META  # type: ignore[assignment]
                        self.stats.encoded += 1
                        continue
                    self._put(k, {"latent": lat[j]}, {"content_hash": r.content_hash,
                                                      "target_size": "%dx%d" % tuple(r.target_size),
                                                      "crop": "%d,%d" % tuple(r.crop), "flip": int(r.flip),
                                                      "source": os.path.basename(r.label)})
                    self.stats.encoded += 1
                del pixels, lat
                done += len(chunk)
                if progress:
                    progress(done, total)
        return LatentStore([self._ref(k) for k in keys])


# -------------------------------------------------------------------- text embeddings
def _split(out: Tensors, n: int) -> Tuple[str, List[Dict[str, torch.Tensor]]]:
    """Encoder output -> (structure, one dict of tensors per caption)."""
    if isinstance(out, torch.Tensor):
        structure, named = "tensor", {"0": out}
    elif isinstance(out, (tuple, list)):
        structure, named = "tuple", {str(i): t for i, t in enumerate(out)}
    elif isinstance(out, Mapping):
        structure, named = "dict", {str(k): v for k, v in out.items()}
    else:
        raise CacheError(f"text encode_fn returned {type(out).__name__}; return a tensor, a tuple of tensors or a dict")
    for k, t in named.items():
        if not isinstance(t, torch.Tensor) or t.shape[0] != n:
            raise CacheError(f"text encode_fn output '{k}' has shape {tuple(getattr(t, 'shape', ()))} for {n} "
                             f"caption(s); every output needs one row per caption")
    return structure, [{k: t[i] for k, t in named.items()} for i in range(n)]


def _join(structure: str, d: Dict[str, torch.Tensor]) -> Tensors:
    if structure == "tensor":
        return d["0"]
    if structure == "tuple":
        return tuple(d[str(i)] for i in range(len(d)))
    return dict(d)


class EmbeddingStore(Mapping):
    """caption -> embedding (tensor, tuple or dict as the encoder returned). Disk stores load when asked."""

    def __init__(self, refs: Dict[str, Any], structure: Dict[str, str]):
        self._refs, self._structure = refs, structure

    def __getitem__(self, caption: str) -> Tensors:
        ref = self._refs[caption]
        return _join(self._structure[caption], _load_entry(ref) if isinstance(ref, str) else ref)

    def __iter__(self):
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def stack(self, captions: Sequence[str], collate=None) -> Tensors:
        """Batch the embeddings of `captions` (a tensor, or a tuple / dict of stacked tensors; `collate(list)` when
        given: the family's own batching, families/base.py)."""
        vals = [self[c] for c in captions]
        if collate is not None:
            return collate(vals)
        first = vals[0]
        if isinstance(first, torch.Tensor):
            return torch.stack(vals)
        if isinstance(first, tuple):
            return tuple(torch.stack([v[i] for v in vals]) for i in range(len(first)))
        return {k: torch.stack([v[k] for v in vals]) for k in first}


class TextEmbeddingCache(_Base):
    """`TextEmbeddingCache(dir or None, text_encoder_id).get_or_encode(captions, encode_fn)` for a frozen text
    encoder. encode_fn(list of captions) -> tensor (B, ...) or a tuple / dict of such (SDXL: hidden, pooled)."""
    kind = "text"

    def key(self, caption: str) -> str:
        return _digest([CACHE_FORMAT, self.kind, self.model_id, caption])

    def get_or_encode(self, captions: Iterable[str], encode_fn: Callable[[List[str]], Tensors], batch_size: int = 16,
                      progress: Progress = None, should_stop: ShouldStop = None) -> EmbeddingStore:
        caps = list(dict.fromkeys(captions))  # unique, in order
        self.stats.requested += len(caps)
        structure: Dict[str, str] = {}
        todo = []
        for c in caps:
            meta = self._lookup(self.key(c))
            if meta is not None and meta.get("structure") in ("tensor", "tuple", "dict"):
                self.stats.hits += 1
                structure[c] = meta["structure"]
            else:
                todo.append(c)
        if progress and todo:
            progress(0, len(todo))
        for b in range(0, len(todo), max(1, batch_size)):
            if should_stop is not None and should_stop():
                raise CachingStopped(f"text-embedding caching stopped after {b} of {len(todo)} caption(s).")
            chunk = todo[b:b + max(1, batch_size)]
            with torch.no_grad():
                out = encode_fn(chunk)
            self.stats.encode_calls += 1
            s, rows = _split(out, len(chunk))
            for c, row in zip(chunk, rows):
                for t in row.values():
                    _check_finite(t, f"text embedding of caption {c[:60]!r}",
                                  "Run the text encoder in fp32 (mixed_precision 'no') and check the model file.")
                k = self.key(c)
                self._put(k, row, {"structure": s, "caption_sha256": hashlib.sha256(c.encode()).hexdigest()})
                structure[c] = s
                self.stats.encoded += 1
            if progress:
                progress(min(b + len(chunk), len(todo)), len(todo))
        refs = {}
        for c in caps:
            k = self.key(c)
            if self.cache_dir is None:
                refs[c] = self._mem[k]
            else:
                refs[c] = _entry_path(self.cache_dir, k)
        return EmbeddingStore(refs, structure)
