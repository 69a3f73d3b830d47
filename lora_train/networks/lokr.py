"""LoKr (LyCORIS `algo=lokr`): delta = kron(w1, w2) * scale, w1 small (factor), w2 the rest (often low rank).

File layout (LyCORIS; A1111's network_lokr.py, ComfyUI's weight_adapter/lokr.py): `<module>.lokr_w1`
(out_l, in_m) or `.lokr_w1_a/_b`, `.lokr_w2` (out_k, in_n[, kh, kw]) or `.lokr_w2_a` (out_k, r) +
`.lokr_w2_b` (r, in_n*kh*kw), `.alpha`. The hosts' scale: alpha / r where r is the inner size of the
decomposed factor (w2_b, else w1_b); 1 when both factors are full matrices (LyCORIS writes alpha = r then).
peft's LoKr scales by alpha / r even with full matrices and has no full-matrix option, hence this module.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .delta import DeltaModule


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """LyCORIS' split of a dimension into (m, n), m <= n, m closest to `factor` (-1: as square as it gets)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKr(DeltaModule):
    TYPE = "lokr"
    KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    PLUS = ("lokr_w2_a", "lokr_w2")  # the output-side factor of the trained (zero-started) part

    def __init__(self, w1: Tuple[int, int], w2: Tuple[int, ...], rank: Optional[int], alpha: float,
                 w1_rank: Optional[int] = None, **kw):
        super().__init__(**kw)
        if w1_rank:
            self.lokr_w1_a = nn.Parameter(torch.empty(w1[0], w1_rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(w1_rank, w1[1]))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(*w1))
        if rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(w2[0], rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, int(math.prod(w2[1:]))))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(*w2))
        self.alpha = float(alpha)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, alpha: float, factor: int = -1, full_matrix: bool = False,
               **kw) -> "LoKr":
        """As LyCORIS' LokrModule (decompose_both off, no Tucker): w2 low rank unless rank >= max(w2) / 2 or
        full_matrix; w1 kaiming, w2_a kaiming, w2_b (or the full w2) zero."""
        out_dim, in_dim, k = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        in_m, in_n = factorization(in_dim, factor)
        out_l, out_k = factorization(out_dim, factor)
        full = full_matrix or rank >= max(out_k, in_n) / 2
        m = cls((out_l, in_m), (out_k, in_n) + k, None if full else rank, float(rank) if full else alpha, **kw)
        with torch.no_grad():
            nn.init.kaiming_uniform_(m.lokr_w1, a=math.sqrt(5))
            if full:
                nn.init.zeros_(m.lokr_w2)
            else:
                nn.init.kaiming_uniform_(m.lokr_w2_a, a=math.sqrt(5))
                nn.init.zeros_(m.lokr_w2_b)
        return m

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor], weight_shape=None) -> "LoKr":
        if "lokr_t2" in t or "lokr_t1" in t:
            raise ValueError("LoKr with Tucker decomposition (lokr_t2, LyCORIS use_tucker) is not supported")
        w1_rank = None
        if "lokr_w1" in t:
            w1 = tuple(t["lokr_w1"].shape)
        else:
            w1 = (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
            w1_rank = t["lokr_w1_a"].shape[1]
        rank = None
        if "lokr_w2" in t:
            w2 = tuple(t["lokr_w2"].shape)
        else:
            w2 = (t["lokr_w2_a"].shape[0], int(math.prod(t["lokr_w2_b"].shape[1:])))
            rank = t["lokr_w2_a"].shape[1]
        m = cls(w1, w2, rank, 1.0, w1_rank=w1_rank)
        return m._load(t, {k: k for k in cls.KEYS if hasattr(m, k)})

    def scale(self) -> float:
        """As the hosts: dim = w2_b's rank, else w1_b's, else none (scale 1)."""
        dim = None
        if hasattr(self, "lokr_w1_b"):
            dim = self.lokr_w1_b.shape[0]
        if hasattr(self, "lokr_w2_b"):
            dim = self.lokr_w2_b.shape[0]
        return 1.0 if dim is None or self.alpha is None else self.alpha / dim

    def updown(self, shape) -> torch.Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(shape) * self.scale()

    def updown_rows(self, rows: torch.Tensor, shape) -> torch.Tensor:
        """Rows of kron(w1, w2): row r = w1[r // out_k] (x) w2[r % out_k], without the whole product."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        if w2.dim() != 2:
            return super().updown_rows(rows, shape)
        out_k = w2.shape[0]
        a, b = w1[rows // out_k], w2[rows % out_k]
        return (a[:, :, None] * b[:, None, :]).reshape(len(rows), *shape[1:]) * self.scale()

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {k: getattr(self, k).detach().float().cpu().clone() for k in self.KEYS if hasattr(self, k)}
        out.update(self._common_tensors())
        return out
