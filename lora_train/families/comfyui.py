"""A ComfyUI graph's own MODEL, trained in place (hosts/comfyui_inplace.py has the ComfyUI side): whatever family
ComfyUI loaded, the model is `BaseModel(kind="comfyui")` whose extra["graph"] does the family's work through
ComfyUI's own objects (its CLIP's encoding, its VAE and latent format, its model_sampling's objective, its
apply_model). This family asks the graph; the trainer asks this family (`in_place`), as for any other family.

What the file says: the known family's version and architecture (sd-scripts' values, from that family) when
ComfyUI's model is one of ours, else "comfyui" and ComfyUI's model class; the objective (eps / v / flow); the
module names are ComfyUI's own (`lora_unet_<native path>`), which ComfyUI maps for every family.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .base import Family

_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "flow": "flow", "x0": "sample", "other": "other"}


def graph(model):
    return model.extra["graph"]


class ComfyUIInPlace(Family):
    name, title = "comfyui", "ComfyUI model (in place)"
    in_place = True
    base_model_version = "comfyui"
    architecture = "comfyui/lora"
    implementation = "https://github.com/comfyanonymous/ComfyUI"
    detect_order = 99  # never told from a file: the ComfyUI host makes it
    caption_style, caption_tokens, caption_tokenizer = "detailed", None, "other"

    def known(self, model) -> Optional[Family]:
        """Our family of the graph's model, or None (a family we have no defaults for)."""
        return graph(model).known

    def prediction_type(self, model) -> str:
        return _PREDICTIONS[graph(model).prediction]

    def architecture_for(self, prediction_type: str) -> str:
        return self.architecture

    # text and latents (cached by the trainer)
    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        return graph(model).encode_text(list(captions))

    def conditioning_tag(self, model) -> str:
        g = graph(model)
        return f"comfyui/{g.config_name}/encode_from_tokens_scheduled"

    @staticmethod
    def collate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """One conditioning per sample (lengths differ between captions for most 2026 text encoders)."""
        return list(rows)

    def encode_latents(self, model, vae, pixels):
        return graph(model).encode_latents(pixels)

    def vae_factor(self, vae) -> int:
        return vae.graph.vae_factor()

    def latent_tag(self, model) -> str:
        return f"comfyui/{graph(model).config_name}/process_latent_in"

    # the network, the objective, the file
    def build_network(self, model, spec, lr: float, adapter: str) -> List[Dict[str, Any]]:
        """The adapters in, as optimizer parameter groups (LoRA+: the up / B side at ratio x lr)."""
        return graph(model).inject(spec, lr, adapter)

    def describe(self, model) -> str:
        return graph(model).describe()

    def lora_weights(self, model, adapter: str):
        return graph(model).lora_weights(adapter)

    def sample_timesteps(self, model, cfg, n: int, latent_hw, gen):
        return graph(model).sample_timesteps(cfg, n, latent_hw, gen)

    def loss(self, model, latents, cond, noise, timesteps, **kw):
        return graph(model).loss(latents, cond, noise, timesteps, **kw)

    def run_metadata(self, model) -> Dict[str, str]:
        g, fam = graph(model), self.known(model)
        meta = {"ss_comfyui_model": g.config_name, "ss_prediction_type": self.prediction_type(model),
                "ss_trained_in_place": "comfyui"}
        if fam is not None and fam.flow:  # its default variant's version / architecture, as its trainers write them
            meta.update(fam.file_metadata(fam.variants[0] if fam.variants else None))
        elif fam is not None:
            meta["ss_base_model_version"] = fam.base_model_version
            meta["modelspec.architecture"] = fam.architecture_for(self.prediction_type(model))
        return meta

    def text_encoder_components(self, model) -> List[tuple]:
        return []
