"""Optimizers: AdamW (torch; fused/foreach where the device allows), AdamW8bit, Lion, Prodigy, Adafactor.

Each optional one is imported only when chosen, with a message naming the package and the alternative.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List

import torch


class OptimizerError(ValueError):
    pass


def _missing(name: str, package: str) -> OptimizerError:
    return OptimizerError(f"optimizer {name} needs the '{package}' package: `pip install {package}`, or use "
                          f"optimizer: AdamW.")


def make_optimizer(name: str, param_groups: List[Dict[str, Any]], device: torch.device, weight_decay: float,
                   betas=(0.9, 0.999), eps: float = 1e-8, extra: Dict[str, Any] = None) -> torch.optim.Optimizer:
    extra = dict(extra or {})
    if name == "AdamW":
        kw: Dict[str, Any] = dict(betas=betas, eps=eps, weight_decay=weight_decay)
        sig = inspect.signature(torch.optim.AdamW).parameters
        if device.type == "cuda" and "fused" in sig and "foreach" not in extra:
            kw["fused"] = True
        elif "foreach" in sig and device.type != "cpu":
            kw["foreach"] = True
        kw.update(extra)
        return torch.optim.AdamW(param_groups, **kw)
    if name == "AdamW8bit":
        if device.type != "cuda":
            raise OptimizerError("optimizer AdamW8bit runs on CUDA GPUs only (bitsandbytes); this run is on "
                                 f"{device.type}: use optimizer: AdamW.")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise _missing("AdamW8bit", "bitsandbytes") from None
        return bnb.optim.AdamW8bit(param_groups, betas=betas, eps=eps, weight_decay=weight_decay, **extra)
    if name == "Lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise _missing("Lion", "lion-pytorch") from None
        kw = dict(betas=(0.9, 0.99), weight_decay=weight_decay)
        kw.update(extra)
        return Lion(param_groups, **kw)
    if name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise _missing("Prodigy", "prodigyopt") from None
        kw = dict(weight_decay=weight_decay, decouple=True, safeguard_warmup=True, use_bias_correction=True)
        kw.update(extra)
        return Prodigy(param_groups, **kw)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        kw = dict(scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=weight_decay)
        kw.update(extra)
        return Adafactor(param_groups, **kw)
    raise OptimizerError(f"optimizer '{name}' is not known: use AdamW, AdamW8bit, Lion, Prodigy or Adafactor.")


def describe(opt: torch.optim.Optimizer) -> str:
    """kohya-style `ss_optimizer` text: module.Class(key=value,...)."""
    cls = type(opt)
    d = opt.defaults
    keys = [k for k in ("weight_decay", "betas", "eps", "decouple") if k in d]
    args = ",".join(f"{k}={d[k]}" for k in keys)
    return f"{cls.__module__}.{cls.__name__}({args})"
