"""SD3 / SD3.5 (medium, large): SD3Transformer2DModel, CLIP-L + CLIP-G (+ T5) conditioning. Defaults are
sd-scripts' sd3_train_network.py: timestep_sampling "sigma" with logit_normal weighting, the scheduler's shift
(3.0)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import FlowFamily
from .flow_parts import param_device, t5_conditioning_tag, t5_encode, t5_max_length, t5_run_metadata, token_ids

SD3_SHIFT = 3.0

# diffusers paths inside a joint block -> MMDiT's module (sd-scripts' names), fused parts in MMDiT's order
JOINT = (
    ("x_block_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block_attn_proj", ("attn.to_out.0",)),
    ("context_block_attn_proj", ("attn.to_add_out",)),
    ("x_block_attn2_qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ("x_block_attn2_proj", ("attn2.to_out.0",)),
    ("x_block_mlp_fc1", ("ff.net.0.proj",)),
    ("x_block_mlp_fc2", ("ff.net.2",)),
    ("context_block_mlp_fc1", ("ff_context.net.0.proj",)),
    ("context_block_mlp_fc2", ("ff_context.net.2",)),
    ("x_block_adaLN_modulation_1", ("norm1.linear",)),
    ("context_block_adaLN_modulation_1", ("norm1_context.linear",)),
)
# sd3_train_network.py: the MMDiT model_type is ss_base_model_version; sai_model_spec's ARCH_SD3 + model_type
METADATA = {"sd3-medium": ("medium", "stable-diffusion-3-medium/lora"),
            "sd35-medium": ("5-medium", "stable-diffusion-3-5-medium/lora"),
            "sd35-large": ("5-large", "stable-diffusion-3-5-large/lora"),
            None: ("sd3", "stable-diffusion-3/lora")}


VRAM_TIERS = ((16.0, False, 0, 1024, "16 GB+: SD3.5 Medium (2.5 B, 5 GB in bf16) with checkpointing fits easily"),
              (10.0, False, 0, 1024, "10-16 GB: bf16 + checkpointing fits in ~10 GB at 1024 px"),
              (6.0, True, 0, 1024, "6-10 GB: fp8 base (2.5 GB of weights) + checkpointing"),
              (0.0, True, 12, 512, "under 6 GB: fp8 + checkpointing + 12 blocks swapped, 512 px"))


class SD3(FlowFamily):
    caption_tokens, caption_tokenizer = 256, "t5"
    name, title = "sd3", "SD3 / SD3.5"
    transformer_class = "SD3Transformer2DModel"
    variants = ("sd35-medium", "sd3-medium", "sd35-large")
    tiny_specs = ("tiny-sd3",)
    pipeline_prefixes = ("StableDiffusion3",)
    pipeline_class = "StableDiffusion3Pipeline"
    name_pattern = r"(^|[^a-z])sd_?3"
    lora_blocks = (("transformer_blocks", "joint_blocks", JOINT),)
    # sd-scripts' `emb_dims` modules
    lora_extras = {"context_embedder": "context_embedder", "x_embedder_proj": "pos_embed.proj",
                   "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
                   "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
                   "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
                   "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
                   "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}
    # the last block's context side is pre-only (AdaLayerNormContinuous: scale, shift; MMDiT: shift, scale)
    swapped_suffixes = ("context_block_adaLN_modulation_1",)
    network_module = "networks.lora_sd3"
    training_keys = ("apply_lg_attn_mask", "apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std",
                     "mode_scale")
    diffusers_prefixes = {"transformer.": "unet", "text_encoder.": "te1", "text_encoder_2.": "te2",
                          "text_encoder_3.": "te3"}

    vram_tiers = VRAM_TIERS
    advice_name = "SD3.5 Medium"
    advice_text_encoder = (False, "transformer only: T5 carries most of the prompt; CLIP LoRA is optional", 0.5)

    def advise(self, s, image_count, task, detail):
        rank, lr = (16 if detail == "demanding" else 8), 1e-4
        s.add("learning_rate", lr, "SD3.5 LoRAs train at about 1e-4 (the MMDiT is sensitive: higher rates "
                                   "break anatomy first)")
        s.add("timestep_sampling", "sigma", "SD3's own training: sigmas of the shifted scheduler (shift 3.0) drawn "
                                            "logit-normally")
        s.add("weighting_scheme", "logit_normal", "logit-normal timestep density (SD3 paper, diffusers' and "
                                                  "sd-scripts' SD3 default): most steps at mid noise")
        s.notes.append("SD3.5 Large (8 B) needs about 3x the memory of Medium: use fp8_base below 32 GB and "
                       "lr 5e-5 .. 1e-4.")
        s.add("lora_rank", rank, f"SD3.5 Medium: rank {rank} (8 for most subjects, 16 for demanding detail); the "
                                 f"transformer is wide, so small ranks still carry a lot")
        return rank, lr

    def detect_keys(self, keys):  # MMDiT's joint blocks
        return any("joint_blocks." in k for k in keys)

    def file_metadata(self, variant):
        version, arch = METADATA[variant]
        return {"ss_base_model_version": version, "modelspec.architecture": arch,
                "modelspec.implementation": "diffusers"}

    def t5_encoder(self, model):
        return getattr(model, "text_encoder_3", None)

    def conditioning_tag(self, model) -> str:
        return t5_conditioning_tag(model)

    def run_metadata(self, model):
        return t5_run_metadata(model)

    def weighting_for(self, timestep_sampling: str) -> str:
        return "logit_normal" if timestep_sampling == "sigma" else "none"

    def default_shift(self, model) -> float:
        return float(getattr(model.noise_scheduler.config, "shift", SD3_SHIFT))

    def text_encoder_components(self, model) -> List[tuple]:
        return [("te1", model.text_encoder), ("te2", model.text_encoder_2)]  # CLIP-L, CLIP-G; T5 never trains

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        """cat([pad(cat([CLIP-L, CLIP-G] penultimate), T5 width), T5]) and the two CLIP text_embeds, as diffusers'
        StableDiffusion3Pipeline makes them (zeros for T5 when the model has none)."""
        import torch

        o = []
        for te, tok in ((model.text_encoder, model.tokenizer), (model.text_encoder_2, model.tokenizer_2)):
            ids = token_ids(tok, captions, tok.model_max_length).input_ids
            o.append(te(ids.to(param_device(te, device)), output_hidden_states=True))
        clip_h = torch.cat([o[0].hidden_states[-2].to(device), o[1].hidden_states[-2].to(device)], dim=-1)
        pooled = torch.cat([o[0].text_embeds.to(device), o[1].text_embeds.to(device)], dim=-1)
        width = int(model.unet.config.joint_attention_dim)
        if model.text_encoder_3 is not None:
            t5, _ = t5_encode(model, model.text_encoder_3, model.tokenizer_3, captions, device)
        else:
            t5 = torch.zeros(len(captions), t5_max_length(model), width, dtype=clip_h.dtype, device=device)
        clip_h = torch.nn.functional.pad(clip_h, (0, t5.shape[-1] - clip_h.shape[-1]))
        return {"hidden": torch.cat([clip_h, t5.to(clip_h.dtype)], dim=-2), "pooled": pooled}

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        dtype, dev = noisy.dtype, noisy.device
        return transformer(hidden_states=noisy, timestep=timesteps.to(dev).float().to(dtype),
                           encoder_hidden_states=cond["hidden"].to(dev, dtype),
                           pooled_projections=cond["pooled"].to(dev, dtype), return_dict=False)[0]

    def pipeline(self, model, scheduler):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(transformer=model.unet, scheduler=scheduler, vae=model.vae,
                                        text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                                        text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)
