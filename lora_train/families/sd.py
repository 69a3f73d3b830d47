"""SD1.x, SD2.x and SDXL: UNet families trained on epsilon or v prediction (the noise scheduler's config says
which). The values are sd-scripts' (library/sai_model_spec.py, train_network.py)."""
from __future__ import annotations

from .base import Family


# the text encoders of an original (LDM / SGM) single-file checkpoint: (key prefix, layout "clip" (transformers'
# CLIP names) or "open_clip", with a projection (CLIPTextModelWithProjection), what to call it)
CLIP_L = ("cond_stage_model.transformer.", "clip", False, "text encoder (CLIP-L)")
OPENCLIP_H = ("cond_stage_model.model.", "open_clip", False, "text encoder (OpenCLIP-H)")
XL_CLIP_L = ("conditioner.embedders.0.transformer.", "clip", False, "text encoder 1 (CLIP-L)")
XL_OPENCLIP_G = ("conditioner.embedders.1.model.", "open_clip", True, "text encoder 2 (OpenCLIP-bigG)")
#: kohya's default LoRA modules of an LDM / SGM UNet by their original paths: the attention and feed-forward
#: Linears of the transformer blocks and each SpatialTransformer's proj_in / proj_out (1x1 convs in SD1)
LDM_UNET_LORA = (r"^lora_unet_(input_blocks|middle_block|output_blocks)_.*_(transformer_blocks_\d+_(attn[12]_"
                 r"(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2)|proj_in|proj_out)$")


class SD1(Family):
    native_lora_pattern = LDM_UNET_LORA
    name, title = "sd1", "SD1.x"
    base_model_version = "sd_v1"
    architecture = "stable-diffusion-v1/lora"
    tiny_specs = ("tiny", "tiny-v", "tiny-pixel")
    detect_order = 3
    keys_reason = "the checkpoint has a CLIP-L text encoder"
    anime_clip_skip = True
    ldm_text_encoders = (CLIP_L,)

    def detect_keys(self, keys):  # a CLIP-L text encoder, or any original-layout UNet checkpoint
        return any(k.startswith(("cond_stage_model.transformer.", "model.diffusion_model.")) for k in keys)


class SD2(Family):
    native_lora_pattern = LDM_UNET_LORA
    name, title = "sd2", "SD2.x"
    base_model_version = "sd_v2"
    architecture = "stable-diffusion-v2-768-v/lora"
    ss_v2 = True
    native_resolution = 768
    tiny_specs = ("tiny-sd2", "tiny-sd2-eps")
    detect_order = 2
    keys_reason = "the checkpoint has an OpenCLIP text encoder"
    ldm_text_encoders = (OPENCLIP_H,)
    clip_pad_token = "!"  # OpenCLIP's tokenizer pads with "!"
    #: the bundled single-file config per prediction type (the 768-v model, the 512-base one)
    single_file_variants = {"v_prediction": "sd2_768v", "epsilon": "sd2_512"}
    #: a file that does not say its prediction type is told from its weights (ComfyUI's heuristic)
    prediction_from_weights = True
    name_pattern = r"(^|[^0-9])(v?2[-_.]?[01]|768)([^0-9]|$)"

    def detect_keys(self, keys):  # OpenCLIP-H
        return any(k.startswith("cond_stage_model.model.") for k in keys)

    def architecture_for(self, prediction_type: str) -> str:
        # SD2 epsilon models are the 512-base ones
        return "stable-diffusion-v2-512/lora" if prediction_type == "epsilon" else self.architecture


class SDXL(Family):
    native_lora_pattern = LDM_UNET_LORA
    name, title = "sdxl", "SDXL"
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base/lora"
    implementation = "https://github.com/Stability-AI/generative-models"
    sgm_unet_names = True
    native_resolution = 1024
    tiny_specs = ("tiny-sdxl",)
    detect_order = 1
    keys_reason = "the checkpoint has SDXL's second text encoder"
    ldm_text_encoders = (XL_CLIP_L, XL_OPENCLIP_G)
    name_pattern = r"xl|pony|illustrious"

    def detect_keys(self, keys):  # the second text encoder (OpenCLIP-bigG)
        return any(k.startswith("conditioner.embedders.1") for k in keys)
