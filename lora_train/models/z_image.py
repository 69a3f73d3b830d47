"""Z-Image (6B single-stream DiT; Turbo and base): the tiny test model, diffusers ZImagePipeline folders.

BaseModel for kind "z_image": unet = ZImageTransformer2DModel, vae = AutoencoderKL (Flux's 16-channel VAE,
scaling_factor / shift_factor), text_encoder = Qwen3Model (Qwen3-4B in the release), tokenizer = Qwen2Tokenizer
with Qwen3's chat template, noise_scheduler = FlowMatchEulerDiscreteScheduler (shift 3.0); extra["variant"]
"z-image-turbo" | "z-image" (told by the folder name or the caller; both train and load the same way).

Needs diffusers >= 0.36 (ZImagePipeline) and transformers >= 4.51 (Qwen3); `require()` says so by name.

`tiny-z-image` (random, seeded weights): transformer dim 32, 2 layers + 1 noise / 1 context refiner, 2 heads
(head dim 16, rope axes (4, 6, 6)), caption width 32; the tiny Flux VAE (factor 4: 64 px -> 16 x 16 latents);
Qwen3 32 wide, 3 layers (the pipeline reads the second-to-last hidden state); the byte-level BPE tokenizer made
here (models/qwen_image.py) with a chat template that writes what Qwen3's writes for one user message.
"""
from __future__ import annotations

import os

from .base import BaseModel, ModelError
from .base import require as base_require
from .tiny import seeded

TINY_SEED = 6161
TINY_RESOLUTION = 64
PIPELINES = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
TINY_TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32,
                        axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)
#: the released scheduler (Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
#: Qwen3's chat template for one user message with a generation prompt (enable_thinking=True adds nothing)
#: the parts a folder may take from separate files (models/split_parts.py; qwen_image.py SPLIT_FILES)
SPLIT_FILES = {"vae": ("ae", "ae.safetensors"), "text_encoder": ("qwen3", "qwen_3_4b.safetensors")}
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def require() -> None:
    """A ModelError naming the versions when this environment's diffusers / transformers lack Z-Image."""
    base_require("Z-Image", [("diffusers", ("ZImagePipeline", "ZImageTransformer2DModel"), "diffusers >= 0.36"),
                             ("transformers", ("Qwen3Model",), "transformers >= 4.51")])


def tiny_tokenizer():
    from .qwen_image import tiny_tokenizer as qwen_tokenizer

    tok = qwen_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_z_image(seed: int = TINY_SEED) -> BaseModel:
    """`tiny-z-image`: see the module docstring."""
    require()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .flux import TINY_FLOW_VAE, calibrate_vae

    tok = tiny_tokenizer()
    tr = seeded(seed, lambda: ZImageTransformer2DModel(**TINY_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKL(**TINY_FLOW_VAE))
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    te = seeded(seed + 2, lambda: Qwen3Model(Qwen3Config(**TINY_TEXT, vocab_size=len(tok), pad_token_id=pad,
                                                         bos_token_id=pad, eos_token_id=pad)))
    calibrate_vae(vae)
    for m in (tr, vae, te):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=tok,
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), kind="z_image",
                     name="tiny-z-image", path="tiny-z-image", native_resolution=TINY_RESOLUTION,
                     extra={"variant": "z-image-turbo", "text_default_length": 64})


def variant_of(folder: str) -> str:
    """The variant a folder's or a file's name says (z_image_turbo_bf16.safetensors, Z-Image-Turbo/: Turbo)."""
    return "z-image-turbo" if "turbo" in os.path.basename(os.path.normpath(folder)).lower() else "z-image"


def single_file_options(path: str) -> dict:
    """load_z_image_folder's arguments for a single transformer file: its variant by the file's name (not the
    components folder's: Forge Neo's bundled folder is Z-Image-Turbo's for the base model's files too)."""
    return {"variant": variant_of(path)}


def save_z_image_folder(model: BaseModel, folder: str) -> str:
    """Write a Z-Image BaseModel as a diffusers ZImagePipeline folder."""
    from diffusers import ZImagePipeline

    ZImagePipeline(scheduler=model.noise_scheduler, vae=model.vae, text_encoder=model.text_encoder,
                   tokenizer=model.tokenizer, transformer=model.unet).save_pretrained(folder, safe_serialization=True)
    return folder


def load_z_image_folder(folder: str, transformer=None, single_files=None, variant=None) -> BaseModel:
    """A diffusers ZImagePipeline folder (transformer/, vae/, text_encoder/ (Qwen3), tokenizer/, scheduler/),
    offline; with `transformer` given (a single file's), the folder's own transformer/ is not read; `single_files`
    {"vae" / "text_encoder": file} take those parts' weights from separate files (SPLIT_FILES); `variant` (a
    single file's, by its name) overrides the folder name's."""
    require()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    from .diffusers_folder import load_components

    parts = [("vae", AutoencoderKL), ("text_encoder", Qwen3Model), ("tokenizer", AutoTokenizer),
             ("scheduler", FlowMatchEulerDiscreteScheduler)]
    if transformer is None:
        parts.insert(0, ("transformer", ZImageTransformer2DModel))
    c = load_components(folder, parts, "Z-Image diffusers folder",
                        "transformer/, vae/, text_encoder/ (Qwen3), tokenizer/ and scheduler/ with their weights",
                        single_files)
    tr = c["transformer"] if transformer is None else transformer
    if c["tokenizer"].chat_template is None and single_files and single_files.get("text_encoder"):
        # a config-only folder (Forge Neo's bundled one) may carry no chat template: Neo writes Qwen3's one-message
        # template itself (its text_processing/z_image_engine.py), which is the text CHAT_TEMPLATE writes
        c["tokenizer"].chat_template = CHAT_TEMPLATE
    if c["tokenizer"].chat_template is None:
        raise ModelError(f"the tokenizer in '{folder}' has no chat template: Z-Image's prompts go through Qwen3's; "
                         f"use the tokenizer/ folder of the Z-Image release.")
    small = int(tr.config.n_layers) < 8
    extra = {"variant": variant or variant_of(folder)}
    if small:
        extra["text_default_length"] = 64
    return BaseModel(unet=tr, vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                     noise_scheduler=c["scheduler"], kind="z_image", name=os.path.basename(os.path.normpath(folder)),
                     path=os.path.abspath(folder), native_resolution=TINY_RESOLUTION if small else 1024, extra=extra)
