"""A part of a diffusers pipeline folder built from a separate single file: the config (and tokenizer, scheduler)
come from the folder, the weights from the file. This is how the split files users of ComfyUI and Forge Neo have
(qwen_image_vae.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors, umt5_xxl_fp16.safetensors, ae.safetensors,
qwen_3_4b.safetensors, ...) become a family's VAE and text encoder over a folder that holds configs only (Forge Neo's
backend/huggingface/<org>/<repo>/: model_index.json, <part>/config.json, tokenizer/, scheduler/, no weights).

- diffusers parts: `cls.from_config(<folder>/<part>/config.json)` on the meta device, then the file's weights in
  diffusers' layout, converted by diffusers' own single-file converters where the file is in the original layout
  (Wan 2.1's / Qwen-Image's VAE: `convert_wan_vae_to_diffusers`; Flux's ae / an LDM VAE:
  `convert_ldm_vae_checkpoint`).
- transformers parts: `cls.from_pretrained(None, config=<folder>/<part>/config.json, state_dict=<the file>)`, so
  transformers' own key mapping reads the original checkpoints' names (Qwen2.5-VL's `model.layers.*` /
  `visual.*` as ComfyUI and Neo ship them, Qwen3's `model.*` over a Qwen3Model, T5 / UMT5's tied `shared`).
  What a text encoder file leaves out and conditioning never runs (Qwen2.5-VL's `lm_head`) is initialised by
  transformers and reported, as from_pretrained does; anything else missing, or a file of another model, is a
  ModelError naming the file.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from .base import ModelError

#: the diffusers VAE classes of Wan 2.1's causal 3-D VAE layout (Qwen-Image's VAE is the same network)
WAN_VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")
#: keys ComfyUI's text encoder files carry besides the model (T5's sentencepiece model, CLIP's logit scale)
EXTRA_KEYS = ("spiece_model", "logit_scale")
#: weights a text encoder file may leave out: conditioning never runs them (or they are tied to ones it has)
OPTIONAL_WEIGHTS = ("lm_head.", "encoder.embed_tokens.")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def has_weights(folder: str, sub: str) -> bool:
    """The folder's part holds weights (a config-only folder such as Forge Neo's does not: an index file without
    its shards does not count)."""
    d = os.path.join(folder, sub)
    try:
        return any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(d))
    except OSError:
        return False


def _float_dtype(sd: Dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of the file's floating weights have (what the part is held in)."""
    counts: Dict[torch.dtype, int] = {}
    for v in sd.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def load_part(cls, folder: str, sub: str, sd: Dict[str, torch.Tensor], what: str):
    """Part `sub` of the folder (class `cls`) with the weights of a single file's state dict `sd` (module
    docstring), in the file's dtype, frozen; `what` names the file in errors."""
    if not os.path.isfile(os.path.join(folder, sub, "config.json")):
        raise ModelError(f"'{folder}' has no {sub}/config.json, which {what} needs for its {cls.__name__}.")
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        PreTrainedModel = ()
    if PreTrainedModel and issubclass(cls, PreTrainedModel):
        model = _transformers_part(cls, os.path.join(folder, sub), sd, what)
    else:
        model = _diffusers_part(cls, os.path.join(folder, sub), sd, what)
    return model.eval().requires_grad_(False)


def diffusers_layout(cls_name: str, sd: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """A VAE file's weights in diffusers' layout, through diffusers' own converters when they are in the original
    one (under `vae.` / `first_stage_model.` as well, as inside checkpoints)."""
    for p in ("first_stage_model.", "vae."):
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    if cls_name in WAN_VAE_CLASSES and "decoder.middle.0.residual.0.gamma" in sd:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        return convert_wan_vae_to_diffusers(dict(sd))
    if cls_name == "AutoencoderKL" and any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        return convert_ldm_vae_checkpoint(dict(sd), dict(config))
    return sd


def _diffusers_part(cls, path: str, sd: Dict[str, torch.Tensor], what: str):
    from .file_weights import _assign
    from .single_file import _empty_weights

    config = cls.load_config(path)
    conv = diffusers_layout(cls.__name__, sd, config)
    dtype = _float_dtype(conv)
    with _empty_weights():
        model = cls.from_config(config)
    fit = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in conv.items()}
    return _assign(model, fit, what, f"Pick the {cls.__name__} file of this model family.").to(dtype)


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` from transformers 4.56 on, `torch_dtype` before."""
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover
        return {"dtype": dtype}
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _transformers_part(cls, path: str, sd: Dict[str, torch.Tensor], what: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    sd = {k: v for k, v in sd.items() if k not in EXTRA_KEYS}
    hint = f"Pick the {cls.__name__.replace('ForConditionalGeneration', '')} text encoder file of this model family."
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=sd, output_loading_info=True,
                                          **_dtype_kwargs(_float_dtype(sd)))
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes of another model
        raise ModelError(f"{what} does not fit {cls.__name__} ({str(exc).splitlines()[0][:300]}). {hint}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(OPTIONAL_WEIGHTS)]
    bad = list(info.get("mismatched_keys", []))
    if missing or bad:
        parts = [f"{len(x)} {label} (e.g. {', '.join(str(y) for y in list(x)[:3])})"
                 for x, label in ((missing, "weights missing"), (bad, "with other shapes")) if x]
        raise ModelError(f"{what} does not fit {cls.__name__}: {'; '.join(parts)}. {hint}")
    return model


def part_names(split: Dict[str, tuple], subs, text_encoder: str = "") -> str:
    """'the VAE (e.g. qwen_image_vae.safetensors) and the text encoder (Qwen2.5-VL, e.g. ...)' for subfolders
    `subs`."""
    names = []
    for sub in subs:
        example = split[sub][1]
        if sub == "vae":
            names.append(f"the VAE (e.g. {example})")
        else:
            names.append(f"the text encoder ({text_encoder + ', ' if text_encoder else ''}e.g. {example})")
    return " and ".join(names)


def missing_parts(folder: str, split: Dict[str, tuple], given: Dict[str, object]) -> list:
    """The split parts neither given as files nor held by the folder with weights, in `split`'s order."""
    return [sub for sub in split if sub not in given and not has_weights(folder, sub)]


__all__ = ["has_weights", "load_part", "diffusers_layout", "missing_parts", "part_names", "WAN_VAE_CLASSES"]
