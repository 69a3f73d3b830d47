"""The tab's "Advanced (kohya options)" fields and "Load kohya config" (no gradio: plain values in and out).

Every field has kohya's name and meaning (TrainConfig). A loaded kohya .toml / kohya_ss .json fills the tab's
fields it has, and its path stays in the hidden `kohya_config` setting, so `build_config` starts from everything the
file maps (also keys the tab has no field for, e.g. min_snr_gamma) and the fields override it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import HUBER_SCHEDULES, LOG_WITH, LOSS_TYPES, ConfigError, TrainConfig
from ..kohya.toml_config import FRONT_DOOR_OWNED, layer_config, load_kohya

#: (key, field_type, label, choices): field_type number | int | bool | text | choice
FIELDS: List[Tuple[str, str, str, Sequence[str]]] = [
    ("clip_skip", "int", "clip_skip (0 or 1: off; 2 for anime SD1.5 models)", ()),
    ("max_token_length", "choice", "max_token_length (long captions: 150 / 225)", ("75", "150", "225")),
    ("shuffle_caption", "bool", "shuffle_caption", ()),
    ("keep_tokens", "int", "keep_tokens (tags kept in front when shuffling)", ()),
    ("keep_tokens_separator", "text", "keep_tokens_separator (e.g. |||)", ()),
    ("caption_tag_dropout_rate", "number", "caption_tag_dropout_rate", ()),
    ("reg_data_dir", "text", "reg_data_dir (regularization images, kohya N_class folders)", ()),
    ("prior_loss_weight", "number", "prior_loss_weight", ()),
    ("masked_loss", "bool", "masked_loss", ()),
    ("alpha_mask", "bool", "alpha_mask (the images' alpha channel is the mask)", ()),
    ("mask_dir", "text", "mask_dir (same-name grayscale masks)", ()),
    ("loss_type", "choice", "loss_type", LOSS_TYPES),
    ("huber_schedule", "choice", "huber_schedule", HUBER_SCHEDULES),
    ("huber_c", "number", "huber_c", ()),
    ("multires_noise_iterations", "int", "multires_noise_iterations (0: off)", ()),
    ("multires_noise_discount", "number", "multires_noise_discount", ()),
    ("ip_noise_gamma", "number", "ip_noise_gamma (0: off)", ()),
    ("network_weights", "text", "network_weights (start from this LoRA file)", ()),
    ("dim_from_weights", "bool", "dim_from_weights", ()),
    ("down_lr_weight", "text", "down_lr_weight (12 / 9 numbers, or sine, cosine, ...)", ()),
    ("mid_lr_weight", "text", "mid_lr_weight", ()),
    ("up_lr_weight", "text", "up_lr_weight", ()),
    ("block_lr_zero_threshold", "number", "block_lr_zero_threshold", ()),
    ("block_dims", "text", "block_dims (25 ranks SD1 / 23 SDXL)", ()),
    ("block_alphas", "text", "block_alphas", ()),
    ("wan_expert", "choice", "wan_expert (Wan 2.2 A14B: the expert this LoRA is for; auto: low, or the file's)",
     ("auto", "low", "high")),
    ("ema_decay", "number", "ema_decay (0: off; e.g. 0.999)", ()),
    ("log_with", "choice", "log_with", LOG_WITH),
    ("logging_dir", "text", "logging_dir (default <output>/logs)", ()),
    ("log_prefix", "text", "log_prefix", ()),
]
KEYS = [f[0] for f in FIELDS]
#: the tab's setting keys this module adds (the hidden kohya file path first)
TAB_KEYS = ["kohya_config"] + KEYS
TAB_OWNED = FRONT_DOOR_OWNED  # the tab decides its folder, run name and run folder


def default_values() -> Dict[str, Any]:
    d = TrainConfig().validate()
    out: Dict[str, Any] = {"kohya_config": ""}
    for key, field_type, _label, _ch in FIELDS:
        v = getattr(d, key)
        out[key] = _to_field(field_type, v)
    return out


def _to_field(field_type: str, v: Any) -> Any:
    if field_type == "choice":
        return str(v)
    if field_type == "int":
        return int(v or 0)
    if field_type == "number":
        return float(v or 0)
    if field_type == "bool":
        return bool(v)
    return "" if v is None else str(v)


def config_values(values: Dict[str, Any]) -> Dict[str, Any]:
    """The config keys of the Advanced fields present in `values` (tab field values -> TrainConfig values)."""
    out: Dict[str, Any] = {}
    for key, field_type, _label, _ch in FIELDS:
        if key not in values or values[key] is None:
            continue
        v = values[key]
        if key == "clip_skip":
            out[key] = int(v) if v and int(v) > 1 else None
        elif key == "max_token_length":
            out[key] = int(v or 75)
        elif field_type == "int":
            out[key] = int(v or 0)
        elif field_type == "number":
            out[key] = float(v or 0)
        elif field_type == "bool":
            out[key] = bool(v)
        else:
            out[key] = str(v).strip()
    return out


def with_kohya_file(values: Dict[str, Any], fields: Dict[str, Any]) -> Dict[str, Any]:
    """The tab's config keys: the loaded kohya file, then the tab's fields, then the Advanced fields that are set
    (kohya.toml_config.layer_config, the precedence the ComfyUI node uses too)."""
    path = (values.get("kohya_config") or "").strip()
    try:
        return layer_config(path, fields, config_values(values))
    except ConfigError as exc:
        raise ValueError(f"kohya config '{path}': {exc}") from None


def load_for_tab(path: str, setting_keys: Sequence[str]) -> Tuple[Dict[str, Any], Optional[str], str]:
    """(values for the tab's setting fields, dataset folder or None, a Markdown message) of a kohya file."""
    path = (path or "").strip().strip('"')
    imp = load_kohya(path)
    cfg = imp.config
    values: Dict[str, Any] = {"kohya_config": path}
    for key in setting_keys:
        if key in KEYS:
            field_type = next(f[1] for f in FIELDS if f[0] == key)
            values[key] = _to_field(field_type, getattr(cfg, key))
        elif key in imp.data and hasattr(cfg, key):
            v = getattr(cfg, key)
            values[key] = 0 if v is None else v
    if "lora_alpha" in setting_keys:
        values["lora_alpha"] = cfg.alpha
    if "max_train_steps" in setting_keys:
        values["max_train_steps"] = cfg.max_train_steps or 0
    lines = [f"Loaded **{path}** ({len(imp.data)} setting(s)); the fields below show them, and the keys without "
             f"a field (e.g. optimizer_args, min_snr_gamma) are used as the file says."]
    lines += [f"- {w}" for w in imp.warnings]
    return values, (cfg.train_data_dir or None), "\n".join(lines)
