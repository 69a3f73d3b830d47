"""Diffusers <-> SGM/LDM module paths of Stable Diffusion UNets.

kohya names SDXL LoRA modules after the SGM (Stability's `generative-models`) UNet, e.g.
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, while our models are diffusers
`UNet2DConditionModel`s (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). The same
block layout is the original LDM single-file layout of SD1.x/SD2.x UNets (`model.diffusion_model.*`),
so the functions here also serve the checkpoint writer/loader (lora_train/checkpoints.py).

Layout (L = layers_per_block, 2 in every released SD1/SD2/SDXL model):
  conv_in                          -> input_blocks.0.0
  down_blocks.i.resnets.j          -> input_blocks.(1 + i*(L+1) + j).0
  down_blocks.i.attentions.j       -> input_blocks.(1 + i*(L+1) + j).1
  down_blocks.i.downsamplers.0.conv-> input_blocks.((i+1)*(L+1)).0.op
  mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
  up_blocks.i.resnets.j            -> output_blocks.(i*(L+1) + j).0
  up_blocks.i.attentions.j         -> output_blocks.(i*(L+1) + j).1
  up_blocks.i.upsamplers.0.conv    -> output_blocks.(i*(L+1) + L).2.conv (.1.conv when the block has
                                      no attentions)
  time_embedding.linear_1/2        -> time_embed.0/2;  add_embedding.linear_1/2 -> label_emb.0.0/0.2
  conv_norm_out / conv_out         -> out.0 / out.2
Inside resnets: norm1/conv1/norm2/conv2/time_emb_proj/conv_shortcut ->
in_layers.0/in_layers.2/out_layers.0/out_layers.3/emb_layers.1/skip_connection. Inside attentions
(Transformer2DModel vs SpatialTransformer) the names are the same on both sides (norm, proj_in,
transformer_blocks.k.attn1.to_q, ff.net.0.proj, ff.net.2, proj_out, ...).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

# SDXL base: up_blocks 0 and 1 are CrossAttnUpBlock2D, up_block 2 is UpBlock2D (and has no upsampler).
SDXL_UP_BLOCK_HAS_ATTENTION = (True, True, False)

_RESNET_D2S = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_RESNET_S2D = tuple((s, d) for d, s in _RESNET_D2S)
_TOP_D2S = (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
            ("add_embedding.linear_2", "label_emb.0.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"))
_TOP_S2D = tuple((s, d) for d, s in _TOP_D2S)


def _swap_head(rest: str, table) -> str:
    """Rename the first component(s) of `rest` with `table` [(old, new)]; rest is '' or starts with a name."""
    for old, new in table:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def diffusers_to_sgm_path(path: str, layers_per_block: int = 2,
                          up_block_has_attention: Optional[Sequence[bool]] = None) -> str:
    """Map a diffusers UNet module/parameter path to the SGM/LDM one (see the module docstring).

    `up_block_has_attention` only matters for upsampler paths (default: SDXL base's pattern). Paths
    that are not UNet block paths raise ValueError.
    """
    step = layers_per_block + 1
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$",
                 path)
    if m:
        block, i, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if block == "down_blocks":
            if sub == "resnets":
                return _join(f"input_blocks.{1 + i * step + j}.0", _swap_head(rest, _RESNET_D2S))
            if sub == "attentions":
                return _join(f"input_blocks.{1 + i * step + j}.1", rest)
            if sub == "downsamplers":
                return _join(f"input_blocks.{(i + 1) * step}.0", _swap_head(rest, (("conv", "op"),)))
        else:
            if sub == "resnets":
                return _join(f"output_blocks.{i * step + j}.0", _swap_head(rest, _RESNET_D2S))
            if sub == "attentions":
                return _join(f"output_blocks.{i * step + j}.1", rest)
            if sub == "upsamplers":
                has_attn = SDXL_UP_BLOCK_HAS_ATTENTION if up_block_has_attention is None else up_block_has_attention
                attn = bool(has_attn[i]) if i < len(has_attn) else True
                return _join(f"output_blocks.{i * step + layers_per_block}.{2 if attn else 1}", rest)
        raise ValueError(f"not a UNet block path: {path!r}")
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        sub, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if sub == "attentions":
            return _join(f"middle_block.{1 + 2 * j}", rest)
        return _join(f"middle_block.{2 * j}", _swap_head(rest, _RESNET_D2S))
    new = _swap_head(path, _TOP_D2S)
    if new != path:
        return new
    raise ValueError(f"not a diffusers UNet path: {path!r}")


def sgm_to_diffusers_path(path: str, layers_per_block: int = 2) -> str:
    """The reverse of diffusers_to_sgm_path (the block kind is read from the path itself)."""
    step = layers_per_block + 1
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, k, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        if n == 0:
            if k != 0:
                raise ValueError(f"not an SGM UNet path: {path!r}")
            return _join("conv_in", rest)
        i, j = (n - 1) // step, (n - 1) % step
        if j == layers_per_block:  # the downsampler slot
            if k != 0:
                raise ValueError(f"not an SGM UNet path: {path!r}")
            return _join(f"down_blocks.{n // step - 1}.downsamplers.0", _swap_head(rest, (("op", "conv"),)))
        if k == 0:
            return _join(f"down_blocks.{i}.resnets.{j}", _swap_head(rest, _RESNET_S2D))
        if k == 1:
            return _join(f"down_blocks.{i}.attentions.{j}", rest)
        raise ValueError(f"not an SGM UNet path: {path!r}")
    m = re.match(r"^middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        k, rest = int(m.group(1)), m.group(2) or ""
        if k % 2 == 1:
            return _join(f"mid_block.attentions.{k // 2}", rest)
        return _join(f"mid_block.resnets.{k // 2}", _swap_head(rest, _RESNET_S2D))
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, k, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        i, j = n // step, n % step
        if k == 0:
            return _join(f"up_blocks.{i}.resnets.{j}", _swap_head(rest, _RESNET_S2D))
        if k == 2 or (k == 1 and (rest == "conv" or rest.startswith("conv."))):
            return _join(f"up_blocks.{i}.upsamplers.0", rest)
        if k == 1:
            return _join(f"up_blocks.{i}.attentions.{j}", rest)
        raise ValueError(f"not an SGM UNet path: {path!r}")
    new = _swap_head(path, _TOP_S2D)
    if new != path:
        return new
    raise ValueError(f"not an SGM UNet path: {path!r}")


def unet_layout(unet_or_config) -> dict:
    """layers_per_block and up_block_has_attention of a diffusers UNet (or its config) for the functions above."""
    cfg = getattr(unet_or_config, "config", unet_or_config)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    lpb = get("layers_per_block", 2)
    if not isinstance(lpb, int):
        lpb = set(lpb)
        if len(lpb) != 1:
            raise ValueError("UNets with per-block layers_per_block have no SGM layout here")
        lpb = lpb.pop()
    ups = tuple("CrossAttn" in t for t in get("up_block_types", ()))
    return {"layers_per_block": int(lpb), "up_block_has_attention": ups}
