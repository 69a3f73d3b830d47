"""Chroma (8.9B, from Flux.1 schnell): ChromaTransformer2DModel over Flux's packed 2x2 latents, conditioned on T5
alone (no CLIP, no pooled vector: a `distilled_guidance_layer` makes every block's modulation from the timestep), as
diffusers' ChromaPipeline makes it.

- Text: T5's last hidden state encoded WITH its attention mask (unlike Flux), padded to `t5xxl_max_token_length`
  (default 512; tiny 32); in the transformer every padding token but the first is masked out (the pipeline's rule).
  T5 is never trained.
- Objective: rectified flow (training/flow.py), timestep_sampling "sigmoid", no weighting, guidance not used:
  sd-scripts' Chroma settings (flux_train_network.py --model_type chroma).
- LoRA layout: Flux's (sd-scripts' networks.lora_flux with model_type chroma; ComfyUI 0.8.0's Chroma map):
  `lora_unet_double_blocks_N_img_attn_qkv` (fused q/k/v), `..._img_mlp_0`, `lora_unet_single_blocks_N_linear1`
  (q, k, v and the MLP input fused), `..._linear2`; no modulation Linears in the blocks (228 modules for the
  release). Outside the blocks, read but not trained by default: img_in, txt_in, final_layer_linear and the
  distilled guidance layer (in_proj, layers_N_in_layer / out_layer, out_proj, ComfyUI's names).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import FlowFamily
from .flux import DOUBLE as FLUX_DOUBLE, SINGLE as FLUX_SINGLE
from .flow_parts import (IMPL_BFL, latent_image_ids, pack_latents, param_device, t5_max_length, token_ids,
                         unpack_latents)

# Flux's tables without the per-block modulation Linears Chroma does not have
DOUBLE = tuple(e for e in FLUX_DOUBLE if not e[0].endswith("_mod_lin"))
SINGLE = tuple(e for e in FLUX_SINGLE if e[0] != "modulation_lin")
EXTRAS = dict({"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer_linear": "proj_out",
               "distilled_guidance_layer_in_proj": "distilled_guidance_layer.in_proj",
               "distilled_guidance_layer_out_proj": "distilled_guidance_layer.out_proj"},
              **{f"distilled_guidance_layer_layers_{i}_{ours}": f"distilled_guidance_layer.layers.{i}.{theirs}"
                 for i in range(16) for ours, theirs in (("in_layer", "linear_1"), ("out_layer", "linear_2"))})
#: Flux-sized (8.9 B: 18 GB in bf16, 9 GB in fp8); the Flux tiers scaled, not measured here
VRAM_TIERS = ((40.0, False, 0, 1024, "40 GB+: the bf16 transformer (18 GB) with checkpointing"),
              (16.0, True, 0, 1024, "16-40 GB: fp8 base (9 GB of weights) + checkpointing"),
              (12.0, True, 30, 1024, "12-16 GB: fp8 + checkpointing + 30 of 57 blocks swapped to CPU memory"),
              (0.0, True, 45, 512, "under 12 GB: fp8 + checkpointing + 45 blocks swapped, 512 px (slow)"))


class Chroma(FlowFamily):
    name, title = "chroma", "Chroma"
    timestep_sampling = "sigmoid"
    transformer_class = "ChromaTransformer2DModel"
    variants = ("chroma",)
    tiny_specs = ("tiny-chroma",)
    pipeline_prefixes = ("Chroma",)
    pipeline_class = "ChromaPipeline"
    name_pattern = r"chroma"
    lora_blocks = (("transformer_blocks", "double_blocks", DOUBLE),
                   ("single_transformer_blocks", "single_blocks", SINGLE))
    lora_extras = EXTRAS
    network_module = "networks.lora_flux"  # sd-scripts trains Chroma with its Flux network (model_type chroma)
    training_keys = ("model_type", "apply_t5_attn_mask", "weighting_scheme", "timestep_sampling", "sigmoid_scale",
                     "model_prediction_type", "discrete_flow_shift")
    diffusers_prefixes = {"transformer.": "unet"}
    requires = "diffusers >= 0.35"
    vram_tiers = VRAM_TIERS
    advice_name = "Chroma"
    advice_text_encoder = (False, "T5 stays frozen (Chroma has no CLIP)", None)

    def advise(self, s, image_count, task, detail):
        rank = 8 if task in ("style", "concept") and detail == "simple" else 16
        lr = 1e-4
        s.add("learning_rate", lr, "Chroma LoRAs train like Flux ones: about 1e-4 at rank 16 (batch 1); halve it if "
                                   "samples burn")
        s.add("timestep_sampling", "sigmoid", "sd-scripts' Chroma setting: sigmoid-normal sigmas, no shift")
        s.add("weighting_scheme", "none", "uniform loss weights (sd-scripts' Chroma setting)")
        s.add("lora_rank", rank, f"Chroma: rank {rank} (16 as for Flux); the transformer is wide, so small ranks "
                                 f"still carry a lot")
        return rank, lr

    def default_shift(self, model) -> float:
        return 1.0  # sigmoid sampling: no shift (the value used where `shift` sampling is chosen by hand)

    def detect_keys(self, keys):  # Flux's blocks with the distilled guidance layer
        return any("distilled_guidance_layer.in_proj" in k for k in keys) and any("double_blocks." in k for k in keys)

    def file_metadata(self, variant):
        # sd-scripts: flux_utils.MODEL_VERSION_CHROMA, sai_model_spec ARCH_FLUX_1_CHROMA
        return {"ss_base_model_version": "chroma", "modelspec.architecture": "chroma/lora",
                "modelspec.implementation": IMPL_BFL, "ss_model_type": "chroma"}

    def run_metadata(self, model):
        return {"ss_t5xxl_max_token_length": str(t5_max_length(model)), "ss_apply_t5_attn_mask": "True"}

    def text_encoder_components(self, model) -> List[tuple]:
        return []  # T5 is never trained

    def t5_encoder(self, model):
        return model.text_encoder

    def conditioning_tag(self, model) -> str:
        return f"/chroma_t5len={t5_max_length(model)}/masked"

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        """{"hidden": T5 (B, L, D) encoded with its mask, "mask": (B, L): the caption's tokens and the first pad}."""
        import torch

        tok, te = model.tokenizer, model.text_encoder
        enc = token_ids(tok, captions, t5_max_length(model))
        dev = param_device(te, device)
        hidden = te(enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev))[0].to(device)
        lengths = enc.attention_mask.sum(dim=1)
        keep = torch.arange(enc.attention_mask.shape[1]).unsqueeze(0) <= lengths.unsqueeze(1)
        return {"hidden": hidden, "mask": keep.to(device, hidden.dtype)}

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        import torch

        dtype, dev = noisy.dtype, noisy.device
        b, _, h, w = noisy.shape
        hidden = cond["hidden"].to(dev, dtype)
        mask = torch.cat([cond["mask"].to(dev).bool(), torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool,
                                                                   device=dev)], dim=1)
        out = transformer(hidden_states=pack_latents(noisy), timestep=timesteps.to(dev).float().to(dtype) / 1000.0,
                          encoder_hidden_states=hidden,
                          txt_ids=torch.zeros(hidden.shape[1], 3, device=dev, dtype=dtype),
                          img_ids=latent_image_ids(h, w, dev, dtype), attention_mask=mask, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def pipeline(self, model, scheduler):
        from diffusers import ChromaPipeline

        return ChromaPipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                              tokenizer=model.tokenizer, transformer=model.unet)
