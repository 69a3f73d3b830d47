"""The network a run trains: its type (lora | locon | loha | lokr | dora), targets, injection, LoRA+ parameter
groups and the kohya / LyCORIS metadata that names it.

Types and what they inject (rank / alpha on the linear targets, conv_rank / conv_alpha on the 3x3 convolutions
of the UNet's ResNet blocks when conv_rank > 0; see locon.py for those targets):
  lora   peft LoRA on the default targets (lora.py); with conv_rank it is kohya's LoRA + conv ("LoCon")
  locon  the same with the ResNet convolutions always on (conv_rank 0 -> conv_rank = rank)
  loha   LoHa weight deltas (loha.py), LyCORIS algo=loha
  lokr   LoKr weight deltas (lokr.py; factor, full_matrix), LyCORIS algo=lokr
  dora   LoRA with DoRA's weight decomposition (dora.py), kohya/LyCORIS dora_wd
Files: lora / locon are written as kohya's networks.lora writes them (conv_dim / conv_alpha in
ss_network_args), the others as LyCORIS' lycoris.kohya does ({"algo": ..., "conv_dim": ...}).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import families
from . import delta as delta_mod
from . import flow_names
from . import lora as lora_mod
from .layouts import DELTA_TYPES
from .locon import resnet_target_modules



@dataclass
class NetworkSpec:
    type: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    conv_rank: int = 0
    conv_alpha: float = 0.0
    factor: int = -1
    full_matrix: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    loraplus_lr_ratio: Optional[float] = None
    dora_on_output: bool = False  # DoRA's dora_scale per output channel (LyCORIS wd_on_output); see from_config

    @classmethod
    def from_config(cls, cfg, kind: Optional[str] = None) -> "NetworkSpec":
        """The run's network; `kind` the model's (BaseModel.kind). Flux / SD3 transformers have no ResNet
        convolutions: conv_rank and LoCon do not apply there (LoCon is LoRA). DoRA keeps dora_scale per INPUT
        channel everywhere: A1111 reads no other, and ComfyUI / Forge's output-axis branch normalises by the
        base weight instead of the merged one (comfy/weight_adapter/base.py weight_decompose), which is not what
        LyCORIS trains; on a fused Flux / SD3 module the norm then spans q, k and v together (delta.GroupPart)."""
        typ = getattr(cfg, "network_type", "lora") or "lora"
        conv = int(getattr(cfg, "conv_rank", 0) or 0)
        if typ == "locon" and conv == 0:
            conv = int(cfg.lora_rank)
        flow = bool(kind) and families.get(kind).flow
        if flow:
            conv, typ = 0, ("lora" if typ == "locon" else typ)
        ca = getattr(cfg, "conv_alpha", None)
        return cls(type=typ, rank=int(cfg.lora_rank), alpha=float(cfg.alpha), conv_rank=conv,
                   conv_alpha=float(conv if ca is None else ca), factor=int(getattr(cfg, "factor", -1)),
                   full_matrix=bool(getattr(cfg, "full_matrix", False)),
                   dropout=float(getattr(cfg, "dropout", 0.0) or 0.0),
                   rank_dropout=float(getattr(cfg, "rank_dropout", 0.0) or 0.0),
                   module_dropout=float(getattr(cfg, "module_dropout", 0.0) or 0.0),
                   loraplus_lr_ratio=getattr(cfg, "loraplus_lr_ratio", None))


def targets(component: str, module: nn.Module, spec: NetworkSpec) -> List[Tuple[str, int, float, bool]]:
    """[(module path, rank, alpha, is a 3x3 conv)] the network trains in one component (unet | te | te1 | te2)."""
    if component == "unet":
        out = [(p, spec.rank, spec.alpha, False) for p in lora_mod.unet_target_modules(module)]
        if spec.conv_rank > 0:
            have = {p for p, *_ in out}
            for p, conv in resnet_target_modules(module):
                if p not in have:
                    out.append((p, spec.conv_rank, spec.conv_alpha, True) if conv else (p, spec.rank, spec.alpha, False))
        return out
    return [(p, spec.rank, spec.alpha, False) for p in lora_mod.te_target_modules(module)]


def inject(module: nn.Module, component: str, spec: NetworkSpec, adapter: str = lora_mod.DEFAULT_ADAPTER
           ) -> List[nn.Parameter]:
    """Add the network to one component; returns its trainable parameters (up/B-side ones last, see `split_plus`)."""
    tg = targets(component, module, spec)
    if spec.type in ("lora", "locon"):
        pattern = {p: r for p, r, _, _ in tg if r != spec.rank}
        apattern = {p: a for p, _, a, _ in tg if a != spec.alpha}
        lora_mod.inject(module, [p for p, *_ in tg], spec.rank, spec.alpha, adapter, rank_pattern=pattern,
                        alpha_pattern=apattern, dropout=spec.dropout)
        return lora_mod.lora_parameters(module, adapter)
    cls = DELTA_TYPES[spec.type]
    named = dict(module.named_modules())
    opts: Dict[str, Any] = {"rank_dropout": spec.rank_dropout, "module_dropout": spec.module_dropout}
    if spec.type == "lokr":
        opts.update(factor=spec.factor, full_matrix=spec.full_matrix)
    if spec.type == "dora" and spec.dora_on_output:
        opts["dora_on_output"] = True
    kind = flow_names.kind_of(module) if component == "unet" else None
    if kind:  # Flux / SD3: one adapter per module of the file (fused q/k/v trained as one, as sd-scripts + LyCORIS)
        for g in flow_names.unet_groups(kind, module, extras=False).values():
            flow_names.attach(module, g, adapter, cls.create(flow_names.fused_weight(g, module), spec.rank,
                                                             spec.alpha, **opts))
        return delta_mod.parameters(module, adapter)
    for path, rank, alpha, _ in tg:
        layer = named[path]
        w = delta_mod.base_weight(getattr(layer, "base_layer", layer))
        delta_mod.add(layer, adapter, cls.create(w, rank, alpha, **opts))
    return delta_mod.parameters(module, adapter)


def split_plus(module: nn.Module, params: List[nn.Parameter], adapter: str = lora_mod.DEFAULT_ADAPTER
               ) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(the rest, the LoRA+ "B" side: lora_B / lora_up and the output-side factors of LoHa / LoKr)."""
    plus = {id(m.lora_B[adapter].weight) for _, m in lora_mod.lora_layers(module, adapter)}
    plus |= {id(p) for _, dm in delta_mod.modules(module, adapter) for p in dm.plus_parameters()}
    return [p for p in params if id(p) not in plus], [p for p in params if id(p) in plus]


def param_groups(module: nn.Module, params: List[nn.Parameter], lr: float, spec: NetworkSpec,
                 adapter: str = lora_mod.DEFAULT_ADAPTER) -> List[Dict[str, Any]]:
    """One group at `lr`; with LoRA+ (ratio != 1) two: the rest at lr, the up/B side at ratio x lr."""
    ratio = spec.loraplus_lr_ratio
    if ratio is None or float(ratio) == 1.0:
        return [{"params": params, "lr": lr}]
    rest, plus = split_plus(module, params, adapter)
    groups = [{"params": rest, "lr": lr}] if rest else []
    if plus:
        groups.append({"params": plus, "lr": lr * float(ratio), "loraplus": True})
    return groups


def build(module: nn.Module, component: str, spec: NetworkSpec, lr: float,
          adapter: str = lora_mod.DEFAULT_ADAPTER) -> List[Dict[str, Any]]:
    """Inject the network into one component and return its optimizer parameter groups."""
    return param_groups(module, inject(module, component, spec, adapter), lr, spec, adapter)


def is_trainable_name(name: str, adapter: str = lora_mod.DEFAULT_ADAPTER) -> bool:
    """Is a named_parameters() name one of the adapter's weights (peft LoRA or our weight-delta types)?"""
    return ((".lora_A." in name or ".lora_B." in name) and adapter in name) or \
        delta_mod.is_adapter_parameter(name, adapter)


def metadata(spec: NetworkSpec, kind: Optional[str] = None) -> Dict[str, str]:
    """ss_network_module / ss_network_args as kohya (lora, locon; networks.lora_flux / lora_sd3 for the flow
    families) and LyCORIS (loha, lokr, dora) write them."""
    args: Dict[str, Any] = {}
    if spec.type in ("lora", "locon"):
        module = families.get(kind).network_module if kind in families.FLOW else "networks.lora"
        if spec.conv_rank > 0:
            args.update(conv_dim=str(spec.conv_rank), conv_alpha=f"{spec.conv_alpha:g}")
        if spec.dropout:
            args["dropout"] = f"{spec.dropout:g}"
    else:
        module = "lycoris.kohya"
        args["algo"] = "lora" if spec.type == "dora" else spec.type
        if spec.conv_rank > 0:
            args.update(conv_dim=str(spec.conv_rank), conv_alpha=f"{spec.conv_alpha:g}")
        if spec.type == "dora":
            args.update(dora_wd="True", wd_on_output=str(bool(spec.dora_on_output)))
        if spec.type == "lokr":
            args["factor"] = str(spec.factor)
            if spec.full_matrix:
                args["full_matrix"] = "True"
        for k in ("rank_dropout", "module_dropout"):
            if getattr(spec, k):
                args[k] = f"{getattr(spec, k):g}"
    if spec.loraplus_lr_ratio is not None and float(spec.loraplus_lr_ratio) != 1.0:
        args["loraplus_lr_ratio"] = f"{float(spec.loraplus_lr_ratio):g}"
    return {"ss_network_module": module, "ss_network_args": json.dumps(args)}


def check_finite_and_nonzero(lw) -> Tuple[bool, bool]:
    """(every tensor finite, some trained tensor non-zero) of a LoraWeights (all types): the trainer's checks."""
    finite, nonzero = True, False
    for d, u, _ in lw.modules.values():
        finite &= bool(torch.isfinite(d).all() and torch.isfinite(u).all())
        nonzero |= bool(u.any())
    for entry in lw.extra.values():
        for k, t in entry.tensors.items():
            finite &= bool(torch.isfinite(t).all())
        zero_started = {"loha": ("hada_w2_a",), "lokr": ("lokr_w2_b", "lokr_w2"), "dora": ("lora_up.weight",)}
        nonzero |= any(bool(entry.tensors[k].any()) for k in zero_started.get(entry.type, ()) if k in entry.tensors)
    return finite, nonzero
