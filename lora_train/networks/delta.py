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

    def updown_rows(self, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Rows `rows` (an index tensor) of `updown(shape)`; the types compute only those rows where they can."""
        return self.updown(shape)[rows]

    def dora_on_output(self) -> bool:
        """Is `dora_scale` per output channel (LyCORIS' wd_on_output, shape (out, 1, ...))?"""
        ds = self.dora_scale
        return ds is not None and ds.dim() >= 2 and ds.shape[0] != 1 and ds.shape[1] == 1

    def decompose(self, updown: torch.Tensor, weight: torch.Tensor, dora_scale: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
        """DoRA's weight decomposition as the hosts and LyCORIS compute it: the merged weight's norm per input
        channel (`dora_scale` of shape (1, in, 1, 1)), or per output channel when `dora_scale` is (out, 1, ...)
        (LyCORIS' wd_on_output; ComfyUI reads both, A1111 only the input one). Returns the new delta.
        `dora_scale`: these rows of ours (a part of a fused module, output axis only)."""
        w = weight.float()
        merged = w + updown
        ds = self.dora_scale if dora_scale is None else dora_scale
        nd = w.dim() - 1
        if self.dora_on_output():  # on the output axis
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

    def _load(self, t: Dict[str, torch.Tensor], names: Dict[str, str]) -> "DeltaModule":
        """Copy the file's tensors {file name: attribute} present in `t` (reshaped to the parameter), then alpha and
        dora_scale; returns self."""
        with torch.no_grad():
            for key, attr in names.items():
                if key in t:
                    p = getattr(self, attr)
                    p.copy_(t[key].float().reshape(p.shape))
        self._read_common(t)
        return self

    def _read_common(self, t: Dict[str, torch.Tensor]) -> None:
        self.alpha = float(t["alpha"].float().item()) if "alpha" in t else None
        if "dora_scale" in t:
            self.dora_scale = nn.Parameter(t["dora_scale"].float().clone())

    def init_dora(self, weight: torch.Tensor, on_output: bool = False) -> None:
        """dora_scale = the base weight's norm per input channel, or per output channel with `on_output` (LyCORIS'
        wd_on_output; the delta starts at zero either way)."""
        w = weight.detach().float()
        nd = w.dim() - 1
        if on_output:
            norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * nd)
        else:
            norm = (w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
                    .reshape(w.shape[1], *[1] * nd).transpose(0, 1))
        self.dora_scale = nn.Parameter(norm.clone())

    def plus_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n in self.PLUS]


class GroupPart(nn.Module):
    """The rows of one layer inside an adapter trained on a FUSED module of the file (Flux's img_attn_qkv = our
    to_q + to_k + to_v; linear1 = q, k, v, proj_mlp; SD3's pre-only modulation with its two halves swapped). The
    adapter (`group`, shared by every part) holds the file's tensors for the fused weight, so its delta is exactly
    what sd-scripts + LyCORIS train and what the hosts apply to the fused weight; this part adds its rows of that
    delta to its layer. `rows`: the fused module's row index of each of this layer's rows, in the layer's order;
    `layers` / `rows_of`: every part's layer and rows (the fused weight, for DoRA on the input axis)."""

    def __init__(self, group: DeltaModule, paths: Tuple[str, ...], rows: torch.Tensor,
                 layers: List[nn.Module], rows_of: List[torch.Tensor], fused_shape: Tuple[int, ...]):
        super().__init__()
        self.group = group
        self.paths = tuple(paths)
        self.register_buffer("rows", rows.long(), persistent=False)
        self.fused_shape = tuple(fused_shape)
        self.__dict__["_parts"] = (list(layers), [r.long() for r in rows_of])  # not submodules: no cycles

    TYPE = property(lambda self: self.group.TYPE)
    rank_dropout = property(lambda self: self.group.rank_dropout)
    module_dropout = property(lambda self: self.group.module_dropout)

    def fused_weight(self) -> torch.Tensor:
        layers, rows_of = self.__dict__["_parts"]
        ws = [base_weight(layer).float() for layer in layers]
        out = ws[0].new_zeros(self.fused_shape)
        for w, r in zip(ws, rows_of):
            out[r.to(w.device)] = w
        return out

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        g, rows = self.group, self.rows.to(weight.device)
        if g.dora_scale is not None and not g.dora_on_output():  # the norm spans every part: the whole module
            return g.delta(self.fused_weight())[rows]
        ud = g.updown_rows(rows, torch.Size(self.fused_shape))
        if self.training and g.rank_dropout:
            keep = (torch.rand(ud.shape[0], device=ud.device) > g.rank_dropout).to(ud.dtype)
            ud = ud * keep.view(-1, *[1] * (ud.dim() - 1))
        if g.dora_scale is not None:
            return g.decompose(ud, weight, g.dora_scale[rows])
        return ud


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


def add_group(layers: List[nn.Module], paths: Tuple[str, ...], rows_of: List[torch.Tensor], adapter: str,
              module: DeltaModule, fused_shape: Tuple[int, ...], strength: float = 1.0) -> None:
    """Attach `module` (an adapter on a fused module of the file) to its parts: layer i gets `rows_of[i]`."""
    layers = [getattr(m, "base_layer", m) for m in layers]
    for layer, rows in zip(layers, rows_of):
        add(layer, adapter, GroupPart(module, paths, rows, layers, rows_of, fused_shape), strength)


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
    """(path, adapter) of every adapter once; one on a fused module as (its first part's path, the shared one)."""
    seen = set()
    for path, _, box in layers(root, adapter):
        m = box.adapters[adapter]
        if isinstance(m, GroupPart):
            if id(m.group) in seen:
                continue
            seen.add(id(m.group))
            path, m = m.paths[0], m.group
        yield path, m


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
