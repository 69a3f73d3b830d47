"""Writers of the original single-file layout (LDM / SGM keys) from diffusers models: the tests make their
checkpoint files with them (users bring real ones; the product only reads this layout, models/single_file.py)."""
import re
from typing import Dict, Optional

import torch

from lora_train.io_utils import atomic_path
from lora_train.models.base import BaseModel
from lora_train.models.single_file import (_OPENCLIP_LAYER, _OPENCLIP_TOP, SD1_TE_PREFIX, SD2_TE_PREFIX, UNET_PREFIX,
                                           VAE_PREFIX, XL_TE1_PREFIX, XL_TE2_PREFIX, _cast)
from lora_train.networks.sdxl_names import diffusers_to_sgm_path, unet_layout


def _canonical_te(model) -> Dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict with the `text_model.` level (whatever the version)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k if k.startswith(("text_model.", "text_projection")) else "text_model." + k] = v
    return out


def open_clip_te_to_ldm(model, prefix: str, extra_layers: int = 0) -> Dict[str, torch.Tensor]:
    """Reverse of open_clip_te_from_ldm. `extra_layers` appends copies of the last block (SD2 files hold one
    more block than the model uses)."""
    sd = _canonical_te(model)
    out: Dict[str, torch.Tensor] = {}
    for src, dst in _OPENCLIP_TOP:
        out[prefix + src] = sd[dst]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:  # SD2 files carry a (unused) projection; keep the layout real
        h = int(model.config.hidden_size)
        out[prefix + "text_projection"] = torch.eye(h, dtype=sd[_OPENCLIP_TOP[0][1]].dtype,
                                                    device=sd[_OPENCLIP_TOP[0][1]].device)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    n = int(model.config.num_hidden_layers)
    for i in range(n + extra_layers):
        src_i = min(i, n - 1)
        base = f"text_model.encoder.layers.{src_i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[dst + f"attn.in_proj_{suffix}"] = torch.cat(
                [sd[f"{base}self_attn.{p}.{suffix}"] for p in ("q_proj", "k_proj", "v_proj")], dim=0)
        for s, d in _OPENCLIP_LAYER:
            for suffix in ("weight", "bias"):
                out[dst + s + suffix] = sd[base + d + suffix]
    return out


def clip_te_to_ldm(model, prefix: str) -> Dict[str, torch.Tensor]:
    out = {prefix + k: v for k, v in _canonical_te(model).items() if not k.startswith("text_projection")}
    pos = int(model.config.max_position_embeddings)
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(pos).unsqueeze(0)
    return out


def unet_to_ldm(unet) -> Dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel -> `model.diffusion_model.*` (LDM/SGM layout)."""
    layout = unet_layout(unet)
    return {UNET_PREFIX + diffusers_to_sgm_path(k, **layout): v for k, v in unet.state_dict().items()}


_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."),
             ("query.", "q."), ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out."))


def _vae_path_to_ldm(k: str, n_up: int) -> str:
    m = re.match(r"^(encoder|decoder)\.(.*)$", k)
    if not m:
        return k  # quant_conv / post_quant_conv
    side, rest = m.group(1), m.group(2)
    rest = rest.replace("conv_norm_out.", "norm_out.")
    mm = re.match(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)
    if mm:
        rest = f"down.{mm.group(1)}.block.{mm.group(2)}.{mm.group(3).replace('conv_shortcut', 'nin_shortcut')}"
    mm = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.(.*)$", rest)
    if mm:
        rest = f"down.{mm.group(1)}.downsample.{mm.group(2)}"
    mm = re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)
    if mm:
        rest = (f"up.{n_up - 1 - int(mm.group(1))}.block.{mm.group(2)}."
                f"{mm.group(3).replace('conv_shortcut', 'nin_shortcut')}")
    mm = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", rest)
    if mm:
        rest = f"up.{n_up - 1 - int(mm.group(1))}.upsample.{mm.group(2)}"
    mm = re.match(r"^mid_block\.resnets\.(\d+)\.(.*)$", rest)
    if mm:
        rest = f"mid.block_{int(mm.group(1)) + 1}.{mm.group(2).replace('conv_shortcut', 'nin_shortcut')}"
    mm = re.match(r"^mid_block\.attentions\.0\.(.*)$", rest)
    if mm:
        a = mm.group(1)
        for s, d in _VAE_ATTN:
            if a.startswith(s):
                a = d + a[len(s):]
                break
        rest = f"mid.attn_1.{a}"
    return f"{side}.{rest}"


def vae_to_ldm(vae) -> Dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> `first_stage_model.*` (attention projections as 1x1 convs, as in the originals)."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for k, v in vae.state_dict().items():
        lk = _vae_path_to_ldm(k, n_up)
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[VAE_PREFIX + lk] = v
    return out


def to_original_state_dict(model: BaseModel, mark_v_prediction: bool = True) -> Dict[str, torch.Tensor]:
    """The original single-file (ldm/sgm) layout of a BaseModel (SD1, SD2 or SDXL; real or tiny).

    The text encoders get the `text_model.` level back (transformers 5 dropped it), SD2 files get their
    OpenCLIP extra block, and v-prediction models the `v_pred` marker key (as ComfyUI writes it)."""
    sd = unet_to_ldm(model.unet)
    sd.update(vae_to_ldm(model.vae))
    if model.kind == "sdxl":
        sd.update(clip_te_to_ldm(model.text_encoder, XL_TE1_PREFIX))
        sd.update(open_clip_te_to_ldm(model.text_encoder_2, XL_TE2_PREFIX))
    elif model.kind == "sd2":
        sd.update(open_clip_te_to_ldm(model.text_encoder, SD2_TE_PREFIX, extra_layers=1))
    else:
        sd.update(clip_te_to_ldm(model.text_encoder, SD1_TE_PREFIX))
    sched = model.noise_scheduler
    if getattr(sched, "alphas_cumprod", None) is not None:
        sd["alphas_cumprod"] = sched.alphas_cumprod.detach().float().clone()
    if mark_v_prediction and model.prediction_type == "v_prediction":
        sd["v_pred"] = torch.tensor([])
    return sd


def write_original_checkpoint(model: BaseModel, path: str, mark_v_prediction: bool = True,
                              dtype: Optional[torch.dtype] = None) -> str:
    """Write `model` as an original-layout single-file .safetensors (a test helper; real files come from users)."""
    from safetensors.torch import save_file

    sd = to_original_state_dict(model, mark_v_prediction)
    sd = {k: _cast(v.detach().cpu(), dtype).contiguous().clone() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(sd, tmp, metadata={"format": "pt"})
    return path
