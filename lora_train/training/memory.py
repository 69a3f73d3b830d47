"""Memory savers for the large transformers (Flux.1 12 B, SD3.5 2.5-8 B): fp8 base weights, block swap.

fp8_base       the frozen Linear weights inside the transformer blocks are stored as float8_e4m3fn and upcast to
               the compute dtype inside each layer's forward (a per-call copy, freed after the layer); LoRA
               weights (lora_A / lora_B) and everything outside the blocks keep their dtype (LoRA: fp32).
               (diffusers' hooks.apply_layerwise_casting is not used: it hooks peft's LoRA wrappers as well and turns
               off peft's input cast, so fp32 LoRA weights meet bf16 inputs.)
blocks_to_swap the last N transformer blocks' frozen weights live in CPU memory; a forward pre-hook moves them to
               the compute device before the block runs and a forward hook moves them back after it (LoRA weights
               stay on the device, so the optimizer never sees a moved parameter). With gradient checkpointing the
               backward's recomputation goes through the same hooks, so the weights are on the device only while
               their block computes; without it autograd keeps the device copies until the backward.
"""
from __future__ import annotations

import types
from typing import List

import torch
from torch import nn

from .cpu_bf16 import stored_linear


def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with the stored float8 weight (and bias) upcast to the input's dtype for this call."""
    return stored_linear(x, self.weight, self.bias)  # autograd keeps the fp8 weight, not an upcast copy


def apply_fp8_base(transformer: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the frozen nn.Linear weights inside the transformer blocks as float8_e4m3fn; each such layer upcasts
    its weight to the input's dtype (the run's compute dtype, `compute_dtype`) in its forward. LoRA layers (peft's
    lora_A / lora_B) and everything outside the blocks are left as they are. Returns the number of layers cast."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError("fp8_base needs torch >= 2.1 (torch.float8_e4m3fn): update torch or turn fp8_base off.")
    n = 0
    for block in transformer_blocks(transformer):
        for name, mod in block.named_modules():
            if type(mod) is not nn.Linear or "lora_" in name or mod.weight.requires_grad:
                continue
            with torch.no_grad():
                mod.weight.data = mod.weight.data.to(torch.float8_e4m3fn)
                if mod.bias is not None:
                    mod.bias.data = mod.bias.data.to(compute_dtype)
            mod.forward = types.MethodType(_fp8_forward, mod)
            n += 1
    return n


def transformer_blocks(transformer: nn.Module) -> List[nn.Module]:
    """The blocks in execution order, as the transformer's family lists them (Flux's double then single blocks,
    SD3's joint blocks, Z-Image's noise and context refiners then its layers, Wan's blocks, ...)."""
    from .. import families

    kind = families.by_transformer_class(type(transformer).__name__)
    names = families.get(kind).block_lists if kind else ("transformer_blocks", "single_transformer_blocks")
    return [blk for name in names for blk in getattr(transformer, name, [])]


def cast_except_fp8(module: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer that is not stored in float8 to `dtype` (module.to(dtype) would upcast
    the float8 weights too)."""
    f8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point() and t.dtype not in f8 and t.dtype != dtype:
                t.data = t.data.to(dtype)


class BlockSwap:
    """`BlockSwap(transformer, n, device)`: see the module docstring. `moves` counts the transfers (in and out);
    `remove()` takes the hooks away and leaves the weights in CPU memory."""

    def __init__(self, transformer: nn.Module, n: int, device, offload="cpu"):
        blocks = transformer_blocks(transformer)
        n = max(0, min(int(n), len(blocks)))
        self.blocks = blocks[len(blocks) - n:] if n else []
        self.device, self.offload = torch.device(device), torch.device(offload)
        self.moves = 0
        self.handles = []
        for b in self.blocks:
            self._move(b, self.offload)
            self.handles.append(b.register_forward_pre_hook(self._pre))
            self.handles.append(b.register_forward_hook(self._post))

    @staticmethod
    def _frozen(block: nn.Module):
        return [p for p in block.parameters() if not p.requires_grad]

    def _move(self, block: nn.Module, dev: torch.device) -> None:
        with torch.no_grad():
            for p in self._frozen(block):
                if p.device != dev:
                    p.data = p.data.to(dev, non_blocking=dev.type != "cpu")
            for name, buf in block.named_buffers():
                if buf.device != dev:
                    mod = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                    mod._buffers[name.rsplit(".", 1)[-1]] = buf.to(dev)
        self.moves += 1

    def _pre(self, block, args):
        self._move(block, self.device)

    def _post(self, block, args, output):
        self._move(block, self.offload)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
