"""kohya's block-wise LoRA options for SD1.x/SD2.x and SDXL UNets (sd-scripts networks/lora.py):
down_lr_weight / mid_lr_weight / up_lr_weight (+ block_lr_zero_threshold), block_dims / block_alphas.

Blocks are numbered as kohya numbers them, from the kohya module name (`lora.kohya_name`):
  SD1/SD2 (25 blocks): 0 (no LoRA), down_blocks_i_{resnets,attentions}_j -> 1 + 3i + j, down_blocks_i_downsamplers
           -> 1 + 3i + 2, mid_block -> 12, up_blocks_i_... -> 13 + 3i + j (upsamplers 13 + 3i + 2).
  SDXL (23 blocks): 0 (time/label embedding), input_blocks_N -> 1 + N, middle_block_N -> 10 + N,
           output_blocks_N -> 13 + N, out -> 22.
lr weights: down (12 / 9 values), mid (1 / 3), up (12 / 9), as "a,b,c" lists (short lists filled with 1, long ones
cut) or presets cosine / sine / linear / reverse_linear / zeros with an optional "+base"; values <= the zero
threshold become 0, and a block with lr weight 0 gets no LoRA at all (kohya removes its modules).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional

RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
SD_BLOCKS, SD_MID = 12, 1
SDXL_BLOCKS, SDXL_MID = 9, 3


class BlockError(ValueError):
    pass


def n_total(is_sdxl: bool) -> int:
    return 1 + SDXL_BLOCKS * 2 + SDXL_MID + 1 if is_sdxl else SD_BLOCKS * 2 + SD_MID


def block_index(lora_name: str, is_sdxl: bool = False) -> int:
    """kohya's get_block_index (-1: not in a block)."""
    idx = -1
    if not is_sdxl:
        m = RE_UPDOWN.search(lora_name)
        if m:
            g = m.groups()
            i, j = int(g[1]), int(g[3])
            k = 3 * i + 2 if g[2] in ("upsamplers", "downsamplers") else 3 * i + j
            idx = 1 + k if g[0] == "down" else SD_BLOCKS + 1 + k
        elif "mid_block_" in lora_name:
            idx = SD_BLOCKS
        return idx
    if lora_name.startswith("lora_unet_"):
        name = lora_name[len("lora_unet_"):]
        if name.startswith(("time_embed_", "label_emb_")):
            idx = 0
        elif name.startswith("input_blocks_"):
            idx = 1 + int(name.split("_")[2])
        elif name.startswith("middle_block_"):
            idx = 10 + int(name.split("_")[2])
        elif name.startswith("output_blocks_"):
            idx = 13 + int(name.split("_")[2])
        elif name.startswith("out_"):
            idx = 22
    return idx


def _preset(spec: str, n: int) -> List[float]:
    name, _, base = spec.partition("+")
    b = float(base) if base else 0.0
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + b for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + b for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + b for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + b for i in reversed(range(n))]
    if name == "zeros":
        return [0.0 + b] * n
    raise BlockError(f"lr weight preset '{spec}' is not known: use numbers 'a,b,...' or cosine, sine, linear, "
                     f"reverse_linear, zeros (optionally +base, e.g. sine+.5).")


def _floats(spec: str, key: str) -> List[float]:
    try:
        return [float(s) if s.strip() else 0.0 for s in str(spec).split(",")]
    except ValueError:
        raise BlockError(f"{key} = {spec!r} is not a list of numbers: write e.g. 1,1,0.5,...") from None


def lr_weights(is_sdxl: bool, down: str, mid: str, up: str, zero_threshold: float = 0.0) -> Optional[List[float]]:
    """kohya's get_block_lr_weight: one lr factor per block (25 / 23), or None when none is set."""
    if not (down or mid or up):
        return None
    n, n_mid = (SDXL_BLOCKS, SDXL_MID) if is_sdxl else (SD_BLOCKS, SD_MID)

    def side(spec: str, key: str, length: int) -> List[float]:
        if not spec:
            return [1.0] * length
        s = str(spec)
        vals = _floats(s, key) if ("," in s or re.match(r"^[\d.+-]+$", s)) else _preset(s, length)
        vals = (vals + [1.0] * length)[:length]
        return [w if w > zero_threshold else 0.0 for w in vals]

    out = side(down, "down_lr_weight", n) + side(mid, "mid_lr_weight", n_mid) + side(up, "up_lr_weight", n)
    return [1.0] + out + [1.0] if is_sdxl else out


def dims_alphas(is_sdxl: bool, block_dims: str, block_alphas: str, rank: int, alpha: float
                ) -> Optional[Dict[str, List[float]]]:
    """{"dims": [...], "alphas": [...]} per block, or None when block_dims is not set."""
    if not block_dims:
        return None
    n = n_total(is_sdxl)
    dims = [int(round(x)) for x in _floats(block_dims, "block_dims")]
    if len(dims) != n:
        raise BlockError(f"block_dims has {len(dims)} values; this model ({'SDXL' if is_sdxl else 'SD1/SD2'}) has "
                         f"{n} blocks: give {n} ranks (0 = no LoRA in that block).")
    alphas = _floats(block_alphas, "block_alphas") if block_alphas else [float(alpha)] * n
    if len(alphas) != n:
        raise BlockError(f"block_alphas has {len(alphas)} values: give {n}, one per block.")
    return {"dims": dims, "alphas": alphas}
