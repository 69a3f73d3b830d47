"""Flow-model single files, offline: the transformer file users have (ComfyUI models/diffusion_models, Forge), plus
its component files or a components folder.

Flux (ComfyUI models/diffusion_models, Forge): the BFL transformer (`double_blocks.*`, `single_blocks.*`, optionally
  under `model.diffusion_model.`; fp32 / fp16 / bf16, or float8_e4m3fn, loaded as bf16), with `ae` (ae.safetensors:
  BFL / LDM VAE keys, or diffusers AutoencoderKL keys), `clip_l` (clip_l.safetensors: transformers CLIP keys) and
  `t5xxl` (t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors: transformers T5 encoder keys) as separate files. All-in-one
  checkpoints that hold `vae.*` / `first_stage_model.*` and `text_encoders.clip_l.transformer.*` /
  `text_encoders.t5xxl.transformer.*` need no separate files.
SD3 / SD3.5 (sd3_medium.safetensors, sd3.5_medium.safetensors, sd3.5_large.safetensors): `model.diffusion_model.
  joint_blocks.*`, `first_stage_model.*` and, when included, `text_encoders.clip_l / clip_g / t5xxl.transformer.*`;
  otherwise `clip_l`, `clip_g` (and optionally `t5xxl`; without it SD3 runs on zeros for T5 as diffusers does).
Qwen-Image, Z-Image, Chroma, Wan (2.1 T2V, 2.2 TI2V-5B), FLUX.2 [klein] (qwen_image_bf16, z_image_turbo_bf16,
  Chroma1-HD, wan2.1_t2v_14B_bf16 / wan2.2_ti2v_5B_fp16, flux-2-klein-4b; bf16 / fp16 / float8_e4m3fn, loaded as
  bf16 from fp8; bare or under `model.diffusion_model.` / `diffusion_model.`): the transformer alone, in the
  original layout; the VAE, text encoder, tokenizer and scheduler come from `components_folder` (a diffusers folder
  of that family), whose transformer/config.json gives what shapes cannot tell (rope axes, Wan's head size).
  Qwen-Image's, Z-Image's, Chroma's and Wan's VAE and text encoder may be separate files instead (`vae`,
  `text_encoder`: qwen_image_vae + qwen_2.5_vl_7b, ae + qwen_3_4b, ae + t5xxl_fp16, wan_2.1_vae + umt5_xxl_fp16, as
  ComfyUI and Forge Neo users have them), over a components folder that holds only their configs (Forge Neo's
  bundled backend/huggingface/<org>/<repo>/): models/split_parts.py.
Every file is read by models/file_weights.py: float8 as bf16, ComfyUI's scaled fp8 dequantised.

Conversion: diffusers' own loaders.single_file_utils (convert_flux_transformer_checkpoint_to_diffusers,
convert_sd3_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint, convert_z_image_*, convert_chroma_*,
convert_wan_transformer_to_diffusers, convert_flux2_*; Qwen-Image's names are diffusers' own). The diffusers configs
are read from the weights' shapes; what shapes cannot tell is taken from the released models: Flux rope axes (16, 56,
56) for 128-wide heads, CLIP heads = width / 64 (CLIP-L quick_gelu, CLIP-G gelu), the VAEs' scaling / shift factors
(Flux 0.3611 / 0.1159, SD3 1.5305 / 0.0609), the schedulers of the releases. Narrower test-size models (tests/) get
width / 8 CLIP heads, rope axes (d/4, 3d/8, 3d/8) and 8 VAE norm groups; Flux's and Chroma's fused single-block
linear1 is split at the model's width (diffusers' converters split it at 3072).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch

from .base import BaseModel, ModelError
from . import flow
from .flux import SCHEDULER_DEV, SCHEDULER_SCHNELL, clip_config
from .sd3 import SCHEDULER_SD3
from ..family import family_of_keys
from .single_file import _empty_weights, read_safetensors_header
# reading and assigning a file's weights (re-exported: hosts/comfyui_flow.py uses check_not_scaled_fp8)
from .file_weights import _assign, check_not_scaled_fp8, dequantize_scaled, read_file  # noqa: F401

DIT_PREFIX = "model.diffusion_model."
VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
TE_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
               "t5xxl": "text_encoders.t5xxl.transformer."}
VAE_PREFIXES = ("first_stage_model.", "vae.")
FILE_KEYS = {"flux": ("ae", "clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g", "t5xxl"),
             "qwen_image": ("components_folder", "vae", "text_encoder"),
             "z_image": ("components_folder", "vae", "text_encoder"),
             "chroma": ("components_folder", "vae", "text_encoder"), "wan": ("components_folder", "vae", "text_encoder"),
             "flux2": ("components_folder",)}


# ----------------------------------------------------------------------------- detection
def detect_family(path: str) -> Optional[str]:
    """The flow family ("flux", "sd3", "qwen_image", ...) or None from a .safetensors header (no tensor is read)."""
    try:
        shapes, _ = read_safetensors_header(path)
    except (ModelError, OSError):
        return None
    return family_of_keys(shapes)


def component_kind(path: str) -> Optional[str]:
    """The kind of a separate component file, from its .safetensors header (None when it is none of these, or
    unreadable): "ae" (Flux's / an LDM VAE: Flux, Z-Image, Chroma), "wan_vae" (Wan 2.1's causal 3-D VAE, which
    Qwen-Image's VAE shares: wan_2.1_vae, qwen_image_vae), "t5xxl", "umt5" (T5 with a relative attention bias in
    every block, or UMT5's 256384-token vocabulary: umt5_xxl), "clip" (CLIP-L or CLIP-G: `component_files` tells
    them apart by width), "qwen2.5-vl" (qwen_2.5_vl_7b: the q/k/v biases of Qwen2), "qwen3" (qwen_3_4b: Qwen3's
    q / k norms). The keys asked are the ones Forge Neo's loader (backend/loader.py replace_state_dict) sorts the
    picked files by."""
    try:
        shapes, _ = read_safetensors_header(os.path.expanduser(str(path)))
    except (ModelError, OSError):
        return None
    keys = list(shapes)

    def has(suffix: str) -> bool:
        return any(k.endswith(suffix) for k in keys)

    if has("decoder.middle.0.residual.0.gamma") or has("decoder.mid_block.resnets.0.norm1.gamma"):
        return "wan_vae"
    if has("encoder.conv_in.weight") and any("decoder." in k for k in keys):
        return "ae"
    umt5_vocab = any(k.endswith("shared.weight") and shapes[k][0] == 256384 for k in keys)  # Forge Neo's own rule
    if has("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight") or umt5_vocab:
        return "umt5"
    if has("encoder.block.0.layer.0.SelfAttention.q.weight"):
        return "t5xxl"
    if has("embeddings.token_embedding.weight"):
        return "clip"
    if has("layers.0.self_attn.q_norm.weight"):
        return "qwen3"
    if has("layers.0.self_attn.k_proj.bias"):
        return "qwen2.5-vl"
    return None


def _clip_width(path: str) -> int:
    shapes, _ = read_safetensors_header(os.path.expanduser(str(path)))
    return max((s[-1] for k, s in shapes.items() if k.endswith("embeddings.token_embedding.weight")), default=0)


def component_files(paths, family: Optional[str] = None) -> Dict[str, str]:
    """The config keys of a list of separate component files in any order (Forge's "VAE / Text Encoder" picks,
    `shared.opts.forge_additional_modules`), by each file's kind (`component_kind`). Flux / SD3: "ae" / "clip_l" /
    "clip_g" / "t5xxl"; two CLIP files: the wider one is CLIP-G (1280 vs 768); one: CLIP-L, unless it is 1280 wide
    in an SD3 set. The families whose single files are the transformer alone (Qwen-Image, Z-Image, Chroma, Wan):
    "vae" / "text_encoder", the files of the kinds their models module names (`split_files`). Files of other kinds
    are left out."""
    split = split_files(family)
    out: Dict[str, str] = {}
    clips = []
    for p in paths or []:
        part = component_kind(p)
        if split:
            key = next((k for k, (wanted, _example) in split.items() if wanted == part), None)
            if key is not None and key not in out:
                out[key] = str(p)
        elif part == "clip":
            clips.append(str(p))
        elif part is not None and part not in out:
            out[part] = str(p)
    if len(clips) >= 2:
        clips.sort(key=_clip_width)
        out["clip_l"], out["clip_g"] = clips[0], clips[-1]
    elif clips:
        out["clip_g" if "clip_g" in FILE_KEYS.get(family, ()) and _clip_width(clips[0]) == 1280 else "clip_l"] = clips[0]
    return out


def split_files(family: Optional[str]) -> Dict[str, tuple]:
    """{subfolder: (component kind, a released file name)} of the parts a family's components folder may take from
    separate files instead of its own weights (models/<family>.py SPLIT_FILES); {} for Flux / SD3 and others."""
    if family not in _WITH_FOLDER:
        return {}
    import importlib

    return dict(getattr(importlib.import_module(f".{_WITH_FOLDER[family][2]}", __package__), "SPLIT_FILES", {}))


# ----------------------------------------------------------------------------- reading
def _sub(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- Flux transformer
def _flux_rope_axes(head_dim: int):
    if head_dim == 128:
        return (16, 56, 56)
    a = head_dim // 4
    return (a, (head_dim - a) // 2, head_dim - a - (head_dim - a) // 2)


def convert_flux(sd: Dict[str, torch.Tensor]):
    """(diffusers config, diffusers state dict) of BFL-layout Flux weights (with or without `model.diffusion_model.`)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = {(k[len(DIT_PREFIX):] if k.startswith(DIT_PREFIX) else k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("vae.", "first_stage_model.", "text_encoders."))}
    try:
        inner, in_ch = sd["img_in.weight"].shape
        head_dim = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
        n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("double_blocks."))
        n_single = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_blocks."))
        config = dict(patch_size=1, in_channels=int(in_ch), num_layers=n_double, num_single_layers=n_single,
                      attention_head_dim=head_dim, num_attention_heads=int(inner) // head_dim,
                      joint_attention_dim=int(sd["txt_in.weight"].shape[1]),
                      pooled_projection_dim=int(sd["vector_in.in_layer.weight"].shape[1]),
                      guidance_embeds="guidance_in.in_layer.weight" in sd, axes_dims_rope=_flux_rope_axes(head_dim))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the Flux transformer file lacks {exc}: it is not a complete Flux.1 dev / schnell "
                         f"transformer (a Flux variant with other inputs, or a partial file).") from exc
    return config, _at_flux_width(sd, int(inner), convert_flux_transformer_checkpoint_to_diffusers)


def _at_flux_width(sd: Dict[str, torch.Tensor], inner: int, convert) -> Dict[str, torch.Tensor]:
    """`convert(sd)` (diffusers' Flux / Chroma converter) at any width: those split single blocks' fused linear1
    at Flux.1's width 3072; at another width the same split (q, k, v, mlp) is made here at this model's width."""
    sd, narrow = dict(sd), {}
    if inner != 3072:
        for k in [k for k in sd if re.match(r"single_blocks\.\d+\.linear1\.", k)]:
            narrow[k] = sd.pop(k)
            sd[k] = torch.empty((4 * 3072 + 3 * 3072,) + tuple(narrow[k].shape[1:]), device="meta")
    conv = convert(sd)
    for k, v in narrow.items():
        i, kind = k.split(".")[1], k.rsplit(".", 1)[1]
        q, kk, vv, mlp = torch.split(v, (inner,) * 3 + (v.shape[0] - 3 * inner,), dim=0)
        pre = f"single_transformer_blocks.{i}."
        for name, t in (("attn.to_q", q), ("attn.to_k", kk), ("attn.to_v", vv), ("proj_mlp", mlp)):
            conv[f"{pre}{name}.{kind}"] = t
    return conv


def _transformer(cls, converted, what: str, advice: str):
    """A diffusers transformer of class `cls` from a converted (config, state dict), in the file's dtype."""
    config, conv = converted
    dtype = next(iter(conv.values())).dtype
    with _empty_weights():
        model = cls(**config)
    return _assign(model, {k: v.to(dtype) for k, v in conv.items()}, what, advice).to(dtype)


def flux_transformer(sd: Dict[str, torch.Tensor]):
    """A diffusers FluxTransformer2DModel from BFL-layout weights (with or without `model.diffusion_model.`)."""
    from diffusers import FluxTransformer2DModel

    return _transformer(FluxTransformer2DModel, convert_flux(sd), "Flux transformer",
                        "Use an original Flux.1 dev / schnell transformer file (flux1-dev.safetensors, "
                        "flux1-schnell.safetensors or a fine-tune in their layout).")


# ----------------------------------------------------------------------------- SD3 transformer
def convert_sd3(sd: Dict[str, torch.Tensor]):
    """(diffusers config, diffusers state dict) of original SD3 / SD3.5 MMDiT weights."""
    from diffusers.loaders.single_file_utils import (convert_sd3_transformer_checkpoint_to_diffusers,
                                                     get_attn2_layers)

    sd = {k[len(DIT_PREFIX):]: v for k, v in sd.items() if k.startswith(DIT_PREFIX)} or dict(sd)
    try:
        w = sd["x_embedder.proj.weight"]
        caption_dim = int(sd["context_embedder.weight"].shape[0])
        qk = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
        head_dim = int(sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0]) if qk else 64
        pos = int(round(sd["pos_embed"].shape[1] ** 0.5))
        config = dict(sample_size=128 if caption_dim >= 1024 else 16, patch_size=int(w.shape[-1]),
                      in_channels=int(w.shape[1]), out_channels=int(w.shape[1]),
                      num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.")),
                      attention_head_dim=head_dim, num_attention_heads=caption_dim // head_dim,
                      joint_attention_dim=int(sd["context_embedder.weight"].shape[1]),
                      caption_projection_dim=caption_dim,
                      pooled_projection_dim=int(sd["y_embedder.mlp.0.weight"].shape[1]), pos_embed_max_size=pos,
                      dual_attention_layers=get_attn2_layers(sd), qk_norm="rms_norm" if qk else None)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the SD3 file lacks {exc}: it is not a complete SD3 / SD3.5 MMDiT.") from exc
    return config, convert_sd3_transformer_checkpoint_to_diffusers(dict(sd))


def sd3_transformer(sd: Dict[str, torch.Tensor]):
    from diffusers import SD3Transformer2DModel

    return _transformer(SD3Transformer2DModel, convert_sd3(sd), "SD3 transformer",
                        "Use an original SD3 Medium / SD3.5 Medium / SD3.5 Large file.")


# ----------------------------------------------------------------------------- VAE, text encoders
def vae_from(sd: Dict[str, torch.Tensor], family: str):
    """A 16-channel AutoencoderKL from BFL / LDM keys (optionally `first_stage_model.` / `vae.`) or diffusers keys."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for p in VAE_PREFIXES:
        if any(k.startswith(p) for k in sd):
            sd = _sub(sd, p)
            break
    diffusers_layout = any(k.startswith("encoder.down_blocks.") for k in sd)
    try:
        if diffusers_layout:
            chans = [int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                     for i in range(1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks.")))]
            per = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
        else:
            chans = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0])
                     for i in range(1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")))]
            per = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        latent = int(sd["encoder.conv_out.weight"].shape[0]) // 2
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the VAE weights lack {exc}: pass the model's VAE file (Flux: ae.safetensors).") from exc
    scale, shift = VAE_FACTORS[family]
    quant = "quant_conv.weight" in sd
    config = dict(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=tuple(chans),
                  down_block_types=("DownEncoderBlock2D",) * len(chans), up_block_types=("UpDecoderBlock2D",) * len(chans),
                  layers_per_block=per, norm_num_groups=32 if min(chans) >= 64 else 8,
                  sample_size=1024 if min(chans) >= 64 else 64, scaling_factor=scale, shift_factor=shift,
                  use_quant_conv=quant, use_post_quant_conv="post_quant_conv.weight" in sd)
    if latent != 16:
        raise ModelError(f"the VAE has {latent} latent channels; Flux and SD3 use 16: pass their VAE (ae.safetensors).")
    dtype = next(iter(sd.values())).dtype
    conv = sd if diffusers_layout else convert_ldm_vae_checkpoint(sd, config)
    with _empty_weights():
        vae = AutoencoderKL(**config)
    return _assign(vae, {k: v.to(dtype) for k, v in conv.items()}, "VAE",
                   "Pass the model's own VAE (Flux: ae.safetensors; SD3: the one inside the checkpoint).")


def clip_from(sd: Dict[str, torch.Tensor], which: str):
    """CLIP-L (Flux: CLIPTextModel; SD3: with projection) or CLIP-G from transformers-layout keys."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sd = {("text_model." + k if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k): v
          for k, v in sd.items() if k != "logit_scale"}  # logit_scale: ComfyUI's CLIP objects carry it, unused here
    try:
        vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
        n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
        inter = int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
        pos = int(sd["text_model.embeddings.position_embedding.weight"].shape[0])
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the {which} file lacks {exc}: pass a CLIP text encoder in the transformers layout "
                         f"({which}.safetensors as ComfyUI / sd-scripts use).") from exc
    heads = hidden // 64 if hidden % 64 == 0 and hidden >= 512 else hidden // 8
    proj = int(sd["text_projection.weight"].shape[0]) if "text_projection.weight" in sd else int(hidden)
    cfg = clip_config(hidden_size=int(hidden), intermediate_size=inter, num_attention_heads=heads,
                      num_hidden_layers=n, max_position_embeddings=pos, projection_dim=proj,
                      hidden_act="gelu" if which == "clip_g" else "quick_gelu")
    cfg.vocab_size = int(vocab)
    with_proj = which == "clip_g" or "text_projection.weight" in sd
    cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
    with _empty_weights():
        model = cls(cfg)
    expected = set(model.state_dict())
    fit = {}
    for k, v in sd.items():
        k2 = k if k in expected else (k[len("text_model."):] if k[len("text_model."):] in expected else k)
        if k2.startswith("text_projection") and not with_proj or k2.endswith("position_ids"):
            continue
        fit[k2] = v
    dtype = next(iter(fit.values())).dtype
    return _assign(model, {k: v.to(dtype) for k, v in fit.items()}, which,
                   f"Pass the {which} text encoder of this model family.")


def t5_from(sd: Dict[str, torch.Tensor]):
    """T5 encoder (transformers T5EncoderModel keys) from t5xxl_fp16 / fp8_e4m3fn files."""
    from transformers import T5Config, T5EncoderModel

    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    if "encoder.embed_tokens.weight" not in sd and "shared.weight" in sd:  # ComfyUI's T5 (and files saved from it)
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # hold only `shared`; the encoder's is the same table
    try:
        vocab, d_model = sd["shared.weight"].shape
        rel = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        heads = int(rel.shape[1])
        d_kv = int(sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // heads
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
        d_ff = int(sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0])
        n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the t5xxl file lacks {exc}: pass a T5 v1.1 encoder in the transformers layout "
                         f"(t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors).") from exc
    cfg = T5Config(vocab_size=int(vocab), d_model=int(d_model), d_kv=d_kv, d_ff=d_ff, num_layers=n, num_heads=heads,
                   relative_attention_num_buckets=int(rel.shape[0]), feed_forward_proj="gated-gelu" if gated else "relu",
                   dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    with _empty_weights():
        model = T5EncoderModel(cfg)
    dtype = sd["shared.weight"].dtype
    fit = {k: v.to(dtype) for k, v in sd.items() if k in model.state_dict()}
    return _assign(model, fit, "t5xxl", "Pass the T5 v1.1 XXL encoder (t5xxl_fp16.safetensors).")


# ----------------------------------------------------------------------------- the whole model
def _component(main: Dict[str, torch.Tensor], files: Dict[str, str], key: str, prefix: str, family: str, found: str,
               required: bool = True) -> Optional[Dict[str, torch.Tensor]]:
    if files.get(key):
        return read_file(files[key], key)
    inside = _sub(main, prefix) if prefix else {}
    if inside:
        return inside
    if not required:
        return None
    names = {"ae": "the VAE (ae.safetensors)", "clip_l": "CLIP-L (clip_l.safetensors)",
             "clip_g": "CLIP-G (clip_g.safetensors)", "t5xxl": "T5-XXL (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn)"}
    need = ", ".join(f"{k}: <path>" for k in FILE_KEYS[family] if not files.get(k))
    raise ModelError(f"{found}, but not {names[key]}: pass the separate files with the config keys {need} "
                     f"(sd-scripts' names; ComfyUI keeps them in models/vae and models/text_encoders).")


def load_flow_single_file(path: str, files: Dict[str, str]) -> BaseModel:
    """A flow-model single file plus its separate component files or components folder (module docstring)."""
    path = os.path.expanduser(path)
    family = detect_family(path)
    if family is None:
        raise ModelError(f"'{path}' holds none of the transformers read from single files here ({', '.join(TITLES)}).")
    main = read_file(path, "base model")
    name = os.path.splitext(os.path.basename(path))[0]
    return flow_model_from_state_dict(main, files, name=name, path=os.path.abspath(path))


def flow_model_from_state_dict(main: Dict[str, torch.Tensor], files: Optional[Dict[str, str]] = None, *,
                               name: str = "", path: str = "") -> BaseModel:
    """A Flux / SD3 `BaseModel` from weights in the single-file layouts (BFL / MMDiT transformer, optionally under
    `model.diffusion_model.`, with `vae.` / `first_stage_model.` and `text_encoders.*.transformer.` parts inside, as a
    ComfyUI graph's MODEL / CLIP / VAE give them through `state_dict_for_saving`) plus separate component `files`.
    Tensors are used as given (no copies unless a layout or dtype conversion needs one)."""
    files = files or {}
    family = family_of_keys(main)
    if family not in BUILDERS:
        raise ModelError(f"'{name or 'the model'}' holds none of the transformers read from single files here "
                         f"({', '.join(TITLES)}).")
    return BUILDERS[family](main, files, name, path or name)


def _flux(main, files, name: str, path: str) -> BaseModel:
    """Flux.1 dev / schnell from BFL-layout weights (module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = "flux"
    tr = flux_transformer(main)
    variant = "flux-dev" if tr.config.guidance_embeds else "flux-schnell"
    found = (f"'{os.path.basename(path)}' holds a Flux.1 {variant.split('-')[1]} transformer "
             f"({tr.config.num_layers} double + {tr.config.num_single_layers} single blocks, "
             f"{str(next(tr.parameters()).dtype).replace('torch.', '')})")
    if not files.get("ae") and any(k.startswith(VAE_PREFIXES) for k in main):  # an all-in-one checkpoint
        vae = vae_from({k: v for k, v in main.items() if k.startswith(VAE_PREFIXES)}, family)
    else:
        vae = vae_from(_component(main, files, "ae", "", family, found), family)
    # Flux takes CLIP-L's pooler_output (a CLIPTextModel): a text_projection in the file is not used
    clip_l = {k: v for k, v in _component(main, files, "clip_l", TE_PREFIXES["clip_l"], family, found).items()
              if not k.startswith("text_projection")}
    te = clip_from(clip_l, "clip_l")
    t5 = t5_from(_component(main, files, "t5xxl", TE_PREFIXES["t5xxl"], family, found))
    sched = FlowMatchEulerDiscreteScheduler(**(SCHEDULER_DEV if variant == "flux-dev" else SCHEDULER_SCHNELL))
    small = tr.config.num_layers < 8
    extra = {"variant": variant}
    if small:
        extra["t5_default_length"] = 32
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=flow.clip_tokenizer(), noise_scheduler=sched,
                     kind="flux", name=name, path=path, text_encoder_2=t5,
                     tokenizer_2=flow.t5_tokenizer(flow.T5_MAX_LENGTH[variant]),
                     native_resolution=64 if small else 1024, extra=extra)


def _sd3(main, files, name: str, path: str) -> BaseModel:
    """SD3 / SD3.5 from MMDiT-layout weights (module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .sd3 import variant_of

    family = "sd3"
    tr = sd3_transformer(main)
    variant = variant_of(tr)
    found = f"'{os.path.basename(path)}' holds an {variant} transformer ({tr.config.num_layers} blocks)"
    if not any(k.startswith("first_stage_model.") for k in main) and not files.get("ae"):
        raise ModelError(f"{found} without its VAE: use the full checkpoint (with first_stage_model.*), or pass ae: "
                         f"<the SD3 VAE file>.")
    vae = vae_from(read_file(files["ae"], "ae") if files.get("ae") else main, family)
    te1 = clip_from(_component(main, files, "clip_l", TE_PREFIXES["clip_l"], family, found), "clip_l")
    te2 = clip_from(_component(main, files, "clip_g", TE_PREFIXES["clip_g"], family, found), "clip_g")
    t5_sd = _component(main, files, "t5xxl", TE_PREFIXES["t5xxl"], family, found, required=False)
    t5 = t5_from(t5_sd) if t5_sd else None
    small = tr.config.num_layers < 8
    extra = {"variant": variant}
    if small:
        extra["t5_default_length"] = 32
    return BaseModel(unet=tr, vae=vae, text_encoder=te1, tokenizer=flow.clip_tokenizer(),
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_SD3), kind="sd3", name=name,
                     path=path, text_encoder_2=te2, tokenizer_2=flow.clip_tokenizer(pad_token="!"),
                     text_encoder_3=t5, tokenizer_3=flow.t5_tokenizer(256) if t5 is not None else None,
                     native_resolution=64 if small else 1024, extra=extra)


# ----------------------------------------------------------------------------- transformer-only files
def _unprefixed(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A transformer file's own keys: under `model.diffusion_model.` or `diffusion_model.` (ComfyUI's files), or bare;
    other parts (a VAE, text encoders) are left out."""
    for pre in (DIT_PREFIX, "diffusion_model."):
        if any(k.startswith(pre) for k in sd):
            return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    return dict(sd)


def _blocks(sd: Dict[str, torch.Tensor], prefix: str, at: int = 1) -> int:
    """How many blocks `prefix`N.* there are (N the `at`-th dotted part of the key)."""
    return 1 + max(int(k.split(".")[at]) for k in sd if k.startswith(prefix))


def _over(base_config: Optional[dict]) -> dict:
    """The components folder's transformer/config.json without diffusers' `_` entries (what shapes cannot tell)."""
    return {k: v for k, v in (base_config or {}).items() if not k.startswith("_")}


def _rope(config: dict, head_dim: int, default) -> tuple:
    """The folder's rope axes when they fit this head size, else `default` (the releases' split)."""
    axes = config.get("axes_dims_rope")
    return tuple(axes) if axes and sum(axes) == head_dim else tuple(default)


def convert_qwen_image(sd: Dict[str, torch.Tensor], base_config: Optional[dict] = None):
    """(diffusers config, state dict) of a Qwen-Image transformer file: its original names are diffusers' own
    (diffusers' from_single_file maps them unchanged), under `model.diffusion_model.` / `diffusion_model.` in ComfyUI
    files. The config comes from the shapes (blocks, head dim from the q norm, widths) over `base_config` (the
    components folder's transformer/config.json: its rope axes) or the released values."""
    from .qwen_image import FULL_TRANSFORMER

    sd = _unprefixed(sd)
    try:
        head_dim = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0])
        inner = int(sd["img_in.weight"].shape[0])
        config = _over(base_config or FULL_TRANSFORMER)
        config.update(in_channels=int(sd["img_in.weight"].shape[1]), out_channels=int(sd["proj_out.weight"].shape[0]) // 4,
                      num_layers=_blocks(sd, "transformer_blocks."),
                      attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                      joint_attention_dim=int(sd["txt_in.weight"].shape[1]))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the Qwen-Image transformer file misses {exc}: use the original Qwen-Image diffusion "
                         f"model file (qwen_image_bf16.safetensors, its fp8 copy, or a fine-tune in its layout).") from exc
    return config, sd


def convert_z_image(sd: Dict[str, torch.Tensor], base_config: Optional[dict] = None):
    """(diffusers config, state dict) of a Z-Image transformer file in its original layout (fused attention.qkv,
    `x_embedder`, `final_layer`; ComfyUI's files, under `model.diffusion_model.`), through diffusers' own
    converter; the config from the shapes over `base_config` (the components folder's transformer/config.json)."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    sd = _unprefixed(sd)
    try:
        head_dim = int(sd["layers.0.attention.q_norm.weight"].shape[0])
        dim = int(sd["x_embedder.weight"].shape[0])
        config = _over(base_config)
        config.update(dim=dim, n_heads=dim // head_dim, n_kv_heads=dim // head_dim,
                      in_channels=int(sd["x_embedder.weight"].shape[1]) // 4,
                      n_layers=_blocks(sd, "layers."), n_refiner_layers=_blocks(sd, "noise_refiner."),
                      cap_feat_dim=int(sd["cap_embedder.1.weight"].shape[1]))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the Z-Image transformer file misses {exc}: use the original Z-Image diffusion model file "
                         f"(z_image_turbo_bf16.safetensors, its fp8 copy, or a fine-tune in its layout).") from exc
    return config, convert_z_image_transformer_checkpoint_to_diffusers(dict(sd))


def convert_chroma(sd: Dict[str, torch.Tensor], base_config: Optional[dict] = None):
    """(diffusers config, state dict) of a Chroma transformer file in its original layout (Flux's `double_blocks` /
    `single_blocks` without modulation, `distilled_guidance_layer`; Chroma1-HD / -Base, ComfyUI's copies), through
    diffusers' own converter; the config from the shapes over `base_config`."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    sd = _unprefixed(sd)
    try:
        inner, in_ch = (int(x) for x in sd["img_in.weight"].shape)
        head_dim = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
        appr = sd["distilled_guidance_layer.in_proj.weight"]
        config = _over(base_config)
        out_ch = int(sd["final_layer.linear.weight"].shape[0])
        config.update(patch_size=1, in_channels=in_ch, out_channels=None if out_ch == in_ch else out_ch,
                      num_layers=_blocks(sd, "double_blocks."), num_single_layers=_blocks(sd, "single_blocks."),
                      attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                      joint_attention_dim=int(sd["txt_in.weight"].shape[1]),
                      axes_dims_rope=_rope(config, head_dim, _flux_rope_axes(head_dim)),
                      approximator_num_channels=int(appr.shape[1]), approximator_hidden_dim=int(appr.shape[0]),
                      approximator_layers=_blocks(sd, "distilled_guidance_layer.layers.", at=2))
        conv = _at_flux_width(sd, inner, convert_chroma_transformer_checkpoint_to_diffusers)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the Chroma transformer file misses {exc}: use the original Chroma diffusion model file "
                         f"(Chroma1-HD.safetensors, its fp8 copy, or a fine-tune in its layout).") from exc
    return config, conv


#: Wan variants with other inputs than text-to-video's (their keys or input channels tell them)
_WAN_OTHER = ("img_emb.", "vace_", "face_adapter.", "motion_encoder.")


def convert_wan(sd: Dict[str, torch.Tensor], base_config: Optional[dict] = None):
    """(diffusers config, state dict) of a Wan transformer file in its original layout (`blocks.N.self_attn.q`,
    `cross_attn`, `ffn.0`, `head.head`; Wan-AI's and ComfyUI's files), through diffusers' own converter; the config
    from the shapes over `base_config` (its head size: 128 in every release)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = _unprefixed(sd)
    pe, head = sd.get("patch_embedding.weight"), sd.get("head.head.weight")
    if any(k.startswith(_WAN_OTHER) for k in sd) or (
            pe is not None and head is not None and head.shape[0] != pe.shape[1] * pe.shape[2:].numel()):
        raise ModelError(f"the file holds a Wan image-to-video / VACE / Animate transformer (other inputs than "
                         f"text-to-video's): this trainer reads the text-to-video ones (Wan 2.1 T2V 1.3B / 14B, "
                         f"Wan 2.2 TI2V-5B). Use one of those files.")
    try:
        pe = sd["patch_embedding.weight"]  # (inner, in channels, *patch)
        inner, in_ch, patch = int(pe.shape[0]), int(pe.shape[1]), tuple(int(x) for x in pe.shape[2:])
        out_ch = int(sd["head.head.weight"].shape[0]) // (patch[0] * patch[1] * patch[2])
        config = _over(base_config)
        head_dim = int(config.get("attention_head_dim") or 128)
        config.update(patch_size=patch, in_channels=in_ch, out_channels=out_ch, attention_head_dim=head_dim,
                      num_attention_heads=inner // head_dim, text_dim=int(sd["text_embedding.0.weight"].shape[1]),
                      freq_dim=int(sd["time_embedding.0.weight"].shape[1]),
                      ffn_dim=int(sd["blocks.0.ffn.0.weight"].shape[0]), num_layers=_blocks(sd, "blocks."),
                      cross_attn_norm="blocks.0.norm3.weight" in sd,
                      qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in sd else None,
                      image_dim=None, added_kv_proj_dim=None)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the Wan transformer file misses {exc}: use the original Wan diffusion model file "
                         f"(wan2.1_t2v_14B_bf16.safetensors, wan2.2_ti2v_5B_fp16.safetensors, their fp8 copies, or a "
                         f"fine-tune in their layout).") from exc
    return config, convert_wan_transformer_to_diffusers(dict(sd))


def convert_flux2(sd: Dict[str, torch.Tensor], base_config: Optional[dict] = None):
    """(diffusers config, state dict) of a FLUX.2 transformer file in BFL's layout (`double_blocks`, `single_blocks`,
    `double_stream_modulation_img.lin`; flux-2-klein-4b.safetensors, ComfyUI's copies), through diffusers' own
    converter; the config from the shapes over `base_config`."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    sd = _unprefixed(sd)
    try:
        inner, in_ch = (int(x) for x in sd["img_in.weight"].shape)
        head_dim = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
        out_ch = int(sd["final_layer.linear.weight"].shape[0])
        config = _over(base_config)
        config.update(patch_size=1, in_channels=in_ch, out_channels=None if out_ch == in_ch else out_ch,
                      num_layers=_blocks(sd, "double_blocks."), num_single_layers=_blocks(sd, "single_blocks."),
                      attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                      joint_attention_dim=int(sd["txt_in.weight"].shape[1]),
                      timestep_guidance_channels=int(sd["time_in.in_layer.weight"].shape[1]),
                      mlp_ratio=int(sd["double_blocks.0.img_mlp.0.weight"].shape[0]) / 2 / inner,
                      axes_dims_rope=_rope(config, head_dim, (head_dim // 4,) * 4),
                      guidance_embeds="guidance_in.in_layer.weight" in sd)
        conv = convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the FLUX.2 transformer file misses {exc}: use the original FLUX.2 [klein] diffusion "
                         f"model file (flux-2-klein-4b.safetensors, its fp8 copy, or a fine-tune in its "
                         f"layout).") from exc
    return config, conv


#: family -> (diffusers transformer class, converter, the folder loader's module, what the family is called)
_WITH_FOLDER = {"qwen_image": ("QwenImageTransformer2DModel", convert_qwen_image, "qwen_image", "Qwen-Image",
                               "Qwen2.5-VL"),
                "z_image": ("ZImageTransformer2DModel", convert_z_image, "z_image", "Z-Image", "Qwen3"),
                "chroma": ("ChromaTransformer2DModel", convert_chroma, "chroma", "Chroma", "T5-XXL"),
                "wan": ("WanTransformer3DModel", convert_wan, "wan", "Wan", "UMT5-XXL"),
                "flux2": ("Flux2Transformer2DModel", convert_flux2, "flux2", "FLUX.2", "Qwen3")}


def _with_components_folder(family: str):
    """A builder for a family whose single files hold the transformer only (Qwen-Image, Z-Image, Chroma, Wan,
    FLUX.2): the transformer from the file (bf16 / fp16 / fp8 as stored), the VAE, text encoder, tokenizer and
    scheduler from `components_folder` (a diffusers folder of that family: the release's layout). The VAE and text
    encoder may come from separate files instead (`vae`, `text_encoder`: the split files ComfyUI and Forge Neo users
    have, models/<family>.py SPLIT_FILES), over a folder that then needs only their configs (Forge Neo's
    backend/huggingface/<org>/<repo>/: models/split_parts.py)."""
    cls_name, convert, module, title, te_name = _WITH_FOLDER[family]

    def build(main, files, name: str, path: str) -> BaseModel:
        import importlib

        import diffusers

        from .split_parts import missing_parts, part_names

        mod = importlib.import_module(f".{module}", __package__)
        mod.require()
        folder = os.path.expanduser(files.get("components_folder") or "")
        if not folder or not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ModelError(f"'{os.path.basename(path)}' is a {title} transformer; its VAE, text encoder "
                             f"({te_name}) and tokenizer come from a diffusers {title} folder: set "
                             f"components_folder: <the folder with model_index.json, vae/, text_encoder/, "
                             f"tokenizer/> (got {folder or 'nothing'}).")
        split = split_files(family)
        given = {k: files[k] for k in split if files.get(k)}
        missing = missing_parts(folder, split, given)
        if missing:
            raise ModelError(f"'{os.path.basename(path)}' holds a {title} transformer, but not "
                             f"{part_names(split, missing, te_name)}: '{folder}' holds their configs without "
                             f"weights, so "
                             f"pass the separate files with the config keys "
                             f"{', '.join(f'{k}: <path>' for k in missing)} (ComfyUI keeps them in models/vae and "
                             f"models/text_encoders).")
        base_config = None
        cfg_path = os.path.join(folder, "transformer", "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as fh:
                base_config = json.load(fh)
        try:
            tr = _transformer(getattr(diffusers, cls_name), convert(main, base_config), f"{title} transformer",
                              f"Use the original {title} diffusion model file or a fine-tune in its layout.")
        except ModelError as exc:  # a wrong or partial file: say which
            raise ModelError(f"'{path}': {exc}") from exc
        tr.eval().requires_grad_(False)
        options = mod.single_file_options(path) if hasattr(mod, "single_file_options") else {}  # Wan: the expert
        if given:
            options["single_files"] = given
        model = getattr(mod, f"load_{module}_folder")(folder, transformer=tr, **options)
        model.name, model.path = name, path
        return model

    return build


#: the flow families read from single files here, by family
BUILDERS = {"flux": _flux, "sd3": _sd3, **{f: _with_components_folder(f) for f in _WITH_FOLDER}}
TITLES = ("Flux.1", "SD3 / SD3.5", "Qwen-Image", "Z-Image", "Chroma", "Wan", "FLUX.2 [klein]")
