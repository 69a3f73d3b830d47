"""SD3 / SD3.5 (medium, large): SD3Transformer2DModel, CLIP-L + CLIP-G (+ T5) conditioning. Defaults are
sd-scripts' sd3_train_network.py: timestep_sampling "sigma" with logit_normal weighting, the scheduler's shift
(3.0)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from .base import FlowFamily
from .flow_parts import param_device, t5_encode, t5_max_length, token_ids

SD3_SHIFT = 3.0


class SD3(FlowFamily):
    name, title = "sd3", "SD3 / SD3.5"

    def weighting_for(self, timestep_sampling: str) -> str:
        return "logit_normal" if timestep_sampling == "sigma" else "none"

    def default_shift(self, model) -> float:
        return float(getattr(model.noise_scheduler.config, "shift", SD3_SHIFT))

    def text_encoder_components(self, model) -> List[tuple]:
        return [("te1", model.text_encoder), ("te2", model.text_encoder_2)]  # CLIP-L, CLIP-G; T5 never trains

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        """cat([pad(cat([CLIP-L, CLIP-G] penultimate), T5 width), T5]) and the two CLIP text_embeds, as diffusers'
        StableDiffusion3Pipeline makes them (zeros for T5 when the model has none)."""
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
