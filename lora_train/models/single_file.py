"""Single-file SD1.x / SD2.x / SDXL checkpoints, offline, and host-loaded (in-memory) weights.

Original ("ldm"/"sgm") single-file layout, as WebUI, Forge, ComfyUI and Civitai keep it:
  UNet        model.diffusion_model.*                   (input_blocks / middle_block / output_blocks)
  VAE         first_stage_model.*
  SD1 text    cond_stage_model.transformer.text_model.*   (CLIP-L, transformers layout)
  SD2 text    cond_stage_model.model.*                    (OpenCLIP-H layout: transformer.resblocks.N ...)
  SDXL text   conditioner.embedders.0.transformer.text_model.*  (CLIP-L)
              conditioner.embedders.1.model.*                   (OpenCLIP-bigG layout)

Public API
  detect_checkpoint(state_dict, prediction_type="auto", metadata=None) -> CheckpointInfo
  load_single_file(path, allow_pickle=False, prediction_type="auto", config=None, dtype=float32) -> BaseModel
  from_original_state_dict(state_dict, kind=None, prediction_type="auto", name="", config=None, ...) -> BaseModel
  normalize_host_keys(state_dict)   (drops AUTOMATIC1111's in-memory `.wrapped.` levels; done by the above)
  to_original_state_dict(model) / write_original_checkpoint(model, path)   (the reverse, for tests and tools)
  bundled_config_dir(variant), diffusers_config_folder(variant, dest), clip_tokenizer(pad_token=None)

Nothing here touches the network: the diffusers configs of SD1.5, SD2.x (768-v, 512-base) and SDXL base
and the CLIP BPE tokenizer files are bundled in lora_train/configs/ (tools/make_clip_tokenizer.py makes
the tokenizer files). The UNet and VAE go through diffusers' own single-file converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`); the text encoders through the small
converters below, which also handle transformers 5 (CLIPTextModel without the `text_model.` level).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .. import families
from ..families.sd import CLIP_L, OPENCLIP_H, XL_CLIP_L, XL_OPENCLIP_G
from .base import BaseModel, ModelError

#: within `unet_dtype(d)`, single-file loads build the UNet in `d` instead of the load's dtype (training.cpu_bf16)
_UNET_DTYPE: contextvars.ContextVar = contextvars.ContextVar("lora_train_unet_dtype", default=None)


@contextlib.contextmanager
def unet_dtype(dtype: Optional[torch.dtype]):
    """`with unet_dtype(torch.bfloat16): load...`: the UNet of the checkpoints loaded inside (load_single_file,
    from_original_state_dict) is built in `dtype`, never as an fp32 copy (None: no change)."""
    token = _UNET_DTYPE.set(dtype)
    try:
        yield
    finally:
        _UNET_DTYPE.reset(token)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TOKENIZER_DIR = os.path.join(CONFIG_DIR, "clip_tokenizer")
VARIANTS = {
    # variant: (kind, native resolution, description)
    "sd15": ("sd1", 512, "Stable Diffusion 1.x"),
    "sd2_768v": ("sd2", 768, "Stable Diffusion 2.x 768-v (v-prediction)"),
    "sd2_512": ("sd2", 512, "Stable Diffusion 2.x 512-base (epsilon)"),
    "sdxl_base": ("sdxl", 1024, "Stable Diffusion XL base"),
}
SUPPORTED = ("supported: Stable Diffusion 1.x, 2.x (512-base epsilon and 768-v v-prediction) and SDXL base "
             "single-file checkpoints (.safetensors), or a diffusers SD1.x/SD2.x folder")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX, SD2_TE_PREFIX = CLIP_L[0], OPENCLIP_H[0]  # the families' text encoders (families/sd.py)
XL_TE1_PREFIX, XL_TE2_PREFIX = XL_CLIP_L[0], XL_OPENCLIP_G[0]
XL_REFINER_TE_PREFIX = "conditioner.embedders.0.model."
# ComfyUI's SD2 v-prediction heuristic: this bias is wide in the v models, narrow in the epsilon ones.
SD2_V_HEURISTIC_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_HEURISTIC_STD = 0.09


# ============================================================================= detection
@dataclass
class CheckpointInfo:
    kind: str                       # sd1 | sd2 | sdxl
    variant: str                    # key of VARIANTS: the bundled config that fits
    prediction_type: str            # epsilon | v_prediction
    prediction_source: str          # override | marker | metadata | heuristic | default
    native_resolution: int
    zero_terminal_snr: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return VARIANTS[self.variant][2]


def _shape(v) -> Tuple[int, ...]:
    if isinstance(v, (tuple, list, torch.Size)):
        return tuple(int(x) for x in v)
    if hasattr(v, "shape"):
        return tuple(int(x) for x in v.shape)
    if hasattr(v, "get_shape"):
        return tuple(int(x) for x in v.get_shape())
    raise TypeError(f"cannot read a shape from {type(v).__name__}")


def _value(v) -> Optional[torch.Tensor]:
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        return v
    return None


def _unsupported(what: str, hint: str = "") -> ModelError:
    return ModelError(f"{what}. {hint + ' ' if hint else ''}This trainer needs a base model; {SUPPORTED}.")


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _check_not_other_model(keys: List[str], name: str) -> None:
    """ModelError for every known kind of file that is not an SD1/SD2/SDXL base checkpoint."""
    label = f"'{name}'" if name else "the checkpoint"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")) or
           re.search(r"\.(lora_down|lora_up|lora_A|lora_B|hada_w1_a|lokr_w1|oft_blocks|lora_mid)\b", k) for k in keys):
        raise _unsupported(f"{label} is a LoRA / LyCORIS adapter, not a base model",
                           "Put it in the LoRA folder (or load it with the LoRA loader) and choose the checkpoint it "
                           "was trained for as base_model.")
    if keys and all(k in ("emb_params", "clip_l", "clip_g", "name", "step", "sd_checkpoint", "sd_checkpoint_name")
                    or k.startswith(("string_to_param", "string_to_token")) for k in keys):
        raise _unsupported(f"{label} is a textual-inversion embedding, not a base model")
    if any("joint_blocks." in k for k in keys):
        raise _unsupported(f"{label} is a Stable Diffusion 3 / 3.5 (MMDiT) checkpoint, which this trainer does not "
                           f"support")
    if any("double_blocks." in k for k in keys) and any("single_blocks." in k for k in keys):
        raise _unsupported(f"{label} is a FLUX checkpoint, which this trainer does not support")
    if _has_prefix(keys, "control_model.") or any(k.startswith(("input_hint_block.", "controlnet_cond_embedding."))
                                                 or ".input_hint_block." in k for k in keys):
        raise _unsupported(f"{label} is a ControlNet, not a base model")
    if any(k.startswith(("edm_mean", "edm_std", "edm_vpred.", "edm_vpred")) for k in keys):
        raise _unsupported(f"{label} uses EDM noise parameters (Playground v2.5 / CosXL style), which this trainer "
                           f"does not support")
    if any(k.startswith(("down_blocks.", "unet.down_blocks.")) for k in keys) and "conv_in.weight" in keys \
            or any(k.startswith("unet.conv_in.") for k in keys):
        raise _unsupported(f"{label} holds diffusers-layout UNet weights only",
                           "Point base_model at the whole diffusers folder (the one with model_index.json), or at an "
                           "original single-file checkpoint.")
    if not _has_prefix(keys, UNET_PREFIX):
        for vp in ("", VAE_PREFIX, "vae.", "first_stage_model."):
            if f"{vp}encoder.conv_in.weight" in keys and f"{vp}decoder.conv_out.weight" in keys:
                raise _unsupported(f"{label} is a VAE alone, not a full checkpoint",
                                   "Use it as the VAE of a full model, and give the full checkpoint as base_model.")
        if any(".resblocks." in k or "text_model.encoder.layers." in k or k.startswith("encoder.layers.")
               for k in keys):
            raise _unsupported(f"{label} is a text encoder alone, not a full checkpoint")
        if any(k.startswith(("transformer_blocks.", "blocks.", "layers.", "model.diffusion_model.blocks"))
               for k in keys):
            raise _unsupported(f"{label} is a transformer (DiT) model, not a Stable Diffusion UNet")
        first = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        raise _unsupported(f"{label} is not a Stable Diffusion 1.x/2.x/SDXL checkpoint: it has no "
                           f"model.diffusion_model.* UNet weights (first keys: {first})")


def detect_checkpoint(state_dict: Mapping[str, Any], prediction_type: str = "auto",
                      metadata: Optional[Mapping[str, str]] = None, name: str = "") -> CheckpointInfo:
    """Architecture and prediction type of an original-layout state dict.

    `state_dict` maps keys to tensors (any device, meta included), to shapes (tuples), or to anything with
    `.shape`. Raises ModelError, saying what the file is, for every unsupported kind (LoRA, VAE alone, SD3,
    FLUX, inpainting, SDXL refiner, ...). Prediction type, first match wins: `prediction_type` when not
    "auto"; a `v_pred` marker key (ComfyUI's); `modelspec.predict_key` / `modelspec.prediction_type` in
    `metadata`; for SD2 the ComfyUI heuristic (std of one norm bias > 0.09 -> v), when that tensor's values
    are at hand; else epsilon (SD1, SDXL) or v_prediction (SD2: diffusers' default, the 768-v model).
    """
    keys = list(state_dict.keys())
    label = f"'{name}'" if name else "the checkpoint"
    if not keys:
        raise ModelError(f"{label} holds no tensors.")
    _check_not_other_model(keys, name)
    sd = state_dict
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise _unsupported(f"{label} has UNet weights without input_blocks.0.0 (conv_in): not an SD1/SD2/SDXL UNet")
    in_ch = _shape(conv_in)[1]
    is_xl = _has_prefix(keys, "conditioner.embedders.") or UNET_PREFIX + "label_emb.0.0.weight" in sd
    if in_ch == 9:
        raise _unsupported(f"{label} is an inpainting model ({'SDXL' if is_xl else 'SD'} UNet with 9 input channels)",
                           "Train on the regular (non-inpainting) checkpoint; LoRAs trained on it work with the "
                           "inpainting model too.")
    if in_ch == 8:
        raise _unsupported(f"{label} is an InstructPix2Pix model (UNet with 8 input channels)")
    if in_ch != 4:
        raise _unsupported(f"{label} has a UNet with {in_ch} input channels (an upscaler or another special model)")
    label_emb = sd.get(UNET_PREFIX + "label_emb.0.0.weight")
    if _has_prefix(keys, XL_REFINER_TE_PREFIX) and not _has_prefix(keys, XL_TE1_PREFIX) or \
            (label_emb is not None and _shape(label_emb)[1] == 2560):
        raise _unsupported(f"{label} is the SDXL refiner", "Train on an SDXL base checkpoint instead.")
    if label_emb is not None and not is_xl:
        raise _unsupported(f"{label} has a class-conditioned UNet (label_emb) that is neither SDXL nor SD1/SD2")
    notes: List[str] = []
    if is_xl:
        if not _has_prefix(keys, XL_TE1_PREFIX) or not _has_prefix(keys, XL_TE2_PREFIX):
            raise ModelError(f"{label} is an SDXL checkpoint without both text encoders "
                             f"(conditioner.embedders.0 = CLIP-L, conditioner.embedders.1 = OpenCLIP-bigG); a full "
                             f"SDXL base checkpoint is needed.")
        kind, variant = "sdxl", "sdxl_base"
    else:
        # The text encoder's layout tells SD1 (CLIP, transformers layout) from SD2 (OpenCLIP); the UNet's
        # cross-attention width must agree at full size (768 / 1024; tiny test models have other widths).
        k_ctx = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        ctx = _shape(sd[k_ctx])[-1] if k_ctx in sd else None
        has_sd1_te, has_sd2_te = _has_prefix(keys, SD1_TE_PREFIX), _has_prefix(keys, SD2_TE_PREFIX)
        if has_sd2_te and ctx != 768:
            kind, variant = "sd2", "sd2_768v"
        elif has_sd1_te and ctx != 1024:
            kind, variant = "sd1", "sd15"
        elif ctx in (768, 1024):
            what = "SD1" if ctx == 768 else "SD2"
            te = ("its CLIP text encoder (cond_stage_model.transformer.*)" if ctx == 768 else
                  "its OpenCLIP text encoder (cond_stage_model.model.*)")
            raise ModelError(f"{label} has an {what} UNet (cross-attention width {ctx}) but not {te}; a full "
                             f"checkpoint is needed.")
        else:
            raise _unsupported(f"{label} has no SD1/SD2 text encoder (cond_stage_model.*) and a UNet with "
                               f"cross-attention width {ctx}: not an SD1/SD2/SDXL checkpoint")
        if ctx not in (None, 768, 1024):
            notes.append(f"non-standard cross-attention width {ctx} (a tiny or modified model)")
    if not _has_prefix(keys, VAE_PREFIX):
        raise ModelError(f"{label} has no VAE weights (first_stage_model.*); this trainer needs a full checkpoint "
                         f"with its VAE baked in.")
    # ---- prediction type
    pt, source = None, "default"
    if prediction_type not in ("auto", "", None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"prediction_type must be auto, epsilon or v_prediction, not {prediction_type!r}.")
        pt, source = prediction_type, "override"
    elif "v_pred" in sd:
        pt, source = "v_prediction", "marker"
    elif metadata and str(metadata.get("modelspec.predict_key", metadata.get("modelspec.prediction_type", ""))
                           ).lower() in ("v", "v_prediction", "epsilon", "eps"):
        raw = str(metadata.get("modelspec.predict_key", metadata.get("modelspec.prediction_type", ""))).lower()
        pt, source = ("v_prediction" if raw.startswith("v") else "epsilon"), "metadata"
    elif families.get(kind).prediction_from_weights:
        probe = _value(sd.get(SD2_V_HEURISTIC_KEY)) if SD2_V_HEURISTIC_KEY in sd else None
        if probe is not None:
            std = float(probe.float().std(unbiased=False))
            pt, source = ("v_prediction" if std > SD2_V_HEURISTIC_STD else "epsilon"), "heuristic"
            notes.append(f"SD2 prediction type from weights (norm bias std {std:.3f}; > {SD2_V_HEURISTIC_STD} means "
                         f"v-prediction); set prediction_type to override")
        else:
            pt = "v_prediction"
            notes.append("SD2 prediction type not told by the file: assuming v-prediction (768-v); set "
                         "prediction_type: epsilon for 512-base models")
    else:
        pt = "epsilon"
    variant = families.get(kind).single_file_variants.get(pt, variant)
    ztsnr = "ztsnr" in sd
    if ztsnr:
        notes.append("zero-terminal-SNR model (ztsnr marker)")
    return CheckpointInfo(kind=kind, variant=variant, prediction_type=pt, prediction_source=source,
                          native_resolution=VARIANTS[variant][1], zero_terminal_snr=ztsnr, notes=notes)


# ============================================================================= bundled configs / tokenizer
def bundled_config_dir(variant: str) -> str:
    if variant not in VARIANTS:
        raise ModelError(f"unknown bundled config {variant!r}; one of {', '.join(VARIANTS)}")
    return os.path.join(CONFIG_DIR, variant)


def clip_tokenizer(pad_token: Optional[str] = None, folder: Optional[str] = None):
    """The CLIP BPE tokenizer from the bundled files (SD1: pads with <|endoftext|>; SD2 / SDXL's second: "!")."""
    from transformers import CLIPTokenizer

    kw = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(folder or TOKENIZER_DIR, local_files_only=True, **kw)


def _pad_for(kind: str, second: bool = False) -> Optional[str]:
    return "!" if second else families.get(kind).clip_pad_token


def diffusers_config_folder(variant: str, dest: str) -> str:
    """A complete diffusers config folder (configs + tokenizer files, no weights) for `variant`, written to
    `dest`: what diffusers' `Pipeline.from_single_file(path, config=dest, local_files_only=True)` needs offline."""
    src = bundled_config_dir(variant)
    kind = VARIANTS[variant][0]
    shutil.copytree(src, dest, dirs_exist_ok=True)
    subs = ["tokenizer", "tokenizer_2"][:len(families.get(kind).ldm_text_encoders)]
    for i, sub in enumerate(subs):
        clip_tokenizer(_pad_for(kind, second=i == 1)).save_pretrained(os.path.join(dest, sub))
    return dest


def meta_model(variant: str) -> BaseModel:
    """A full-size BaseModel of a bundled variant with weights on the meta device (no memory, no file):
    for key-layout tests and for listing module names."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kind, native, _ = VARIANTS[variant]
    spec = _spec_from_folder(bundled_config_dir(variant), kind, native, bundled=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(spec.unet)
        vae = AutoencoderKL.from_config(spec.vae)
        te = CLIPTextModel(spec.te)
        te2 = CLIPTextModelWithProjection(spec.te2) if spec.te2 is not None else None
    sched = DDPMScheduler.from_config(spec.scheduler)
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=spec.tokenizer, noise_scheduler=sched, kind=kind,
                     name=variant, path="", text_encoder_2=te2, tokenizer_2=spec.tokenizer_2,
                     native_resolution=native)


# ============================================================================= conversion helpers
def _ldm_converters():
    """diffusers' own single-file converters (0.28+: loaders.single_file_utils; older: convert_from_ckpt)."""
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    except ImportError:  # pragma: no cover - diffusers < 0.28
        from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_unet_checkpoint,
                                                                            convert_ldm_vae_checkpoint)
    return convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint


@contextlib.contextmanager
def _empty_weights():
    """Build modules with parameters on the meta device (buffers stay real), when accelerate is there."""
    try:
        from accelerate import init_empty_weights
    except Exception:  # pragma: no cover
        yield
        return
    with init_empty_weights(include_buffers=False):
        yield


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t


def _load_component(model: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str, dtype,
                    allow_missing=(r"position_ids$",)) -> torch.nn.Module:
    """Strictly load `sd` into a (meta-initialised) model by assignment, fixing conv1x1 <-> linear shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not any(re.search(p, k) for p in allow_missing)]
    unexpected = [k for k in sd if k not in expected]
    bad = []
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k not in expected:
            continue
        want = tuple(expected[k].shape)
        if tuple(v.shape) != want:
            if v.numel() == expected[k].numel():
                v = v.reshape(want)
            else:
                bad.append(f"{k} {tuple(v.shape)} vs {want}")
                continue
        out[k] = _cast(v, dtype).contiguous()
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if bad:
            parts.append(f"{len(bad)} with other shapes (e.g. {'; '.join(bad[:2])})")
        raise ModelError(f"the {what} weights do not fit the expected architecture: {'; '.join(parts)}. The file is "
                         f"a modified or different model; {SUPPORTED}.")
    try:
        model.load_state_dict(out, strict=False, assign=True)
    except TypeError:  # pragma: no cover - torch < 2.1 has no assign=
        model.to_empty(device="cpu")
        model.load_state_dict(out, strict=False)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"
            and n in out and out[n].device.type != "meta"]
    if left:  # pragma: no cover
        raise ModelError(f"internal: {what} tensors left on the meta device: {left[:3]}")
    model.eval().requires_grad_(False)
    return model


def _te_layer_index(k: str) -> Optional[int]:
    m = re.match(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.", k)
    return int(m.group(1)) if m else None


def _fit_te_keys(model, canonical: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Canonical (`text_model.`-level) keys -> the keys this transformers version's model uses; drops layers
    beyond num_hidden_layers (SD2 uses OpenCLIP's penultimate layer: 24 in the file, 23 in the model),
    position_ids and the projection where the model has none."""
    expected = set(model.state_dict().keys())
    n_layers = int(model.config.num_hidden_layers)
    out = {}
    for k, v in canonical.items():
        idx = _te_layer_index(k)
        if idx is not None and idx >= n_layers:
            continue
        if k.endswith("position_ids") or (k.startswith("text_projection") and not any(
                e.startswith("text_projection") for e in expected)):
            continue
        if k in expected:
            out[k] = v
        elif k.startswith("text_model.") and k[len("text_model."):] in expected:
            out[k[len("text_model."):]] = v
        else:
            out[k] = v  # reported as unexpected by _load_component
    return out


def clip_te_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """CLIP-L text encoder under `prefix` -> transformers keys with the `text_model.` level."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if rest.startswith(("embeddings.", "encoder.", "final_layer_norm.")):  # very old files lack text_model.
            rest = "text_model." + rest
        out[rest] = v
    return out


_OPENCLIP_TOP = (("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                 ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                 ("ln_final.weight", "text_model.final_layer_norm.weight"),
                 ("ln_final.bias", "text_model.final_layer_norm.bias"))
_OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                   ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def open_clip_te_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """OpenCLIP text tower under `prefix` (SD2 / SDXL's second encoder) -> transformers CLIP keys
    (`text_model.` level; `text_projection.weight` = the transposed OpenCLIP `text_projection`)."""
    out: Dict[str, torch.Tensor] = {}
    for src, dst in _OPENCLIP_TOP:
        if prefix + src in sd:
            out[dst] = sd[prefix + src]
    if prefix + "text_projection" in sd:
        out["text_projection.weight"] = sd[prefix + "text_projection"].T
    for k, v in sd.items():
        m = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$", k)
        if not m:
            continue
        base, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            q, kk, vv = v.chunk(3, dim=0)
            suffix = "weight" if rest.endswith("weight") else "bias"
            for name, t in (("q_proj", q), ("k_proj", kk), ("v_proj", vv)):
                out[f"{base}self_attn.{name}.{suffix}"] = t
            continue
        for s, d in _OPENCLIP_LAYER:
            if rest.startswith(s):
                out[base + d + rest[len(s):]] = v
                break
        else:
            out[base + rest] = v  # unknown: reported as unexpected
    return out


# ============================================================================= building the model
@dataclass
class _Spec:
    unet: dict
    vae: dict
    te: Any                 # transformers CLIPTextConfig
    te2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: dict
    native_resolution: int
    prediction_type: Optional[str]  # the config's own (folder / template); None for bundled configs
    source: str


def _plain(cfg) -> dict:
    """A diffusers config as a plain dict without the private keys. `_use_default_values` must go: from_config
    would otherwise reset the values it lists (e.g. a scaling_factor registered after construction)."""
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def _spec_from_folder(folder: str, kind: str, native: Optional[int], bundled: bool) -> _Spec:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    def sub(name):
        return os.path.join(folder, name)

    dual = len(families.get(kind).ldm_text_encoders) > 1  # SDXL's CLIP-L + OpenCLIP-bigG
    try:
        unet = _plain(UNet2DConditionModel.load_config(sub("unet")))
        vae = _plain(AutoencoderKL.load_config(sub("vae")))
        te = CLIPTextConfig.from_pretrained(sub("text_encoder"), local_files_only=True)
        te2 = CLIPTextConfig.from_pretrained(sub("text_encoder_2"), local_files_only=True) if dual else None
        sched = _plain(DDPMScheduler.load_config(sub("scheduler")))
    except (OSError, ValueError) as exc:
        raise ModelError(f"config folder '{folder}' lacks a component config for a {kind} model ({exc}); it needs "
                         f"unet/, vae/, text_encoder/{', text_encoder_2/' if dual else ''} and "
                         f"scheduler/ configs.") from exc

    def tok(name, second):
        if any(os.path.isfile(os.path.join(sub(name), f)) for f in ("vocab.json", "tokenizer.json")):
            return clip_tokenizer(_pad_for(kind, second), folder=sub(name))
        return clip_tokenizer(_pad_for(kind, second))

    tokenizer = tok("tokenizer", False)
    tokenizer_2 = tok("tokenizer_2", True) if dual else None
    if native is None:
        native = int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", (1, 1, 1, 1))) - 1)
    return _Spec(unet, vae, te, te2, tokenizer, tokenizer_2, sched, native,
                 None if bundled else sched.get("prediction_type"), folder)


def _spec_from_template(t: BaseModel) -> _Spec:
    import copy

    return _Spec(_plain(t.unet.config), _plain(t.vae.config), copy.deepcopy(t.text_encoder.config),
                 copy.deepcopy(t.text_encoder_2.config) if t.text_encoder_2 is not None else None,
                 t.tokenizer, t.tokenizer_2, _plain(t.noise_scheduler.config), int(t.native_resolution),
                 t.prediction_type, f"template:{t.name}")


def _resolve_spec(config, info: CheckpointInfo) -> _Spec:
    if config is None:
        return _spec_from_folder(bundled_config_dir(info.variant), info.kind, info.native_resolution, bundled=True)
    if isinstance(config, BaseModel):
        if not families.same(config.kind, info.kind):
            raise ModelError(f"the config template is a {config.kind} model but the weights are {info.kind}.")
        return _spec_from_template(config)
    if isinstance(config, str) and config in VARIANTS:
        if VARIANTS[config][0] != info.kind:
            raise ModelError(f"bundled config {config!r} is for {VARIANTS[config][0]}, the weights are {info.kind}.")
        return _spec_from_folder(bundled_config_dir(config), info.kind, VARIANTS[config][1], bundled=True)
    if isinstance(config, (str, os.PathLike)) and os.path.isdir(config):
        return _spec_from_folder(str(config), info.kind, None, bundled=False)
    raise ModelError(f"config must be None (bundled), one of {', '.join(VARIANTS)}, a diffusers config folder or a "
                     f"BaseModel template, not {config!r}.")


def _build_ldm_part(spec: _Spec, sd, dtype, what: str):
    """The UNet or the VAE (`what`) of an LDM checkpoint, converted by diffusers' own converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    convert_unet, convert_vae = _ldm_converters()
    prefix, convert, cls, cfg = ((UNET_PREFIX, convert_unet, UNet2DConditionModel, spec.unet) if what == "UNet"
                                 else (VAE_PREFIX, convert_vae, AutoencoderKL, spec.vae))
    converted = convert({k: v for k, v in sd.items() if k.startswith(prefix)}, cfg)
    with _empty_weights():
        model = cls.from_config(cfg)
    return _load_component(model, converted, what, dtype)


def _build_te(cls, cfg, canonical, what, dtype):
    with _empty_weights():
        te = cls(cfg)
    return _load_component(te, _fit_te_keys(te, canonical), what, dtype)


def normalize_host_keys(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Undo the wrappers a host adds in memory: AUTOMATIC1111 wraps the text encoder and its token embedding
    (`cond_stage_model.wrapped.transformer...token_embedding.wrapped.weight`, `conditioner.embedders.0.wrapped.`)."""
    if not any(".wrapped." in k for k in state_dict):
        return state_dict
    return {k.replace(".wrapped.", "."): v for k, v in state_dict.items()}


def from_original_state_dict(state_dict: Mapping[str, torch.Tensor], kind: Optional[str] = None,
                             prediction_type: str = "auto", name: str = "", config=None,
                             dtype: Optional[torch.dtype] = torch.float32, path: str = "",
                             metadata: Optional[Mapping[str, str]] = None) -> BaseModel:
    """Build a BaseModel from an original-layout (ldm/sgm) state dict held in memory, e.g. the weights a
    WebUI or ComfyUI has loaded (see the module docstring for the key prefixes).

    kind: None (detect) or sd1/sd2/sdxl (checked against the detection). config: None = the bundled
    config of the detected variant; a variant name ("sd2_512"); a diffusers config folder; or a BaseModel
    whose component configs and tokenizers are used (tiny test models). dtype: floating tensors are cast
    to it (None keeps them); tensors already in that dtype are used as they are, not copied, so the
    model shares their memory (it never writes to them). Tensors on the meta device give a meta model
    (shapes only), which the key-layout tests use.
    """
    state_dict = normalize_host_keys(state_dict)
    info = detect_checkpoint(state_dict, prediction_type, metadata=metadata, name=name)
    if kind not in (None, "", "auto") and not families.same(kind, info.kind):
        raise ModelError(f"the weights are {info.kind} ({info.description}), not {kind}.")
    spec = _resolve_spec(config, info)
    pt = info.prediction_type
    if info.prediction_source == "default" and spec.prediction_type:
        pt = spec.prediction_type  # a config folder / template tells more than a guess
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _build_ldm_part(spec, state_dict, _UNET_DTYPE.get() or dtype, "UNet")
    vae = _build_ldm_part(spec, state_dict, dtype, "VAE")
    readers = {"clip": clip_te_from_ldm, "open_clip": open_clip_te_from_ldm}
    built = [_build_te(CLIPTextModelWithProjection if projection else CLIPTextModel, te_spec,
                       readers[layout](state_dict, prefix), label, dtype)
             for (prefix, layout, projection, label), te_spec in zip(families.get(info.kind).ldm_text_encoders,
                                                                     (spec.te, spec.te2))]
    te, te2 = built[0], (built[1] if len(built) > 1 else None)
    sched_cfg = dict(spec.scheduler)
    sched_cfg["prediction_type"] = pt
    if info.zero_terminal_snr:
        sched_cfg["rescale_betas_zero_snr"] = True
    sched = DDPMScheduler.from_config(sched_cfg)
    extra = {"checkpoint": asdict(info), "config_source": spec.source}
    extra["checkpoint"]["prediction_type"] = pt
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=spec.tokenizer, noise_scheduler=sched,
                     kind=info.kind, name=name or "checkpoint", path=path, text_encoder_2=te2,
                     tokenizer_2=spec.tokenizer_2, native_resolution=spec.native_resolution, extra=extra)


# ============================================================================= files
def read_safetensors_header(path: str) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """{key: shape} and the metadata of a .safetensors file, reading only its header."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelError(f"'{path}' is not a .safetensors file (too short).")
        n = struct.unpack("<Q", raw)[0]
        if n <= 1 or n > min(size - 8, 256 * 1024 * 1024):
            hint = " It looks like a pickle (zip) renamed to .safetensors." if raw[:2] == b"PK" else ""
            raise ModelError(f"'{path}' is not a valid .safetensors file.{hint}")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"'{path}' is not a valid .safetensors file ({exc}).") from exc
    meta = header.pop("__metadata__", None) or {}
    return {k: tuple(v.get("shape", ())) for k, v in header.items()}, meta


_KEEP_PREFIXES = (UNET_PREFIX, VAE_PREFIX, SD1_TE_PREFIX, SD2_TE_PREFIX, XL_TE1_PREFIX, XL_TE2_PREFIX)


def _wanted(k: str) -> bool:
    return k.startswith(_KEEP_PREFIXES) and ".visual." not in k and not k.startswith(SD2_TE_PREFIX + "visual.")


def _load_pickle(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"'{path}' could not be loaded as a weights-only pickle ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). It holds Python objects beyond tensors: convert it to .safetensors with "
                         f"a tool you trust, or use the .safetensors release of the model.") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"'{path}' does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_single_file(path: str, allow_pickle: bool = False, prediction_type: str = "auto", config=None,
                     dtype: Optional[torch.dtype] = torch.float32, kind: Optional[str] = None) -> BaseModel:
    """Load an SD1.x / SD2.x / SDXL-base single-file checkpoint offline into a BaseModel.

    .safetensors only, unless allow_pickle=True (then .ckpt/.pt/.pth with torch.load(weights_only=True)).
    See from_original_state_dict for prediction_type, config and dtype."""
    path = os.path.expanduser(str(path))
    name = os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint '{path}' does not exist.")
    ext = os.path.splitext(path)[1].lower()
    metadata: Dict[str, str] = {}
    if ext in PICKLE_EXTS:
        if not allow_pickle:
            raise ModelError(f"'{path}' is a pickle checkpoint ({ext}): pickles can run code when loaded, so they are "
                             f"refused by default. Use the .safetensors version of the model, or opt in with "
                             f"allow_pickle (loaded with torch.load(weights_only=True)).")
        full = _load_pickle(path)
        info = detect_checkpoint(full, prediction_type, name=os.path.basename(path))
        sd = {k: _cast(v, dtype) for k, v in full.items() if _wanted(k) or k in ("v_pred", "ztsnr")}
        del full
    elif ext in (".safetensors", ".sft"):
        shapes, metadata = read_safetensors_header(path)
        from safetensors import safe_open

        probe: Dict[str, Any] = dict(shapes)
        with safe_open(path, framework="pt", device="cpu") as fh:
            if SD2_V_HEURISTIC_KEY in shapes:
                probe[SD2_V_HEURISTIC_KEY] = fh.get_tensor(SD2_V_HEURISTIC_KEY)
            info = detect_checkpoint(probe, prediction_type, metadata=metadata, name=os.path.basename(path))
            sd = {}
            udt = _UNET_DTYPE.get() or dtype
            for k in shapes:
                if _wanted(k) or k in ("v_pred", "ztsnr"):  # cast per tensor: peak memory ~ one model copy
                    sd[k] = _cast(fh.get_tensor(k), udt if k.startswith(UNET_PREFIX) else dtype)
    else:
        raise ModelError(f"'{path}' has an unknown extension {ext!r}: {SUPPORTED}.")
    del info  # detection runs again on the loaded tensors (same answer: the heuristic tensor is among them)
    return from_original_state_dict(sd, kind=kind, prediction_type=prediction_type, name=name, config=config,
                                    dtype=dtype, path=os.path.abspath(path), metadata=metadata)
