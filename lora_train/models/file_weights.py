"""A .safetensors file's weights for the single-file loaders (models/flow_single_file.py, models/split_parts.py):
read on the CPU with float8 stored weights as bfloat16 and ComfyUI's scaled fp8 ones dequantised, and assigned
into a model built on the meta device with a clear error when they do not fit."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch

from .base import ModelError
from .single_file import read_safetensors_header


def _dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a stored tensor is loaded as: float8 -> bfloat16 (computed in 16 bits; fp8_base re-stores the
    block weights in fp8), others as stored."""
    if t.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
        return torch.bfloat16
    return t.dtype


def read_file(path: str, what: str) -> Dict[str, torch.Tensor]:
    """A .safetensors file's tensors on the CPU: float8 ones as bfloat16, ComfyUI's scaled fp8 ones dequantised
    (`dequantize_scaled`)."""
    from safetensors import safe_open

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ModelError(f"the {what} file '{path}' does not exist.")
    if not path.lower().endswith((".safetensors", ".sft")):
        raise ModelError(f"the {what} file '{path}' is not a .safetensors file: use the .safetensors release.")
    read_safetensors_header(path)  # a clear error for a broken / renamed file
    raw = {}
    with safe_open(path, framework="pt", device="cpu") as fh:
        metadata = fh.metadata() or {}
        for k in fh.keys():
            raw[k] = fh.get_tensor(k)
    raw = dequantize_scaled(raw, metadata, f"the {what} file '{os.path.basename(path)}'")
    return {k: (t.to(_dtype(t)) if t.is_floating_point() else t) for k, t in raw.items()}


#: ComfyUI's per-layer quantisation formats read here: a float8 weight times its per-tensor (or per-row) scale
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def dequantize_scaled(sd: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]], what: str,
                      dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """ComfyUI's "scaled fp8" weights as plain `dtype` weights (weight x scale, what ComfyUI's and Forge Neo's
    layers compute before every matmul), in both of ComfyUI's layouts:
    - the older one (*_fp8_scaled files, e.g. qwen_2.5_vl_7b_fp8_scaled, umt5_xxl_fp8_e4m3fn_scaled): a
      `scaled_fp8` marker key (under the model's prefix, if any) and `<layer>.scale_weight` per Linear;
    - the newer one (*_fp8_mixed): `<layer>.weight_scale` with `<layer>.comfy_quant` (the layer's format as JSON
      bytes) or the file's `_quantization_metadata`.
    `scale_input` / `input_scale` (activation scales for fp8 matmuls) are dropped. Other formats (block-scaled
    nvfp4 / mxfp8, int8) raise a ModelError naming `what` and what to pick instead. Files without scales come back
    as they are."""
    layers: Dict[str, str] = {}
    if metadata and metadata.get("_quantization_metadata"):
        try:
            conf = json.loads(metadata["_quantization_metadata"]) or {}
        except ValueError:
            conf = {}
        layers.update({k: str((v or {}).get("format", "")) for k, v in (conf.get("layers") or {}).items()})
    for k, v in sd.items():
        if k.endswith(".comfy_quant"):
            try:
                layers[k[:-len(".comfy_quant")]] = str(json.loads(bytes(v.tolist()).decode("utf-8")).get("format", ""))
            except (ValueError, AttributeError):
                layers[k[:-len(".comfy_quant")]] = "unknown"
    old = any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in sd) or any(k.endswith(".scale_weight")
                                                                               for k in sd)
    if not layers and not old:
        return sd
    other = sorted({f for f in layers.values() if f not in FP8_FORMATS})
    if other:
        raise ModelError(f"{what} holds {', '.join(other)}-quantised weights (ComfyUI's mixed-precision "
                         f"quantisation), which this trainer does not read: use the bf16 / fp16 release of that "
                         f"file, or its plain or scaled fp8 copy.")
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith((".scaled_fp8", ".comfy_quant", ".scale_weight", ".weight_scale",
                                             ".scale_input", ".input_scale")):
            continue
        out[k] = v
    for k, v in sd.items():
        for suffix in (".scale_weight", ".weight_scale"):
            if not k.endswith(suffix):
                continue
            wkey = k[:-len(suffix)] + ".weight"
            w = out.get(wkey)
            if w is None:
                continue
            scale = v.float()
            if scale.numel() != 1 and scale.dim() != w.dim():
                raise ModelError(f"{what} scales '{wkey}' by blocks ({tuple(scale.shape)}), which this trainer "
                                 f"does not read: use the bf16 / fp16 release of that file.")
            out[wkey] = (w.float() * (scale.reshape(()) if scale.numel() == 1 else scale)).to(dtype)
    return out


def check_not_scaled_fp8(sd, what: str) -> None:
    """ComfyUI's "scaled fp8" weights (per-layer `scale_weight`) are refused where they come as a live model's state
    dict (a ComfyUI graph's MODEL, whose layers apply the scales themselves); files are dequantised by `read_file`."""
    if "scaled_fp8" in sd or any(k.endswith(".scale_weight") for k in sd):
        raise ModelError(f"{what} a 'scaled fp8' model (ComfyUI's *_fp8_scaled): its weights need per-layer "
                         f"scales this trainer does not apply. Use the fp16 or plain fp8_e4m3fn release.")


def _assign(model: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str, hint: str,
            optional=(r"position_ids$", r"^encoder\.embed_tokens\.weight$")) -> torch.nn.Module:
    """Load `sd` into a meta-initialised model by assignment; a clear error when it does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not any(re.search(p, k) for p in optional)]
    unexpected = [k for k in sd if k not in expected]
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in sd.items()
           if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        parts = [f"{len(x)} {label} (e.g. {', '.join(x[:3])})" for x, label in
                 ((missing, "weights missing"), (unexpected, "unexpected weights"), (bad, "with other shapes")) if x]
        raise ModelError(f"the {what} weights do not fit: {'; '.join(parts)}. {hint}")
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=False, assign=True)
    for n, p in list(model.named_parameters()):
        if p.device.type == "meta":
            raise ModelError(f"the {what} weights leave {n} unset. {hint}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval().requires_grad_(False)
