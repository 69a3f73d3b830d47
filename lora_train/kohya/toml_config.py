"""kohya configs -> TrainConfig, and TrainConfig -> kohya TOML.

Read: the TOML files sd-scripts takes with `--config_file` (flat, or in sections such as SD-Trainer's
[model_arguments] / [training_arguments] / ...: sd-scripts flattens the sections, so do we), kohya_ss GUI's saved
.json / .toml (flat, with GUI names such as `epoch`, `max_resolution`, `lr_warmup` in percent, `LoRA_type`), and
sd-scripts' `dataset_config` TOML ([general], [[datasets]], [[datasets.subsets]] with image_dir, num_repeats,
class_tokens, is_reg, ...), referenced by `dataset_config = "..."` or given alone.

Networks (KOHYA_NETWORKS, read by import and export): networks.lora (with conv_dim: kohya's LoCon, our locon),
networks.lora_flux (Flux.1), networks.lora_sd3 (SD3 / SD3.5), lycoris.kohya with algo=lora|locon|loha|lokr
(dora_wd=True with lora / locon: our dora), and kohya_ss GUI's LoRA_type values that build them. A family module
that does not match a base model we can tell without loading it is an error; otherwise the family comes from the
model file.

Every key is either mapped to ours, accepted as having no effect here (xformers, worker counts, ...), or listed in
ONE warning (`KohyaImport.warnings[0]`, "not used: ..."). A key whose loss would silently change what is trained
(a network or network_args option we do not train, such as networks.oft, algo=ia3 or use_tucker; an optimizer or
scheduler we do not have; a fine-tuning dataset) is an error (KohyaConfigError) that names it and says what to do.
Keys at their kohya default (false, 0, "") are not listed.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..config import OPTIMIZERS, SCHEDULERS, ConfigError, TrainConfig
from ..data.folder import REPEAT_RE
from ..io_utils import atomic_write_text


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


def _is_default(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0) \
        or (isinstance(v, (str, list, dict)) and len(v) == 0)


def _resolve_path(p: str, base_dir: str) -> str:
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


def _resolution(v: Any, key: str) -> Tuple[int, Optional[str]]:
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


# ------------------------------------------------------------------------------------------------ dataset_config
def map_dataset_config(dc: Dict[str, Any], base_dir: str) -> Tuple[Dict[str, Any], List[str], Dict[str, Any]]:
    """sd-scripts' dataset_config -> (our keys, warnings, not-used keys)."""
    general = dict(dc.get("general") or {})
    datasets = dc.get("datasets") or []
    ours: Dict[str, Any] = {}
    notes: List[str] = []
    not_used: Dict[str, Any] = {}
    train, reg = [], []
    ds_params: List[Dict[str, Any]] = []
    for di, ds in enumerate(datasets):
        if not isinstance(ds, dict):
            raise KohyaConfigError("datasets", f"datasets[{di}] must be a table ([[datasets]]).")
        dparams = {**general, **{k: v for k, v in ds.items() if k != "subsets"}}
        ds_params.append({k: v for k, v in dparams.items() if k in DATASET_KEYS})
        subsets = ds.get("subsets") or []
        if not subsets:
            raise KohyaConfigError("datasets", f"datasets[{di}] has no [[datasets.subsets]]: add one with image_dir.")
        for si, sub in enumerate(subsets):
            merged = {**{k: v for k, v in dparams.items() if k in SUBSET_KEYS}, **sub}
            where = f"datasets[{di}].subsets[{si}]"
            if merged.get("metadata_file"):
                raise KohyaConfigError("metadata_file", f"{where} is a kohya fine-tuning subset (metadata_file): not "
                                       f"supported. Use an image folder with .txt captions (image_dir) instead.")
            if not merged.get("image_dir"):
                raise KohyaConfigError("image_dir", f"{where} has no image_dir: set it to the image folder.")
            merged["image_dir"] = _resolve_path(str(merged["image_dir"]), base_dir)
            (reg if merged.get("is_reg") else train).append(merged)
            for k, v in merged.items():
                if k not in SUBSET_KEYS and k not in DATASET_KEYS and not _is_default(v):
                    not_used[f"{where}.{k}"] = v
        for k, v in dparams.items():
            if k not in DATASET_KEYS and k not in SUBSET_KEYS and not _is_default(v):
                not_used[k] = v
    if not train:
        raise KohyaConfigError("datasets", "the dataset config has no training subset (every subset is is_reg): add "
                               "a [[datasets.subsets]] with image_dir and is_reg = false.")
    if len({json.dumps(p, sort_keys=True) for p in ds_params}) > 1:
        raise KohyaConfigError("datasets", "the dataset config has several [[datasets]] with different resolution / "
                               "batch / bucket settings: one run here trains one dataset. Put the subsets into one "
                               "[[datasets]] (or train them one after the other).")
    for k, v in (ds_params[0] if ds_params else {}).items():
        if k == "resolution":
            ours["resolution"], note = _resolution(v, "resolution")
            if note:
                notes.append(note)
        else:
            ours[DATASET_KEYS[k]] = v
    ours.update(_subset_dirs(train, "train_data_dir", "num_repeats"))
    if reg:
        reg_map = _subset_dirs(reg, "reg_data_dir", None)
        ours["reg_data_dir"] = reg_map["reg_data_dir"]
        if any(int(r.get("num_repeats", 1)) != 1 for r in reg) and len(reg) == 1:
            notes.append("the reg subset's num_repeats is not used: reg images are repeated to the number of "
                         "training images (as kohya balances them)")
    first = train[0]
    for k in CAPTION_OPTIONS:
        vals = {json.dumps(t.get(k)) for t in train if k in t}
        if len(vals) > 1:
            notes.append(f"the training subsets differ in {k}: the first subset's value {first.get(k)!r} is used "
                         f"for all")
        val = next((t[k] for t in train if k in t), None)
        if val is not None:
            ours[k] = val
    cls = first.get("class_tokens")
    if cls:
        ours["trigger_word"] = str(cls)
        notes.append(f"class_tokens '{cls}' is the trigger_word: images without a caption file use it, and it is "
                     f"put in front of captions that lack it")
    if first.get("conditioning_data_dir"):
        ours["mask_dir"] = _resolve_path(str(first["conditioning_data_dir"]), base_dir)
    for t in train + reg:
        for k in ("caption_prefix", "caption_suffix", "color_aug", "random_crop", "face_crop_aug_range",
                  "token_warmup_min", "token_warmup_step", "caption_dropout_every_n_epochs", "secondary_separator",
                  "enable_wildcard", "cache_info", "custom_attributes", "caption_separator"):
            if k in t and not _is_default(t[k]) and not (k == "token_warmup_min" and t[k] == 1):
                not_used[k] = t[k]
    return ours, notes, not_used


def _subset_dirs(subs: List[Dict[str, Any]], key: str, repeats_key: Optional[str]) -> Dict[str, Any]:
    """One subset -> its folder (+ num_repeats); several -> their common parent when they are kohya N_name
    folders whose N is their num_repeats (the layout our folder reader reads)."""
    if len(subs) == 1:
        out: Dict[str, Any] = {key: subs[0]["image_dir"]}
        if repeats_key and int(subs[0].get("num_repeats", 1)) != 1:
            out[repeats_key] = int(subs[0]["num_repeats"])
        return out
    dirs = [os.path.normpath(s["image_dir"]) for s in subs]
    parents = {os.path.dirname(d) for d in dirs}
    ok = len(parents) == 1
    for s, d in zip(subs, dirs):
        m = REPEAT_RE.match(os.path.basename(d))
        if not m or int(m.group(1)) != int(s.get("num_repeats", m.group(1) if m else 1)):
            ok = False
    if not ok:
        raise KohyaConfigError(key, f"{len(subs)} {'reg' if key.startswith('reg') else 'training'} subsets "
                               f"({', '.join(dirs)}) in different folders or with num_repeats that differ from "
                               f"their folder names: put them into one folder as kohya N_name subfolders "
                               f"(e.g. 10_mychar/) and give that folder as image_dir.")
    return {key: parents.pop()}


# ------------------------------------------------------------------------------------------------ networks
LYCORIS = "lycoris.kohya"
#: (kohya network_module, LyCORIS algo, dora_wd) -> our network_type, read by import and export (export writes the
#: first key of a type). A lora that also trains the 3x3 convolutions is our locon: kohya's networks.lora with
#: conv_dim, or LyCORIS' lora / locon (both train them unless the preset leaves them out).
KOHYA_NETWORKS = {
    ("networks.lora", "", False): "lora",
    ("networks.lora_flux", "", False): "lora",
    ("networks.lora_sd3", "", False): "lora",
    (LYCORIS, "loha", False): "loha",
    (LYCORIS, "lokr", False): "lokr",
    (LYCORIS, "lora", True): "dora",
    (LYCORIS, "locon", True): "dora",
    (LYCORIS, "lora", False): "lora",
    (LYCORIS, "locon", False): "lora",
}
#: the family a kohya module trains (networks.lora and LyCORIS: any SD1 / SD2 / SDXL, LyCORIS also Flux / SD3);
#: the same names as networks/flow_names.NETWORK_MODULE, which writes them into the files
MODULE_FAMILY = {"networks.lora_flux": "flux", "networks.lora_sd3": "sd3"}
FAMILY_NAMES = {"flux": "Flux.1", "sd3": "SD3 / SD3.5", "sd": "SD1 / SD2 / SDXL"}
#: LyCORIS presets we train -> whether they include the ResNet blocks' 3x3 convolutions
LYCORIS_PRESETS = {"full": True, "attn-mlp": False}
#: kohya_ss GUI LoRA_type -> (network_module, LyCORIS algo, the GUI fields it passes as network_args), as kohya_ss'
#: lora_gui.train_model builds them; the types we do not train are here so that the refusal names their algo
_LYCO_FIELDS = ("preset", "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "dora_wd", "use_scalar",
                "rank_dropout_scale", "train_norm", "bypass_mode")
_KOHYA_FIELDS = ("rank_dropout", "module_dropout", "conv_block_dims", "conv_block_alphas")
GUI_LORA_TYPES = {
    "Standard": ("networks.lora", "", _KOHYA_FIELDS),
    "Kohya LoCon": ("networks.lora", "", _KOHYA_FIELDS + ("conv_dim", "conv_alpha")),
    "LoCon": (LYCORIS, "locon", _LYCO_FIELDS + ("use_tucker",)),
    "LyCORIS/LoCon": (LYCORIS, "locon", _LYCO_FIELDS + ("use_tucker",)),
    "LyCORIS/LoHa": (LYCORIS, "loha", _LYCO_FIELDS + ("use_tucker",)),
    "LyCORIS/LoKr": (LYCORIS, "lokr", _LYCO_FIELDS + ("factor", "use_cp", "decompose_both", "full_matrix")),
    "Flux1": ("networks.lora_flux", "", ("split_mode", "split_qkv")),
    "LyCORIS/BOFT": (LYCORIS, "boft", ()), "LyCORIS/Diag-OFT": (LYCORIS, "diag-oft", ()),
    "LyCORIS/DyLoRA": (LYCORIS, "dylora", ()), "LyCORIS/GLoRA": (LYCORIS, "glora", ()),
    "LyCORIS/iA3": (LYCORIS, "ia3", ()), "LyCORIS/Native Fine-Tuning": (LYCORIS, "full", ()),
    "Kohya DyLoRA": ("networks.dylora", "", ()), "LoRA-FA": ("networks.lora_fa", "", ()),
    "Flux1 OFT": ("networks.oft_flux", "", ()),
}
#: kohya_ss GUI fields that only reach training through network_args (top-level keys of a GUI file)
GUI_NETWORK_FIELDS = tuple(sorted({"LyCORIS_preset" if f == "preset" else f for _, _, fs in GUI_LORA_TYPES.values()
                                   for f in fs} | {"train_blocks"}))
#: network_args that ask for something this trainer does not train (when on / set) -> what they are
REFUSED_ARGS = {
    "use_tucker": "LyCORIS' Tucker decomposition", "use_cp": "LyCORIS' Tucker decomposition",
    "use_scalar": "LyCORIS' trained scalar", "decompose_both": "LoKr with a decomposed w1",
    "unbalanced_factorization": "LoKr's unbalanced factorization", "train_norm": "training the norm layers",
    "rs_lora": "rank-stabilised LoRA scaling", "rank_dropout_scale": "rescaled rank dropout",
    "wd_on_output": "DoRA's scale per output channel", "conv_block_dims": "block-wise conv ranks",
    "train_t5xxl": "LoRA on T5-XXL", "split_qkv": "separate q / k / v LoRAs",
    "train_double_block_indices": "a subset of the Flux blocks", "train_single_block_indices":
    "a subset of the Flux blocks", "train_block_indices": "a subset of the SD3 blocks",
    **{k: "per-layer ranks of networks.lora_flux / lora_sd3" for k in (
        "img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim", "single_dim",
        "single_mod_dim", "in_dims", "emb_dims", "context_attn_dim", "context_mlp_dim", "context_mod_dim",
        "x_attn_dim", "x_mlp_dim", "x_mod_dim")},
}
#: network_args with no effect on what is trained (a computation mode; OFT-only options)
NETWORK_ARGS_NO_EFFECT = ("bypass_mode", "constrain", "rescaled", "verbose", "conv_block_alphas")
ACCEPTED_NETWORKS = ("networks.lora (conv_dim: LoCon), networks.lora_flux, networks.lora_sd3, lycoris.kohya with "
                     "algo=lora|locon|loha|lokr (dora_wd=True: DoRA)")


def _set(v: Any) -> bool:
    """Is a network_args option on / given? (False, 0, "", None and their strings are off.)"""
    return not _is_default(v) and str(v).strip().lower() not in ("false", "none", "0")


def base_family(spec: str) -> Optional[str]:
    """"flux", "sd3" or "sd" (SD1 / SD2 / SDXL) of a base model told without loading it (lora_train.family: a tiny
    spec, a diffusers folder's model_index.json, a .safetensors header). None when that cannot tell."""
    from ..family import told_by_spec

    told = told_by_spec(spec)
    if told is None:
        return None
    return told[0] if told[0] in ("flux", "sd3") else "sd"


def _network_source(flat: Dict[str, Any]) -> Tuple[str, Dict[str, Any], str]:
    """(network_module, network_args, how the file named them): sd-scripts' keys, or the network_module and
    network_args kohya_ss builds from its LoRA_type and GUI fields."""
    module = flat.get("network_module")
    lt = flat.get("LoRA_type")
    if module or not lt:
        return str(module or "networks.lora"), parse_kv_list(flat.get("network_args") or [], "network_args"), \
            f"network_module '{module or 'networks.lora'}'"
    if str(lt) not in GUI_LORA_TYPES:
        raise KohyaConfigError("LoRA_type", f"LoRA_type '{lt}' is not available here: use one of "
                               f"{', '.join(t for t, v in GUI_LORA_TYPES.items() if _trainable(v[0], v[1]))}.")
    module, algo, fields = GUI_LORA_TYPES[str(lt)]
    nargs: Dict[str, Any] = {"algo": algo} if algo else {}
    for f in fields:
        src = "LyCORIS_preset" if f == "preset" else f
        if src in flat and flat[src] not in (None, ""):
            nargs[f] = flat[src]
    if nargs.pop("split_mode", False):
        nargs["train_blocks"] = "single"  # kohya_ss: split_mode trains the single blocks only
    return module, nargs, f"LoRA_type '{lt}'"


def _trainable(module: str, algo: str) -> bool:
    return any(k[0] == module and k[1] == algo for k in KOHYA_NETWORKS)


def _refuse(module: str, algo: str, dora: bool, nargs: Dict[str, Any], label: str) -> None:
    """A KohyaConfigError for a network (or a network_args option) this trainer does not train."""
    if not any(k[0] == module for k in KOHYA_NETWORKS):
        raise KohyaConfigError("network_module", f"{label} is not available here (it would train another kind of "
                               f"network): this trainer trains {ACCEPTED_NETWORKS}. Use kohya for {module}.")
    if (module, algo, dora) not in KOHYA_NETWORKS:
        what = f"algo={algo} with dora_wd=True" if dora and _trainable(module, algo) else f"algo={algo}"
        raise KohyaConfigError("network_args", f"{label} network_args {what} is not available here: use "
                               f"algo=lora, locon, loha or lokr (dora_wd=True with lora / locon: DoRA), or kohya + "
                               f"LyCORIS for it.")
    for k, what in REFUSED_ARGS.items():
        if k in nargs and _set(nargs[k]):
            raise KohyaConfigError("network_args", f"network_args {k}={nargs[k]} ({what}) is not available here: "
                                   f"remove it to train without it, or use kohya for it.")
    if str(nargs.get("train_blocks", "all")).lower() != "all":
        raise KohyaConfigError("network_args", f"network_args train_blocks={nargs['train_blocks']} (a subset of the "
                               f"Flux blocks) is not available here: this trainer trains all blocks; remove it.")
    preset = str(nargs.get("preset", "full"))
    if module == LYCORIS and preset not in LYCORIS_PRESETS:
        raise KohyaConfigError("network_args", f"network_args preset={preset} is not available here: use preset "
                               f"full (with the ResNet convolutions) or attn-mlp (without).")


def _conv(module: str, nargs: Dict[str, Any], flat: Dict[str, Any]) -> Tuple[int, Optional[float]]:
    """(conv_rank, conv_alpha) as the module trains them: kohya's networks.lora only with conv_dim (conv_alpha
    default 1); LyCORIS with its preset's convolutions at conv_dim, else network_dim (conv_alpha default
    network_alpha); none in Flux / SD3 modules."""
    dim, alpha = nargs.pop("conv_dim", None), nargs.pop("conv_alpha", None)
    if module == LYCORIS:
        if not LYCORIS_PRESETS[str(nargs.get("preset", "full"))]:
            return 0, None
        rank = int(float(dim or 0)) or int(flat.get("network_dim") or TrainConfig.lora_rank)
        a = alpha if not _is_default(alpha) else flat.get("network_alpha")
        return rank, (None if _is_default(a) else float(a))
    if module == "networks.lora" and dim not in (None, "") and int(float(dim)) > 0:
        return int(float(dim)), float(1.0 if alpha in (None, "") else alpha)
    if dim not in (None, "") and int(float(dim)) > 0:
        nargs["conv_dim"] = dim  # Flux / SD3 have no 3x3 convolutions: listed as not used
    return 0, None


def map_network(flat: Dict[str, Any], base_dir: str) -> Tuple[Dict[str, Any], Dict[str, Any], List[str],
                                                                 Dict[str, Any]]:
    """The network of flat kohya arguments -> (our network keys, the network_args left for the caller (block
    weights, loraplus, unknown), notes, not-used keys)."""
    module, nargs, label = _network_source(flat)
    lyco = module == LYCORIS
    algo = str(nargs.pop("algo", "lora") or "lora").lower() if lyco else ""
    dora = _set(nargs.pop("dora_wd", False)) if lyco else False
    _refuse(module, algo, dora, nargs, label)
    want, base = MODULE_FAMILY.get(module), flat.get("pretrained_model_name_or_path")
    have = base_family(_resolve_path(str(base), base_dir)) if want and base else None
    if have and have != want:
        fix = next((m for m, f in MODULE_FAMILY.items() if f == have), "networks.lora")
        raise KohyaConfigError("network_module", f"{label} trains {FAMILY_NAMES[want]}, but the base model '{base}' "
                               f"is {FAMILY_NAMES[have]}: set network_module = \"{fix}\", or point "
                               f"pretrained_model_name_or_path at a {FAMILY_NAMES[want]} model.")
    ours: Dict[str, Any] = {}
    notes: List[str] = []
    not_used: Dict[str, Any] = {}
    typ = KOHYA_NETWORKS[(module, algo, dora)]
    conv_rank, conv_alpha = _conv(module, nargs, flat)
    if typ == "lora" and conv_rank > 0:
        typ = "locon"
    ours.update(network_type=typ, conv_rank=conv_rank, conv_alpha=conv_alpha)
    if lyco and conv_rank and nargs.get("preset", "full") == "full":
        notes.append("LyCORIS' preset full also trains conv_in, conv_out and time_embedding: this trainer trains "
                     "the transformer and ResNet blocks (write preset=attn-mlp for the transformer blocks alone)")
    for k in ("rank_dropout", "module_dropout") + (("dropout",) if lyco else ()):
        if k in nargs:
            ours[k] = float(nargs.pop(k) or 0)
    if not lyco and flat.get("network_dropout"):
        ours["dropout"] = float(flat["network_dropout"])  # kohya's modules: the neuron dropout
    elif flat.get("network_dropout"):
        not_used["network_dropout"] = flat["network_dropout"]  # LyCORIS reads network_args dropout instead
    if typ == "lokr":
        ours["factor"] = int(nargs.pop("factor", -1))
        ours["full_matrix"] = _set(nargs.pop("full_matrix", False))
    for k in ("preset", "train_blocks") + NETWORK_ARGS_NO_EFFECT + tuple(REFUSED_ARGS):
        nargs.pop(k, None)  # at their defaults (_refuse)
    for k in ("dropout", "factor", "full_matrix", "dora_wd", "conv_dim"):
        v = nargs.pop(k, None)  # options this module does not read
        if _set(v) and v != -1:
            not_used[f"network_args.{k}"] = v
    if "LoRA_type" not in flat or flat.get("network_module"):  # sd-scripts: the GUI's fields are not arguments
        for k in GUI_NETWORK_FIELDS:
            if k in flat and _set(flat[k]) and KOHYA_DEFAULTS.get(k, object()) != flat[k]:
                not_used[k] = flat[k]
    elif flat.get("LoRA_type") == "Standard" and _set(flat.get("conv_dim")):
        notes.append(f"LoRA_type Standard trains no 3x3 convolutions in kohya_ss: conv_dim {flat['conv_dim']} is "
                     f"not used (LoRA_type Kohya LoCon trains them)")
    return ours, nargs, notes, not_used


def network_to_kohya(cfg: TrainConfig) -> Dict[str, Any]:
    """network_module / network_args / network_dropout that make kohya (+ LyCORIS) train cfg's network: the first
    KOHYA_NETWORKS key of its type, the module of the base model's family for lora, conv_dim / conv_alpha where the
    3x3 convolutions are trained (LyCORIS without them: preset=attn-mlp), factor / full_matrix, the dropouts."""
    family = base_family(cfg.base_model)
    typ = "lora" if cfg.network_type == "locon" else cfg.network_type
    module, algo, dora = next(k for k, t in KOHYA_NETWORKS.items() if t == typ)
    if module == "networks.lora":
        module = next((m for m, f in MODULE_FAMILY.items() if f == family), module)
    flow = family in MODULE_FAMILY.values()
    conv = 0 if flow else (cfg.conv_rank or (cfg.lora_rank if cfg.network_type == "locon" else 0))
    args: List[str] = [f"algo={algo}"] if algo else []
    if dora:
        args.append("dora_wd=True")
    if conv:
        args += [f"conv_dim={conv}", f"conv_alpha={float(conv if cfg.conv_alpha is None else cfg.conv_alpha):g}"]
    elif module == LYCORIS:
        args.append("preset=attn-mlp")  # LyCORIS' default preset trains the convolutions (at network_dim)
    if cfg.network_type == "lokr":
        args.append(f"factor={cfg.factor}")
        if cfg.full_matrix:
            args.append("full_matrix=True")
    for k in ("rank_dropout", "module_dropout") + (("dropout",) if module == LYCORIS else ()):
        if getattr(cfg, k):
            args.append(f"{k}={getattr(cfg, k):g}")
    return {"network_module": module, "network_args": args,
            "network_dropout": (cfg.dropout or None) if module != LYCORIS else None}


# ------------------------------------------------------------------------------------------------ training args
def _optimizer(name: str) -> str:
    n = str(name).strip()
    if n.lower() in OPTIMIZER_NAMES:
        return OPTIMIZER_NAMES[n.lower()]
    if n.lower() in ("adamw8bit", "bitsandbytes.optim.adamw8bit"):
        return "AdamW8bit"
    if n.lower() in ("lion_pytorch.lion", "lion"):
        return "Lion"
    raise KohyaConfigError("optimizer_type", f"optimizer_type '{name}' is not available here (it would train "
                           f"differently): use one of {', '.join(OPTIMIZERS)}.")


def _warmup(v: Any, flat: Dict[str, Any], percent: bool) -> Tuple[Optional[int], Optional[str]]:
    """kohya lr_warmup_steps (an int, or a float < 1 = a fraction of the steps) / kohya_ss lr_warmup (percent)."""
    frac = float(v) / 100.0 if percent else (float(v) if isinstance(v, float) and 0 < v < 1 else None)
    if frac is None:
        return int(v), None
    if frac == 0:
        return 0, None
    total = flat.get("max_train_steps")
    if total:
        return int(round(frac * int(total))), None
    return None, (f"lr warm-up is given as {frac:.0%} of the steps, which are not known before the dataset is read: "
                  f"lr_warmup_steps stays at its default; set it in steps")


def _map_optimization(flat: Dict[str, Any], ours: Dict[str, Any]) -> List[str]:
    """kohya's optimizer, optimizer_args, lr_scheduler and warm-up -> our keys (into `ours`); returns notes."""
    notes: List[str] = []
    if flat.get("optimizer_type") or flat.get("optimizer"):
        ours["optimizer"] = _optimizer(flat.get("optimizer_type") or flat.get("optimizer"))
    elif flat.get("use_8bit_adam"):
        ours["optimizer"] = "AdamW8bit"
    elif flat.get("use_lion_optimizer"):
        ours["optimizer"] = "Lion"
    elif "optimizer_type" in flat or "use_8bit_adam" in flat:
        ours["optimizer"] = "AdamW"  # sd-scripts' default (ours too)
    oargs = parse_kv_list(flat.get("optimizer_args") or [], "optimizer_args")
    rest = {}
    for k, v in oargs.items():
        if k == "weight_decay":
            ours["weight_decay"] = float(v)
        elif k == "betas":
            b = v if isinstance(v, (list, tuple)) else [float(x) for x in str(v).split(",")]
            ours["adam_beta1"], ours["adam_beta2"] = float(b[0]), float(b[1])
        elif k == "eps":
            ours["adam_epsilon"] = float(v)
        else:
            rest[k] = v
    if rest:
        ours["optimizer_args"] = rest
    sched = flat.get("lr_scheduler")
    if sched:
        if sched not in SCHEDULERS:
            raise KohyaConfigError("lr_scheduler", f"lr_scheduler '{sched}' is not available here (the learning "
                                   f"rate would follow another curve): use one of {', '.join(SCHEDULERS)}.")
        ours["lr_scheduler"] = sched
    if "lr_warmup" in flat and "lr_warmup_steps" not in flat:  # kohya_ss GUI: percent of the steps
        steps, note = _warmup(flat["lr_warmup"], flat, percent=True)
    elif "lr_warmup_steps" in flat:
        steps, note = _warmup(flat["lr_warmup_steps"], flat, percent=False)
    else:
        steps, note = None, None
    if steps is not None:
        ours["lr_warmup_steps"] = steps
    if note:
        notes.append(note)
    return notes


def map_training_args(flat: Dict[str, Any], base_dir: str) -> Tuple[Dict[str, Any], List[str], Dict[str, Any]]:
    """Flat kohya training arguments -> (our keys, notes, not-used keys)."""
    known = set(TrainConfig.keys())
    flat = {k: v for k, v in flat.items() if not (isinstance(v, str) and v.strip() == "" and k not in known)}

    if flat.get("network_train_text_encoder_only"):
        raise KohyaConfigError("network_train_text_encoder_only", "network_train_text_encoder_only is not "
                               "available here: the UNet is always trained. Set it to false.")
    ours, nargs, notes, not_used = map_network(flat, base_dir)
    for k, v in nargs.items():
        if k in NETWORK_ARG_KEYS or k in known:
            ours[k] = ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v
        elif not _is_default(v):
            not_used[f"network_args.{k}"] = v
    notes += _map_optimization(flat, ours)
    for k in ("resolution", "max_resolution"):
        if k in flat and flat[k] not in (None, ""):
            ours["resolution"], rn = _resolution(flat[k], k)
            if rn:
                notes.append(rn)
    if flat.get("unet_lr"):
        ours["learning_rate"] = float(flat["unet_lr"])
    elif flat.get("learning_rate"):
        ours["learning_rate"] = float(flat["learning_rate"])
    te_lr = flat.get("text_encoder_lr")
    if isinstance(te_lr, (list, tuple)):
        if len(set(te_lr)) > 1:
            notes.append(f"text_encoder_lr {te_lr}: both SDXL text encoders use {te_lr[0]}")
        te_lr = te_lr[0] if te_lr else None
    unet_only = flat.get("network_train_unet_only")
    if te_lr not in (None, "") and float(te_lr) == 0:
        unet_only = True  # kohya_ss: a text-encoder lr of 0 trains the UNet only
    elif te_lr not in (None, ""):
        ours["text_encoder_lr"] = float(te_lr)
    if unet_only is not None or "network_module" in flat or "LoRA_type" in flat:
        ours["train_text_encoder"] = not bool(unet_only)  # sd-scripts trains the text encoder unless told not to
    if "v_parameterization" in flat or "v2" in flat:
        ours["prediction_type"] = "v_prediction" if flat.get("v_parameterization") else "epsilon"
    if flat.get("cache_latents_to_disk"):
        ours["latent_cache"] = "disk"
    if flat.get("cache_text_encoder_outputs_to_disk"):
        ours["text_cache"] = "disk"
    if flat.get("max_token_length") in (None, "", 0):
        flat.pop("max_token_length", None)
    if flat.get("noise_offset_type") == "Multires":  # kohya_ss: the multires noise replaces the offset noise
        ours["noise_offset"] = 0.0
    if flat.get("sample_prompts"):
        ours["sample_prompts"], sn = _sample_prompts(flat["sample_prompts"], base_dir)
        if sn:
            notes.append(sn)
    if "max_train_steps" in flat and not flat["max_train_steps"]:
        flat.pop("max_train_steps")
    if flat.get("mixed_precision") == "no" or flat.get("mixed_precision") in ("fp16", "bf16"):
        ours["mixed_precision"] = flat["mixed_precision"]
    if flat.get("save_precision") not in (None, "", "float", "fp32"):
        not_used["save_precision"] = flat["save_precision"]  # we write float32 files
    if flat.get("full_fp16"):
        not_used["full_fp16"] = True
    if flat.get("resume"):
        notes.append(f"resume '{flat['resume']}': resume a run of this trainer with --resume RUN_DIR (kohya "
                     f"states are not read)")
    handled = set(GUI_NETWORK_FIELDS) | {"network_module", "LoRA_type", "network_dropout",
               "network_train_text_encoder_only", "network_args", "optimizer_type", "optimizer", "use_8bit_adam",
               "use_lion_optimizer", "optimizer_args", "lr_scheduler", "lr_warmup", "lr_warmup_steps", "resolution",
               "max_resolution", "unet_lr", "learning_rate", "text_encoder_lr", "network_train_unet_only",
               "v_parameterization", "cache_latents_to_disk", "cache_text_encoder_outputs_to_disk",
               "noise_offset_type", "sample_prompts", "mixed_precision", "save_precision", "full_fp16", "resume",
               "dataset_config", "train_data_dir", "reg_data_dir", "logging_dir", "output_dir", "network_weights",
               "lora_network_weights", "additional_parameters", "training_comment"}
    for k, v in flat.items():
        if k in handled or k in NO_EFFECT:
            continue
        ours_k = KOHYA_NAMES.get(k, k)
        if ours_k in known:
            if v is None or (isinstance(v, str) and v.strip() == "" and ours_k not in ("trigger_word",)):
                continue
            if ours_k in OPTIONAL_KEYS and not isinstance(v, bool) and v in (0, "0"):
                continue  # kohya's 0 = off is our empty
            ours[ours_k] = v
        elif not _is_default(v) and KOHYA_DEFAULTS.get(k, object()) != v:
            not_used[k] = v
    if flat.get("logging_dir") and not flat.get("log_with"):
        ours["log_with"] = "tensorboard"  # sd-scripts: a logging_dir alone logs to TensorBoard
    for k in ("train_data_dir", "reg_data_dir", "logging_dir", "output_dir"):
        if flat.get(k):
            ours[k] = _resolve_path(str(flat[k]), base_dir)
    w = flat.get("network_weights") or flat.get("lora_network_weights")
    if w:
        ours["network_weights"] = _resolve_path(str(w), base_dir)
    if flat.get("additional_parameters"):
        not_used["additional_parameters"] = flat["additional_parameters"]
    if "epochs" in ours and "max_train_steps" in ours:
        pass  # max_train_steps wins, as in kohya
    if ours.get("lora_alpha") in (0, None) and "lora_alpha" in ours:
        ours.pop("lora_alpha")
    if "clip_skip" in ours and ours["clip_skip"] in (None, 0, 1, "1"):
        ours["clip_skip"] = None
    return ours, notes, not_used


def _sample_prompts(v: Any, base_dir: str) -> Tuple[List[str], Optional[str]]:
    """kohya's sample_prompts is a file (.txt: one prompt a line, `--n` etc. options after the text)."""
    if isinstance(v, list):
        return [str(x) for x in v], None
    path = _resolve_path(str(v), base_dir)
    if not os.path.isfile(path):
        return [], f"sample_prompts file '{v}' was not found: no samples during training"
    if not path.lower().endswith(".txt"):
        return [], f"sample_prompts '{v}' is not a .txt file (only those are read): no samples during training"
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(re.split(r"\s--\w", " " + line, maxsplit=1)[0].strip())
    return [p for p in prompts if p], None


# ------------------------------------------------------------------------------------------------ entry points
def from_kohya(data: Dict[str, Any], base_dir: str = ".", dataset_config: Optional[Dict[str, Any]] = None,
               overrides: Optional[Dict[str, Any]] = None) -> KohyaImport:
    """Map kohya training arguments (+ an optional dataset_config dict) to a validated TrainConfig."""
    notes: List[str] = []
    not_used: Dict[str, Any] = {}
    ours: Dict[str, Any] = {}
    if is_dataset_config(data):
        dataset_config, data = data, {}
    flat = flatten(data)
    if flat:
        o, n, u = map_training_args(flat, base_dir)
        ours.update(o)
        notes += n
        not_used.update(u)
    if dataset_config is not None:
        o, n, u = map_dataset_config(dataset_config, base_dir)
        ours.update(o)  # the dataset config wins over train_data_dir / resolution of the arguments, as in kohya
        notes += n
        not_used.update(u)
    if "num_repeats" not in ours and ours.get("train_data_dir") and dataset_config is None:
        pass  # kohya DreamBooth folders: the N_name subfolders carry their repeats
    ours.update(overrides or {})
    try:
        cfg = TrainConfig.from_dict(ours)
    except ConfigError as exc:
        raise KohyaConfigError(exc.key, f"from the kohya config: {exc}") from exc
    warnings: List[str] = []
    if not_used:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(not_used.items()))
        warnings.append(f"{len(not_used)} kohya key(s) are not used by this trainer and have no effect here "
                        f"(training may differ from kohya's where they matter): {listed}.")
    warnings += [n + "." for n in notes]
    return KohyaImport(config=cfg, data=ours, warnings=warnings, not_used=not_used)


def load_kohya(path: str, overrides: Optional[Dict[str, Any]] = None) -> KohyaImport:
    """A kohya config file (training-argument TOML / kohya_ss JSON, or a dataset_config TOML alone)."""
    data = read_file(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    sources = [path]
    dc = None
    dc_path = flatten(data).get("dataset_config") if not is_dataset_config(data) else None
    if dc_path:
        dc_file = _resolve_path(str(dc_path), base_dir)
        dc = read_file(dc_file)
        if not is_dataset_config(dc):
            raise KohyaConfigError("dataset_config", f"dataset_config '{dc_path}' has no [[datasets]]: point it at "
                                   f"kohya's dataset config TOML.")
        sources.append(dc_file)
    imp = from_kohya(data, base_dir, dc, overrides)
    imp.sources = sources
    return imp


def load_any(path: str, overrides: Optional[Dict[str, Any]] = None) -> Tuple[TrainConfig, List[str]]:
    """(config, warnings) of our YAML or a kohya .toml / .json (what `train FILE` accepts)."""
    if is_kohya_path(path):
        imp = load_kohya(path, overrides)
        return imp.config, imp.warnings
    return TrainConfig.load(path, overrides), []


# ------------------------------------------------------------------------------------------------ export
def to_kohya_dict(cfg: TrainConfig) -> Dict[str, Dict[str, Any]]:
    """TrainConfig -> sd-scripts training arguments, in the sections SD-Trainer writes (sd-scripts flattens them)."""
    def some(d: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in d.items() if v is not None and v != ""}

    net = network_to_kohya(cfg)
    nargs = net["network_args"] + [f"{k}={getattr(cfg, k)}" for k in NETWORK_ARG_KEYS
             if getattr(cfg, k) not in ("", 0, 0.0) and not (k == "block_lr_zero_threshold")]
    if cfg.block_lr_zero_threshold and (cfg.down_lr_weight or cfg.mid_lr_weight or cfg.up_lr_weight):
        nargs.append(f"block_lr_zero_threshold={cfg.block_lr_zero_threshold:g}")
    extra_opt = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.optimizer_args.items()]
    opt_args = [f"weight_decay={cfg.weight_decay:g}", f"betas={cfg.adam_beta1:g},{cfg.adam_beta2:g}",
                f"eps={cfg.adam_epsilon:g}"] + extra_opt
    return {
        "model_arguments": some({
            "pretrained_model_name_or_path": cfg.base_model,
            "v_parameterization": cfg.prediction_type == "v_prediction" if cfg.prediction_type != "auto" else None,
            "network_weights": cfg.network_weights, "dim_from_weights": cfg.dim_from_weights or None,
        }),
        "dataset_arguments": some({
            "train_data_dir": cfg.train_data_dir, "reg_data_dir": cfg.reg_data_dir,
            "prior_loss_weight": cfg.prior_loss_weight, "resolution": f"{cfg.resolution},{cfg.resolution}",
            "caption_extension": cfg.caption_extension, "enable_bucket": cfg.enable_bucket,
            "min_bucket_reso": cfg.min_bucket_reso, "max_bucket_reso": cfg.max_bucket_reso,
            "bucket_reso_steps": cfg.bucket_reso_steps, "bucket_no_upscale": cfg.bucket_no_upscale,
            "shuffle_caption": cfg.shuffle_caption, "keep_tokens": cfg.keep_tokens,
            "keep_tokens_separator": cfg.keep_tokens_separator, "caption_dropout_rate": cfg.caption_dropout_rate,
            "caption_tag_dropout_rate": cfg.caption_tag_dropout_rate, "flip_aug": cfg.flip_aug,
            "max_token_length": cfg.max_token_length if cfg.max_token_length != 75 else None,
            "masked_loss": cfg.masked_loss, "alpha_mask": cfg.alpha_mask,
            "cache_latents": True, "cache_latents_to_disk": cfg.latent_cache == "disk",
            "validation_split": cfg.validation_split or None, "validation_seed": cfg.validation_seed,
        }),
        "additional_network_arguments": some({
            "network_module": net["network_module"], "network_dim": cfg.lora_rank, "network_alpha": cfg.alpha,
            "network_dropout": net["network_dropout"], "network_train_unet_only": not cfg.train_text_encoder,
            "network_args": nargs or None, "loraplus_lr_ratio": cfg.loraplus_lr_ratio,
        }),
        "optimizer_arguments": some({
            "optimizer_type": cfg.optimizer, "learning_rate": cfg.learning_rate, "unet_lr": cfg.learning_rate,
            "text_encoder_lr": cfg.te_lr if cfg.train_text_encoder else None, "optimizer_args": opt_args,
            "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps,
            "lr_scheduler_num_cycles": cfg.lr_scheduler_num_cycles, "lr_scheduler_power": cfg.lr_scheduler_power,
            "max_grad_norm": cfg.max_grad_norm,
        }),
        "training_arguments": some({
            "train_batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "max_train_epochs": cfg.epochs, "max_train_steps": cfg.max_train_steps, "seed": cfg.seed,
            # kohya has no "auto": ours trains in bf16 on a GPU that has it (write fp16 for an older card)
            "mixed_precision": "bf16" if cfg.mixed_precision == "auto" else cfg.mixed_precision,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "clip_skip": cfg.clip_skip, "noise_offset": cfg.noise_offset or None,
            "multires_noise_iterations": cfg.multires_noise_iterations or None,
            "multires_noise_discount": cfg.multires_noise_discount if cfg.multires_noise_iterations else None,
            "ip_noise_gamma": cfg.ip_noise_gamma or None, "min_snr_gamma": cfg.min_snr_gamma,
            "loss_type": cfg.loss_type, "huber_schedule": cfg.huber_schedule if cfg.loss_type in ("huber", "smooth_l1")
            else None, "huber_c": cfg.huber_c if cfg.loss_type in ("huber", "smooth_l1") else None,
            "huber_scale": cfg.huber_scale if cfg.loss_type in ("huber", "smooth_l1") else None,
            "ema_decay": cfg.ema_decay or None,  # not an sd-scripts key: this trainer reads it back
        }),
        "sample_prompt_arguments": some({
            "sample_every_n_steps": cfg.sample_every_n_steps or None,
            "sample_every_n_epochs": cfg.sample_every_n_epochs or None,
        }),
        "saving_arguments": some({
            "output_dir": cfg.output_dir, "output_name": cfg.output_name, "save_model_as": "safetensors",
            "save_every_n_epochs": cfg.save_every_n_epochs or None,
            "save_every_n_steps": cfg.save_every_n_steps or None, "save_state": cfg.save_state,
        }),
        "logging_arguments": some({
            "log_with": cfg.log_with, "logging_dir": cfg.logging_dir, "log_prefix": cfg.log_prefix,
        }),
    }


def to_kohya_toml(cfg: TrainConfig) -> str:
    try:
        import tomlkit  # optional: only export-config writes TOML (requirements.txt); hosts may lack it
    except ImportError:
        raise KohyaConfigError("export", "writing a kohya TOML needs the 'tomlkit' package: `pip install "
                               "tomlkit`.") from None
    doc = tomlkit.document()
    doc.add(tomlkit.comment("kohya sd-scripts training arguments (train_network.py --config_file), written by "
                            "lora_train export-config --kohya"))
    if cfg.sample_prompts:
        doc.add(tomlkit.comment("sample prompts (kohya reads them from a file given as sample_prompts): "
                                + " | ".join(cfg.sample_prompts)))
    for section, values in to_kohya_dict(cfg).items():
        if values:
            doc[section] = values
    return tomlkit.dumps(doc)


def export_config(config_path: str, out_path: Optional[str] = None) -> str:
    """Our YAML (or a kohya file) -> the kohya TOML text; written to out_path when given (never over a file)."""
    cfg = load_kohya(config_path).config if is_kohya_path(config_path) else TrainConfig.load(config_path)
    text = to_kohya_toml(cfg)
    if out_path:
        if os.path.exists(out_path):
            raise FileExistsError(f"'{out_path}' exists already: choose another --out name.")
        atomic_write_text(out_path, text)
    return text




# ------------------------------------------------------------------------------------------------ front doors
#: keys a front door decides itself (its folder, run name and folder), never taken from a loaded kohya file
FRONT_DOOR_OWNED = ("train_data_dir", "output_dir", "output_name", "overwrite")


def base_from_file(path: str) -> Dict[str, Any]:
    """Our keys a kohya file maps to, minus FRONT_DOOR_OWNED: the base a tab / node config starts from."""
    data = load_kohya(path).data
    return {k: v for k, v in data.items() if k not in FRONT_DOOR_OWNED}


def layer_config(kohya_file: str, widgets: Dict[str, Any], extras: Optional[Dict[str, Any]] = None,
                 under: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The one precedence of a kohya file and a front door's fields (the tab, the ComfyUI node): `under` (a
    Dataset node's kohya keys), then what the kohya file maps to, then the front door's fields (`widgets`), then
    its optional kohya fields that are set (`extras`). Returns the config keys."""
    d = dict(under or {})
    path = str(kohya_file or "").strip()
    if path:
        d.update(base_from_file(path))
    d.update(widgets)
    d.update(extras or {})
    return d


def node_config(node_kw: Dict[str, Any], dataset_base: Dict[str, Any], options: Dict[str, Any]) -> Dict[str, Any]:
    """A ComfyUI Train node's config (layer_config): the Dataset node's kohya keys, its kohya_config file, the
    node's widgets, then its optional kohya widgets that are not at their default (0 / empty = take it from the
    file, or off)."""
    options = dict(options)
    path = str(options.pop("kohya_config", "") or "").strip()
    return layer_config(path, node_kw, _set_options(options), under=dataset_base)


def _set_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The node's optional kohya widgets that are away from their default (clip_skip: above 1)."""
    d: Dict[str, Any] = {}
    defaults = TrainConfig()
    for k, v in options.items():
        if k not in TrainConfig.keys() or v is None or (isinstance(v, str) and not v.strip()):
            continue
        if k == "clip_skip":
            if int(v) > 1:
                d[k] = int(v)
            continue
        if str(v) != str(getattr(defaults, k)):
            d[k] = v
    return d
