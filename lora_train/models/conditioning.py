"""Text and size conditioning of the UNet for every model kind (SD1, SD2, SDXL).

One object, `Conditioner(model)`, turns captions into what the UNet takes, so the trainer, the validation loss
and the caches do not care which kind of model they train:

  SD1 / SD2   encode(captions) -> tensor (B, 77, D): last hidden state of the one text encoder
              (SD2 checkpoints drop OpenCLIP's last block at conversion, so this is its penultimate layer).
  SDXL        encode(captions) -> {"hidden": (B, 77, D1 + D2), "pooled": (B, P)}:
              penultimate hidden states of CLIP-L (te1) and OpenCLIP-bigG (te2) side by side, and te2's pooled
              projection (text_embeds), as diffusers' StableDiffusionXLPipeline makes them.

Both forms have one row per caption in every tensor, so `cache.TextEmbeddingCache` stores them as they are
(a tensor or a dict) and `EmbeddingStore.stack` / `stack` below batch them back.

  unet_inputs(cond, time_ids) -> (encoder_hidden_states, added_cond_kwargs or None)
  SDXL time ids (B, 6) = original size (h, w), crop top-left (top, left), target size (h, w) per sample:
  `time_ids_from_transforms` builds them from dataset / bucket `SampleTransform`s.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import families
from . import flow
from . import text_chunks

Cond = Union[torch.Tensor, Dict[str, torch.Tensor]]


def is_sdxl(model) -> bool:
    if flow.is_flow(model):  # Flux / SD3 have a second text encoder too
        return False
    return getattr(model, "text_encoder_2", None) is not None


def _tokens(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode(model, captions: Sequence[str], device: Optional[torch.device] = None) -> Cond:
    """Text conditioning of `captions` (see the module docstring); runs with grad when the encoders train."""
    captions = list(captions)
    fam = families.of(model)
    if fam.in_place:  # the host's own text encoders (ComfyUI in place: families/comfyui.py)
        return fam.encode(model, captions, device)
    if flow.is_flow(model):  # Flux / SD3: {"hidden", "pooled"(, "mask")}, models/flow.py
        return flow.encode(model, captions, device)
    if text_chunks.active(model):  # kohya clip_skip / max_token_length 150-225 (models/text_chunks.py)
        return text_chunks.encode_with_options(model, captions, device)
    dev = device if device is not None else next(model.text_encoder.parameters()).device
    if not is_sdxl(model):
        return model.text_encoder(_tokens(model.tokenizer, captions).to(dev))[0]
    o1 = model.text_encoder(_tokens(model.tokenizer, captions).to(dev), output_hidden_states=True)
    dev2 = next(model.text_encoder_2.parameters()).device
    o2 = model.text_encoder_2(_tokens(model.tokenizer_2, captions).to(dev2), output_hidden_states=True)
    h2 = o2.hidden_states[-2]
    return {"hidden": torch.cat([o1.hidden_states[-2], h2.to(o1.hidden_states[-2].device)], dim=-1),
            "pooled": o2.text_embeds.to(o1.hidden_states[-2].device)}


def rows(cond: Cond) -> List[Cond]:
    """Split a batch into one entry per caption (what an in-memory text cache keeps)."""
    if isinstance(cond, torch.Tensor):
        return list(cond)
    n = cond["hidden"].shape[0]
    return [{k: v[i] for k, v in cond.items()} for i in range(n)]


def stack(entries: Sequence[Cond]) -> Cond:
    """Batch per-caption entries again (the reverse of `rows`). Entries of different lengths (Qwen-Image's masked
    text, encoded in different chunks) are padded with zeros, their mask with 0, to the longest."""
    first = entries[0]
    if isinstance(first, torch.Tensor):
        return _stack_padded(list(entries))
    return {k: _stack_padded([e[k] for e in entries]) for k in first}


def _stack_padded(ts: List[torch.Tensor]) -> torch.Tensor:
    n = max(t.shape[0] for t in ts) if ts[0].dim() else 0
    if all(t.shape == ts[0].shape for t in ts):
        return torch.stack(ts)
    return torch.stack([torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, n - t.shape[0])) for t in ts])


def map_cond(cond: Cond, fn) -> Cond:
    """Apply `fn` to every tensor of a conditioning (e.g. `.float().cpu()`)."""
    if isinstance(cond, torch.Tensor):
        return fn(cond)
    return {k: fn(v) for k, v in cond.items()}


def time_ids(original_size: Tuple[int, int], crop_top_left: Tuple[int, int], target_size: Tuple[int, int]
             ) -> List[float]:
    """One SDXL micro-conditioning row: original (h, w), crop (top, left), target (h, w)."""
    return [float(x) for x in (*original_size, *crop_top_left, *target_size)]


def default_time_ids(n: int, resolution: int) -> torch.Tensor:
    """(n, 6) time ids of an uncropped square sample: (res, res), (0, 0), (res, res)."""
    return torch.tensor([time_ids((resolution, resolution), (0, 0), (resolution, resolution))] * n)


def time_ids_from_transform(t, flip: bool = False) -> List[float]:
    """Time ids of one `buckets.SampleTransform` (sizes are (w, h) there, (h, w) here). A mirrored sample's crop
    is measured from the mirrored image's left edge."""
    (ow, oh), (rw, _rh), (left, top), (tw, th) = t.original_size, t.resized_size, t.crop, t.target_size
    if flip:
        left = rw - tw - left
    return time_ids((oh, ow), (top, left), (th, tw))


def time_ids_for_items(dataset, items: Sequence[int], resolution: int,
                       flips: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """(B, 6) time ids of dataset items from their resize + crop plan (`dataset.transform(i)`); items whose plan is
    not available get the uncropped square (resolution, resolution), (0, 0), (resolution, resolution)."""
    flips = list(flips) if flips is not None else [False] * len(items)
    out = []
    get = getattr(dataset, "transform", None)
    for i, f in zip(items, flips):
        row = None
        if get is not None:
            try:
                row = time_ids_from_transform(get(i), f)
            except (OSError, AttributeError, IndexError, TypeError, ValueError):
                row = None
        out.append(row or time_ids((resolution, resolution), (0, 0), (resolution, resolution)))
    return torch.tensor(out)


def unet_inputs(model, cond: Cond, time_ids_: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                device: Optional[torch.device] = None, resolution: Optional[int] = None
                ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """(encoder_hidden_states, added_cond_kwargs) for `model.unet(x, t, ehs, added_cond_kwargs=...)`.

    SD1/SD2: added_cond_kwargs is None. SDXL: {"text_embeds": pooled, "time_ids": time_ids_}; without time ids
    the uncropped square of `resolution` (default: the model's native resolution) is used."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

    if isinstance(cond, torch.Tensor):
        return cast(cond), None
    hidden, pooled = cond["hidden"], cond["pooled"]
    if time_ids_ is None:
        res = int(resolution or getattr(model, "native_resolution", 1024))
        time_ids_ = default_time_ids(hidden.shape[0], res)
    return cast(hidden), {"text_embeds": cast(pooled), "time_ids": cast(time_ids_)}


class Conditioner:
    """`Conditioner(model)`: encode captions and build UNet inputs for the model's kind (module docstring)."""

    def __init__(self, model):
        self.model = model

    @property
    def kind(self) -> str:
        return "sdxl" if is_sdxl(self.model) else getattr(self.model, "kind", "sd1")

    @property
    def text_encoders(self) -> List[Tuple[str, Any]]:
        """[(component, encoder)]: [("te", te)] for SD1/SD2, [("te1", te1), ("te2", te2)] for SDXL."""
        m = self.model
        if flow.is_flow(m):
            return flow.text_encoder_components(m)
        if is_sdxl(m):
            return [("te1", m.text_encoder), ("te2", m.text_encoder_2)]
        return [("te", m.text_encoder)]

    def encode(self, captions: Sequence[str], device: Optional[torch.device] = None) -> Cond:
        return encode(self.model, captions, device)

    def unet_inputs(self, cond: Cond, time_ids_: Optional[torch.Tensor] = None, dtype=None, device=None,
                    resolution: Optional[int] = None):
        return unet_inputs(self.model, cond, time_ids_, dtype, device, resolution)

    def predict(self, unet, noisy: torch.Tensor, t: torch.Tensor, cond: Cond,
                time_ids_: Optional[torch.Tensor] = None, resolution: Optional[int] = None) -> torch.Tensor:
        """The UNet's output for noisy latents, timesteps and a conditioning (inputs cast to noisy's dtype)."""
        if flow.is_flow(self.model):
            return flow.predict(self.model, unet, noisy, t, cond)
        ehs, added = self.unet_inputs(cond, time_ids_, noisy.dtype, noisy.device, resolution)
        if added is None:
            return unet(noisy, t, ehs).sample
        return unet(noisy, t, ehs, added_cond_kwargs=added).sample
