"""The model families, one module each (families/base.py says what a family states). `get(name)` and
`of(model)` are how the rest of the package asks; `FLOW` names the flow-matching ones."""
from __future__ import annotations

from typing import Dict

from .base import Family, FlowFamily, unknown
from .flux import Flux
from .sd import SD1, SD2, SDXL
from .sd3 import SD3

REGISTRY: Dict[str, Family] = {f.name: f for f in (SD1(), SD2(), SDXL(), Flux(), SD3())}
NAMES = tuple(REGISTRY)
FLOW = tuple(n for n, f in REGISTRY.items() if f.flow)


def get(name: str) -> Family:
    try:
        return REGISTRY[name]
    except KeyError:
        raise unknown(name, NAMES) from None


def of(model) -> Family:
    """The family of a BaseModel (its `kind`)."""
    return get(getattr(model, "kind", "sd1"))


def is_flow(model) -> bool:
    return getattr(model, "kind", "") in FLOW


__all__ = ["Family", "FlowFamily", "REGISTRY", "NAMES", "FLOW", "get", "of", "is_flow"]
