"""A model family: what differs between SD1, SDXL, Flux.1, SD3 / SD3.5, Qwen-Image, Z-Image, Chroma, Wan is a `Family`
and its module here (families/sd.py, flux.py, sd3.py, qwen_image.py, z_image.py, chroma.py, wan.py), in the style
of peft's `tuners/<method>/`; the weights' side (tiny models, folders, single files) is models/<family>.py. The
trainer, networks, loaders, advisor, outputs and sampler ask the family of the model (`families.of(model)`,
`families.get(kind)`); they do not branch on its name (tests/test_layout.py holds that).

A family states:
- what it is: `name` (BaseModel.kind), `title`, whether it trains by flow matching (`flow`), its native resolution;
- how it is told without loading weights: tiny specs, a diffusers folder's pipeline class prefixes, a single
  file's keys (`detect_keys`), a file name (`name_pattern`), in `detect_order`;
- what its LoRA files say (sd-scripts' / musubi-tuner's own values): `base_model_version`, `architecture_for`,
  `implementation`, `ss_v2` (UNet families), `file_metadata` / `network_module` / `training_keys` (flow families);
- how kohya names and groups its modules: `sgm_unet_names` (SDXL), `lora_blocks` / `lora_extras` and the swapped
  halves (flow families: diffusers paths -> the original model's names, fused q/k/v as one module);
- its latents (`encode_latents`, `vae_factor`), and for flow families the timestep sampling / weighting / shift,
  the text encoders a LoRA may train, the text conditioning, the denoiser call, the blocks in execution order
  (fp8_base, block swap), the sampling pipeline and its arguments, and the advisor's numbers (`vram_tiers`,
  `advise`) with their sources.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple


class Family:
    name = ""
    title = ""
    flow = False
    base_model_version = ""
    architecture = ""
    implementation = "diffusers"
    ss_v2 = False
    sgm_unet_names = False
    #: the side its pictures are trained at
    native_resolution = 512
    # UNet families' single-file checkpoints (models/single_file.py):
    #: the text encoders in the file, in order (families/sd.py)
    ldm_text_encoders: Tuple[Tuple[str, str, bool, str], ...] = ()
    #: the first text encoder's tokenizer pads with this token (None: <|endoftext|>); a second one always with "!"
    clip_pad_token: Optional[str] = None
    #: prediction type -> the bundled config of that kind ({}: the one the detection chose)
    single_file_variants: Dict[str, str] = {}
    prediction_from_weights = False
    #: its anime fine-tunes (NovelAI lineage) are trained and used at CLIP skip 2 (SD1.5; SDXL always uses the
    #: penultimate layers)
    anime_clip_skip = False
    # captions (captions/styles.py, captions/checks.py): the style its trainers caption in, and how many tokens of
    # a caption its text encoder reads (CLIP: 75 a chunk; kohya's max_token_length 150 / 225 reads more)
    caption_style = "short"
    caption_tokens: Optional[int] = 75
    #: which tokenizer counts them: clip | t5 (both bundled) | other (estimated from the words)
    caption_tokenizer = "clip"
    # detection without loading weights (lora_train/family.py asks in `detect_order`, lowest first):
    detect_order = 9
    #: the tiny test models of the family (models/ builds them)
    tiny_specs: Tuple[str, ...] = ()
    #: a diffusers folder's model_index.json `_class_name` starts with one of these
    pipeline_prefixes: Tuple[str, ...] = ()
    #: a regular expression a checkpoint's lower-case file name matches
    name_pattern = ""

    def detect_keys(self, keys: Sequence[str]) -> bool:
        """A single file's state-dict keys (kohya / original / ComfyUI layouts) are this family's."""
        return False

    @property
    def keys_reason(self) -> str:
        """Why `detect_keys` said yes, for the user."""
        return f"the file's keys are {self.title}'s"

    def prediction_type(self, model) -> str:
        """What the denoiser predicts: the noise scheduler's epsilon / v_prediction (flow families: "flow")."""
        return getattr(model.noise_scheduler.config, "prediction_type", "epsilon")

    def architecture_for(self, prediction_type: str) -> str:
        """modelspec.architecture as sd-scripts writes it for a model of this prediction type."""
        return self.architecture

    def encode_latents(self, model, vae, pixels):
        """Latents (B, C, h, w) of pixels (B, 3, H, W) in [-1, 1], as the family's pipeline scales them."""
        return (vae.encode(pixels).latent_dist.mean - model.vae_shift) * model.vae_scale

    def vae_factor(self, vae) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def latent_tag(self, model) -> str:
        """What `encode_latents` does besides the VAE's weights (part of the latent cache's identity)."""
        shift = model.vae_shift
        return f"latent_dist.mean*{model.vae_scale:g}" + (f"-{shift:g}" if shift else "")

    #: the model is a host's own (ComfyUI in place, families/comfyui.py): the trainer asks the family to build the
    #: network (`build_network`), draw timesteps, compute the loss and read the weights out, and leaves the base
    #: weights where the host keeps them
    in_place = False

    #: how a batch's cached text conditionings (one per caption) reach the forward: None = stacked (a tensor, or a
    #: dict / tuple of them); a function of the list otherwise (in place: one conditioning per sample)
    collate = None

    #: a regular expression over `lora_unet_<module path in the host's (original-layout) model, . -> _>` that
    #: matches the modules a LoRA of the family trains by default (ComfyUI in place: hosts/comfyui_inplace.py)
    native_lora_pattern: Optional[str] = None

    def file_components(self, model, metadata: Dict[str, str]) -> Dict[str, Any]:
        """{component: module} a LoRA file goes into instead of the model's own, by the file's metadata (Wan 2.2
        A14B: the expert it was trained for)."""
        return {}

    def held_modules(self, model) -> List[tuple]:
        """[(component, module)] of the other denoisers the pipeline runs (Wan 2.2 A14B's other expert, once
        loaded): the sampler sets LoRA strengths on them too."""
        return []

    def __repr__(self) -> str:
        return f"<family {self.name}>"


#: one kohya module of a block: (kohya suffix, the diffusers paths in the block it covers; more than one = one fused
#: Linear in the original model, in this order)
LoraEntry = Tuple[str, Tuple[str, ...]]


def identity_entries(paths: Sequence[str]) -> Tuple[LoraEntry, ...]:
    """Block entries of a family whose original layout is diffusers' own (Qwen-Image): each Linear is one module,
    named by its path with `_` for `.`."""
    return tuple((p.replace(".", "_"), (p,)) for p in paths)


class FlowFamily(Family):
    """A flow-matching family (the transformer predicts noise - latents; timesteps are sigma x 1000)."""

    flow = True
    caption_style = "detailed"  # T5 / Qwen / Mistral read long natural-language captions
    caption_tokens = 512
    caption_tokenizer = "t5"
    native_resolution = 1024
    detect_order = 0

    @property
    def keys_reason(self) -> str:
        return f"the file's keys are {self.title}'s transformer blocks"

    def prediction_type(self, model) -> str:
        return "flow"  # the transformer predicts noise - latents
    #: sd-scripts' defaults for `auto` (training/flow.resolve)
    timestep_sampling = "sigma"
    weighting_scheme = "none"
    #: the diffusers text-to-image pipeline a folder of the family is (model_index.json's _class_name)
    pipeline_class = ""
    #: the diffusers class of the denoiser (how a loaded transformer tells its family)
    transformer_class = ""
    #: the variants a model of the family can be (BaseModel.extra["variant"]); the first is the default
    variants: Tuple[str, ...] = ()
    #: the LoRA file's layout (networks/flow_names.py): ((diffusers block list, kohya block prefix, entries), ...)
    lora_blocks: Tuple[Tuple[str, str, Tuple[LoraEntry, ...]], ...] = ()
    #: modules outside the blocks, read from files but not trained by default: kohya suffix -> diffusers path
    lora_extras: Dict[str, str] = {}
    #: block suffixes whose Linear (when it outputs 2 x its input) orders (scale, shift) where the original has
    #: (shift, scale): lora_up's halves are swapped on export and import
    swapped_suffixes: Tuple[str, ...] = ()
    #: the transformer's block lists in execution order (fp8_base and block swap work on their blocks); default:
    #: the LoRA layout's lists
    block_order: Tuple[str, ...] = ()
    #: the same for modules outside the blocks (always swapped: Flux's and SD3's final AdaLayerNormContinuous)
    swapped_extras: Tuple[str, ...] = ("final_layer_adaLN_modulation_1",)
    #: sd-scripts' (or musubi-tuner's) --network_module for the family, and the training settings it records
    network_module = ""
    training_keys: Tuple[str, ...] = ()
    #: key prefixes of diffusers' LoRA files for the pipeline -> our components
    diffusers_prefixes: Dict[str, str] = {"transformer.": "unet"}
    #: text-encoder packages / versions the family needs ("" = any the core supports)
    requires = ""

    @property
    def native_lora_pattern(self) -> Optional[str]:
        """The default modules of `lora_blocks` by their kohya names, which are the original model's paths."""
        if not self.lora_blocks:
            return None
        alts = ["{}_\\d+_({})".format(re.escape(prefix), "|".join(re.escape(s) for s, _ in entries))
                for _, prefix, entries in self.lora_blocks]
        return r"^lora_unet_(" + "|".join(alts) + r")$"

    @property
    def block_lists(self) -> Tuple[str, ...]:
        return self.block_order or tuple(b for b, _, _ in self.lora_blocks)

    def file_metadata(self, variant: Optional[str]) -> Dict[str, str]:
        """ss_base_model_version, modelspec.architecture / implementation (and family keys) for a variant."""
        raise NotImplementedError

    def run_metadata(self, model) -> Dict[str, str]:
        """The run's conditioning settings as sd-scripts records them (ss_t5xxl_max_token_length, ...)."""
        return {}

    def configure(self, model, cfg) -> None:
        """The run's family options into the model before adapters go in (Wan 2.2 A14B: which expert trains)."""

    def timestep_range(self, model) -> Optional[Tuple[float, float]]:
        """The (low, high) sigma range training draws from (None: all of (0, 1))."""
        return None

    def t5_encoder(self, model):
        """The T5 a LoRA may name (te3), or None."""
        return None

    def components(self, model) -> List[tuple]:
        """[(component, module)] a LoRA file of the family may hold: the transformer (unet) and text encoders."""
        out = [("unet", model.unet)]
        te = [(c, m) for c, m in self.text_encoder_components(model) if m is not None]
        t5 = self.t5_encoder(model)
        return out + te + ([("te3", t5)] if t5 is not None else [])

    def conditioning_tag(self, model) -> str:
        """What changes the text conditioning besides the encoders' weights (part of the text cache's identity)."""
        return ""

    # the advisor (tuning/flow_advice.py), each value with its reason:
    #: (vram at least, fp8_base, blocks_to_swap, resolution, tier text), largest first; the last starts at 0 GB
    vram_tiers: Tuple[Tuple[float, bool, int, int, str], ...] = ()
    #: the model the tiers are for, as the advice names it
    advice_name = ""
    #: the text encoders' part: (train_text_encoder, its reason, text_encoder_lr as a share of the lr or None)
    advice_text_encoder: Tuple[bool, str, Optional[float]] = (False, "", None)

    def advise(self, s, image_count: int, task: str, detail: str) -> Tuple[int, float]:
        """Add the family's lr, rank reason, timestep sampling (and its own keys) to a Suggestion `s`; returns
        (rank, lr)."""
        raise NotImplementedError

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

    def image_of(self, out):
        """The picture of the pipeline's output (a video pipeline's first frame)."""
        return out.images[0]

    def call_kwargs(self, model, kw: Dict[str, Any]) -> Dict[str, Any]:
        """The pipeline call's arguments from the sampler's (prompt, negative_prompt, guidance_scale, steps, size,
        generator): T5's max length is the one the model trains with."""
        from .flow_parts import t5_max_length

        return dict(kw, max_sequence_length=t5_max_length(model))


def unknown(kind: Optional[str], known: Sequence[str]) -> ValueError:
    return ValueError(f"unknown model family {kind!r}: lora_train trains {', '.join(known)}")
