"""EMA of the LoRA weights (`ema_decay`): ema = decay * ema + (1 - decay) * weights after every optimizer step,
with diffusers' EMAModel warm-up of the decay, min(decay, (1 + n) / (10 + n)) at update n, so early steps are not
dominated by the zero-initialised start. The saved LoRA files are the EMA copy; the resumable state carries it.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch


class LoraEMA:
    def __init__(self, named: Dict[str, torch.nn.Parameter], decay: float):
        self.decay = float(decay)
        self.names: List[str] = sorted(named)
        self.params = [named[n] for n in self.names]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.updates += 1
        cur = [p.detach().float().to(s.device) for p, s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, cur, 1.0 - d)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block, its own weights again after it."""
        saved = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        sd = {f"ema.{n}": s.cpu().contiguous() for n, s in zip(self.names, self.shadow)}
        sd["ema_updates"] = torch.tensor(self.updates)
        return sd

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"ema.{n}" not in sd]
        if missing:
            raise ValueError(f"the state's EMA weights do not fit this config (e.g. {missing[0]}): resume with the "
                             f"config it was saved with.")
        self.shadow = [sd[f"ema.{n}"].float().to(s.device) for n, s in zip(self.names, self.shadow)]
        self.updates = int(sd["ema_updates"])
