"""Flux.1 (dev, schnell): FluxTransformer2DModel over packed 2x2 latents, CLIP-L pooled + T5 hidden states, dev's
guidance input. Defaults are sd-scripts' flux_train_network.py: timestep_sampling "shift" with discrete_flow_shift
3.1582, no loss weighting."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from .base import FlowFamily
from .flow_parts import latent_image_ids, pack_latents, param_device, t5_encode, token_ids, unpack_latents

FLUX_SHIFT = 3.1582


class Flux(FlowFamily):
    name, title = "flux", "Flux.1"
    timestep_sampling = "shift"

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
