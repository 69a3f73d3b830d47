"""The advisor's section for the flow-matching families (Flux.1, SD3.5, Qwen-Image): lr, rank, resolution, timestep
sampling and the VRAM tiers with fp8_base / gradient checkpointing / blocks_to_swap, each with its reason.
`advisor.suggest` calls `apply` after its UNet-family rules when the base is a flow family.

The numbers are the family's (families/<family>.py: `vram_tiers`, `advise`, `advice_text_encoder`, with their
sources); what is the same for every flow family (batch 1, bf16, checkpointing, how the tier sets fp8 and block
swap) is here.
"""
from __future__ import annotations

from typing import Tuple

from .. import families

FLOW_BASES = families.FLOW


def tier(base: str, vram_gb: float) -> Tuple[bool, int, int, str]:
    """(fp8_base, blocks_to_swap, resolution, tier text) of the family's tier for `vram_gb`."""
    for lo, fp8, swap, res, text in families.get(base).vram_tiers:
        if vram_gb >= lo:
            return fp8, swap, res, text
    raise AssertionError("the last tier starts at 0 GB")


def apply(s, base: str, vram_gb: float, vram_text: str, image_count: int, task: str, detail: str,
          resolution_given: bool) -> None:
    """Replace the UNet-family values of a Suggestion `s` with the flow family's, with reasons."""
    fam = families.get(base)
    fp8, swap, res, tier_text = tier(base, vram_gb)
    name = fam.advice_name or fam.title
    rank, lr = fam.advise(s, image_count, task, detail)
    s.add("lora_alpha", float(rank), "alpha = rank (scale 1.0), the scale the learning rate above assumes")
    train_te, te_reason, te_share = fam.advice_text_encoder
    if te_share is not None:
        s.add("text_encoder_lr", lr * te_share, f"{te_share:g} x the transformer lr, for CLIP only (T5 is never "
                                                f"trained)")
    else:  # the family trains no text encoder: the UNet families' text-encoder lr does not apply
        s.drop("text_encoder_lr")
    s.add("train_text_encoder", train_te, te_reason)
    s.add("batch_size", 1, f"{name} at {res} px: batch 1 (raise gradient_accumulation_steps for a larger "
                           f"effective batch)")
    if resolution_given:
        res = s.value("resolution")
    s.add("resolution", res, f"{vram_text}: {tier_text}" if not resolution_given else "your choice")
    s.add("mixed_precision", "bf16", "bf16: these models are trained and released in bf16 (fp16 overflows in "
                                     "their activations)")
    s.add("gradient_checkpointing", True, f"{name} activations at 1024 px are several GB per block: always on")
    s.add("fp8_base", fp8, f"{vram_text}: {tier_text}")
    s.add("blocks_to_swap", swap, f"{vram_text}: {tier_text}" + ("; swapping is slower: lower it if memory allows"
                                                                  if swap else ""))
