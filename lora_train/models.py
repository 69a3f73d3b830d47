"""Base models: the BaseModel bundle, diffusers folders, and the tiny demo model built from code.

Nothing here ever downloads: every `from_pretrained` runs with `local_files_only=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

TINY_SEED = 1234
TINY_RESOLUTION = 64


class ModelError(ValueError):
    """A base model that cannot be used; the message says what it is and what to do."""


@dataclass
class BaseModel:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    kind: str = "sd1"  # sd1 | sd2 | sdxl
    name: str = "tiny"
    path: str = ""
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    native_resolution: int = 512
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return getattr(self.noise_scheduler.config, "prediction_type", "epsilon")

    @property
    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def text_encoders(self):
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]

    def to(self, device=None, dtype=None) -> "BaseModel":
        for m in (self.unet, self.vae, *self.text_encoders):
            m.to(device=device, dtype=dtype)
        return self

    def model_hash(self) -> str:
        """Short hash of the identity of the base model (path + name), for metadata."""
        return hashlib.sha256(f"{self.kind}:{self.name}:{self.path}".encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- tiny tokenizer
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# A few merges so that common caption words become single tokens (kept small on purpose).
_TINY_WORDS = ["a", "of", "on", "the", "photo", "red", "green", "blue", "yellow", "circle", "square", "stripes",
               "background", "with", "and", "lrtdemo", "style", "image", "pattern", "dot", "dots", "white"]


def write_tiny_tokenizer(folder: str) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) with a small vocabulary made here."""
    os.makedirs(folder, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    seen = set(vocab)
    for word in _TINY_WORDS:  # greedy left-to-right merges that build each word
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merged = a + b
            if (a, b) not in merges:
                merges.append((a, b))
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({tok: i for i, tok in enumerate(vocab)}, fh, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
           "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, fh)


def tiny_vocab_size(folder: str) -> int:
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as fh:
        return len(json.load(fh))


# ----------------------------------------------------------------------------- tiny model
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")


def _tiny_scheduler_config(prediction_type: str = "epsilon") -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def _calibrate_vae_scale(vae) -> float:
    """Scaling factor that gives the tiny VAE's latents unit variance on structured test images."""
    from .demo import procedural_images

    imgs = procedural_images(8, TINY_RESOLUTION, seed=7)
    import numpy as np

    x = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1) for im in imgs])
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
    return float(1.0 / lat.std().clamp_min(1e-6))


def build_tiny(prediction_type: str = "epsilon", seed: int = TINY_SEED) -> BaseModel:
    """The tiny SD1-architecture demo model: fixed configs, seeded random weights, our own tokenizer."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
        vocab = tiny_vocab_size(tmp)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE)
        torch.manual_seed(seed + 2)
        te_cfg = CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                pad_token_id=vocab - 1, **TINY_TEXT)
        text_encoder = CLIPTextModel(te_cfg)
    finally:
        torch.random.set_rng_state(torch_state)
    vae.register_to_config(scaling_factor=_calibrate_vae_scale(vae))
    sched = DDPMScheduler(**_tiny_scheduler_config(prediction_type))
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=sched,
                     kind="sd1", name="tiny", path="tiny", native_resolution=TINY_RESOLUTION)


def save_diffusers_folder(model: BaseModel, folder: str) -> str:
    """Write the bundle as a diffusers StableDiffusionPipeline folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------- loading
def _index_has(index: dict, key: str) -> bool:
    """model_index.json lists a component (diffusers writes [null, null] for an absent one)."""
    v = index.get(key)
    return bool(v) and not (isinstance(v, (list, tuple)) and all(x is None for x in v))


def load_diffusers_folder(folder: str) -> BaseModel:
    """An SD1.x / SD2.x (StableDiffusionPipeline) or SDXL base (StableDiffusionXLPipeline) diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    cls_name = index.get("_class_name", "")
    supported = "Use an SD1.x, SD2.x or SDXL base diffusers folder."
    if _index_has(index, "transformer") or not _index_has(index, "unet"):
        raise ModelError(f"'{folder}' is a {cls_name or 'non-UNet'} folder (a transformer model, not a Stable "
                         f"Diffusion UNet); this version trains SD1.x, SD2.x and SDXL. {supported}")
    xl = _index_has(index, "text_encoder_2")
    if xl and not _index_has(index, "text_encoder"):
        raise ModelError(f"'{folder}' is the SDXL refiner (no first text encoder); train on an SDXL base model. "
                         f"{supported}")
    if "Inpaint" in cls_name:
        raise ModelError(f"'{folder}' is an inpainting model; train on the regular checkpoint. {supported}")
    kw = dict(local_files_only=True)
    te2 = tok2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
        if xl:
            te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kw)
            tok2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", **kw)
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
    except (OSError, ValueError) as exc:
        subs = "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/" if xl else "text_encoder/, tokenizer/"
        raise ModelError(f"could not load the diffusers folder '{folder}': {exc}. It needs unet/, vae/, {subs} "
                         f"and scheduler/ subfolders with their weights.") from exc
    if int(unet.config.in_channels) != 4:
        raise ModelError(f"'{folder}' has a UNet with {unet.config.in_channels} input channels (inpainting or "
                         f"another special model). {supported}")
    for m in (unet, vae, text_encoder, te2):
        if m is not None:
            m.eval().requires_grad_(False)
    if xl:
        kind = "sdxl"
    else:  # SD2's OpenCLIP-H: 1024 wide, gelu (CLIP-L of SD1: 768, quick_gelu)
        te_cfg = text_encoder.config
        kind = "sd2" if te_cfg.hidden_size == 1024 or getattr(te_cfg, "hidden_act", "") == "gelu" else "sd1"
    native = int(unet.config.sample_size) * (2 ** (len(vae.config.block_out_channels) - 1))
    name = os.path.basename(os.path.normpath(folder))
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=sched,
                     kind=kind, name=name, path=os.path.abspath(folder), native_resolution=native,
                     text_encoder_2=te2, tokenizer_2=tok2)


TINY_SPECS = ("tiny", "tiny-v", "tiny-sd2", "tiny-sd2-eps", "tiny-sdxl")


def load_base_model(spec: str, prediction_type: str = "auto", allow_pickle: bool = False) -> BaseModel:
    """`tiny`, `tiny-v` (v-prediction), `tiny-sd2` (v) / `tiny-sd2-eps`, `tiny-sdxl` (demo models), a diffusers
    folder (SD1.x / SD2.x / SDXL base), or a single-file checkpoint (.safetensors; .ckpt/.pt pickles only with
    allow_pickle=True, then loaded with torch.load(weights_only=True))."""
    spec = (spec or "").strip()
    if spec in TINY_SPECS:
        from . import tiny_variants

        if spec == "tiny-sdxl":
            model = tiny_variants.build_tiny_sdxl()
        elif spec.startswith("tiny-sd2"):
            model = tiny_variants.build_tiny_sd2(v_prediction=spec == "tiny-sd2")
        else:
            model = build_tiny("v_prediction" if spec == "tiny-v" else "epsilon")
        if prediction_type not in ("auto", model.prediction_type):
            model.noise_scheduler.register_to_config(prediction_type=prediction_type)
        return model
    if not spec:
        raise ModelError("base_model is empty: set it to 'tiny' (demo) or a diffusers model folder.")
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise ModelError(f"base_model '{spec}' does not exist: give 'tiny', or the path of a diffusers folder "
                         f"(with model_index.json).")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelError(f"'{spec}' is a folder without model_index.json, so not a diffusers model. Point "
                             f"base_model at the folder that holds model_index.json.")
        model = load_diffusers_folder(path)
    else:
        from .checkpoints import load_single_file  # SD1.x / SD2.x / SDXL single file, offline

        model = load_single_file(path, allow_pickle=allow_pickle, prediction_type=prediction_type)
    if prediction_type != "auto" and prediction_type != model.prediction_type:
        model.noise_scheduler.register_to_config(prediction_type=prediction_type)
    return model
