"""Wan (2.1 T2V, 2.2 TI2V-5B): the tiny test model, diffusers WanPipeline folders. LoRAs train on images (one latent
frame); video datasets are not read here.

BaseModel for kind "wan": unet = WanTransformer3DModel, vae = AutoencoderKLWan (causal 3-D VAE, one frame; latents
normalised by its config's latents_mean / latents_std), text_encoder = UMT5EncoderModel, tokenizer = its T5 tokenizer,
noise_scheduler = FlowMatchEulerDiscreteScheduler with the folder's flow_shift (the release ships UniPC with
flow_shift; training and our grids use flow-matching Euler at the same shift); extra["variant"] "wan2.1-t2v" (16
latent channels: 1.3B, 14B) | "wan2.2-ti2v-5b" (48) | "wan2.2-t2v-a14b" (the expert pair).

Wan 2.2 A14B is two transformers of Wan 2.1 14B's shape: `transformer` denoises the high-noise timesteps (t >=
boundary_ratio x 1000; 0.875 for T2V, model_index.json's boundary_ratio) and `transformer_2` the low-noise ones, as
WanPipeline switches them. A LoRA is for one expert: model.unet is the expert being trained, extra["wan_pair"] an
`ExpertPair` (which expert, the boundary, the folder the other expert is read from only when a grid needs it), so
that training holds one 14B transformer, not two. A pair folder loads the low-noise expert (the one that draws
detail and likeness); `select_expert` swaps before the adapters go in. A single expert file (ComfyUI's
wan2.2_t2v_high_noise_14B_*.safetensors / low_noise) is that expert by its name.

Needs diffusers >= 0.33 (WanPipeline; the A14B pair: >= 0.35) and transformers >= 4.40 (UMT5); `require()` says so.

`tiny-wan` (random, seeded weights): transformer 2 blocks, 2 heads x 16, text width 32, ffn 64; VAE base_dim 8,
3 levels (factor 4: 64 px -> 16 x 16 latents), latents_mean / latents_std measured on procedural images; UMT5 32
wide, 2 layers, with the bundled T5 tokenizer (configs/t5_tokenizer; length 32). `tiny-wan-a14b`: the same with two
transformers (other seeds) and boundary_ratio 0.875, held as a pair folder would be (the other expert in memory).
"""
from __future__ import annotations

import json
import os

from . import flow
from .base import BaseModel, ModelError
from .base import require as base_require
from .tiny import seeded

TINY_SEED = 8181
TINY_RESOLUTION = 64
TINY_T5_LENGTH = 32
PIPELINES = ("WanPipeline",)
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                scale_factor_spatial=4)
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=32128,
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)
#: the releases' flow_shift (Wan-AI/Wan2.1-T2V-*, Wan2.2-TI2V-5B scheduler configs: 3.0 at 480p, 5.0 at 720p)
FLOW_SHIFT = 3.0
#: Wan-AI/Wan2.2-T2V-A14B-Diffusers model_index.json (I2V: 0.9); musubi-tuner's --timestep_boundary default for t2v
BOUNDARY_RATIO = 0.875
#: the parts a folder may take from separate files (models/split_parts.py; qwen_image.py SPLIT_FILES)
SPLIT_FILES = {"vae": ("wan_vae", "wan_2.1_vae.safetensors"), "text_encoder": ("umt5", "umt5_xxl_fp16.safetensors")}
#: expert -> the pair folder's subfolder (WanPipeline: transformer handles t >= boundary, transformer_2 below)
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}


def require() -> None:
    """A ModelError naming the versions when this environment's diffusers / transformers lack Wan."""
    base_require("Wan", [("diffusers", ("AutoencoderKLWan", "WanPipeline", "WanTransformer3DModel"),
                          "diffusers >= 0.33"), ("transformers", ("UMT5EncoderModel",), "transformers >= 4.40")])


def scheduler(shift: float = FLOW_SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def calibrate_vae(vae) -> None:
    """latents_mean / latents_std of the tiny VAE on structured test images (what the released config states)."""
    from .qwen_image import calibrate_vae as calibrate_3d

    calibrate_3d(vae)


def require_pair() -> None:
    require()
    base_require("Wan 2.2 A14B (two experts)", [("diffusers", ("WanPipeline",), "diffusers >= 0.35")])
    import inspect

    from diffusers import WanPipeline

    if "transformer_2" not in inspect.signature(WanPipeline.__init__).parameters:
        import diffusers

        raise ModelError(f"Wan 2.2 A14B (two experts) needs diffusers >= 0.35 (WanPipeline's transformer_2); this "
                         f"environment has diffusers {diffusers.__version__}: pip install -U diffusers")


def variant_of(transformer) -> str:
    return "wan2.2-ti2v-5b" if int(transformer.config.in_channels) == 48 else "wan2.1-t2v"


def expert_of_name(file_name: str):
    """"high" / "low" for ComfyUI's and Wan-AI's expert file names (wan2.2_t2v_high_noise_14B_fp8_scaled,
    high_noise_model/...), None for others."""
    n = os.path.basename(file_name).lower().replace("-", "_")
    return "high" if "high_noise" in n else "low" if "low_noise" in n else None


def single_file_options(path: str) -> dict:
    """load_wan_folder's arguments for a single transformer file: which expert its name says it is."""
    return {"expert": expert_of_name(path)}


def _load_expert(folder: str, expert: str):
    from diffusers import WanTransformer3DModel

    from .diffusers_folder import load_components

    sub = EXPERT_FOLDERS[expert]
    return load_components(folder, [(sub, WanTransformer3DModel)], "Wan 2.2 A14B folder",
                           f"{sub}/ (the {expert}-noise expert)")[sub]


class ExpertPair:
    """Wan 2.2 A14B's experts behind a BaseModel (model.extra["wan_pair"]; families/wan.py asks it): `expert` is the
    one in model.unet, `boundary_ratio` where WanPipeline switches, `folder` the pair folder the other one is read
    from (None: an expert file without one), `held` the experts kept in memory besides model.unet (the tiny pair's;
    a folder's other expert once a grid read it), `from_file`: model.unet is a single file's (it cannot be swapped
    for the folder's)."""

    def __init__(self, expert: str, boundary_ratio: float = BOUNDARY_RATIO, folder=None, held=None,
                 from_file: bool = False):
        self.expert, self.boundary_ratio, self.folder = expert, float(boundary_ratio), folder
        self.held, self.from_file = dict(held or {}), from_file

    @property
    def other_name(self) -> str:
        return "low" if self.expert == "high" else "high"

    def other(self):
        """The expert not being trained (for a grid through both), read from the folder once; None for an expert
        file without a pair folder."""
        name = self.other_name
        if name not in self.held:
            if not self.folder:
                return None
            self.held[name] = _load_expert(self.folder, name)
        return self.held[name]

    def select(self, model, expert: str) -> None:
        """Make `expert` ("low" | "high") model.unet, before any adapter goes in."""
        if expert not in EXPERT_FOLDERS:
            raise ModelError(f"wan_expert {expert!r} is not valid: use low (the low-noise expert, transformer_2) or "
                             f"high (the high-noise expert, transformer).")
        if expert == self.expert:
            return
        if self.from_file or (expert not in self.held and not self.folder):
            raise ModelError(f"'{model.name}' is the {self.expert}-noise expert (wan_expert: {expert} asked for the "
                             f"other); to train the {expert}-noise expert load its file "
                             f"(wan2.2_t2v_{expert}_noise_14B_*), or the A14B folder itself.")
        new = self.held.pop(expert, None)
        if new is None:
            new = _load_expert(self.folder, expert)
        if not self.folder:  # nowhere to read it again from: keep it
            self.held[self.expert] = model.unet
        model.unet, self.expert = new, expert

    def for_file(self, model, metadata) -> dict:
        """{"unet": the other expert} when a LoRA file's ss_wan_expert names it; {} otherwise."""
        want = str(metadata.get("ss_wan_expert", "")).replace("_noise", "")
        if want not in EXPERT_FOLDERS or want == self.expert:
            return {}
        other = self.other()
        if other is None:
            raise ModelError(f"the LoRA is for Wan 2.2 A14B's {want}-noise expert (its ss_wan_expert), and "
                             f"'{model.name}' holds the {self.expert}-noise expert only: load the {want}-noise model "
                             f"for it.")
        return {"unet": other}


def pair_of(model):
    """The model's ExpertPair, or None (a Wan 2.1 / TI2V-5B model, or another family)."""
    return (getattr(model, "extra", None) or {}).get("wan_pair")


def select_expert(model, expert: str) -> None:
    pair = pair_of(model)
    if pair is None:
        raise ModelError(f"wan_expert: {expert} applies to Wan 2.2 A14B (a folder with transformer/ and "
                         f"transformer_2/, or an expert file named *_high_noise_* / *_low_noise_*); "
                         f"'{model.name}' is one transformer. Leave wan_expert on auto.")
    pair.select(model, expert)


def other_expert(model):
    pair = pair_of(model)
    return None if pair is None else pair.other()


def _tiny_parts(seed: int):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tr = seeded(seed, lambda: WanTransformer3DModel(**TINY_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKLWan(**TINY_VAE))
    te = seeded(seed + 2, lambda: UMT5EncoderModel(UMT5Config(**TINY_UMT5)))
    calibrate_vae(vae)
    for m in (tr, vae, te):
        m.eval().requires_grad_(False)
    return tr, vae, te


def build_tiny_wan_a14b(seed: int = TINY_SEED + 10) -> BaseModel:
    """`tiny-wan-a14b`: see the module docstring (the low-noise expert loaded, the high-noise one held)."""
    require_pair()
    from diffusers import WanTransformer3DModel

    high, vae, te = _tiny_parts(seed)
    low = seeded(seed + 3, lambda: WanTransformer3DModel(**TINY_TRANSFORMER)).eval().requires_grad_(False)
    return BaseModel(unet=low, vae=vae, text_encoder=te, tokenizer=flow.t5_tokenizer(TINY_T5_LENGTH),
                     noise_scheduler=scheduler(), kind="wan", name="tiny-wan-a14b", path="tiny-wan-a14b",
                     native_resolution=TINY_RESOLUTION,
                     extra={"variant": "wan2.2-t2v-a14b", "t5_default_length": TINY_T5_LENGTH,
                            "wan_pair": ExpertPair("low", held={"high": high})})


def build_tiny_wan(seed: int = TINY_SEED) -> BaseModel:
    """`tiny-wan`: see the module docstring."""
    require()
    tr, vae, te = _tiny_parts(seed)
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=flow.t5_tokenizer(TINY_T5_LENGTH),
                     noise_scheduler=scheduler(), kind="wan", name="tiny-wan", path="tiny-wan",
                     native_resolution=TINY_RESOLUTION,
                     extra={"variant": "wan2.1-t2v", "t5_default_length": TINY_T5_LENGTH})


def save_wan_folder(model: BaseModel, folder: str) -> str:
    """Write a Wan BaseModel as a diffusers WanPipeline folder (an A14B pair with both experts and boundary_ratio)."""
    from diffusers import WanPipeline

    kw = {"transformer": model.unet}
    pair = pair_of(model)
    if pair is not None:
        other = pair.other()
        if other is None:
            raise ModelError(f"'{model.name}' is one Wan 2.2 A14B expert: a pair folder needs both.")
        high, low = (model.unet, other) if pair.expert == "high" else (other, model.unet)
        kw = {"transformer": high, "transformer_2": low, "boundary_ratio": pair.boundary_ratio}
    WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                scheduler=model.noise_scheduler, **kw).save_pretrained(folder, safe_serialization=True)
    return folder


def load_wan_folder(folder: str, transformer=None, expert=None, single_files=None) -> BaseModel:
    """A diffusers WanPipeline folder (transformer/, vae/, text_encoder/ (UMT5), tokenizer/, scheduler/; an A14B pair
    also transformer_2/ and boundary_ratio), offline; with `transformer` given (a single file's), the folder's own
    transformers are not read: `expert` says which one it is (None: a plain Wan model); `single_files` {"vae" /
    "text_encoder": file} take those parts' weights from separate files (SPLIT_FILES)."""
    require()
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from .diffusers_folder import index_has, load_components

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    pair = index_has(index, "transformer_2")
    if pair:
        require_pair()
        if expert is None:
            expert = "low"
    parts = [("vae", AutoencoderKLWan), ("text_encoder", UMT5EncoderModel), ("tokenizer", AutoTokenizer)]
    if transformer is None:
        parts.insert(0, (EXPERT_FOLDERS[expert] if pair else "transformer", WanTransformer3DModel))
    c = load_components(folder, parts, "Wan diffusers folder", "transformer/, vae/, text_encoder/ (UMT5), tokenizer/ and scheduler/",
                        single_files)
    shift = FLOW_SHIFT
    try:
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as fh:
            conf = json.load(fh)
        shift = float(conf.get("flow_shift") or conf.get("shift") or FLOW_SHIFT)
    except (OSError, ValueError):
        pass
    tr = transformer if transformer is not None else c[EXPERT_FOLDERS[expert] if pair else "transformer"]
    small = int(tr.config.num_layers) < 8
    extra = {"variant": variant_of(tr)}
    if expert is not None:
        boundary = float(index.get("boundary_ratio") or BOUNDARY_RATIO) if pair else BOUNDARY_RATIO
        extra.update(variant="wan2.2-t2v-a14b",
                     wan_pair=ExpertPair(expert, boundary, os.path.abspath(folder) if pair else None,
                                         from_file=transformer is not None))
    if small:
        extra["t5_default_length"] = TINY_T5_LENGTH
    return BaseModel(unet=tr, vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                     noise_scheduler=scheduler(shift), kind="wan", name=os.path.basename(os.path.normpath(folder)),
                     path=os.path.abspath(folder), native_resolution=TINY_RESOLUTION if small else 832, extra=extra)
