"""CLIP text encoding with kohya's / the WebUIs' `clip_skip` and long captions (`max_token_length` 150 / 225).

The rule the WebUIs apply when they generate (A1111 `sd_hijack_clip`, Forge, ComfyUI), so a LoRA trained with it
sees the text conditioning it will be used with:
  - the caption's tokens (no BOS/EOS) are cut into chunks of 75 (the tokenizer's length - 2); each chunk becomes
    BOS + chunk + EOS + padding to 77 and is encoded on its own; the chunks' hidden states are concatenated along
    the sequence (B, 77 * chunks, D). A training run uses a fixed chunk count, max_token_length / 75, so that every
    caption has one shape (empty chunks are BOS + EOS + padding, as the WebUIs pad a batch to its longest prompt);
    tokens beyond max_token_length are cut.
  - clip_skip N > 1: the hidden state N layers from the end (`hidden_states[-N]`), then the text model's final
    layer norm (A1111: `CLIP_stop_at_last_layers`; kohya: `--clip_skip`). N = 1 (or None) is the last hidden
    state, which already went through the final layer norm.
  - SDXL keeps its own layers (penultimate, no final norm; pooled text_embeds of encoder 2 from the first chunk,
    as the WebUI does); only the chunking applies.

Settings ride on the model bundle: `model.extra["clip_skip"]`, `model.extra["max_token_length"]` (the Trainer sets
them from the config); `conditioning.encode` calls `encode_with_options` when one of them is not the default.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


def options(model) -> Tuple[Optional[int], int]:
    """(clip_skip or None, max_token_length) the model bundle carries."""
    extra = getattr(model, "extra", None) or {}
    cs = extra.get("clip_skip")
    return (int(cs) if cs and int(cs) > 1 else None), int(extra.get("max_token_length") or 75)


def active(model) -> bool:
    cs, mtl = options(model)
    return cs is not None or mtl > 75


def chunk_ids(tokenizer, captions: Sequence[str], max_token_length: int) -> Tuple[torch.Tensor, int]:
    """(ids (B * chunks, L), chunks): each caption's tokens in chunks of L - 2, each as BOS + chunk + EOS + pad."""
    length = int(tokenizer.model_max_length)
    per = length - 2
    chunks = max(1, -(-int(max_token_length) // per))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    toks: List[List[int]] = tokenizer(list(captions), add_special_tokens=False, truncation=False).input_ids
    rows: List[List[int]] = []
    for t in toks:
        t = list(t)[: chunks * per]
        for c in range(chunks):
            part = t[c * per:(c + 1) * per]
            rows.append([bos] + part + [eos] + [pad] * (per - len(part)))
    return torch.tensor(rows, dtype=torch.long), chunks


def _final_norm(text_encoder):
    tm = getattr(text_encoder, "text_model", text_encoder)
    return getattr(tm, "final_layer_norm")


def hidden(text_encoder, ids: torch.Tensor, chunks: int, layer: Optional[int], final_norm: bool,
           want_pooled: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Hidden states (B, chunks * L, D) of the chunked ids: `layer` None = last_hidden_state, else
    hidden_states[layer] (+ the final layer norm when final_norm); pooled text_embeds of each caption's first chunk."""
    dev = next(text_encoder.parameters()).device
    out = text_encoder(ids.to(dev), output_hidden_states=layer is not None)
    if layer is None:
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    else:
        h = out.hidden_states[layer]
        if final_norm:
            h = _final_norm(text_encoder)(h)
    b = ids.shape[0] // chunks
    h = h.reshape(b, chunks * h.shape[1], h.shape[2])
    pooled = None
    if want_pooled:
        emb = getattr(out, "text_embeds", None)
        if emb is None:
            emb = out.pooler_output
        pooled = emb.reshape(b, chunks, -1)[:, 0]
    return h, pooled


def encode_with_options(model, captions: Sequence[str], device: Optional[torch.device] = None) -> Any:
    """conditioning.encode with the model's clip_skip / max_token_length (module docstring)."""
    clip_skip, mtl = options(model)
    captions = list(captions)
    if getattr(model, "text_encoder_2", None) is None:
        ids, n = chunk_ids(model.tokenizer, captions, mtl)
        h, _ = hidden(model.text_encoder, ids, n, -clip_skip if clip_skip else None, final_norm=True)
        return h if device is None else h.to(device)
    ids1, n = chunk_ids(model.tokenizer, captions, mtl)
    ids2, _ = chunk_ids(model.tokenizer_2, captions, mtl)
    h1, _ = hidden(model.text_encoder, ids1, n, -2, final_norm=False)
    h2, pooled = hidden(model.text_encoder_2, ids2, n, -2, final_norm=False, want_pooled=True)
    out: Dict[str, torch.Tensor] = {"hidden": torch.cat([h1, h2.to(h1.device)], dim=-1), "pooled": pooled.to(h1.device)}
    return out


def configure(model, clip_skip: Optional[int], max_token_length: int) -> List[str]:
    """Put the options on the model bundle; returns warnings (clip_skip does not apply to SDXL)."""
    notes = []
    if clip_skip and clip_skip > 1 and getattr(model, "text_encoder_2", None) is not None:
        notes.append(f"clip_skip {clip_skip} is not used for SDXL (it always uses the penultimate layers, as kohya "
                     f"and the WebUIs do): remove clip_skip.")
        clip_skip = None
    layers = getattr(getattr(model.text_encoder, "config", None), "num_hidden_layers", None)
    if clip_skip and layers and clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers: use 1 or 2.")
    model.extra["clip_skip"] = clip_skip if clip_skip and clip_skip > 1 else None
    model.extra["max_token_length"] = int(max_token_length or 75)
    return notes
