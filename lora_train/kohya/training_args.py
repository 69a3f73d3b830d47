"""kohya's training arguments (optimizer, scheduler, warm-up, precision, loss, sampling, saving) -> our keys."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Tuple

from ..config import OPTIMIZERS, SCHEDULERS, TrainConfig
from .common import (KOHYA_DEFAULTS, KOHYA_NAMES, KohyaConfigError, NETWORK_ARG_KEYS, NO_EFFECT, OPTIMIZER_NAMES,
                     OPTIONAL_KEYS, is_default, parse_resolution, resolve_path, parse_kv_list)
from .networks import GUI_NETWORK_FIELDS, map_network


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


def _wan_expert(flat: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """musubi-tuner's Wan 2.2 A14B per-expert runs (network_module networks.lora_wan or task *A14B, with
    --min_timestep / --max_timestep on one side of --timestep_boundary) -> our wan_expert; the two keys are then used
    (popped from `flat`)."""
    wan = flat.get("network_module") == "networks.lora_wan" or "a14b" in str(flat.get("task", "")).lower() \
        or flat.get("timestep_boundary") not in (None, "")
    lo, hi = flat.get("min_timestep"), flat.get("max_timestep")
    if not wan or (lo in (None, "") and hi in (None, "")):
        return None, ""
    b = flat.get("timestep_boundary")
    b = 875.0 if b in (None, "") else float(b) * (1000.0 if float(b) <= 1 else 1.0)
    lo = 0 if lo in (None, "") else int(lo)
    hi = 1000 if hi in (None, "") else int(hi)
    expert = "high" if (lo, hi) == (round(b), 1000) else "low" if (lo, hi) == (0, round(b)) else None
    if expert:
        flat.pop("min_timestep", None)
        flat.pop("max_timestep", None)
    return expert, (f"min_timestep {lo} / max_timestep {hi}: Wan 2.2 A14B's {expert}-noise expert "
                    f"(wan_expert: {expert}, its timesteps by the boundary {round(b)})" if expert else "")


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
        elif not is_default(v):
            not_used[f"network_args.{k}"] = v
    notes += _map_optimization(flat, ours)
    for k in ("resolution", "max_resolution"):
        if k in flat and flat[k] not in (None, ""):
            ours["resolution"], rn = parse_resolution(flat[k], k)
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
    expert, note = _wan_expert(flat)
    if expert:
        ours["wan_expert"] = expert
        notes.append(note)
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
        elif not is_default(v) and KOHYA_DEFAULTS.get(k, object()) != v:
            not_used[k] = v
    if flat.get("logging_dir") and not flat.get("log_with"):
        ours["log_with"] = "tensorboard"  # sd-scripts: a logging_dir alone logs to TensorBoard
    for k in ("train_data_dir", "reg_data_dir", "logging_dir", "output_dir"):
        if flat.get(k):
            ours[k] = resolve_path(str(flat[k]), base_dir)
    w = flat.get("network_weights") or flat.get("lora_network_weights")
    if w:
        ours["network_weights"] = resolve_path(str(w), base_dir)
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
    path = resolve_path(str(v), base_dir)
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


