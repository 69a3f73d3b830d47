"""The model families, one module each (families/base.py says what a family states). `get(name)` and
`of(model)` are how the rest of the package asks; `FLOW` names the flow-matching ones."""
from __future__ import annotations

from typing import Dict

from .base import Family, FlowFamily, unknown
from .chroma import Chroma
from .comfyui import ComfyUIInPlace
from .flux import Flux
from .flux2 import Flux2
from .qwen_image import QwenImage
from .sd import SD1, SD2, SDXL
from .sd3 import SD3
from .wan import Wan
from .z_image import ZImage

REGISTRY: Dict[str, Family] = {f.name: f for f in (SD1(), SD2(), SDXL(), Flux(), SD3(), QwenImage(), ZImage(), Chroma(), Wan(), Flux2(),
                                                   ComfyUIInPlace())}
#: the families a user picks (the in-place one, families/comfyui.py, is made by its host)
NAMES = tuple(n for n, f in REGISTRY.items() if not f.in_place)
FLOW = tuple(n for n, f in REGISTRY.items() if f.flow)
#: the order detection asks the families in (families/base.py detect_order): flow families, SDXL, SD2, SD1
DETECT_ORDER = tuple(sorted(NAMES, key=lambda n: REGISTRY[n].detect_order))
#: tiny test model spec -> family
TINY_SPECS = {spec: n for n, f in REGISTRY.items() for spec in f.tiny_specs}
TINY_FLOW_SPECS = tuple(spec for spec, n in TINY_SPECS.items() if REGISTRY[n].flow)


def get(name: str) -> Family:
    try:
        return REGISTRY[name]
    except KeyError:
        raise unknown(name, NAMES) from None


def of(model) -> Family:
    """The family of a BaseModel (its `kind`)."""
    return get(getattr(model, "kind", "sd1"))


def by_transformer_class(class_name: str):
    """The flow family whose denoiser is this diffusers class, or None."""
    return next((n for n, f in REGISTRY.items() if f.flow and f.transformer_class == class_name), None)


def by_pipeline_class(class_name: str):
    """The flow family whose diffusers pipeline classes start with this name's longest matching prefix (Flux2... is
    FLUX.2, Flux... Flux.1), or None."""
    hits = [(len(p), n) for n, f in REGISTRY.items() if f.flow for p in f.pipeline_prefixes if class_name.startswith(p)]
    return max(hits)[1] if hits else None


def same(a: str, b: str) -> bool:
    """Two family names (BaseModel.kind) are the same family."""
    return get(a) is get(b)


def is_flow(model) -> bool:
    return getattr(model, "kind", "") in FLOW


__all__ = ["Family", "FlowFamily", "REGISTRY", "NAMES", "FLOW", "get", "of", "is_flow", "by_transformer_class", "DETECT_ORDER",
           "TINY_SPECS", "TINY_FLOW_SPECS", "same", "by_pipeline_class"]
