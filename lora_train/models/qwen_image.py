"""Qwen-Image: the tiny test model, diffusers QwenImagePipeline folders.

BaseModel for kind "qwen_image": unet = QwenImageTransformer2DModel, vae = AutoencoderKLQwenImage (Wan-style causal
3-D VAE, one frame; latents normalised by its config's latents_mean / latents_std), text_encoder =
Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL-7B-Instruct in the release), tokenizer = Qwen2Tokenizer,
noise_scheduler = FlowMatchEulerDiscreteScheduler (dynamic shift, exponential time shift); extra["variant"]
"qwen-image". The family (families/qwen_image.py) says how it is conditioned and called.

Needs diffusers >= 0.35 (QwenImagePipeline) and transformers >= 4.49 (Qwen2.5-VL); `require()` says so by name.

`tiny-qwen-image` (random, seeded weights): transformer 2 blocks, 2 heads x 16, rope axes (4, 6, 6), text width 32;
VAE base_dim 8, 3 levels (factor 4: 64 px -> 16 x 16 latents -> 8 x 8 packed), latents_mean / latents_std measured
on procedural images; Qwen2.5-VL 32 wide, 2 layers (a 1-layer vision tower that text-only use never runs); a
byte-level BPE tokenizer of 400 tokens trained here, offline, with Qwen's chat tokens (<|im_start|>, <|im_end|>,
<|endoftext|>).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from .base import BaseModel
from .base import require as base_require
from .tiny import _TINY_WORDS, seeded

TINY_RESOLUTION = 64
TINY_SEED = 5151
PIPELINES = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
TINY_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True])
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024,
                 rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)
TINY_VOCAB = 400
#: the released scheduler (Qwen/Qwen-Image scheduler/scheduler_config.json)
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
#: the released transformer (Qwen/Qwen-Image transformer/config.json)
FULL_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: the parts a folder may take from separate files (models/split_parts.py): subfolder -> (the file's kind as
#: flow_single_file.component_kind tells it, the released file: Comfy-Org's split files, which Forge Neo loads)
SPLIT_FILES = {"vae": ("wan_vae", "qwen_image_vae.safetensors"),
               "text_encoder": ("qwen2.5-vl", "qwen_2.5_vl_7b_fp8_scaled.safetensors")}


def require() -> None:
    """A ModelError naming the versions when this environment's diffusers / transformers lack Qwen-Image."""
    base_require("Qwen-Image", [("diffusers", ("AutoencoderKLQwenImage", "QwenImagePipeline",
                                              "QwenImageTransformer2DModel"), "diffusers >= 0.35"),
                                ("transformers", ("Qwen2_5_VLForConditionalGeneration",), "transformers >= 4.49")])


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(_TINY_WORDS), "Describe the image by detailing the color, shape, size, texture, "
              "quantity, text, spatial relationships of the objects and background", "system user assistant"]
    tk.train_from_iterator(corpus * 4, trainer)
    return tk.to_str()


def tiny_tokenizer():
    """The tiny model's Qwen2 tokenizer (a byte-level BPE made here: any text tokenizes)."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()), eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>", unk_token=None, model_max_length=1024)


def tiny_text_encoder(seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2_5_VLConfig(text_config=dict(TINY_TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                                            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
                           vision_config=TINY_VISION, bos_token_id=ids["<|endoftext|>"],
                           eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(cfg)), tok


def calibrate_vae(vae) -> None:
    """latents_mean / latents_std per channel of the tiny VAE on structured test images (what the released VAE's
    config states for photos), so that its normalised latents have zero mean and unit variance."""
    import numpy as np

    from ..data.demo import procedural_images

    imgs = procedural_images(8, TINY_RESOLUTION, seed=7)
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1) for im in imgs])
    with torch.no_grad():
        lat = vae.encode(x.unsqueeze(2)).latent_dist.mean[:, :, 0]
    mean = lat.mean(dim=(0, 2, 3))
    std = lat.std(dim=(0, 2, 3)).clamp_min(1e-6)
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])


def build_tiny_qwen_image(seed: int = TINY_SEED) -> BaseModel:
    """`tiny-qwen-image`: see the module docstring."""
    require()
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tr = seeded(seed, lambda: QwenImageTransformer2DModel(**TINY_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKLQwenImage(**TINY_VAE))
    te, tok = tiny_text_encoder(seed + 2)
    calibrate_vae(vae)
    for m in (tr, vae, te):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=tok,
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), kind="qwen_image",
                     name="tiny-qwen-image", path="tiny-qwen-image", native_resolution=TINY_RESOLUTION,
                     extra={"variant": "qwen-image", "text_default_length": 64})


def native_resolution(transformer) -> int:
    return 1328 if int(transformer.config.num_layers) >= 8 else TINY_RESOLUTION


def save_qwen_image_folder(model: BaseModel, folder: str) -> str:
    """Write a Qwen-Image BaseModel as a diffusers QwenImagePipeline folder."""
    from diffusers import QwenImagePipeline

    QwenImagePipeline(scheduler=model.noise_scheduler, vae=model.vae, text_encoder=model.text_encoder,
                      tokenizer=model.tokenizer, transformer=model.unet).save_pretrained(folder, safe_serialization=True)
    return folder


def load_qwen_image_folder(folder: str, transformer=None, single_files=None) -> BaseModel:
    """A diffusers QwenImagePipeline folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/), offline;
    with `transformer` given (a single file's), the folder's own transformer/ is not read; `single_files`
    {"vae" / "text_encoder": file} take those parts' weights from separate files (SPLIT_FILES)."""
    require()
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from .diffusers_folder import load_components

    parts = [("vae", AutoencoderKLQwenImage), ("text_encoder", Qwen2_5_VLForConditionalGeneration),
             ("tokenizer", AutoTokenizer), ("scheduler", FlowMatchEulerDiscreteScheduler)]
    if transformer is None:
        parts.insert(0, ("transformer", QwenImageTransformer2DModel))
    c = load_components(folder, parts, "Qwen-Image diffusers folder",
                        "transformer/, vae/, text_encoder/ (Qwen2.5-VL), tokenizer/ and scheduler/ with their weights",
                        single_files)
    tr = c["transformer"] if transformer is None else transformer
    extra = {"variant": "qwen-image"}
    if int(tr.config.num_layers) < 8:  # a tiny test model saved as a folder keeps its short text length
        extra["text_default_length"] = 64
    return BaseModel(unet=tr, vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                     noise_scheduler=c["scheduler"], kind="qwen_image", name=os.path.basename(os.path.normpath(folder)),
                     path=os.path.abspath(folder), native_resolution=native_resolution(tr), extra=extra)
