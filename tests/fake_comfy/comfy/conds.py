"""Fake of comfy.conds (0.8.0): CONDRegular (repeated to the batch, concatenated along it), CONDCrossAttn
(text of different lengths concatenates only when one length divides the other: it is repeated up to the longer,
as ComfyUI does for CLIP's 77-token chunks) and CONDConstant (a non-tensor value, e.g. num_tokens)."""
import math

import torch


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device=None, **kwargs):
        c = self.cond
        if c.shape[0] < batch_size:
            c = c.repeat([math.ceil(batch_size / c.shape[0])] + [1] * (c.ndim - 1))[:batch_size]
        return self._copy_with(c.to(device) if device is not None else c)

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class CONDCrossAttn(CONDRegular):
    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        if s1 != s2:
            if s1[0] != s2[0] or s1[2] != s2[2]:
                return False
            mult_min = math.lcm(s1[1], s2[1])
            if mult_min // min(s1[1], s2[1]) > 4:
                return False
            if max(s1[1], s2[1]) % min(s1[1], s2[1]) != 0:
                return False
        return True

    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        n = max(c.shape[1] for c in conds)
        return torch.cat([c.repeat(1, n // c.shape[1], 1) for c in conds])


class CONDConstant(CONDRegular):
    """A value every sample of a batch shares (Lumina / Z-Image's num_tokens): concatenates only when equal."""

    def process_cond(self, batch_size, **kwargs):
        return self._copy_with(self.cond)

    def can_concat(self, other):
        return self.cond == other.cond

    def concat(self, others):
        return self.cond
