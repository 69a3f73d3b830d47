"""The tensor layouts of the network types in a kohya/LyCORIS file, apart from the module names.

A module's entry in a file is `<kohya module name>.<tensor name>`; the module name is the model family's
(lora.kohya_name, flow families alike), the tensor names are the type's:
  lora / locon  lora_down.weight, lora_up.weight, alpha                       (lora.LoraWeights.modules)
  dora          lora_down.weight, lora_up.weight, alpha, dora_scale            (NetEntry "dora")
  loha          hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha [dora_scale] (NetEntry "loha")
  lokr          lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b, alpha [dora_scale]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch

from .delta import DeltaModule
from .dora import LoraDelta
from .loha import LoHa
from .lokr import LoKr

DELTA_TYPES = {"loha": LoHa, "lokr": LoKr, "dora": LoraDelta}


@dataclass
class NetEntry:
    """One module of a weight-delta type: its type and its tensors by name (float32, as in the file)."""

    type: str
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)

    def module(self) -> DeltaModule:
        return DELTA_TYPES[self.type].from_tensors(self.tensors)


def detect(names: Iterable[str]) -> Optional[str]:
    """The type of a module from its tensor names; None for plain LoRA / LoCon (and for anything unknown)."""
    names = set(names)
    if any(n.startswith("hada_") for n in names):
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    if "lora_down.weight" in names and ("dora_scale" in names or "lora_mid.weight" in names):
        return "dora"
    return None


def complete(type_: str, names: Iterable[str]) -> bool:
    names = set(names)
    if type_ == "loha":
        return set(LoHa.KEYS) <= names
    if type_ == "lokr":
        return (("lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names)
                and ("lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names))
    return {"lora_down.weight", "lora_up.weight"} <= names


def entry_from_group(type_: str, group: Dict[str, torch.Tensor]) -> NetEntry:
    """A NetEntry from the tensors of one module (names after `<module>.`); checks it can be built."""
    t = {k: v.float() for k, v in group.items()}
    entry = NetEntry(type_, t)
    entry.module()  # raises ValueError for layouts we cannot apply (Tucker)
    return entry


def state_dict_entries(name: str, entry: NetEntry, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.to(dtype).contiguous() for k, v in sorted(entry.tensors.items())}
