"""Where a run computes: the device ("auto": CUDA when there is one), the mixed precision ("auto": bf16 on a GPU
that has it, fp16 with loss scaling on one that does not, fp32 on the CPU), and prompts encoded there."""
from __future__ import annotations

from typing import List

import torch

from ..models import conditioning
from ..models.base import BaseModel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_precision(choice: str, device) -> str:
    """mixed_precision "auto" for a device: bf16 on a CUDA GPU that has it, fp16 (with loss scaling) on one that
    does not, "no" (fp32) elsewhere; any other choice as it is."""
    if choice != "auto":
        return choice
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def encode_prompts(model: BaseModel, captions: List[str], device: torch.device):
    """Text conditioning of captions: last hidden state (SD1/SD2), {"hidden", "pooled"} (SDXL); conditioning.py."""
    return conditioning.encode(model, captions, device)
