"""mixed_precision "bf16" on a CPU: the frozen base weights are STORED in bf16 and COMPUTED in fp32.

On a GPU, bf16 means bf16 weights and bf16 compute (autocast). On a CPU without native bf16 (no AVX512-BF16 / AMX),
bf16 matmuls are emulated and ~70x slower than fp32 (seen: 0.15 vs 10 GFLOP/s), so bf16 compute is useless there;
what the CPU user wants from bf16 is memory: a full SDXL UNet is 10.3 GB in fp32, 5.1 GB in bf16 (a WebUI such as
Forge holds its own copy of the model in the same process). So on a CPU:

- `unet_load_dtype(cfg, device)`: the UNet is loaded in bf16 (models.single_file's `unet_dtype`), so no fp32
  copy of it exists even while loading;
- `store_frozen_bf16(unet)`: after the LoRA injection, every frozen nn.Linear / nn.Conv2d weight stays bf16 and is
  upcast to the input's dtype (fp32) for each call (what Forge does with --unet-in-bf16 on a CPU); everything else
  (norms, biases, embeddings, the LoRA weights) is fp32. The upcast weights live only during one layer's call when
  gradient checkpointing is on, which the trainer turns on with it (else autograd keeps every upcast weight for
  the backward pass: the fp32 copy again);
- `accelerate_precision(...)`: accelerate gets "no" (its CPU autocast would compute in bf16).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def applies(mixed_precision: str, device) -> bool:
    """True for mixed_precision "bf16" on a CPU device."""
    return mixed_precision == "bf16" and torch.device(device).type == "cpu"


def accelerate_precision(mixed_precision: str, device) -> str:
    """The precision accelerate gets: "no" on a CPU with bf16 (fp32 compute, bf16 storage), else unchanged."""
    return "no" if applies(mixed_precision, device) else mixed_precision


def unet_load_dtype(mixed_precision: str, device) -> Optional[torch.dtype]:
    """bf16 when the UNet is to be stored in bf16 (so it is loaded that way), else None (the loader's default)."""
    return torch.bfloat16 if applies(mixed_precision, device) else None


#: rows of a stored weight upcast at once: a 27648 x 3072 weight (FLUX.2's single-block linear1) is upcast 4096 rows
#: at a time (50 MB in fp32) instead of whole (340 MB)
CHUNK_ROWS = 4096


class _StoredLinear(torch.autograd.Function):
    """F.linear with a frozen weight stored in a narrower dtype: upcast (CHUNK_ROWS rows at a time) for the forward
    and again for the backward, so autograd keeps the stored weight, not an upcast copy (without this, the backward
    of a checkpointed block holds every upcast weight of the block at once: for Qwen-Image's 340 M-parameter blocks,
    1.4 GB)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        dt = x.dtype
        parts = [F.linear(x, weight[i:i + CHUNK_ROWS].to(dt), None if bias is None else bias[i:i + CHUNK_ROWS].to(dt))
                 for i in range(0, weight.shape[0], CHUNK_ROWS)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            for i in range(0, weight.shape[0], CHUNK_ROWS):
                part = grad[..., i:i + CHUNK_ROWS] @ weight[i:i + CHUNK_ROWS].to(grad.dtype)
                gx = part if gx is None else gx + part
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb


def stored_linear(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """F.linear of x with a frozen weight stored in another dtype (bf16, fp8), computed in x's dtype."""
    return _StoredLinear.apply(x, weight, bias)


def _linear(self, x: torch.Tensor) -> torch.Tensor:
    return stored_linear(x, self.weight, self.bias)


def _conv(self, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(x, self.weight.to(x.dtype), self.bias)


def store_frozen_bf16(module: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Store the frozen nn.Linear / nn.Conv2d weights of `module` in bf16, computed in `compute_dtype` (the input's
    dtype at call time); every other floating parameter and buffer goes to `compute_dtype`. LoRA layers (peft's
    lora_A / lora_B) and trainable weights are not stored in bf16. Returns the number of layers stored in bf16."""
    stored = set()
    for name, mod in module.named_modules():
        kind = type(mod)
        if kind not in (nn.Linear, nn.Conv2d) or "lora_" in name or mod.weight.requires_grad:
            continue
        with torch.no_grad():
            mod.weight.data = mod.weight.data.to(torch.bfloat16)
        mod.forward = types.MethodType(_linear if kind is nn.Linear else _conv, mod)
        stored.add(id(mod.weight))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in stored and p.is_floating_point() and p.dtype != compute_dtype:
                p.data = p.data.to(compute_dtype)
        for b in module.buffers():
            if b.is_floating_point() and b.dtype != compute_dtype:
                b.data = b.data.to(compute_dtype)
    return len(stored)
