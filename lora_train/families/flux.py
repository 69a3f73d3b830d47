"""Flux.1 (dev, schnell): FluxTransformer2DModel over packed 2x2 latents, CLIP-L pooled + T5 hidden states, dev's
guidance input. Defaults are sd-scripts' flux_train_network.py: timestep_sampling "shift" with discrete_flow_shift
3.1582, no loss weighting."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import FlowFamily
from .flow_parts import (IMPL_BFL, latent_image_ids, pack_latents, param_device, t5_conditioning_tag, t5_encode,
                         t5_run_metadata, token_ids, unpack_latents, variant)

FLUX_SHIFT = 3.1582

# diffusers paths inside a block -> BFL's module (sd-scripts' names), fused parts in BFL's order
DOUBLE = (
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn_proj", ("attn.to_out.0",)),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("img_mlp_0", ("ff.net.0.proj",)),
    ("img_mlp_2", ("ff.net.2",)),
    ("txt_mlp_0", ("ff_context.net.0.proj",)),
    ("txt_mlp_2", ("ff_context.net.2",)),
    ("img_mod_lin", ("norm1.linear",)),
    ("txt_mod_lin", ("norm1_context.linear",)),
)
SINGLE = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation_lin", ("norm.linear",)),
)
# sd-scripts' flux_utils.MODEL_VERSION_FLUX_V1 and sai_model_spec's architectures
METADATA = {"flux-dev": ("flux1", "flux-1-dev/lora"), "flux-schnell": ("flux1", "flux-1-schnell/lora"),
            None: ("flux1", "flux-1/lora")}


#: sd-scripts' Flux docs and our bench (bench/flow_bench.py: Flux.1-dev rank 16 at 1024 px, batch 1, fp8 base +
#: checkpointing <= 16 GB, <= 10 GB with 36 blocks swapped)
VRAM_TIERS = ((48.0, False, 0, 1024, "48 GB+: the bf16 transformer (24 GB) fits; fp8 would only cost accuracy"),
              (20.0, True, 0, 1024, "20-48 GB: fp8 base (12 GB of weights) + checkpointing fits in ~16 GB"),
              (14.0, True, 36, 1024, "14-20 GB: fp8 base + checkpointing + 36 blocks swapped to CPU memory (~10 GB)"),
              (10.0, True, 36, 512, "10-14 GB: fp8 + checkpointing + block swap, 512 px (Flux learns well at 512 and "
                                    "generalises to 1024)"),
              (0.0, True, 50, 512, "under 10 GB: fp8 + checkpointing, 50 of 57 blocks swapped, 512 px: slow (every "
                                   "step moves ~6 GB over PCIe)"))


class Flux(FlowFamily):
    name, title = "flux", "Flux.1"
    timestep_sampling = "shift"
    transformer_class = "FluxTransformer2DModel"
    variants = ("flux-dev", "flux-schnell")
    tiny_specs = ("tiny-flux", "tiny-flux-schnell")
    pipeline_prefixes = ("Flux",)
    pipeline_class = "FluxPipeline"
    name_pattern = r"flux"
    lora_blocks = (("transformer_blocks", "double_blocks", DOUBLE),
                   ("single_transformer_blocks", "single_blocks", SINGLE))
    # sd-scripts' `in_dims` modules
    lora_extras = {"img_in": "x_embedder", "txt_in": "context_embedder",
                   "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
                   "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
                   "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
                   "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
                   "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
                   "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
                   "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}
    network_module = "networks.lora_flux"
    # flux_train_network.update_metadata
    training_keys = ("model_type", "apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                     "guidance_scale", "timestep_sampling", "sigmoid_scale", "model_prediction_type",
                     "discrete_flow_shift")
    # diffusers' FluxPipeline does not load LoRA into T5 (te3)
    diffusers_prefixes = {"transformer.": "unet", "text_encoder.": "te1"}

    vram_tiers = VRAM_TIERS
    advice_name = "Flux.1"
    advice_text_encoder = (False, "transformer only: T5 carries most of the prompt; CLIP LoRA is optional", 0.5)

    def advise(self, s, image_count, task, detail):
        rank = 8 if task in ("style", "concept") and detail == "simple" else 16
        lr = 1e-4 if image_count < 50 else 2e-4
        s.add("learning_rate", lr, f"Flux LoRAs train at 1e-4 .. 4e-4 with rank 16 (batch 1); "
                                   f"{'1e-4, the safe start for under 50 images' if lr == 1e-4 else '2e-4 for 50+ images'}"
                                   f"; halve it if samples burn or the loss jumps")
        s.add("timestep_sampling", "shift", "sd-scripts' recommendation for Flux LoRAs: sigmoid-normal sigmas "
                                            "shifted towards noise (discrete_flow_shift)")
        s.add("discrete_flow_shift", FLUX_SHIFT, "the shift sd-scripts uses for Flux.1 dev (its sampling shift at "
                                                 "1024 px); flux_shift instead scales it with the resolution")
        s.add("weighting_scheme", "none", "Flux trains with uniform loss weights (the shifted sampling does the work)")
        s.add("guidance_scale", 1.0, "Flux dev's guidance input while training: 1.0 (sd-scripts' default); "
                                     "ignored for schnell")
        s.add("lora_rank", rank, f"Flux.1: rank {rank} (16 is the usual Flux LoRA rank); the transformer is wide, "
                                 f"so small ranks still carry a lot")
        return rank, lr

    def detect_keys(self, keys):  # BFL's double and single blocks (kohya / BFL / ComfyUI files), not Chroma's
        return any("double_blocks." in k for k in keys) and any("single_blocks." in k for k in keys) and \
            not any("distilled_guidance_layer." in k or "double_stream_modulation" in k for k in keys)

    def file_metadata(self, variant):
        version, arch = METADATA[variant]
        return {"ss_base_model_version": version, "modelspec.architecture": arch,
                "modelspec.implementation": IMPL_BFL, "ss_model_type": "flux"}

    def t5_encoder(self, model):
        return model.text_encoder_2

    def conditioning_tag(self, model) -> str:
        return t5_conditioning_tag(model)

    def run_metadata(self, model):
        meta = t5_run_metadata(model)
        if variant(model) == "flux-dev":  # schnell has no guidance input
            meta["ss_guidance_scale"] = f"{float(model.extra.get('guidance_scale', 1.0)):g}"
        return meta

    def default_shift(self, model) -> float:
        return FLUX_SHIFT

    def text_encoder_components(self, model) -> List[tuple]:
        return [("te1", model.text_encoder)]  # CLIP-L; T5 is never trained

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        ids = token_ids(model.tokenizer, captions, model.tokenizer.model_max_length).input_ids
        te = model.text_encoder
        pooled = te(ids.to(param_device(te, device)), output_hidden_states=False).pooler_output
        hidden, mask = t5_encode(model, model.text_encoder_2, model.tokenizer_2, captions, device)
        return {"hidden": hidden, "pooled": pooled.to(device), "mask": mask.to(hidden.dtype)}

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        """Packed latents, position ids, dev's guidance input (model.extra["guidance_scale"], default 1.0), the T5
        mask in attention when apply_t5_attn_mask is on."""
        import torch

        dtype, dev = noisy.dtype, noisy.device
        hidden, pooled = cond["hidden"].to(dev, dtype), cond["pooled"].to(dev, dtype)
        t = timesteps.to(dev).float()
        b, _, h, w = noisy.shape
        cfg = getattr(transformer, "config", None) or model.unet.config
        guidance = None
        if getattr(cfg, "guidance_embeds", False):
            guidance = torch.full((b,), float(model.extra.get("guidance_scale", 1.0)), device=dev, dtype=torch.float32)
        kwargs = {}
        if model.extra.get("apply_t5_attn_mask") and "mask" in cond:
            txt = cond["mask"].to(dev).bool()
            full = torch.cat([txt, torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool, device=dev)], dim=1)
            kwargs["joint_attention_kwargs"] = {"attention_mask": full[:, None, None, :]}
        out = transformer(hidden_states=pack_latents(noisy), timestep=t / 1000.0, guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=hidden,
                          txt_ids=torch.zeros(hidden.shape[1], 3, device=dev, dtype=dtype),
                          img_ids=latent_image_ids(h, w, dev, dtype), return_dict=False, **kwargs)[0]
        return unpack_latents(out, h, w)

    def pipeline(self, model, scheduler):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                            tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
                            tokenizer_2=model.tokenizer_2, transformer=model.unet)
