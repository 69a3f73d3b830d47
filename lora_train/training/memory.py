"""Memory savers for the large transformers (Flux.1 12 B, SD3.5 2.5-8 B): fp8 base weights, block swap.

fp8_base       the frozen Linear weights inside the transformer blocks are stored as float8_e4m3fn and upcast to
               the compute dtype around each layer's forward (diffusers' hooks.apply_layerwise_casting); LoRA
               weights (lora_A / lora_B) and everything outside the blocks keep their dtype (LoRA: fp32).
blocks_to_swap the last N transformer blocks' frozen weights live in CPU memory; a forward pre-hook moves them to
               the compute device before the block runs and a forward hook moves them back after it (LoRA weights
               stay on the device, so the optimizer never sees a moved parameter). With gradient checkpointing the
               backward's recomputation goes through the same hooks, so the weights are on the device only while
               their block computes; without it autograd keeps the device copies until the backward.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

#: modules inside the blocks left in their dtype by fp8_base (the LoRA layers); outside the blocks nothing is cast
FP8_SKIP = (r"lora_",)


def apply_fp8_base(transformer: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the frozen Linear weights of the transformer blocks as float8_e4m3fn, computing in `compute_dtype`.
    Returns the number of layers cast."""
    from diffusers.hooks import apply_layerwise_casting

    if not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError("fp8_base needs torch >= 2.1 (torch.float8_e4m3fn): update torch or turn fp8_base off.")
    for block in transformer_blocks(transformer):
        apply_layerwise_casting(block, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                skip_modules_pattern=FP8_SKIP, skip_modules_classes=(nn.Conv2d, nn.LayerNorm))
    return sum(1 for _, m in transformer.named_modules()
               if isinstance(m, nn.Linear) and m.weight.dtype == torch.float8_e4m3fn)


def transformer_blocks(transformer: nn.Module) -> List[nn.Module]:
    """The blocks in execution order: Flux's double then single blocks, SD3's joint blocks."""
    return list(getattr(transformer, "transformer_blocks", [])) + list(getattr(transformer, "single_transformer_blocks", []))


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
