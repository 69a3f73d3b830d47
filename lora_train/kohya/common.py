"""kohya config reading: the errors, the key tables (names that differ, keys with no effect here, kohya's
defaults), reading TOML / JSON files and kohya's value forms ("k=v" lists, resolutions, paths)."""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..config import OPTIMIZERS, ConfigError, TrainConfig




class KohyaConfigError(ConfigError):
    """A kohya key we cannot honour and must not ignore; the message names it and says what to do."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)


@dataclass
class KohyaImport:
    config: TrainConfig
    data: Dict[str, Any]  # our keys -> values taken from the file(s)
    warnings: List[str] = field(default_factory=list)
    not_used: Dict[str, Any] = field(default_factory=dict)  # kohya key -> value, listed in warnings[0]
    sources: List[str] = field(default_factory=list)


# keys that have no effect on what is trained here (performance, workers, where kohya logs its console, secrets)
NO_EFFECT = {
    "xformers", "sdpa", "mem_eff_attn", "max_data_loader_n_workers", "persistent_data_loader_workers", "lowram",
    "highvram", "cache_latents", "vae_batch_size", "num_cpu_threads_per_process", "wandb_api_key", "wandb_run_name",
    "log_tracker_name", "log_tracker_config", "console_log_level", "console_log_file", "console_log_simple",
    "cache_text_encoder_outputs", "sdxl_cache_text_encoder_outputs", "ui_custom_params", "enable_preview",
    "model_list", "save_model_as", "debug_dataset", "skip_cache_check", "save_last_n_epochs", "save_last_n_steps",
    "save_last_n_epochs_state", "save_last_n_steps_state", "save_state_on_train_end", "caption_metadata_filename",
    "gpu_ids", "multi_gpu", "num_processes", "num_machines", "main_process_port", "dynamo_backend",
    "extra_accelerate_launch_args", "save_as_bool", "use_wandb", "lowvram", "save_every_weights",
    "sample_sampler", "huggingface_repo_id", "async_upload", "full_bf16", "mixed_precision_type",
    "lr_scheduler_type", "stop_text_encoder_training", "no_half_vae", "sdxl_no_half_vae", "dataset_config",
    "pretrained_model_name_or_path_type", "train_on_input", "output_name_type", "sdxl", "v2", "model_train_type",
    "constrain", "rescaled", "flux1_checkbox",
}
KOHYA_DEFAULTS = {  # kohya / kohya_ss defaults of keys we do not use: not listed when they have these values
    "max_timestep": 1000, "min_timestep": 0, "factor": -1, "conv_alpha": 1, "token_warmup_min": 1,
    "huber_scale": 1.0, "multires_noise_discount": 0.3, "noise_offset_type": "Original", "LoRA_type": "Standard",
    "sample_sampler": "euler_a", "save_model_as": "safetensors", "LyCORIS_preset": "full", "train_blocks": "all",
}
KOHYA_NAMES = {  # kohya key -> our key, where only the name differs
    "pretrained_model_name_or_path": "base_model",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "epoch": "epochs",
    "lr_restart_cycles": "lr_scheduler_num_cycles",
    "lora_network_weights": "network_weights",
    "conditioning_data_dir": "mask_dir",
}
OPTIONAL_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if "Optional" in str(f.type)}
OPTIMIZER_NAMES = {o.lower(): o for o in OPTIMIZERS}
KV_LIST_KEYS = ("network_args", "optimizer_args")  # kohya's ["k=v", ...] arguments
NETWORK_ARG_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                    "block_alphas")
SUBSET_KEYS = ("image_dir", "num_repeats", "is_reg", "class_tokens", "caption_extension", "keep_tokens",
               "keep_tokens_separator", "shuffle_caption", "flip_aug", "caption_dropout_rate",
               "caption_tag_dropout_rate", "alpha_mask", "conditioning_data_dir", "caption_prefix", "caption_suffix",
               "color_aug", "random_crop", "face_crop_aug_range", "token_warmup_min", "token_warmup_step",
               "caption_dropout_every_n_epochs", "secondary_separator", "enable_wildcard", "cache_info",
               "metadata_file", "custom_attributes", "caption_separator")
CAPTION_OPTIONS = ("caption_extension", "keep_tokens", "keep_tokens_separator", "shuffle_caption", "flip_aug",
                   "caption_dropout_rate", "caption_tag_dropout_rate", "alpha_mask")
DATASET_KEYS = {"resolution": "resolution", "batch_size": "batch_size", "enable_bucket": "enable_bucket",
                "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso",
                "bucket_reso_steps": "bucket_reso_steps", "bucket_no_upscale": "bucket_no_upscale",
                "validation_split": "validation_split", "validation_seed": "validation_seed"}


# ------------------------------------------------------------------------------------------------ reading files
def _toml_parser():
    """tomllib (Python 3.11+) or tomli (3.10): imported when a TOML is read, so that a host without tomli (a
    WebUI on Python 3.10) loads the trainer and only a kohya TOML needs it."""
    try:
        import tomllib  # novermin  (Python 3.11+; 3.10 uses tomli below)
    except ImportError:
        try:
            import tomli as tomllib  # Python 3.10: the same parser as a package (requirements.txt)
        except ImportError:
            raise KohyaConfigError("config", "reading a kohya .toml on Python 3.10 needs the 'tomli' package: "
                                   "`pip install tomli` (or give a kohya_ss .json).") from None
    return tomllib


def read_file(path: str) -> Dict[str, Any]:
    """A kohya .toml or kohya_ss .json as a dict (with a clear error for bad syntax)."""
    if not os.path.isfile(path):
        raise KohyaConfigError("config", f"kohya config '{path}' does not exist: check the path.")
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise KohyaConfigError("config", f"'{path}' is not valid JSON: {exc}") from exc
    else:
        tomllib = _toml_parser()
        with open(path, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise KohyaConfigError("config", f"'{path}' is not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise KohyaConfigError("config", f"'{path}' must hold key = value pairs.")
    return data


def is_kohya_path(path: str) -> bool:
    return path.lower().endswith((".toml", ".json"))


def is_dataset_config(data: Dict[str, Any]) -> bool:
    return isinstance(data.get("datasets"), list)


def flatten(data: Dict[str, Any]) -> Dict[str, Any]:
    """sd-scripts' read_config_from_file: the keys of every [section] go to the top level (network_args /
    optimizer_args given as a table are the arguments themselves)."""
    out: Dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in KV_LIST_KEYS:
            out.update(v)
        else:
            out[k] = v
    return out


def is_default(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0) \
        or (isinstance(v, (str, list, dict)) and len(v) == 0)


def resolve_path(p: str, base_dir: str) -> str:
    """kohya resolves relative paths against the working folder; where that does not exist but the path does next
    to the config file, the config's folder is meant."""
    if not p or os.path.isabs(p) or os.path.exists(p):
        return p
    cand = os.path.join(base_dir, p)
    return cand if os.path.exists(cand) else p


def _parse_value(s: str) -> Any:
    s = s.strip()
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        low = s.lower()
        if low in ("true", "false"):
            return low == "true"
        return s


def parse_kv_list(items: Any, key: str) -> Dict[str, Any]:
    """kohya's optimizer_args / network_args: ["k=v", ...] (or one string "k=v k=v") -> {k: v}."""
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        items = items.split()
    out: Dict[str, Any] = {}
    for it in items or []:
        if not isinstance(it, str) or "=" not in it:
            raise KohyaConfigError(key, f"{key} entry {it!r} is not key=value: write e.g. [\"weight_decay=0.01\"].")
        k, v = it.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def parse_resolution(v: Any, key: str) -> Tuple[int, Optional[str]]:
    """kohya resolution "512" / "512,768" / [512, 768] -> (our square side, a note when it was not square)."""
    if isinstance(v, (list, tuple)):
        nums = [int(x) for x in v]
    else:
        nums = [int(float(x)) for x in str(v).replace("x", ",").split(",") if x.strip()]
    if not nums or len(nums) > 2:
        raise KohyaConfigError(key, f"{key} = {v!r} is not a resolution: write \"512\" or \"512,768\".")
    if len(nums) == 1 or nums[0] == nums[1]:
        return nums[0], None
    side = int(round(math.sqrt(nums[0] * nums[1]) / 8.0)) * 8
    return side, (f"{key} {nums[0]}x{nums[1]} is not square: training uses resolution {side} (the same area); "
                  f"turn on enable_bucket to keep aspect ratios")


