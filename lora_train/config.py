"""TrainConfig: every training knob, YAML load/save and validation with actionable messages."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import yaml
from .io_utils import atomic_write_text

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor")
NAN_POLICIES = ("stop", "recover")
PRECISIONS = ("auto", "no", "fp16", "bf16")  # auto: bf16 on a GPU that has it, else fp16 + loss scaling; CPU fp32
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
CACHE_MODES = ("memory", "disk")
TIMESTEP_SAMPLINGS = ("auto", "sigma", "uniform", "sigmoid", "shift", "flux_shift")  # flow models (training/flow.py)
WEIGHTING_SCHEMES = ("auto", "none", "uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap")
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")  # networks/network.py
#: the name of a LoRA nobody named yet (every front door's default)
DEFAULT_NAME = "my_lora"
#: the start learning rate of the UNet LoRA by effective batch (batch x accumulation), alpha = rank, AdamW: the
#: advisor's table (tuning/advisor.py reads it from here) and the config's default
LR_BY_BATCH: Dict[int, float] = {1: 1e-4, 2: 1.5e-4, 4: 2e-4}


def learning_rate_for(effective_batch: int, scaling: str = "sqrt") -> float:
    """The start lr for an effective batch: the table's, else scaled (sqrt or linear) from the largest table
    batch below it, to 3 significant digits (batch 8 -> 2.83e-4 by sqrt)."""
    batch = max(1, int(effective_batch))
    if batch in LR_BY_BATCH:
        return LR_BY_BATCH[batch]
    anchor = max(b for b in LR_BY_BATCH if b <= batch)
    factor = math.sqrt(batch / anchor) if scaling == "sqrt" else batch / anchor
    return float(f"{LR_BY_BATCH[anchor] * factor:.3g}")
NETWORK_DROPOUTS = {"lora": ("dropout",), "locon": ("dropout",), "loha": ("rank_dropout", "module_dropout"),
                    "lokr": ("rank_dropout", "module_dropout"), "dora": ("rank_dropout", "module_dropout")}


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value, what is allowed and what to do."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


#: the TrainConfig fields that name a single-file base model's separate component files (Flux / SD3; the
#: transformer-only families' components folder and, over it, their separate VAE / text encoder files)
COMPONENT_FILE_KEYS = ("ae", "clip_l", "clip_g", "t5xxl", "components_folder", "vae", "text_encoder")


@dataclass
class TrainConfig:
    # data
    train_data_dir: str = ""
    caption_extension: str = ".txt"
    trigger_word: str = ""
    resolution: int = 512
    # model
    base_model: str = "tiny"
    prediction_type: str = "auto"
    allow_pickle: bool = False  # .ckpt/.pt base models run code when unpickled: explicit opt-in, weights_only=True
    # output
    output_dir: str = "output"
    output_name: str = DEFAULT_NAME
    overwrite: bool = False
    save_every_n_epochs: int = 1
    save_every_n_steps: int = 0  # also write <name>-step0000NNNN.safetensors every N optimizer steps (0: off)
    # network
    lora_rank: int = 8
    lora_alpha: Optional[float] = None  # default: = lora_rank
    train_text_encoder: bool = False
    network_type: str = "lora"  # lora | locon | loha | lokr | dora (networks/network.py)
    conv_rank: int = 0  # > 0: also the 3x3 convs of the UNet's ResNet blocks (kohya conv_dim); locon: 0 -> lora_rank
    conv_alpha: Optional[float] = None  # default: = conv_rank
    factor: int = -1  # LoKr: Kronecker factor (-1: automatic, as LyCORIS)
    full_matrix: bool = False  # LoKr: full matrices instead of a low-rank w2
    dropout: float = 0.0  # lora / locon: dropout of the adapter's input
    rank_dropout: float = 0.0  # loha / lokr / dora: drop rows of the weight delta while training
    module_dropout: float = 0.0  # loha / lokr / dora: skip a module's delta while training
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: up/B matrices at ratio x lr (e.g. 16); empty or 1: off
    # optimisation
    learning_rate: Optional[float] = None  # empty: LR_BY_BATCH for the effective batch (1: 1e-4, 2: 1.5e-4, 4: 2e-4)
    text_encoder_lr: Optional[float] = None  # default: = learning_rate / 2
    optimizer: str = "AdamW"
    optimizer_args: Dict[str, Any] = field(default_factory=dict)
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    epochs: int = 10
    max_train_steps: Optional[int] = None  # overrides epochs
    # run
    seed: int = 42
    mixed_precision: str = "auto"
    device: str = "auto"
    log_every_n_steps: int = 1
    # reliability
    save_state: bool = False  # keep a resumable state (<output_dir>/state/) at the end of a finished run; a stopped
    # run always keeps one. The periodic ones below also write one at the end.
    save_state_every_n_steps: int = 0
    save_state_every_n_epochs: int = 0
    save_state_keep: int = 2
    nan_policy: str = "stop"
    nan_max_recoveries: int = 3
    # memory / quality features
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # torch.compile the UNet for the training forward (slow first steps; GPU)
    noise_offset: float = 0.0
    min_snr_gamma: Optional[float] = None
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    # caches: latents are always encoded once ("memory" or "disk"); text embeddings when the text encoder is frozen
    latent_cache: str = "memory"
    text_cache: str = "memory"
    cache_dir: str = ""  # disk caches; default <output_dir>/cache (never the image folder)
    # aspect-ratio buckets (kohya names)
    enable_bucket: bool = False
    min_bucket_reso: Optional[int] = None
    max_bucket_reso: Optional[int] = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int = 1234
    # samples during training (strength-1 row beside the base, into output_dir/samples)
    sample_every_n_steps: int = 0
    sample_every_n_epochs: int = 0
    sample_prompts: List[str] = field(default_factory=list)
    sample_seed: int = 1
    sample_steps: int = 20
    sample_cfg: float = 7.0
    # flow-matching models (Flux.1, SD3 / SD3.5; sd-scripts' names): training/flow.py, models/flow.py
    ae: str = ""  # COMPONENT_FILE_KEYS: separate component files of a single-file base model (Flux: ae, clip_l, t5xxl; SD3: + clip_g)
    clip_l: str = ""
    clip_g: str = ""
    t5xxl: str = ""
    components_folder: str = ""  # a diffusers folder with the other parts of a single-file transformer (Qwen-Image, Z-Image, Chroma, Wan, FLUX.2)
    vae: str = ""  # Qwen-Image, Z-Image, Chroma, Wan: the VAE file over components_folder's configs (qwen_image_vae, ae, wan_2.1_vae)
    text_encoder: str = ""  # the same for the text encoder file (qwen_2.5_vl_7b(_fp8_scaled), qwen_3_4b, t5xxl_fp16, umt5_xxl_fp16)
    timestep_sampling: str = "auto"  # auto (flux: shift, sd3: sigma) | sigma | uniform | sigmoid | shift | flux_shift
    discrete_flow_shift: Optional[float] = None  # default: flux 3.1582, sd3 the scheduler's shift (3.0)
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "auto"  # auto (sd3 + sigma: logit_normal) | none | uniform | logit_normal | mode | sigma_sqrt | cosmap
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 1.0  # Flux dev's guidance input while training
    wan_expert: str = "auto"  # Wan 2.2 A14B: low (transformer_2, timesteps < boundary) | high (transformer) | auto (the one loaded: low, or the file's)
    timestep_boundary: Optional[float] = None  # Wan 2.2 A14B: the experts' boundary (0..1 or 0..1000; default the folder's boundary_ratio, 0.875)
    t5xxl_max_token_length: Optional[int] = None  # default: flux-dev 512, flux-schnell 256, sd3 256
    apply_t5_attn_mask: bool = False
    fp8_base: bool = False  # frozen transformer Linear weights stored as float8_e4m3fn (LoRA stays fp32)
    blocks_to_swap: int = 0  # the last N transformer blocks' frozen weights live in CPU memory, moved in turn
    # kohya options (issue 18), with kohya's names and meanings; logic in lora_train/kohya/
    clip_skip: Optional[int] = None  # SD1/SD2: hidden state of layer -clip_skip + final layer norm (2 for anime SD1.5)
    max_token_length: int = 75  # 75 / 150 / 225: captions in 75-token chunks, each with BOS/EOS (as the WebUIs)
    shuffle_caption: bool = False
    keep_tokens: int = 0  # shuffle_caption / tag dropout keep the first N comma-separated tags
    keep_tokens_separator: str = ""  # e.g. "|||": the tags before it are kept (instead of keep_tokens)
    caption_tag_dropout_rate: float = 0.0
    num_repeats: int = 1  # repeats of the images directly in train_data_dir (kohya N_name subfolders keep their N)
    reg_data_dir: str = ""  # regularization images (kohya N_class folders), repeated to the train count
    prior_loss_weight: float = 1.0
    masked_loss: bool = False  # weight the loss per latent pixel by a mask (alpha_mask or mask_dir)
    alpha_mask: bool = False  # the mask is the image's alpha channel
    mask_dir: str = ""  # a folder of same-name grayscale masks (white = trained); kohya's conditioning_data_dir
    loss_type: str = "l2"  # l1 | l2 | huber | smooth_l1
    huber_schedule: str = "snr"  # constant | exponential | snr
    huber_c: float = 0.1
    huber_scale: float = 1.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    network_weights: str = ""  # start from this LoRA file (ours or kohya's layout)
    dim_from_weights: bool = False  # take the rank (and alpha) from network_weights
    down_lr_weight: str = ""  # block-wise lr factors: 12 (SD1) / 9 (SDXL) numbers "a,b,..." or a preset "sine+.5"
    mid_lr_weight: str = ""
    up_lr_weight: str = ""
    block_lr_zero_threshold: float = 0.0
    block_dims: str = ""  # rank per block: 25 numbers (SD1) / 23 (SDXL), 0 = no LoRA in that block
    block_alphas: str = ""
    ema_decay: float = 0.0  # EMA of the LoRA weights (e.g. 0.999; 0: off); the saved files are the EMA copy
    log_with: str = ""  # tensorboard | wandb | all | "" (off)
    logging_dir: str = ""  # default <output_dir>/logs
    log_prefix: str = ""

    # ------------------------------------------------------------------ helpers
    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def component_files(self) -> Dict[str, str]:
        """{"ae" / "clip_l" / "clip_g" / "t5xxl" / "components_folder" / "vae" / "text_encoder": path} of the
        separate component files given (single files), as models.loading.load_base_model takes them."""
        return {k: getattr(self, k) for k in COMPONENT_FILE_KEYS if getattr(self, k)}

    @property
    def te_lr(self) -> float:
        lr = self.learning_rate if self.learning_rate is not None else self.default_learning_rate
        return float(lr / 2 if self.text_encoder_lr is None else self.text_encoder_lr)

    @property
    def default_learning_rate(self) -> float:
        """The table's start lr for this config's effective batch (what an empty learning_rate becomes)."""
        return learning_rate_for(self.batch_size * self.gradient_accumulation_steps)

    @classmethod
    def keys(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Dict[str, Any], validate: bool = True) -> "TrainConfig":
        data = dict(data or {})
        known = {f.name: f for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(key, unknown_key_message(key, list(known)))
        cfg = cls()
        for key, value in data.items():
            setattr(cfg, key, coerce(key, value, known[key]))
        if validate:
            cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str, overrides: Optional[Dict[str, Any]] = None) -> "TrainConfig":
        if not os.path.isfile(path):
            raise ConfigError("config", f"config file '{path}' does not exist: check the path, or write one with "
                              f"`python -m lora_train suggest --images DIR --write config.yaml`.")
        with open(path, "r", encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError("config", f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("config", f"config file '{path}' must hold a mapping of key: value lines, "
                              f"got {type(data).__name__}.")
        data.update(overrides or {})
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str) -> None:
        atomic_write_text(path, self.to_yaml())

    def replace(self, **changes: Any) -> "TrainConfig":
        data = self.to_dict()
        if getattr(self, "_lr_from_batch", False) and "learning_rate" not in changes:
            data["learning_rate"] = None  # still the default: it follows a changed batch / accumulation
        data.update(changes)
        return TrainConfig.from_dict(data)

    # --------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        def need(cond: bool, key: str, allowed: str, todo: str) -> None:
            if not cond:
                raise ConfigError(key, f"{key} = {getattr(self, key)!r} is not valid: allowed {allowed}. {todo}")

        def positive_float(key: str, lo: float, hi: float, todo: str) -> None:
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and math.isfinite(v) and lo < v <= hi, key,
                 f"a number in ({lo:g}, {hi:g}]", todo)

        if self.learning_rate is None and isinstance(self.batch_size, int) and \
                isinstance(self.gradient_accumulation_steps, int):
            self.learning_rate = self.default_learning_rate
            self._lr_from_batch = True
        _optimization_checks(self, need, positive_float)
        _training_checks(self, need)
        _data_and_output_checks(self, need)
        _flow_checks(self, need)
        validate_kohya_options(self, need)
        return self


def _optimization_checks(cfg: "TrainConfig", need, positive_float) -> None:
    """Learning rates, network size, batch, length, schedule, optimizer, NaN policy."""
    positive_float("learning_rate", 0.0, 1.0, "A usual start is 1e-4 at batch 1, 1.5e-4 at 2, 2e-4 at 4 (1e-4 "
                                               "for fewer than ~50 images); leave it empty for that.")
    if cfg.text_encoder_lr is not None:
        positive_float("text_encoder_lr", 0.0, 1.0, "A usual value is half the UNet learning rate, e.g. 5e-5..1e-4.")
    need(isinstance(cfg.lora_rank, int) and 1 <= cfg.lora_rank <= 1024, "lora_rank", "an integer 1..1024",
         "Use 4-6 for a simple style, 8-12 for faces or a specific style, 16 as an upper bound for most.")
    if cfg.lora_alpha is not None:
        need(isinstance(cfg.lora_alpha, (int, float)) and math.isfinite(cfg.lora_alpha)
             and 0 < cfg.lora_alpha <= 4096, "lora_alpha", "a number in (0, 4096]",
             "Leave it empty to use alpha = rank (scale 1.0), or use rank/2.")
    _network_checks(cfg, need)
    need(isinstance(cfg.batch_size, int) and 1 <= cfg.batch_size <= 1024, "batch_size", "an integer 1..1024",
         "Use 1-2 on 8 GB cards, 4 on 12-16 GB.")
    need(isinstance(cfg.gradient_accumulation_steps, int) and 1 <= cfg.gradient_accumulation_steps <= 1024,
         "gradient_accumulation_steps", "an integer 1..1024", "Use 1 unless you need a larger effective batch.")
    need(isinstance(cfg.epochs, int) and 1 <= cfg.epochs <= 100000, "epochs", "an integer 1..100000",
         "A usual run is 10-20 epochs.")
    if cfg.max_train_steps is not None:
        need(isinstance(cfg.max_train_steps, int) and 1 <= cfg.max_train_steps <= 10_000_000, "max_train_steps",
             "an integer >= 1 (or empty to use epochs)", "Remove it to train by epochs.")
    need(cfg.lr_scheduler in SCHEDULERS, "lr_scheduler", ", ".join(SCHEDULERS),
         "cosine with 100-200 warmup steps is the sane default.")
    need(isinstance(cfg.lr_warmup_steps, int) and 0 <= cfg.lr_warmup_steps <= 1_000_000, "lr_warmup_steps",
         "an integer >= 0", "Use 100-200 steps (fewer for very short runs).")
    need(isinstance(cfg.lr_scheduler_num_cycles, int) and cfg.lr_scheduler_num_cycles >= 1,
         "lr_scheduler_num_cycles", "an integer >= 1", "Use 1 unless you want restarts.")
    need(cfg.optimizer in OPTIMIZERS, "optimizer", ", ".join(OPTIMIZERS),
         "Use AdamW (AdamW8bit saves memory on CUDA; Prodigy sets its own lr: use learning_rate 1 with it).")
    need(isinstance(cfg.optimizer_args, dict), "optimizer_args", "a mapping such as {decouple: true}",
         "Write optimizer_args as key: value pairs.")
    need(cfg.nan_policy in NAN_POLICIES, "nan_policy", ", ".join(NAN_POLICIES),
         "Use stop (default) or recover (roll back, halve lr, add warmup).")
    need(isinstance(cfg.nan_max_recoveries, int) and 0 <= cfg.nan_max_recoveries <= 100, "nan_max_recoveries",
         "an integer 0..100", "3 is a sane limit.")

def _training_checks(cfg: "TrainConfig", need) -> None:
    """Resumable states, noise and loss options, validation split, resolution, seed, precision."""
    for k in ("save_state_every_n_steps", "save_state_every_n_epochs"):
        need(isinstance(getattr(cfg, k), int) and getattr(cfg, k) >= 0, k, "an integer >= 0 (0: off)",
             "Use 1 epoch, or a few hundred steps for long epochs.")
    need(isinstance(cfg.save_state_keep, int) and cfg.save_state_keep >= 1, "save_state_keep",
         "an integer >= 1", "2 keeps the last two resumable states.")
    need(isinstance(cfg.noise_offset, (int, float)) and 0 <= cfg.noise_offset <= 1, "noise_offset",
         "a number in [0, 1]", "0.05-0.1 helps very dark/bright images; 0 turns it off.")
    if cfg.min_snr_gamma is not None:
        need(isinstance(cfg.min_snr_gamma, (int, float)) and 0 < cfg.min_snr_gamma <= 100, "min_snr_gamma",
             "a number in (0, 100] or empty", "5 is the published value.")
    need(isinstance(cfg.caption_dropout_rate, (int, float)) and 0 <= cfg.caption_dropout_rate < 1,
         "caption_dropout_rate", "a number in [0, 1)", "0.05-0.1, or 0 to turn it off.")
    need(isinstance(cfg.validation_split, (int, float)) and 0 <= cfg.validation_split < 0.5,
         "validation_split", "a number in [0, 0.5)", "0.1 holds out 10% of the images for a validation loss.")
    need(isinstance(cfg.weight_decay, (int, float)) and 0 <= cfg.weight_decay <= 1, "weight_decay",
         "a number in [0, 1]", "A usual value is 0.01.")
    need(isinstance(cfg.max_grad_norm, (int, float)) and 0 <= cfg.max_grad_norm <= 1e6, "max_grad_norm",
         "a number >= 0 (0 disables clipping)", "A usual value is 1.0.")
    need(isinstance(cfg.resolution, int) and 32 <= cfg.resolution <= 4096 and cfg.resolution % 8 == 0,
         "resolution", "a multiple of 8 in 32..4096", "Use 512 for SD1.x, 768 for SD2-v, 1024 for SDXL.")
    need(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2 ** 63, "seed", "an integer >= 0", "Any fixed number.")
    need(cfg.mixed_precision in PRECISIONS, "mixed_precision", ", ".join(PRECISIONS),
         "Use bf16 on RTX 30xx or newer, fp16 on older cards, no on CPU.")
    need(cfg.prediction_type in PREDICTION_TYPES, "prediction_type", ", ".join(PREDICTION_TYPES),
         "Leave it on auto: the base model's scheduler says what it predicts.")

def _data_and_output_checks(cfg: "TrainConfig", need) -> None:
    """Caches, buckets, the files a run writes, samples and logs."""
    for k in ("latent_cache", "text_cache"):
        need(getattr(cfg, k) in CACHE_MODES, k, ", ".join(CACHE_MODES),
             "memory is fastest; disk keeps memory flat for large datasets and is reused by the next run.")
    need(isinstance(cfg.cache_dir, str), "cache_dir", "a folder path or empty", "Leave it empty for <output_dir>/cache.")
    need(isinstance(cfg.bucket_reso_steps, int) and cfg.bucket_reso_steps >= 8 and cfg.bucket_reso_steps % 8 == 0,
         "bucket_reso_steps", "a multiple of 8 (>= 8)", "64 is usual; 32 for finer buckets.")
    for k in ("min_bucket_reso", "max_bucket_reso"):
        v = getattr(cfg, k)
        if v is not None:
            need(isinstance(v, int) and 32 <= v <= 8192 and v % 8 == 0, k, "a multiple of 8 in 32..8192 or empty",
                 "Leave it empty for resolution/2 .. resolution*2.")
    if cfg.min_bucket_reso is not None and cfg.max_bucket_reso is not None:
        need(cfg.min_bucket_reso <= cfg.resolution <= cfg.max_bucket_reso, "max_bucket_reso",
             f"min_bucket_reso <= resolution ({cfg.resolution}) <= max_bucket_reso",
             "Widen the bucket range around the resolution.")
    need(isinstance(cfg.save_every_n_steps, int) and cfg.save_every_n_steps >= 0, "save_every_n_steps",
         "an integer >= 0 (0: off)", "Use a few hundred steps for long epochs, or 0.")
    need(isinstance(cfg.save_every_n_epochs, int) and cfg.save_every_n_epochs >= 0, "save_every_n_epochs",
         "an integer >= 0 (0: only the final file)", "Use 1 to compare epochs afterwards.")
    for k in ("sample_every_n_steps", "sample_every_n_epochs"):
        need(isinstance(getattr(cfg, k), int) and getattr(cfg, k) >= 0, k, "an integer >= 0 (0: off)",
             "Use 0 to turn samples off, or e.g. 1 epoch.")
    need(isinstance(cfg.sample_steps, int) and 1 <= cfg.sample_steps <= 200, "sample_steps", "1..200",
         "20-30 steps are usual.")
    need((cfg.sample_every_n_steps == 0 and cfg.sample_every_n_epochs == 0) or bool(cfg.sample_prompts),
         "sample_prompts", "at least one prompt when sampling is on",
         "Add sample_prompts (e.g. your trigger word and a short scene), or set the sample_every_* keys to 0.")
    need(isinstance(cfg.log_every_n_steps, int) and cfg.log_every_n_steps >= 1, "log_every_n_steps",
         "an integer >= 1", "Use 1, or 10 for long runs.")
    need(isinstance(cfg.output_name, str) and cfg.output_name.strip() != ""
         and not any(c in cfg.output_name for c in '/\\:*?"<>|'), "output_name",
         "a non-empty file name without / \\ : * ? \" < > |", "Use letters, digits, _ and -.")
    need(isinstance(cfg.output_dir, str) and cfg.output_dir.strip() != "", "output_dir", "a folder path",
         "Set it to the folder where the LoRA files should go.")
    need(isinstance(cfg.caption_extension, str) and cfg.caption_extension.startswith("."), "caption_extension",
         "an extension starting with '.', e.g. .txt", "Use .txt.")

def _flow_checks(cfg: "TrainConfig", need) -> None:
    """Flux / SD3 options and the base model."""
    need(cfg.timestep_sampling in TIMESTEP_SAMPLINGS, "timestep_sampling", ", ".join(TIMESTEP_SAMPLINGS),
         "Leave it on auto (Flux: shift, SD3: sigma with logit_normal).")
    need(cfg.weighting_scheme in WEIGHTING_SCHEMES, "weighting_scheme", ", ".join(WEIGHTING_SCHEMES),
         "Leave it on auto.")
    if cfg.discrete_flow_shift is not None:
        need(isinstance(cfg.discrete_flow_shift, (int, float)) and 0 < cfg.discrete_flow_shift <= 100,
             "discrete_flow_shift", "a number in (0, 100] or empty", "3.1582 for Flux, 3.0 for SD3.")
    for k in ("sigmoid_scale", "logit_std", "mode_scale"):
        need(isinstance(getattr(cfg, k), (int, float)) and 0 < getattr(cfg, k) <= 100, k, "a number in (0, 100]",
             "Leave the default (1.0; mode_scale 1.29).")
    need(isinstance(cfg.guidance_scale, (int, float)) and 0 <= cfg.guidance_scale <= 100, "guidance_scale",
         "a number in [0, 100]", "Use 1.0 to train Flux dev (sd-scripts' default).")
    need(cfg.wan_expert in ("auto", "low", "high"), "wan_expert", "auto, low or high",
         "low trains Wan 2.2 A14B's low-noise expert (detail, likeness), high its high-noise expert (layout).")
    if cfg.timestep_boundary is not None:
        need(isinstance(cfg.timestep_boundary, (int, float)) and 0 < cfg.timestep_boundary < 1000
             and cfg.timestep_boundary != 1, "timestep_boundary", "a number in (0, 1) or (1, 1000), or empty",
             "Leave it empty: Wan 2.2 T2V A14B switches experts at 0.875 (875).")
    if cfg.t5xxl_max_token_length is not None:
        need(isinstance(cfg.t5xxl_max_token_length, int) and 1 <= cfg.t5xxl_max_token_length <= 512,
             "t5xxl_max_token_length", "an integer 1..512 or empty", "Flux dev uses 512, schnell and SD3 256.")
    need(isinstance(cfg.blocks_to_swap, int) and 0 <= cfg.blocks_to_swap <= 100, "blocks_to_swap",
         "an integer 0..100", "0 keeps every block on the GPU; 8-20 for Flux on 10-12 GB cards.")
    need(isinstance(cfg.base_model, str) and cfg.base_model.strip() != "", "base_model",
         "'tiny', a diffusers folder or a checkpoint file", "Point it at your model.")


def _network_checks(cfg: "TrainConfig", need) -> None:
    need(cfg.network_type in NETWORK_TYPES, "network_type", ", ".join(NETWORK_TYPES),
         "lora is the default; locon adds the ResNet convolutions (styles, textures); loha / lokr are smaller "
         "LyCORIS types; dora often learns better at a lower lr.")
    need(isinstance(cfg.conv_rank, int) and 0 <= cfg.conv_rank <= 1024, "conv_rank", "an integer 0..1024 (0: off)",
         "Use 4-8 (LoCon), or 0 to train only the attention layers.")
    if cfg.conv_alpha is not None:
        need(isinstance(cfg.conv_alpha, (int, float)) and math.isfinite(cfg.conv_alpha) and 0 < cfg.conv_alpha <= 4096,
             "conv_alpha", "a number in (0, 4096] or empty", "Leave it empty for conv_alpha = conv_rank.")
    need(isinstance(cfg.factor, int) and (cfg.factor == -1 or cfg.factor >= 1), "factor", "-1 or an integer >= 1",
         "-1 picks the factor automatically; 4-16 are usual for LoKr.")
    allowed = NETWORK_DROPOUTS.get(cfg.network_type, ())
    for k in ("dropout", "rank_dropout", "module_dropout"):
        v = getattr(cfg, k)
        need(isinstance(v, (int, float)) and 0 <= v < 1, k, "a number in [0, 1)", "0.1 is a usual value; 0 is off.")
        if v and k not in allowed:
            raise ConfigError(k, f"{k} = {v!r} does not apply to network_type {cfg.network_type}: it has "
                                 f"{', '.join(allowed) or 'none'}. Set {k} to 0.")
    if cfg.full_matrix and cfg.network_type != "lokr":
        raise ConfigError("full_matrix", f"full_matrix is a LoKr option (network_type is {cfg.network_type}): "
                                         f"set it to false or use network_type lokr.")
    if cfg.loraplus_lr_ratio is not None:
        need(isinstance(cfg.loraplus_lr_ratio, (int, float)) and math.isfinite(cfg.loraplus_lr_ratio)
             and 0 < cfg.loraplus_lr_ratio <= 1000, "loraplus_lr_ratio", "a number in (0, 1000] or empty",
             "16 is the LoRA+ paper's value; leave it empty to train every matrix at the same lr.")
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
LOG_WITH = ("", "tensorboard", "wandb", "all")


def validate_kohya_options(cfg: "TrainConfig", need) -> None:
    """The kohya options' ranges (issue 18); block-wise lists are checked where the model kind is known."""
    if cfg.clip_skip is not None:
        need(isinstance(cfg.clip_skip, int) and 1 <= cfg.clip_skip <= 12, "clip_skip", "an integer 1..12 or empty",
             "Use 2 for anime SD1.5 models (NovelAI-derived), else leave it empty (= 1).")
    need(cfg.max_token_length in (75, 150, 225), "max_token_length", "75, 150 or 225",
         "Use 225 for long tag captions, else 75.")
    need(isinstance(cfg.num_repeats, int) and 1 <= cfg.num_repeats <= 10000, "num_repeats", "an integer >= 1",
         "kohya's usual 10 for 10-20 images, 1 for a few hundred.")
    need(isinstance(cfg.keep_tokens, int) and 0 <= cfg.keep_tokens <= 1000, "keep_tokens", "an integer >= 0",
         "Use 1 to keep the trigger word first while shuffling.")
    for k in ("caption_tag_dropout_rate",):
        need(isinstance(getattr(cfg, k), (int, float)) and 0 <= getattr(cfg, k) < 1, k, "a number in [0, 1)",
             "0.1 drops one tag in ten; 0 turns it off.")
    need(isinstance(cfg.prior_loss_weight, (int, float)) and 0 <= cfg.prior_loss_weight <= 100, "prior_loss_weight",
         "a number in [0, 100]", "1.0 is kohya's default.")
    need(cfg.loss_type in LOSS_TYPES, "loss_type", ", ".join(LOSS_TYPES), "l2 is the usual loss; huber is robust "
         "to outliers.")
    need(cfg.huber_schedule in HUBER_SCHEDULES, "huber_schedule", ", ".join(HUBER_SCHEDULES), "snr is kohya's default.")
    need(isinstance(cfg.huber_c, (int, float)) and 0 < cfg.huber_c <= 10, "huber_c", "a number in (0, 10]",
         "0.1 is kohya's default.")
    need(isinstance(cfg.huber_scale, (int, float)) and 0 < cfg.huber_scale <= 100, "huber_scale", "a number in (0, 100]",
         "1.0 is kohya's default.")
    need(isinstance(cfg.multires_noise_iterations, int) and 0 <= cfg.multires_noise_iterations <= 20,
         "multires_noise_iterations", "an integer 0..20 (0: off)", "6-10 is usual.")
    need(isinstance(cfg.multires_noise_discount, (int, float)) and 0 <= cfg.multires_noise_discount <= 1,
         "multires_noise_discount", "a number in [0, 1]", "0.3 is kohya's default; 0.1 is common.")
    need(isinstance(cfg.ip_noise_gamma, (int, float)) and 0 <= cfg.ip_noise_gamma <= 1, "ip_noise_gamma",
         "a number in [0, 1]", "0.1 is the published value; 0 turns it off.")
    need(isinstance(cfg.block_lr_zero_threshold, (int, float)) and 0 <= cfg.block_lr_zero_threshold <= 1,
         "block_lr_zero_threshold", "a number in [0, 1]", "0 keeps every block.")
    need(isinstance(cfg.ema_decay, (int, float)) and (cfg.ema_decay == 0 or 0.5 <= cfg.ema_decay < 1), "ema_decay",
         "0 (off) or a number in [0.5, 1)", "0.999 is usual for long runs, 0.99 for short ones.")
    need(cfg.log_with in LOG_WITH, "log_with", "tensorboard, wandb, all or empty", "Use tensorboard.")
    need(not cfg.masked_loss or cfg.alpha_mask or bool(cfg.mask_dir), "masked_loss",
         "masked_loss with alpha_mask: true or a mask_dir", "Set alpha_mask: true (the images' alpha channel) or "
         "mask_dir to a folder of same-name grayscale masks.")
    need(not cfg.dim_from_weights or bool(cfg.network_weights), "dim_from_weights",
         "true only with network_weights", "Set network_weights to the LoRA file to start from.")
    need(bool(cfg.block_dims) or not cfg.block_alphas, "block_alphas", "block_alphas only with block_dims",
         "Give block_dims too (one rank per block).")


def unknown_key_message(key: str, valid: List[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'.{hint} Valid keys: {', '.join(valid)}."


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    raise ConfigError(key, f"{key} = {value!r} is not valid: allowed true or false.")


def coerce(key: str, value: Any, f: "dataclasses.Field") -> Any:
    """Convert a YAML/CLI value to the field's type, with a message naming key and value on failure."""
    default = f.default
    typ = str(f.type)
    if typ == "str" and isinstance(value, str):
        return value
    if typ == "str" and isinstance(value, bool):  # YAML 1.1 reads `mixed_precision: no` as False
        return "yes" if value else "no"
    if typ.startswith("Dict"):
        if value is None:
            return {}
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        raise ConfigError(key, f"{key} = {value!r} is not valid: allowed a mapping such as {{weight_decay: 0.01}}.")
    if typ.startswith("List"):
        if value is None:
            return []
        if isinstance(value, str):
            return [v.strip() for v in value.replace("\n", "|").split("|") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(key, f"{key} = {value!r} is not valid: allowed a list of texts (or one text with | "
                               f"between prompts).")
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if "Optional" in typ:
            return None
        if typ == "str":
            return ""
        raise ConfigError(key, f"{key} is empty: it needs a value (default {default!r}).")
    try:
        if "bool" in typ:
            return _parse_bool(key, value)
        if "int" in typ and "float" not in typ:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if "float" in typ:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        kind = "an integer" if ("int" in typ and "float" not in typ) else "a number"
        raise ConfigError(key, f"{key} = {value!r} is not valid: allowed {kind} (default {default!r}).") from None


def parse_overrides(argv: List[str]) -> Dict[str, Any]:
    """`--key value` / `--key=value` / `--flag` pairs into a dict (values parsed as YAML scalars)."""
    out: Dict[str, Any] = {}
    i = 0
    valid = TrainConfig.keys()
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(tok, f"unexpected argument '{tok}': overrides are written --key value.")
        tok = tok[2:]
        if "=" in tok:
            key, raw = tok.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, raw = tok, argv[i + 1]
            i += 2
        else:
            key, raw = tok, "true"
            i += 1
        key = key.replace("-", "_")
        if key not in valid:
            raise ConfigError(key, unknown_key_message(key, valid))
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            out[key] = raw
    return out
