"""LoCon = LoRA on the UNet's ResNet blocks too (kohya `conv_dim`/`conv_alpha`, LyCORIS `algo=locon`).

kohya's networks/lora.py with conv_dim adds the modules of `ResnetBlock2D`, `Downsample2D` and `Upsample2D`
to the targets: their 3x3 convolutions at conv_dim / conv_alpha, their Linear (time_emb_proj) and 1x1
convolutions (conv_shortcut) at the network dim / alpha. The same targets carry the other types' conv layers
(LoHa, LoKr, DoRA with conv_rank > 0). A conv LoRA is stored as kohya does: `lora_down.weight`
(r, in, kh, kw), `lora_up.weight` (out, r, 1, 1), `.alpha`, scale alpha / r (peft's LoRA conv layer is the
same maths, so LoCon trains through peft like plain LoRA).
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

RESNET_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def _base(m: nn.Module) -> nn.Module:
    return getattr(m, "base_layer", m)


def is_conv3x3(m: nn.Module) -> bool:
    m = _base(m)
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)


def resnet_target_modules(unet: nn.Module) -> List[Tuple[str, bool]]:
    """[(module path, is a 3x3 conv)] of every Linear / Conv2d in the UNet's ResNet, down- and upsampler blocks
    (kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3), in model order."""
    out: List[Tuple[str, bool]] = []
    seen = set()
    for pname, parent in unet.named_modules():
        if type(parent).__name__ not in RESNET_PARENTS:
            continue
        for cname, child in parent.named_modules():
            if not cname or any(p in ("base_layer", "lora_A", "lora_B", "parametrizations")
                                for p in cname.split(".")):
                continue
            if isinstance(child, (nn.Linear, nn.Conv2d)) or hasattr(child, "base_layer"):
                b = _base(child)
                if not isinstance(b, (nn.Linear, nn.Conv2d)):
                    continue
                path = f"{pname}.{cname}" if pname else cname
                if path not in seen:
                    seen.add(path)
                    out.append((path, is_conv3x3(b)))
    return out
