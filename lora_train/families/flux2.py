"""FLUX.2 [klein] 4B / 9B and FLUX.2 [dev]: Flux2Transformer2DModel over the Flux.2 VAE's latents patchified 2x2
(32 -> 128 channels) and normalised by the VAE's batch-norm statistics, one token per 2x2 patch, conditioned on the
text encoder's hidden states of three layers side by side, as diffusers' Flux2KleinPipeline / Flux2Pipeline make
them.

- Text, klein: each caption as one Qwen3 user message (enable_thinking off), padded to `text_max_length` (default
  512; tiny 64), the hidden states of `extra["text_layers"]` (9, 18, 27) stacked along the width (klein 4B:
  3 x 2560 = 7680). dev: Mistral Small 3.1 over Flux2Pipeline's system message and the caption, layers (10, 20, 30)
  (3 x 5120 = 15360), through the pipeline's own function. The text encoders stay frozen. Text position ids
  (t, h, w, l) = (0, 0, 0, l), image ids (0, h, w, 0).
- Objective: rectified flow (training/flow.py), timestep_sampling "flux_shift" (the resolution-dependent shift of
  the scheduler's config), no weighting. dev is guidance-distilled: its guidance input is `guidance_scale` (1.0 while
  training, as sd-scripts for Flux.1 dev and musubi-tuner's default `--guidance_scale 1.0`; recorded in the file);
  klein has none.
- LoRA layout: BFL's names, which ComfyUI maps (0.8.0 cannot load klein itself: the names are checked against its
  map's klein layout), one module per fused weight: `lora_unet_double_blocks_N_img_attn_qkv` (q, k, v),
  `..._img_mlp_0` (gate and up in one Linear already in diffusers: ff.linear_in), `lora_unet_single_blocks_N_linear1`
  (diffusers' attn.to_qkv_mlp_proj, fused already), `..._linear2`; no per-block modulation: the three global
  modulation Linears, img_in, txt_in, time_in and the final layer are read but not trained by default.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import FlowFamily
from .flow_parts import IMPL_BFL, param_device
from .qwen_image import text_max_length


def _dev(model) -> bool:
    return model.extra.get("variant") == "flux2-dev"


def _layers(model):
    return tuple(model.extra.get("text_layers", (10, 20, 30) if _dev(model) else (9, 18, 27)))

DOUBLE = (
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn_proj", ("attn.to_out.0",)),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("img_mlp_0", ("ff.linear_in",)),
    ("img_mlp_2", ("ff.linear_out",)),
    ("txt_mlp_0", ("ff_context.linear_in",)),
    ("txt_mlp_2", ("ff_context.linear_out",)),
)
SINGLE = (
    ("linear1", ("attn.to_qkv_mlp_proj",)),
    ("linear2", ("attn.to_out",)),
)
#: BFL's notes for klein (4B: ~8 GB in bf16, 9B: ~18 GB) and the issue's targets; not measured here
VRAM_TIERS = ((24.0, False, 0, 1024, "24 GB+: the bf16 transformer (klein 4B 8 GB, 9B 18 GB) with checkpointing"),
              (12.0, True, 0, 1024, "12-24 GB: fp8 base + checkpointing (4B <= 12 GB, 9B <= 16 GB targets)"),
              (0.0, True, 12, 768, "under 12 GB: fp8 + checkpointing + 12 single blocks swapped, 768 px"))


def patchify(latents):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): Flux2Pipeline._patchify_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def _ids(b: int, t: int, h: int, w: int, l: int, device):
    import torch

    return torch.cartesian_prod(torch.arange(t), torch.arange(h), torch.arange(w), torch.arange(l)).to(
        device).unsqueeze(0).expand(b, -1, -1)


class Flux2(FlowFamily):
    caption_tokens, caption_tokenizer = 512, "other"
    name, title = "flux2", "FLUX.2"
    timestep_sampling = "flux_shift"
    transformer_class = "Flux2Transformer2DModel"
    variants = ("flux2-klein-4b", "flux2-klein-9b", "flux2-dev")
    tiny_specs = ("tiny-flux2-klein", "tiny-flux2-dev")
    pipeline_prefixes = ("Flux2",)
    pipeline_class = "Flux2KleinPipeline"
    name_pattern = r"flux[-_. ]?2"
    detect_order = -1  # before Flux.1: both have double_blocks / single_blocks
    lora_blocks = (("transformer_blocks", "double_blocks", DOUBLE),
                   ("single_transformer_blocks", "single_blocks", SINGLE))
    lora_extras = {"img_in": "x_embedder", "txt_in": "context_embedder",
                   "time_in_in_layer": "time_guidance_embed.timestep_embedder.linear_1",
                   "time_in_out_layer": "time_guidance_embed.timestep_embedder.linear_2",
                   "guidance_in_in_layer": "time_guidance_embed.guidance_embedder.linear_1",  # dev only
                   "guidance_in_out_layer": "time_guidance_embed.guidance_embedder.linear_2",
                   "double_stream_modulation_img_lin": "double_stream_modulation_img.linear",
                   "double_stream_modulation_txt_lin": "double_stream_modulation_txt.linear",
                   "single_stream_modulation_lin": "single_stream_modulation.linear",
                   "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}
    network_module = "networks.lora_flux_2"  # musubi-tuner's
    training_keys = ("timestep_sampling", "discrete_flow_shift", "weighting_scheme")
    requires = "diffusers >= 0.37, transformers >= 4.51"
    vram_tiers = VRAM_TIERS
    advice_name = "FLUX.2 [klein]"
    advice_text_encoder = (False, "the text encoder (klein: Qwen3, dev: Mistral 3) stays frozen (musubi-tuner, "
                                  "ai-toolkit and diffusers train the transformer only)", None)

    def advise(self, s, image_count, task, detail):
        rank = 8 if task in ("style", "concept") and detail == "simple" else 16
        lr = 1e-4
        s.add("learning_rate", lr, "FLUX.2 [klein] LoRAs train at about 1e-4 with rank 16 (ai-toolkit's and "
                                   "musubi-tuner's defaults); halve it if samples burn")
        s.add("timestep_sampling", "flux_shift", "the scheduler's resolution-dependent shift (Flux's dynamic "
                                                 "shifting), as the pipeline samples")
        s.add("weighting_scheme", "none", "uniform loss weights")
        s.add("lora_rank", rank, f"FLUX.2 [klein]: rank {rank}; the transformer is wide, so small ranks still "
                                 f"carry a lot")
        s.notes.append("FLUX.2 [dev] (32 B transformer, 24 B Mistral text encoder: 64 GB + 48 GB in bf16) takes the "
                       "same lr and rank; on a 24 GB card train it with fp8_base and blocks_to_swap 40 or more, and "
                       "cache the text conditioning (cache_text_encoder_outputs) so that Mistral leaves the card "
                       "(SimpleTuner's and musubi-tuner's FLUX.2 notes).")
        return rank, lr

    def default_shift(self, model) -> float:
        return float(getattr(model.noise_scheduler.config, "shift", 3.0))

    def detect_keys(self, keys):  # BFL's Flux.2 blocks and its global modulation
        return any("double_stream_modulation_img.lin" in k for k in keys) and any("single_blocks." in k for k in keys)

    def file_metadata(self, variant):
        arch = {"flux2-klein-9b": "Flux.2-klein-9b", "flux2-dev": "Flux.2-dev"}.get(variant or "", "Flux.2-klein-4b")
        return {"ss_base_model_version": "flux2", "ss_architecture": (variant or "flux2-klein-4b").replace("-", "_"),
                "modelspec.architecture": f"{arch}/lora", "modelspec.implementation": IMPL_BFL}

    def run_metadata(self, model):
        if not _dev(model):
            return {}
        return {"ss_guidance_scale": f"{float(model.extra.get('guidance_scale', 1.0)):g}"}

    def text_encoder_components(self, model) -> List[tuple]:
        return []  # Qwen3 / Mistral 3 stay frozen

    def conditioning_tag(self, model) -> str:
        chat = "mistral3_system" if _dev(model) else "qwen3_chat"
        return f"/{chat}/layers={_layers(model)}/len={text_max_length(model)}"

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        import torch

        tok, te = model.tokenizer, model.text_encoder
        if _dev(model):  # Flux2Pipeline's messages (its system message, then the caption), tokenized as it does
            from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

            enc = tok.apply_chat_template(format_input(list(captions), system_message=SYSTEM_MESSAGE),
                                          add_generation_prompt=False, tokenize=True, return_dict=True,
                                          return_tensors="pt", padding="max_length", truncation=True,
                                          max_length=text_max_length(model))
        else:
            texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False) for c in captions]
            enc = tok(texts, padding="max_length", max_length=text_max_length(model), truncation=True,
                      return_tensors="pt")
        dev = param_device(te, device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out = te(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True, use_cache=False)
        hidden = torch.cat([out.hidden_states[k] for k in _layers(model)], dim=-1).to(device)
        return {"hidden": hidden, "mask": mask.to(device, hidden.dtype)}

    def encode_latents(self, model, vae, pixels):
        import torch

        lat = patchify(vae.encode(pixels).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat.device, lat.dtype)
        return (lat - mean) / std

    def vae_factor(self, vae) -> int:
        return 2 ** len(vae.config.block_out_channels)  # the VAE's halvings and the 2x2 patch

    def latent_tag(self, model) -> str:
        return "flux2/mode/patchify2x2/bn"

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        import torch

        dtype, dev = noisy.dtype, noisy.device
        b, c, h, w = noisy.shape
        hidden = cond["hidden"].to(dev, dtype)
        packed = noisy.reshape(b, c, h * w).permute(0, 2, 1)
        guidance = None
        if _dev(model):  # the pipeline passes guidance_scale; the transformer scales it by 1000 as the timestep
            guidance = torch.full((b,), float(model.extra.get("guidance_scale", 1.0)), device=dev, dtype=torch.float32)
        out = transformer(hidden_states=packed, timestep=timesteps.to(dev).float().to(dtype) / 1000.0, guidance=guidance,
                          encoder_hidden_states=hidden, txt_ids=_ids(b, 1, 1, 1, hidden.shape[1], dev),
                          img_ids=_ids(b, 1, h, w, 1, dev), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    def pipeline(self, model, scheduler):
        import diffusers

        cls = getattr(diffusers, "Flux2Pipeline" if _dev(model) else "Flux2KleinPipeline")
        return cls(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                   transformer=model.unet)

    def call_kwargs(self, model, kw: Dict[str, Any]) -> Dict[str, Any]:
        """Neither pipeline takes a negative prompt (klein's CFG runs on an empty one; dev's guidance_scale is the
        distilled guidance input)."""
        out = {k: v for k, v in kw.items() if k != "negative_prompt"}
        return dict(out, max_sequence_length=text_max_length(model), text_encoder_out_layers=_layers(model))
