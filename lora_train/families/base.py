"""A model family: what differs between SD1, SDXL, Flux.1, SD3 / SD3.5, ... is a `Family` and its module here
(families/sd.py, flux.py, sd3.py), in the style of peft's `tuners/<method>/`. The trainer, the networks, the
outputs and the sampler ask the family of the model (`families.of(model)`); they do not branch on its name.

A family states:
- what it is: `name` (BaseModel.kind), `title`, whether it trains by flow matching (`flow`);
- what its LoRA files say (sd-scripts' own values): `base_model_version` (ss_base_model_version),
  `architecture_for(prediction)` (modelspec.architecture), `implementation`, `ss_v2`;
- how kohya names and groups its UNet (`sgm_unet_names`: SDXL's SGM block names and block-weight layout);
- flow-matching families: the default timestep sampling / weighting / shift, the text encoders a LoRA may
  train, the text conditioning, the denoiser call and the sampling pipeline.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence


class Family:
    name = ""
    title = ""
    flow = False
    base_model_version = ""
    architecture = ""
    implementation = "diffusers"
    ss_v2 = False
    sgm_unet_names = False

    def architecture_for(self, prediction_type: str) -> str:
        """modelspec.architecture as sd-scripts writes it for a model of this prediction type."""
        return self.architecture

    def __repr__(self) -> str:
        return f"<family {self.name}>"


class FlowFamily(Family):
    """A flow-matching family (the transformer predicts noise - latents; timesteps are sigma x 1000)."""

    flow = True
    #: sd-scripts' defaults for `auto` (training/flow.resolve)
    timestep_sampling = "sigma"
    weighting_scheme = "none"

    def default_shift(self, model) -> float:
        raise NotImplementedError

    def weighting_for(self, timestep_sampling: str) -> str:
        return self.weighting_scheme

    def text_encoder_components(self, model) -> List[tuple]:
        """[(component, encoder)] of the text encoders a LoRA may train."""
        raise NotImplementedError

    def encode(self, model, captions: Sequence[str], device) -> Dict[str, Any]:
        """Text conditioning ({"hidden", "pooled"(, "mask")}), with grad when a text encoder trains."""
        raise NotImplementedError

    def forward(self, model, transformer, noisy, timesteps, cond: Dict[str, Any]):
        """The denoiser's prediction for noisy latents shaped like the latents."""
        raise NotImplementedError

    def pipeline(self, model, scheduler):
        """diffusers' text-to-image pipeline over the model's parts, for grids and samples."""
        raise NotImplementedError


def unknown(kind: Optional[str], known: Sequence[str]) -> ValueError:
    return ValueError(f"unknown model family {kind!r}: lora_train trains {', '.join(known)}")
