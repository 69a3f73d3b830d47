"""Qwen-Image (20B MMDiT): QwenImageTransformer2DModel over Flux-style packed 2x2 latents of a one-frame 3-D VAE,
conditioned on Qwen2.5-VL's last hidden state, as diffusers' QwenImagePipeline makes it.

- Text: each caption goes into the pipeline's system-prompt template; the template's own tokens (34 with the
  released tokenizer: counted with the model's tokenizer) are dropped, the rest kept with its mask (padding is
  masked out in attention). Length: `text_max_length` (model.extra, default 512 = the pipeline's
  max_sequence_length; the tiny model 64). The text encoder is never trained (musubi-tuner, ai-toolkit, diffusers).
- Latents: vae.encode(pixels as one frame).latent_dist.mean, normalised per channel, (lat - latents_mean) /
  latents_std (the VAE's config), frame axis dropped.
- Objective: rectified flow (training/flow.py), timestep_sampling "shift" with discrete_flow_shift 2.2, no
  weighting: musubi-tuner's Qwen-Image recommendation (docs/qwen_image.md); `flux_shift` / `sigma` as options.
- LoRA layout: Qwen-Image's original modules are diffusers' own (no fused q/k/v), so every block Linear is one module
  named `lora_unet_transformer_blocks_N_<path with _>` (musubi-tuner's networks.lora_qwen_image and ComfyUI 0.8.0's
  `lora_unet` layout: 14 per block, 840 for the 60 blocks); img_in, txt_in, proj_out, norm_out.linear and the
  timestep embedder are read from files but not trained by default.
- Grids: QwenImagePipeline, the sampler's CFG scale as its `true_cfg_scale` (with " " as negative prompt when
  none is given, as the pipeline's own example does).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import FlowFamily, identity_entries
from .flow_parts import pack_latents, param_device, unpack_latents, video_vae_factor, video_vae_latents

QWEN_SHIFT = 2.2
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEXT_MAX_LENGTH = 512
BLOCK = identity_entries((
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2"))


def text_max_length(model) -> int:
    asked = model.extra.get("text_max_length")
    return int(asked) if asked else int(model.extra.get("text_default_length", TEXT_MAX_LENGTH))


def template_length(tokenizer) -> int:
    """Tokens of the template before the caption (the pipeline's prompt_template_encode_start_idx: 34)."""
    return len(tokenizer(TEMPLATE.split("{}")[0]).input_ids)


#: musubi-tuner's Qwen-Image memory notes (docs/qwen_image.md: fp8 base saves ~20 GB of the 41 GB bf16 weights,
#: 16 blocks swapped ~8 GB more, 45 blocks ~30 GB and then 64 GB of CPU memory); not measured here
VRAM_TIERS = ((80.0, False, 0, 1024, "80 GB+: the bf16 transformer (41 GB) fits with checkpointing"),
              (32.0, True, 0, 1024, "32-80 GB: fp8 base (20 GB of weights) + checkpointing"),
              (24.0, True, 16, 1024, "24-32 GB: fp8 base + checkpointing + 16 of 60 blocks swapped to CPU memory"),
              (16.0, True, 30, 768, "16-24 GB: fp8 + checkpointing + 30 blocks swapped, 768 px"),
              (0.0, True, 45, 512, "under 16 GB: fp8 + checkpointing + 45 blocks swapped, 512 px; needs 64 GB of CPU "
                                   "memory and every step moves ~15 GB over PCIe (slow)"))


class QwenImage(FlowFamily):
    caption_tokens, caption_tokenizer = 512, "other"
    name, title = "qwen_image", "Qwen-Image"
    timestep_sampling = "shift"
    transformer_class = "QwenImageTransformer2DModel"
    variants = ("qwen-image",)
    native_resolution = 1328
    tiny_specs = ("tiny-qwen-image",)
    pipeline_prefixes = ("QwenImage",)
    pipeline_class = "QwenImagePipeline"
    name_pattern = r"qwen[-_ ]?image"
    lora_blocks = (("transformer_blocks", "transformer_blocks", BLOCK),)
    lora_extras = {p.replace(".", "_"): p for p in (
        "img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2")}
    network_module = "networks.lora_qwen_image"  # musubi-tuner's
    training_keys = ("timestep_sampling", "discrete_flow_shift", "weighting_scheme")
    requires = "diffusers >= 0.35, transformers >= 4.49"

    vram_tiers = VRAM_TIERS
    advice_name = "Qwen-Image"
    advice_text_encoder = (False, "Qwen2.5-VL stays frozen (musubi-tuner, ai-toolkit and diffusers train the "
                                  "transformer only)", None)

    def advise(self, s, image_count, task, detail):
        rank = 8 if task in ("style", "concept") and detail == "simple" else 16
        lr = 5e-5 if image_count < 50 else 1e-4
        s.add("learning_rate", lr, f"Qwen-Image LoRAs train at 5e-5 .. 1e-4 with rank 16 (musubi-tuner's example: "
                                   f"5e-5; ai-toolkit's default: 1e-4); "
                                   f"{'5e-5 for under 50 images' if lr == 5e-5 else '1e-4 for 50+ images'}; halve it "
                                   f"if samples burn")
        s.add("timestep_sampling", "shift", "musubi-tuner's recommendation for Qwen-Image: sigmoid-normal sigmas "
                                            "shifted towards noise; flux_shift follows the resolution as the "
                                            "scheduler's dynamic shift does")
        s.add("discrete_flow_shift", QWEN_SHIFT, "the shift musubi-tuner recommends for Qwen-Image (2.2)")
        s.add("weighting_scheme", "none", "uniform loss weights (musubi-tuner's Qwen-Image setting)")
        s.add("lora_rank", rank, f"Qwen-Image: rank {rank} (16 is musubi-tuner's and ai-toolkit's); the 20 B "
                                 f"transformer is wide, so small ranks still carry a lot")
        return rank, lr

    def default_shift(self, model) -> float:
        return QWEN_SHIFT

    def detect_keys(self, keys):  # Qwen's text-side modulation and text norm (diffusers names = original names)
        return any(k.endswith("transformer_blocks.0.txt_mod.1.weight") for k in keys) and \
            any(k.endswith("txt_norm.weight") for k in keys)

    def file_metadata(self, variant):
        # musubi-tuner's values (ARCHITECTURE_QWEN_IMAGE_FULL, sai_model_spec ARCH_QWEN_IMAGE)
        return {"ss_base_model_version": "qwen_image", "ss_architecture": "qwen_image",
                "modelspec.architecture": "Qwen-Image/lora", "modelspec.implementation":
                "https://github.com/QwenLM/Qwen-Image"}

    def text_encoder_components(self, model) -> List[tuple]:
        return []  # Qwen2.5-VL stays frozen

    def conditioning_tag(self, model) -> str:
        return f"/qwen_template/len={text_max_length(model)}"

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        """{"hidden": (B, L, D) with zeros past each caption, "mask": (B, L)}; L = the longest caption here."""
        tok, te = model.tokenizer, model.text_encoder
        drop = template_length(tok)
        enc = tok([TEMPLATE.format(c) for c in captions], max_length=text_max_length(model) + drop, padding=True,
                  truncation=True, return_tensors="pt")
        dev = param_device(te, device)
        out = te(input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev), output_hidden_states=True)
        hidden = out.hidden_states[-1][:, drop:].to(device)
        mask = enc.attention_mask[:, drop:].to(device)
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return {"hidden": hidden, "mask": mask.to(hidden.dtype)}

    def encode_latents(self, model, vae, pixels):
        return video_vae_latents(vae, pixels)

    def vae_factor(self, vae) -> int:
        return video_vae_factor(vae)

    def latent_tag(self, model) -> str:
        return "qwen_image/latent_dist.mean/normalised"

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        dtype, dev = noisy.dtype, noisy.device
        b, _, h, w = noisy.shape
        hidden = cond["hidden"].to(dev, dtype)
        mask = cond["mask"].to(dev)
        out = transformer(hidden_states=pack_latents(noisy), timestep=timesteps.to(dev).float().to(dtype) / 1000.0,
                          encoder_hidden_states=hidden, encoder_hidden_states_mask=mask,
                          img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def pipeline(self, model, scheduler):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                                 tokenizer=model.tokenizer, transformer=model.unet)

    def call_kwargs(self, model, kw: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(kw, max_sequence_length=text_max_length(model), true_cfg_scale=kw.get("guidance_scale") or 1.0,
                   guidance_scale=None)
        if out["true_cfg_scale"] > 1.0 and not out.get("negative_prompt") and "prompt" in out \
                and out["prompt"] is not None:
            out["negative_prompt"] = " "
        return out
