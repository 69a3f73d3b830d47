"""Weight-delta adapters (LoHa, LoKr, DoRA) as a parametrization of a Linear / Conv2d weight.

The hosts apply every LyCORIS type as a weight delta: W' = W + strength * delta(W) (A1111's
extensions-builtin/Lora network_*.py `calc_updown` + `finalize_updown`; ComfyUI's comfy/weight_adapter
`calculate_weight`). We train and apply them the same way: the layer's weight is parametrized
(torch.nn.utils.parametrize) by `NetworkDelta`, which adds `strength * adapter.delta(W)` of each active
adapter to the base weight. So the trained model, the imported file and the hosts compute one formula, and
plain LoRA adapters of peft (which wrap the layer and read `base_layer.weight`) combine with these.

An adapter module (loha.LoHa, lokr.LoKr, dora.LoraDelta) holds its tensors under the file's names, computes
`updown(shape)` (the scaled delta before weight decomposition, as the hosts' calc_updown) and, when it has a
`dora_scale`, the weight decomposition of DoRA (`decompose`). The names of the modules in a file (kohya_name)
are the model family's business; a type only knows the tensor names after the module name.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize


class DeltaModule(nn.Module):
    """One adapter on one layer. Subclasses set TYPE, KEYS (file tensor names they read) and PLUS (parameter
    names that LoRA+ trains at ratio x lr), and implement `updown(shape)`."""

    TYPE = ""
    PLUS: Tuple[str, ...] = ()

    def __init__(self, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.alpha: Optional[float] = None
        self.dora_scale: Optional[nn.Parameter] = None

    # ------------------------------------------------------------------ maths
    def updown(self, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def decompose(self, updown: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's weight decomposition as the hosts and LyCORIS compute it: the merged weight's norm per input
        channel (`dora_scale` of shape (1, in, 1, 1)), or per output channel when `dora_scale` is (out, 1, ...)
        (LyCORIS' wd_on_output; ComfyUI reads both, A1111 only the input one). Returns the new delta."""
        w = weight.float()
        merged = w + updown
        ds = self.dora_scale
        nd = w.dim() - 1
        if ds.shape[0] == w.shape[0] and ds.shape[0] != 1:  # on the output axis
            norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * nd)
        else:
            norm = (merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
                    .reshape(w.shape[1], *[1] * nd).transpose(0, 1))
        norm = norm + torch.finfo(torch.float32).eps
        return merged * (ds / norm) - w

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight delta at strength 1 (float32), what the hosts add at `<lora:name:1>`."""
        ud = self.updown(weight.shape)
        if self.training and self.rank_dropout:
            keep = (torch.rand(ud.shape[0], device=ud.device) > self.rank_dropout).to(ud.dtype)
            ud = ud * keep.view(-1, *[1] * (ud.dim() - 1))
        if self.dora_scale is not None:
            return self.decompose(ud, weight)
        return ud

    # ------------------------------------------------------------------ file tensors
    def tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors this adapter writes after `<module name>.` (float32, on the CPU)."""
        raise NotImplementedError

    def _common_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach().float().cpu().clone()
        return out

    def _read_common(self, t: Dict[str, torch.Tensor]) -> None:
        self.alpha = float(t["alpha"].float().item()) if "alpha" in t else None
        if "dora_scale" in t:
            self.dora_scale = nn.Parameter(t["dora_scale"].float().clone())

    def init_dora(self, weight: torch.Tensor) -> None:
        """dora_scale = the base weight's norm per input channel (so the delta starts at zero)."""
        w = weight.detach().float()
        nd = w.dim() - 1
        self.dora_scale = nn.Parameter(w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
                                       .reshape(w.shape[1], *[1] * nd).transpose(0, 1).clone())

    def plus_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n in self.PLUS]


class NetworkDelta(nn.Module):
    """The parametrization: W -> W + sum over active adapters of strength * delta(W)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.strength: Dict[str, float] = {}
        self.active: List[str] = []

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = weight
        for name in self.active:
            ad = self.adapters[name]
            s = self.strength.get(name, 1.0)
            if not s or (ad.training and ad.module_dropout and float(torch.rand(())) < ad.module_dropout):
                continue
            out = out + (ad.delta(weight) * s).to(weight.dtype)
        return out


def _container(layer: nn.Module) -> Optional[NetworkDelta]:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations.weight:
        if isinstance(p, NetworkDelta):
            return p
    return None


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's own weight without our adapters."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def add(layer: nn.Module, adapter: str, module: DeltaModule, strength: float = 1.0) -> None:
    """Attach `module` as adapter `adapter` to a Linear / Conv2d layer (the base layer of a peft wrapper)."""
    layer = getattr(layer, "base_layer", layer)
    box = _container(layer)
    if box is None:
        box = NetworkDelta()
        parametrize.register_parametrization(layer, "weight", box, unsafe=True)
    w = base_weight(layer)
    module.to(device=w.device)
    box.adapters[adapter] = module
    box.strength[adapter] = float(strength)
    if adapter not in box.active:
        box.active.append(adapter)


def layers(root: nn.Module, adapter: Optional[str] = None) -> Iterable[Tuple[str, nn.Module, NetworkDelta]]:
    """(module path as the model names it without the peft level, layer, container) of every layer with one
    of our adapters (with `adapter` when given)."""
    for name, m in root.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        box = _container(m)
        if box is None or (adapter is not None and adapter not in box.adapters):
            continue
        path = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
        yield path, m, box


def modules(root: nn.Module, adapter: str) -> Iterable[Tuple[str, DeltaModule]]:
    for path, _, box in layers(root, adapter):
        yield path, box.adapters[adapter]


def parameters(root: nn.Module, adapter: str) -> List[nn.Parameter]:
    return [p for _, m in modules(root, adapter) for p in m.parameters()]


def set_strength(root: nn.Module, strength: float, adapter: str) -> None:
    for _, _, box in layers(root, adapter):
        box.strength[adapter] = float(strength)


def set_active(root: nn.Module, names: List[str]) -> None:
    """Exactly `names` active (in that order) on every layer holding one of our adapters."""
    for _, _, box in layers(root):
        box.active = [n for n in names if n in box.adapters]


def activate(root: nn.Module, adapter: str) -> None:
    for _, _, box in layers(root, adapter):
        if adapter not in box.active:
            box.active.append(adapter)


def remove(root: nn.Module, adapter: str) -> None:
    """Take the adapter out; a layer left without adapters gets its plain weight back."""
    for _, layer, box in list(layers(root, adapter)):
        del box.adapters[adapter]
        box.strength.pop(adapter, None)
        box.active = [a for a in box.active if a != adapter]
        if not len(box.adapters):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def is_adapter_parameter(name: str, adapter: str) -> bool:
    """Is `name` (from named_parameters) a parameter of our adapter `adapter`?"""
    return f".adapters.{adapter}." in name and ".parametrizations." in name
