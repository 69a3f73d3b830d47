"""DoRA (weight-decomposed LoRA): W' = dora_scale * (W + s B A) / ||W + s B A||, per input channel.

File layout as LyCORIS (`dora_wd=True, wd_on_output=False`) and kohya write it, which both hosts apply
exactly: `<module>.lora_down.weight`, `.lora_up.weight`, `.alpha` and `.dora_scale` of shape (1, in[, 1, 1]).
A1111 1.10.1 (network.py `apply_weight_decompose`) only reads the input-channel orientation; ComfyUI
(weight_adapter/base.py `weight_decompose`) reads both. peft's DoRA keeps its magnitude per output channel
(the other orientation), so this module computes it. Strength w: W + w * (W' - W), as the hosts do.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from .delta import DeltaModule


class LoraDelta(DeltaModule):
    """A LoRA as a weight delta (up @ down * alpha / rank), used for DoRA (with `dora_scale`)."""

    TYPE = "dora"
    KEYS = ("lora_down.weight", "lora_up.weight")
    PLUS = ("lora_up",)

    def __init__(self, down_shape, up_shape, alpha: float, **kw):
        super().__init__(**kw)
        self.lora_down = nn.Parameter(torch.empty(*down_shape))
        self.lora_up = nn.Parameter(torch.empty(*up_shape))
        self.alpha = float(alpha)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, alpha: float, dora: bool = True, dora_on_output: bool = False,
               **kw) -> "LoraDelta":
        """down (r, in[, kh, kw]) kaiming as kohya/peft, up (out, r[, 1, 1]) zero; dora_scale = ||W|| per input
        channel (per output channel with `dora_on_output`: the flow families, see network.py)."""
        k = tuple(weight.shape[2:])
        m = cls((rank, weight.shape[1]) + k, (weight.shape[0], rank) + (1,) * len(k), alpha, **kw)
        with torch.no_grad():
            nn.init.kaiming_uniform_(m.lora_down, a=math.sqrt(5))
            nn.init.zeros_(m.lora_up)
        if dora:
            m.init_dora(weight, on_output=dora_on_output)
        return m

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor], weight_shape=None) -> "LoraDelta":
        if "lora_mid.weight" in t:
            raise ValueError("LoCon with a Tucker middle (lora_mid, LyCORIS use_tucker) is not supported")
        down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
        return cls(tuple(down.shape), tuple(up.shape), float(down.shape[0]))._load(
            t, {"lora_down.weight": "lora_down", "lora_up.weight": "lora_up"})

    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.lora_down.shape[0]

    def updown(self, shape) -> torch.Tensor:
        up = self.lora_up.reshape(self.lora_up.shape[0], -1)
        down = self.lora_down.reshape(self.lora_down.shape[0], -1)
        return (up @ down).reshape(shape) * self.scale()

    def updown_rows(self, rows: torch.Tensor, shape) -> torch.Tensor:
        up = self.lora_up.reshape(self.lora_up.shape[0], -1)[rows]
        down = self.lora_down.reshape(self.lora_down.shape[0], -1)
        return (up @ down).reshape(len(rows), *shape[1:]) * self.scale()

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {"lora_down.weight": self.lora_down.detach().float().cpu().clone(),
               "lora_up.weight": self.lora_up.detach().float().cpu().clone()}
        out.update(self._common_tensors())
        return out
