"""ComfyUI glue for the flow-matching families (Flux.1, SD3 / SD3.5): the graph's MODEL / CLIP / VAE -> our BaseModel,
and the memory plan of the Train node for these 2.5-12 B parameter models.

In-memory layouts in ComfyUI (comfy/supported_models.py Flux / FluxSchnell / SD3 / SD35*, comfy/text_encoders/flux.py,
sd3_clip.py): `BaseModel.state_dict_for_saving(clip_sd, vae_sd)` gives
  Flux  `model.diffusion_model.double_blocks.*` / `single_blocks.*` (BFL layout), `vae.*` (the ae's LDM keys),
        `text_encoders.clip_l.transformer.text_model.*`, `text_encoders.t5xxl.transformer.{shared,encoder}.*`
  SD3   `model.diffusion_model.joint_blocks.*` (MMDiT layout), `first_stage_model.*`,
        `text_encoders.clip_l / clip_g / t5xxl.transformer.*` (those the CLIP object holds)
which is the all-in-one single-file layout `models.flow_single_file` reads: its `flow_model_from_state_dict` does the
conversion (no second converter here). ComfyUI's CLIP objects also carry `logit_scale` and a CLIP-L
`text_projection` that Flux does not use; flow_single_file drops them.

Memory plan (never two 16-bit copies of a 12 B transformer on the GPU):
1. ComfyUI's models are unloaded from the GPU by its own model management (`unload_all_models`,
   `soft_empty_cache`: `ComfyUIHost.free_memory`, run by `run.train_for_host` BEFORE our copy is built);
2. our copy is built from ComfyUI's tensors in their own 16-bit dtype (fp8 weights are read as bf16), never float32;
3. on a GPU, a transformer of >= 4 B parameters (Flux.1, SD3.5 Large) is trained with `fp8_base` (its frozen block
   weights stored as float8_e4m3fn) unless the node's fp8_base input says otherwise; ComfyUI's own copy stays in CPU
   memory (its offload device) for the sampler after training.
The node's report says which plan ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..family import family_of_keys


FAMILY_NAMES = {"flux": "Flux.1", "sd3": "SD3 / SD3.5"}
#: transformers at least this large are trained with fp8_base on a GPU when the node's fp8_base is "auto"
FP8_AUTO_PARAMS = 4e9
FP8_CHOICES = ("auto", "on", "off")
LATENT_CHANNELS = {"flux": 16, "sd3": 16}


def _inner(model: Any) -> Any:
    return getattr(model, "model", None)  # ModelPatcher.model: comfy.model_base.BaseModel


def graph_family(model: Any) -> Optional[str]:
    """"flux", "sd3" or None (a UNet model) for a graph's MODEL, from its diffusion model's keys (no copies)."""
    inner = _inner(model)
    if inner is None or not hasattr(inner, "state_dict"):
        return None
    return family_of_keys(k for k in inner.state_dict() if k.startswith("diffusion_model."))


def transformer_params(model: Any) -> int:
    """Parameter count of the graph's diffusion model (what fp8_base would store in fp8)."""
    inner = _inner(model)
    return sum(int(v.numel()) for k, v in inner.state_dict().items()
               if k.startswith("diffusion_model.") and hasattr(v, "numel"))


@dataclass
class MemoryPlan:
    family: str
    params: int
    fp8_base: bool
    text: str


def memory_plan(model: Any, device: str, choice: str = "auto") -> Optional[MemoryPlan]:
    """The Train node's plan for a Flux / SD3 MODEL (module docstring); None for UNet models (no plan needed)."""
    family = graph_family(model)
    if family is None:
        return None
    choice = (choice or "auto").strip().lower()
    if choice not in FP8_CHOICES:
        raise ValueError(f"fp8_base is '{choice}': use one of {', '.join(FP8_CHOICES)}.")
    n = transformer_params(model)
    on_gpu = str(device).startswith("cuda")
    if choice == "auto":
        fp8 = on_gpu and n >= FP8_AUTO_PARAMS
        why = ("auto: a transformer of >= 4 B parameters on a GPU" if fp8 else
               "auto: on the CPU" if not on_gpu else "auto: below 4 B parameters it fits in 16 bits")
    else:
        fp8 = choice == "on"
        why = "set on the node"
    size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"
    text = (f"memory plan: {FAMILY_NAMES[family]} transformer of {size} parameters. ComfyUI's copy was unloaded from "
            f"the GPU by its model management before ours was built (it stays in CPU memory for the sampler); ours "
            + ("stores the frozen transformer weights in fp8 (fp8_base" if fp8 else
               "keeps the frozen weights in their 16-bit / float dtype (no fp8_base") + f", {why}).")
    return MemoryPlan(family=family, params=n, fp8_base=fp8, text=text)


def flow_base_model_from_state_dict(sd: Mapping[str, Any], name: str):
    """Our BaseModel from a Flux / SD3 graph's `state_dict_for_saving` (called outside inference mode).

    ComfyUI loads weights under torch.inference_mode(): such tensors cannot be saved for backward, so each is
    copied once (fp8 ones are read as bf16, which makes the copy); the dtype stays 16-bit (never a float32 copy of a
    12 B model)."""
    import torch

    from ..models.flow_single_file import check_not_scaled_fp8, flow_model_from_state_dict  # lazy: heavy

    check_not_scaled_fp8(sd, "the graph's MODEL is")
    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    out: Dict[str, Any] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.dtype in fp8:
            v = v.to(torch.bfloat16)
        elif v.is_inference():
            v = v.clone()
        out[k] = v
    return flow_model_from_state_dict(out, name=name)
