"""SD1.x, SD2.x and SDXL: UNet families trained on epsilon or v prediction (the noise scheduler's config says
which). The values are sd-scripts' (library/sai_model_spec.py, train_network.py)."""
from __future__ import annotations

from .base import Family


class SD1(Family):
    name, title = "sd1", "SD1.x"
    base_model_version = "sd_v1"
    architecture = "stable-diffusion-v1/lora"


class SD2(Family):
    name, title = "sd2", "SD2.x"
    base_model_version = "sd_v2"
    architecture = "stable-diffusion-v2-768-v/lora"
    ss_v2 = True

    def architecture_for(self, prediction_type: str) -> str:
        # SD2 epsilon models are the 512-base ones
        return "stable-diffusion-v2-512/lora" if prediction_type == "epsilon" else self.architecture


class SDXL(Family):
    name, title = "sdxl", "SDXL"
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base/lora"
    implementation = "https://github.com/Stability-AI/generative-models"
    sgm_unet_names = True
