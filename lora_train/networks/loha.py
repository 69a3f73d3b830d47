"""LoHa (LyCORIS `algo=loha`): delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (Hadamard product).

File layout (LyCORIS, read by A1111's network_hada.py and ComfyUI's weight_adapter/loha.py):
`<module>.hada_w1_a` (out, r), `.hada_w1_b` (r, in*kh*kw), `.hada_w2_a`, `.hada_w2_b`, `.alpha`; the hosts'
scale is alpha / hada_w1_b.shape[0]. Convolutions use the flattened (non-Tucker) form: no `hada_t1/t2`.
peft's LoHa has the same maths; this small module keeps it a weight delta like the others (see delta.py).
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from .delta import DeltaModule


class LoHa(DeltaModule):
    TYPE = "loha"
    KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    PLUS = ("hada_w1_a", "hada_w2_a")  # the output-side factors (LoRA+ "B" matrices)

    def __init__(self, out_dim: int, in_dim: int, rank: int, alpha: float, **kw):
        super().__init__(**kw)
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim))
        self.alpha = float(alpha)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, alpha: float, **kw) -> "LoHa":
        """A new adapter for `weight` with LyCORIS' initialisation (w2_a zero: the delta starts at 0)."""
        m = cls(weight.shape[0], int(math.prod(weight.shape[1:])), rank, alpha, **kw)
        with torch.no_grad():
            nn.init.normal_(m.hada_w1_b, std=1.0)
            nn.init.normal_(m.hada_w1_a, std=0.1)
            nn.init.normal_(m.hada_w2_b, std=1.0)
            nn.init.zeros_(m.hada_w2_a)
        return m

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor], weight_shape=None) -> "LoHa":
        if "hada_t1" in t or "hada_t2" in t:
            raise ValueError("LoHa with Tucker decomposition (hada_t1/hada_t2, LyCORIS use_tucker) is not supported")
        w1a, w1b = t["hada_w1_a"].float(), t["hada_w1_b"].float()
        w1b = w1b.reshape(w1b.shape[0], -1)
        return cls(w1a.shape[0], w1b.shape[1], w1b.shape[0], float(w1b.shape[0]))._load(t, {k: k for k in cls.KEYS})

    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.hada_w1_b.shape[0]

    def updown(self, shape) -> torch.Tensor:
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return w.reshape(shape) * self.scale()

    def updown_rows(self, rows: torch.Tensor, shape) -> torch.Tensor:
        w = (self.hada_w1_a[rows] @ self.hada_w1_b) * (self.hada_w2_a[rows] @ self.hada_w2_b)
        return w.reshape(len(rows), *shape[1:]) * self.scale()

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {k: getattr(self, k).detach().float().cpu().clone() for k in self.KEYS}
        out.update(self._common_tensors())
        return out
