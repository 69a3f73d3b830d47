"""What the advisor says about the network types (issue 17): when LoCon helps, LoHa's dims, LoKr's factor and
learning rate, DoRA's learning rate. Each value comes with its reason.

Sources: LyCORIS' docs (Guidelines / Algo list: LoHa dim <= 32 because its rank is dim^2; LoKr with a small factor
trains best at a higher lr, ~4e-4 .. 1e-3 with AdamW, factor 4-16 for the file size; the convolutions of the
ResNet blocks carry colour and texture), the DoRA paper and users' reports (DoRA trains its magnitude directly
and wants about half the LoRA lr), kohya's LoCon (conv_dim 4-8, conv_alpha 1 .. conv_dim).
"""
from __future__ import annotations

from typing import Any, List, Tuple

from ..config import NETWORK_TYPES

STYLE_TASKS = ("style", "concept")
LOKR_LR = (4e-4, 1e-3)


def network_advice(network_type: str, task: str, lr: float, rank: int, flow: bool = False
                   ) -> List[Tuple[str, Any, str]]:
    """[(config key, value, reason)] for a run of `network_type` on `task`, given the LoRA lr and rank the
    advisor picked; the network_type row first. `flow`: a Flux / SD3 transformer, which has no ResNet
    convolutions (no LoCon, no conv_rank) and whose q/k/v are one fused module in the file."""
    if network_type not in NETWORK_TYPES:
        raise ValueError(f"network_type = {network_type!r}: use one of {', '.join(NETWORK_TYPES)}.")
    style = task in STYLE_TASKS and not flow
    out: List[Tuple[str, Any, str]] = []
    if flow and network_type == "locon":
        return [("network_type", "lora", "lora: flow transformers have no ResNet convolutions, so LoCon is "
                                         "plain LoRA there (conv_rank does not apply)")]
    conv = min(rank, 8)
    conv_reason = (f"conv_rank {conv}: the 3x3 convolutions of the ResNet blocks carry colour, texture and "
                   f"brush strokes, which a {task} LoRA is about (attention alone learns the composition)")
    if network_type == "lora":
        why = ("lora: plain LoRA on the attention layers, the safe first run"
               + ("; for a style or texture try locon (the ResNet convolutions too)" if style else
                  "; identity and objects live in attention, the convolutions mostly add file size"))
        if flow:
            why = ("lora: plain LoRA on every Linear of the transformer blocks (sd-scripts' default set), the safe "
                   "first run; lokr makes much smaller files for styles")
        out.append(("network_type", "lora", why))
        return out
    out.append(("network_type", network_type, {
        "locon": "locon: LoRA + the ResNet convolutions (kohya conv_dim)",
        "loha": "loha: Hadamard product of two low-rank pairs (LyCORIS); more capacity per parameter",
        "lokr": "lokr: Kronecker product (LyCORIS); the smallest files for the capacity",
        "dora": "dora: LoRA with the weight's magnitude trained apart (DoRA); closer to a full fine-tune",
    }[network_type]))
    if network_type == "locon":
        out.append(("conv_rank", conv, conv_reason if style else
                    f"conv_rank {conv}: kept small, a {task} LoRA gains little from the convolutions"))
        out.append(("conv_alpha", float(max(1, conv // 2)), "conv alpha = half the conv rank: the convolutions "
                                                          "react strongly, a smaller scale keeps them calm"))
    elif style:
        out.append(("conv_rank", conv, conv_reason))
    if network_type == "loha":
        dim = min(rank, 16)
        out.append(("lora_rank", dim, f"LoHa dim {dim}: its rank is up to dim^2, so 8-16 match a LoRA of rank "
                                      f"64+; LyCORIS advises dim <= 32 (larger only grows the file)"))
        out.append(("lora_alpha", float(max(1, dim // 2)), "alpha = half the dim (LyCORIS uses 1 .. dim): the "
                                                           "product of two pairs grows fast"))
    elif network_type == "lokr":
        new_lr = min(max(lr * 3.0, LOKR_LR[0]), LOKR_LR[1])
        out.append(("factor", 8, "factor 8: w1 is 8x8-ish and w2 carries the rest; 4-16 are usual, a larger "
                                 "factor makes a smaller file that learns less detail"))
        out.append(("learning_rate", round(new_lr, 6),
                    f"LoKr learns slower per step than LoRA: LyCORIS advises about {LOKR_LR[0]:g} .. "
                    f"{LOKR_LR[1]:g} with AdamW (3x the LoRA lr {lr:.3g}, kept in that range)"))
    elif network_type == "dora":
        out.append(("learning_rate", round(lr * 0.5, 7),
                    f"DoRA trains the weight's magnitude directly, which reacts more than a LoRA update: about "
                    f"half the LoRA lr ({lr:.3g} -> {lr * 0.5:.3g}) is the usual start"
                    + ("; on Flux / SD3 each step also builds the whole fused q/k/v weight per part, so expect "
                       "slower steps and more memory than LoRA" if flow else "")))
    return out


def check_network(cfg) -> List[str]:
    """Warnings for network settings that usually go wrong."""
    out: List[str] = []
    t = cfg.network_type
    lr = cfg.learning_rate if cfg.learning_rate is not None else cfg.default_learning_rate  # empty: the table's
    if t == "loha" and cfg.lora_rank > 32:
        out.append(f"LoHa with lora_rank {cfg.lora_rank}: its rank is up to dim^2, so dim > 32 mostly grows the "
                   f"file and overfits; use 8-16.")
    if t == "lokr" and not cfg.full_matrix and lr < 1e-4:
        out.append(f"LoKr at learning_rate {lr:.3g}: LoKr usually needs {LOKR_LR[0]:g} .. "
                   f"{LOKR_LR[1]:g}; at this lr it will barely learn.")
    if t == "dora" and lr > 5e-4:
        out.append(f"DoRA at learning_rate {lr:.3g}: the magnitude vector reacts strongly; about "
                   f"half the LoRA lr (1e-4) is safer.")
    if cfg.loraplus_lr_ratio and cfg.loraplus_lr_ratio > 32:
        out.append(f"loraplus_lr_ratio {cfg.loraplus_lr_ratio:g}: the up/B matrices train at "
                   f"{lr * cfg.loraplus_lr_ratio:.3g}; LoRA+ uses 16, above 32 tends to diverge.")
    return out
