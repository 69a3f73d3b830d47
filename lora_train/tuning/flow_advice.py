"""The advisor's section for the flow-matching families (Flux.1, SD3.5): lr, rank, resolution, timestep sampling and
the VRAM tiers with fp8_base / gradient checkpointing / blocks_to_swap, each with its reason. `advisor.suggest`
calls `apply` after its UNet-family rules, for base "flux" or "sd3" (SD3.5 Medium; Large: see the note).

Sources of the numbers: sd-scripts' Flux / SD3 docs and defaults (timestep_sampling shift with discrete_flow_shift
3.1582 for Flux LoRAs, guidance_scale 1.0, logit-normal sampling for SD3), the common Flux LoRA range 1e-4 .. 4e-4 at
rank 16, and our bench targets (bench/flow_bench.py: Flux.1-dev rank 16 at 1024 px, batch 1, fp8 base +
checkpointing <= 16 GB, <= 10 GB with 36 blocks swapped; SD3.5 Medium <= 10 GB with checkpointing).
"""
from __future__ import annotations

from typing import Tuple

FLOW_BASES = ("flux", "sd3")
#: (vram at least, fp8_base, blocks_to_swap, resolution, tier text) per family, largest first
FLUX_TIERS = ((48.0, False, 0, 1024, "48 GB+: the bf16 transformer (24 GB) fits; fp8 would only cost accuracy"),
              (20.0, True, 0, 1024, "20-48 GB: fp8 base (12 GB of weights) + checkpointing fits in ~16 GB"),
              (14.0, True, 36, 1024, "14-20 GB: fp8 base + checkpointing + 36 blocks swapped to CPU memory (~10 GB)"),
              (10.0, True, 36, 512, "10-14 GB: fp8 + checkpointing + block swap, 512 px (Flux learns well at 512 and "
                                    "generalises to 1024)"),
              (0.0, True, 50, 512, "under 10 GB: fp8 + checkpointing, 50 of 57 blocks swapped, 512 px: slow (every "
                                   "step moves ~6 GB over PCIe)"))
SD3_TIERS = ((16.0, False, 0, 1024, "16 GB+: SD3.5 Medium (2.5 B, 5 GB in bf16) with checkpointing fits easily"),
             (10.0, False, 0, 1024, "10-16 GB: bf16 + checkpointing fits in ~10 GB at 1024 px"),
             (6.0, True, 0, 1024, "6-10 GB: fp8 base (2.5 GB of weights) + checkpointing"),
             (0.0, True, 12, 512, "under 6 GB: fp8 + checkpointing + 12 blocks swapped, 512 px"))


def tier(base: str, vram_gb: float) -> Tuple[bool, int, int, str]:
    for lo, fp8, swap, res, text in (FLUX_TIERS if base == "flux" else SD3_TIERS):
        if vram_gb >= lo:
            return fp8, swap, res, text
    raise AssertionError("the last tier starts at 0 GB")


def apply(s, base: str, vram_gb: float, vram_text: str, image_count: int, task: str, detail: str,
          resolution_given: bool) -> None:
    """Replace the UNet-family values of a Suggestion `s` with the flow family's, with reasons."""
    fp8, swap, res, tier_text = tier(base, vram_gb)
    name = "Flux.1" if base == "flux" else "SD3.5 Medium"
    if base == "flux":
        rank = 8 if task in ("style", "concept") and detail == "simple" else 16
        lr = 1e-4 if image_count < 50 else 2e-4
        s.add("learning_rate", lr, f"Flux LoRAs train at 1e-4 .. 4e-4 with rank 16 (batch 1); "
                                   f"{'1e-4, the safe start for under 50 images' if lr == 1e-4 else '2e-4 for 50+ images'}"
                                   f"; halve it if samples burn or the loss jumps")
        s.add("timestep_sampling", "shift", "sd-scripts' recommendation for Flux LoRAs: sigmoid-normal sigmas "
                                            "shifted towards noise (discrete_flow_shift)")
        s.add("discrete_flow_shift", 3.1582, "the shift sd-scripts uses for Flux.1 dev (its sampling shift at "
                                             "1024 px); flux_shift instead scales it with the resolution")
        s.add("weighting_scheme", "none", "Flux trains with uniform loss weights (the shifted sampling does the work)")
        s.add("guidance_scale", 1.0, "Flux dev's guidance input while training: 1.0 (sd-scripts' default); "
                                     "ignored for schnell")
    else:
        rank = 16 if detail == "demanding" else 8
        lr = 1e-4
        s.add("learning_rate", lr, "SD3.5 LoRAs train at about 1e-4 (the MMDiT is sensitive: higher rates "
                                   "break anatomy first)")
        s.add("timestep_sampling", "sigma", "SD3's own training: sigmas of the shifted scheduler (shift 3.0) drawn "
                                            "logit-normally")
        s.add("weighting_scheme", "logit_normal", "logit-normal timestep density (SD3 paper, diffusers' and "
                                                  "sd-scripts' SD3 default): most steps at mid noise")
        s.notes.append("SD3.5 Large (8 B) needs about 3x the memory of Medium: use fp8_base below 32 GB and "
                       "lr 5e-5 .. 1e-4.")
    s.add("lora_rank", rank, f"{name}: rank {rank} ({'16 is the usual Flux LoRA rank' if base == 'flux' else '8 for most subjects, 16 for demanding detail'}); "
                             f"the transformer is wide, so small ranks still carry a lot")
    s.add("lora_alpha", float(rank), "alpha = rank (scale 1.0), the scale the learning rate above assumes")
    s.add("text_encoder_lr", lr / 2, "half the transformer lr, for CLIP only (T5 is never trained)")
    s.add("train_text_encoder", False, "transformer only: T5 carries most of the prompt; CLIP LoRA is optional")
    s.add("batch_size", 1, f"{name} at 1024 px: batch 1 (raise gradient_accumulation_steps for a larger "
                           f"effective batch)")
    if resolution_given:
        res = s.value("resolution")
    s.add("resolution", res, f"{vram_text}: {tier_text}" if not resolution_given else "your choice")
    s.add("mixed_precision", "bf16", "bf16: these models are trained and released in bf16 (fp16 overflows in "
                                     "Flux's activations)")
    s.add("gradient_checkpointing", True, f"{name} activations at 1024 px are several GB per block: always on")
    s.add("fp8_base", fp8, f"{vram_text}: {tier_text}")
    s.add("blocks_to_swap", swap, f"{vram_text}: {tier_text}" + ("; swapping is slower: lower it if memory allows"
                                                                  if swap else ""))
