"""Wan (2.1 T2V 1.3B / 14B, 2.2 TI2V-5B) trained on images: WanTransformer3DModel over one latent frame of the
causal 3-D VAE, conditioned on UMT5's last hidden state, as diffusers' WanPipeline makes them.

- Text: UMT5 encoded with its mask, each caption's tokens kept and zeros after them up to `t5xxl_max_token_length`
  (default 512; tiny 32), as the pipeline pads; UMT5 is never trained.
- Latents: vae.encode(pixels as one frame).latent_dist.mean normalised per channel by the VAE's latents_mean /
  latents_std (as Qwen-Image's, whose VAE is Wan's); the transformer takes (B, C, 1, h, w) and timesteps 0..1000.
- Objective: rectified flow (training/flow.py), timestep_sampling "shift" with discrete_flow_shift 3.0 (the
  releases' flow_shift at 480p, musubi-tuner's Wan T2V example), no weighting.
- LoRA layout: ComfyUI's (the original) module names, which 0.8.0 maps (it maps no diffusers names for Wan):
  `lora_unet_blocks_N_self_attn_q/k/v/o`, `..._cross_attn_q/k/v/o`, `..._ffn_0`, `..._ffn_2` (10 per block: 300 for
  TI2V-5B, 400 for 14B); outside the blocks, read but not trained by default: head_head, text_embedding_0/2,
  time_embedding_0/2, time_projection_1.
- Wan 2.2 A14B (models/wan.py): a LoRA trains one expert, `wan_expert` low (default: transformer_2, timesteps below
  boundary_ratio x 1000 = 875) or high (transformer, 875..1000), as musubi-tuner trains them (--min_timestep /
  --max_timestep with --timestep_boundary 0.875, --preserve_distribution_shape); the file states
  ss_wan_expert (high_noise / low_noise), ss_wan_boundary_ratio and ss_min_timestep / ss_max_timestep. Both experts
  share Wan 2.1 14B's layout, so the file's names are the same; ComfyUI applies it to the expert it is loaded on.
- Grids: WanPipeline with one frame; for A14B both experts and boundary_ratio (the LoRA on the trained one).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import FlowFamily
from .flow_parts import param_device, t5_max_length, token_ids, video_vae_factor, video_vae_latents

WAN_SHIFT = 3.0
BLOCK = (
    ("self_attn_q", ("attn1.to_q",)), ("self_attn_k", ("attn1.to_k",)), ("self_attn_v", ("attn1.to_v",)),
    ("self_attn_o", ("attn1.to_out.0",)),
    ("cross_attn_q", ("attn2.to_q",)), ("cross_attn_k", ("attn2.to_k",)), ("cross_attn_v", ("attn2.to_v",)),
    ("cross_attn_o", ("attn2.to_out.0",)),
    ("ffn_0", ("ffn.net.0.proj",)), ("ffn_2", ("ffn.net.2",)),
)
#: TI2V-5B: 10 GB of weights in bf16, 5 GB in fp8; 14B: 28 / 14 GB (musubi-tuner's notes); not measured here
VRAM_TIERS = ((40.0, False, 0, 832, "40 GB+: bf16 weights (5B: 10 GB, 14B: 28 GB) with checkpointing"),
              (24.0, True, 0, 832, "24-40 GB: fp8 base + checkpointing (14B: 14 GB of weights)"),
              (16.0, True, 20, 832, "16-24 GB: fp8 + checkpointing + 20 blocks swapped to CPU memory"),
              (0.0, True, 30, 512, "under 16 GB: fp8 + checkpointing + 30 blocks swapped, 512 px (slow)"))


def _pair(model):
    return (getattr(model, "extra", None) or {}).get("wan_pair")


class Wan(FlowFamily):
    name, title = "wan", "Wan"
    timestep_sampling = "shift"
    transformer_class = "WanTransformer3DModel"
    variants = ("wan2.1-t2v", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b")
    native_resolution = 832
    tiny_specs = ("tiny-wan", "tiny-wan-a14b")
    pipeline_prefixes = ("Wan",)
    pipeline_class = "WanPipeline"
    name_pattern = r"wan[-_ ]?2"
    lora_blocks = (("blocks", "blocks", BLOCK),)
    lora_extras = {"head_head": "proj_out", "text_embedding_0": "condition_embedder.text_embedder.linear_1",
                   "text_embedding_2": "condition_embedder.text_embedder.linear_2",
                   "time_embedding_0": "condition_embedder.time_embedder.linear_1",
                   "time_embedding_2": "condition_embedder.time_embedder.linear_2",
                   "time_projection_1": "condition_embedder.time_proj"}
    swapped_extras = ()
    network_module = "networks.lora_wan"  # musubi-tuner's
    training_keys = ("timestep_sampling", "discrete_flow_shift", "weighting_scheme")
    requires = "diffusers >= 0.33, transformers >= 4.40"
    vram_tiers = VRAM_TIERS
    advice_name = "Wan"
    advice_text_encoder = (False, "UMT5 stays frozen (musubi-tuner and diffusers train the transformer only)", None)

    def advise(self, s, image_count, task, detail):
        rank = 8 if task in ("style", "concept") and detail == "simple" else 16
        lr = 1e-4 if image_count < 50 else 2e-4
        s.add("learning_rate", lr, f"Wan LoRAs train at 1e-4 .. 2e-4 (musubi-tuner's example: 2e-4 at rank 32); "
                                   f"{'1e-4 for under 50 images' if lr == 1e-4 else '2e-4 for 50+ images'}")
        s.add("timestep_sampling", "shift", "musubi-tuner's Wan T2V example: sigmoid-normal sigmas shifted towards "
                                            "noise")
        s.add("discrete_flow_shift", WAN_SHIFT, "the releases' flow_shift at 480p (3.0), as musubi-tuner uses it")
        s.add("weighting_scheme", "none", "uniform loss weights (musubi-tuner's Wan setting)")
        s.add("lora_rank", rank, f"Wan: rank {rank}; images only here (one frame): a LoRA of a look or a subject")
        s.notes.append("Wan trains here on images (one frame). Wan 2.2 A14B: a LoRA is for one expert. The "
                       "low-noise expert (wan_expert: low, the default) draws detail, texture and likeness: train it "
                       "for a face, a character or a style's surface. The high-noise expert (wan_expert: high) sets "
                       "layout and composition: train it too (a second run, same data) when the LoRA should change "
                       "the composition; load each file on its expert.")
        return rank, lr

    # Wan 2.2 A14B: model.extra["wan_pair"] (models/wan.py ExpertPair) is the pair; None for one transformer
    def configure(self, model, cfg):
        pair = _pair(model)
        expert = getattr(cfg, "wan_expert", "auto") or "auto"
        if expert != "auto" and pair is None:
            raise ValueError(f"wan_expert: {expert} applies to Wan 2.2 A14B (a folder with transformer/ and "
                             f"transformer_2/, or an expert file named *_high_noise_* / *_low_noise_*); "
                             f"'{model.name}' is one transformer. Leave wan_expert on auto.")
        if expert != "auto":
            pair.select(model, expert)
        boundary = getattr(cfg, "timestep_boundary", None)
        if boundary is not None and pair is not None:
            pair.boundary_ratio = float(boundary) / (1000.0 if boundary > 1 else 1.0)

    def file_components(self, model, metadata):
        pair = _pair(model)
        return {} if pair is None else pair.for_file(model, metadata)

    def held_modules(self, model):
        pair = _pair(model)
        return [] if pair is None else [("unet", m) for m in pair.held.values()]

    def timestep_range(self, model):
        """The high-noise expert sees sigma in [boundary, 1], the low-noise one [0, boundary), as WanPipeline
        hands timesteps to them."""
        pair = _pair(model)
        if pair is None:
            return None
        return (pair.boundary_ratio, 1.0) if pair.expert == "high" else (0.0, pair.boundary_ratio)

    def default_shift(self, model) -> float:
        return WAN_SHIFT

    def detect_keys(self, keys):  # the original (ComfyUI) layout's self / cross attention and 3-D patch embedding
        return any(k.endswith("blocks.0.self_attn.q.weight") for k in keys) and \
            any(k.endswith("blocks.0.cross_attn.k.weight") for k in keys)

    def file_metadata(self, variant):
        # musubi-tuner's values (ARCHITECTURE_WAN_FULL "wan", sai_model_spec ARCH_WAN "wan2.1")
        return {"ss_base_model_version": "wan", "ss_architecture": "wan", "modelspec.architecture": "wan2.1/lora",
                "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1"}

    def run_metadata(self, model):
        meta = {"ss_t5xxl_max_token_length": str(t5_max_length(model))}
        rng = self.timestep_range(model)
        if rng:  # musubi-tuner's keys for the range, ours for the expert and its boundary
            pair = _pair(model)
            meta.update(ss_wan_expert=f"{pair.expert}_noise", ss_wan_boundary_ratio=f"{pair.boundary_ratio:g}",
                        ss_min_timestep=str(round(rng[0] * 1000)), ss_max_timestep=str(round(rng[1] * 1000)))
        return meta

    def text_encoder_components(self, model) -> List[tuple]:
        return []  # UMT5 stays frozen

    def conditioning_tag(self, model) -> str:
        return f"/umt5len={t5_max_length(model)}/masked/zero_padded"

    def vae_factor(self, vae) -> int:
        return video_vae_factor(vae)

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        tok, te = model.tokenizer, model.text_encoder
        enc = token_ids(tok, captions, t5_max_length(model))
        dev = param_device(te, device)
        hidden = te(enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev)).last_hidden_state.to(device)
        mask = enc.attention_mask.to(device)
        return {"hidden": hidden * mask.unsqueeze(-1).to(hidden.dtype), "mask": mask.to(hidden.dtype)}

    def encode_latents(self, model, vae, pixels):
        return video_vae_latents(vae, pixels)

    def latent_tag(self, model) -> str:
        return "wan/latent_dist.mean/normalised"

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        dtype, dev = noisy.dtype, noisy.device
        out = transformer(hidden_states=noisy.unsqueeze(2), timestep=timesteps.to(dev).float().to(dtype),
                          encoder_hidden_states=cond["hidden"].to(dev, dtype), return_dict=False)[0]
        return out.squeeze(2)

    def pipeline(self, model, scheduler):
        from diffusers import WanPipeline

        kw = {"transformer": model.unet}
        pair = _pair(model)
        other = None if pair is None else pair.other()
        if other is not None:  # A14B: both experts, switched at the boundary as the release samples
            dtype, dev = model.unet.dtype, param_device(model.unet, "cpu")
            if dtype != other.dtype and dtype.itemsize > 1:  # not to fp8 (fp8_base keeps its compute dtype)
                other.to(dtype=dtype)
            other.to(dev)
            high, low = (model.unet, other) if pair.expert == "high" else (other, model.unet)
            kw = {"transformer": high, "transformer_2": low, "boundary_ratio": pair.boundary_ratio}
        return WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                           scheduler=scheduler, **kw)

    def call_kwargs(self, model, kw: Dict[str, Any]) -> Dict[str, Any]:
        return dict(kw, max_sequence_length=t5_max_length(model), num_frames=1)

    def image_of(self, out):
        return out.frames[0][0]
