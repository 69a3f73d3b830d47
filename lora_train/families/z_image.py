"""Z-Image (6B single-stream DiT, Turbo and base): ZImageTransformer2DModel over the Flux VAE's 16-channel latents
(it patchifies them itself), conditioned on Qwen3's second-to-last hidden state of the caption in Qwen3's chat
template, as diffusers' ZImagePipeline makes it.

- Text: each caption as one user message through the tokenizer's chat template, the masked tokens kept (Z-Image
  takes a list of per-caption token features; we keep them padded with their mask and pass each caption's own).
  Length: `text_max_length` (model.extra, default 512 = the pipeline's max_sequence_length). Qwen3 stays frozen.
- The transformer takes a list of (C, 1, H, W) latents and t = 1 - sigma, and predicts latents - noise: the
  velocity we train (noise - latents) is minus its output, as the pipeline's `noise_pred = -noise_pred`.
- Objective: rectified flow (training/flow.py), timestep_sampling "shift" with discrete_flow_shift 2.0, no
  weighting: musubi-tuner's Z-Image settings.
- LoRA layout: Z-Image's original (ComfyUI) modules fuse q, k, v into `attention.qkv`; diffusers splits them.
  Files name ComfyUI's modules (`lora_unet_layers_N_attention_qkv`, `..._attention_out`, `..._feed_forward_w1/2/3`,
  `..._adaLN_modulation_0`, the same in `noise_refiner` and `context_refiner`), which ComfyUI 0.8.0 maps: 30 layers
  x 6 + 2 noise refiners x 6 + 2 context refiners x 5 = 202 block modules for the release.
- Z-Image-Turbo is step-distilled: a LoRA trained on it directly undoes the distillation over a long run;
  ai-toolkit and SimpleTuner merge ostris' training adapter first, or train on Z-Image base (the advisor says so).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import FlowFamily
from .flow_parts import param_device
from .qwen_image import text_max_length

Z_IMAGE_SHIFT = 2.0
BLOCK = (
    ("attention_qkv", ("attention.to_q", "attention.to_k", "attention.to_v")),
    ("attention_out", ("attention.to_out.0",)),
    ("feed_forward_w1", ("feed_forward.w1",)),
    ("feed_forward_w2", ("feed_forward.w2",)),
    ("feed_forward_w3", ("feed_forward.w3",)),
    ("adaLN_modulation_0", ("adaLN_modulation.0",)),
)
#: musubi-tuner's (and diffusion-pipe's) notes, ~6 GB of weights in fp8 / 12 GB in bf16; not measured here
VRAM_TIERS = ((32.0, False, 0, 1024, "32 GB+: the bf16 transformer (12 GB) with checkpointing"),
              (16.0, True, 0, 1024, "16-32 GB: fp8 base (6 GB of weights) + checkpointing"),
              (10.0, True, 10, 768, "10-16 GB: fp8 + checkpointing + 10 of 30 layers swapped, 768 px"),
              (0.0, True, 20, 512, "under 10 GB: fp8 + checkpointing + 20 layers swapped, 512 px (slow)"))


class ZImage(FlowFamily):
    caption_tokens, caption_tokenizer = 512, "other"
    name, title = "z_image", "Z-Image"
    timestep_sampling = "shift"
    transformer_class = "ZImageTransformer2DModel"
    variants = ("z-image-turbo", "z-image")
    tiny_specs = ("tiny-z-image",)
    pipeline_prefixes = ("ZImage",)
    pipeline_class = "ZImagePipeline"
    name_pattern = r"z[-_ ]?image"
    lora_blocks = (("layers", "layers", BLOCK), ("noise_refiner", "noise_refiner", BLOCK),
                   ("context_refiner", "context_refiner", BLOCK))
    block_order = ("noise_refiner", "context_refiner", "layers")  # the refiners run first
    lora_extras = {"x_embedder": "all_x_embedder.2-1", "final_layer_linear": "all_final_layer.2-1.linear",
                   "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
                   "t_embedder_mlp_0": "t_embedder.mlp.0", "t_embedder_mlp_2": "t_embedder.mlp.2",
                   "cap_embedder_1": "cap_embedder.1"}
    swapped_extras = ()  # its final modulation is a plain Linear in both layouts
    network_module = "networks.lora_zimage"  # musubi-tuner's
    training_keys = ("timestep_sampling", "discrete_flow_shift", "weighting_scheme")
    requires = "diffusers >= 0.36, transformers >= 4.51"
    vram_tiers = VRAM_TIERS
    advice_name = "Z-Image"
    advice_text_encoder = (False, "Qwen3 stays frozen (musubi-tuner, ai-toolkit and diffusers train the transformer "
                                  "only)", None)

    def advise(self, s, image_count, task, detail):
        rank = 8 if task in ("style", "concept") and detail == "simple" else 16
        lr = 1e-4
        s.add("learning_rate", lr, "Z-Image LoRAs train at about 1e-4 with rank 16 (musubi-tuner's and ai-toolkit's "
                                   "defaults); halve it if samples burn")
        s.add("timestep_sampling", "shift", "musubi-tuner's Z-Image setting: sigmoid-normal sigmas shifted towards "
                                            "noise")
        s.add("discrete_flow_shift", Z_IMAGE_SHIFT, "the shift musubi-tuner uses for Z-Image (2.0)")
        s.add("weighting_scheme", "none", "uniform loss weights (musubi-tuner's Z-Image setting)")
        s.add("lora_rank", rank, f"Z-Image: rank {rank} (16 is the usual); the 6 B transformer is wide, so small "
                                 f"ranks still carry a lot")
        s.notes.append("Z-Image-Turbo is step-distilled: train on Z-Image base, or merge ostris' Turbo training "
                       "adapter into the base model first (ai-toolkit, SimpleTuner do), else a long run undoes the "
                       "8-step distillation.")
        return rank, lr

    def default_shift(self, model) -> float:
        return Z_IMAGE_SHIFT

    def detect_keys(self, keys):  # Z-Image's fused attention and its caption / noise refiners (original layout)
        return any("noise_refiner.0.attention.qkv.weight" in k for k in keys) and \
            any(k.endswith("cap_embedder.1.weight") for k in keys)

    def file_metadata(self, variant):
        # musubi-tuner's values (ARCHITECTURE_Z_IMAGE_FULL)
        return {"ss_base_model_version": "z_image", "ss_architecture": "z_image",
                "modelspec.architecture": "Z-Image/lora",
                "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image"}

    def text_encoder_components(self, model) -> List[tuple]:
        return []  # Qwen3 stays frozen

    def conditioning_tag(self, model) -> str:
        return f"/qwen3_chat/hidden-2/len={text_max_length(model)}"

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        """{"hidden": (B, L, D) with zeros past each caption, "mask": (B, L)}; L = the longest caption here."""
        tok, te = model.tokenizer, model.text_encoder
        texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True) for c in captions]
        enc = tok(texts, padding=True, max_length=text_max_length(model), truncation=True, return_tensors="pt")
        dev = param_device(te, device)
        mask = enc.attention_mask
        hidden = te(input_ids=enc.input_ids.to(dev), attention_mask=mask.to(dev).bool(),
                    output_hidden_states=True).hidden_states[-2].to(device)
        mask = mask.to(device)
        return {"hidden": hidden * mask.unsqueeze(-1).to(hidden.dtype), "mask": mask.to(hidden.dtype)}

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        import torch

        dtype, dev = noisy.dtype, noisy.device
        hidden, mask = cond["hidden"].to(dev, dtype), cond["mask"].to(dev).bool()
        caps = [hidden[i][mask[i]] for i in range(hidden.shape[0])]
        t = 1.0 - timesteps.to(dev).float() / 1000.0
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), t.to(dtype), caps, return_dict=False)[0]
        return -torch.stack([o.to(dtype) for o in out], dim=0).squeeze(2)

    def pipeline(self, model, scheduler):
        from diffusers import ZImagePipeline

        return ZImagePipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                              tokenizer=model.tokenizer, transformer=model.unet)

    def call_kwargs(self, model, kw: Dict[str, Any]) -> Dict[str, Any]:
        return dict(kw, max_sequence_length=text_max_length(model))
