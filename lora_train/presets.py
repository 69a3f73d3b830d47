"""Named settings ("presets"): a folder of YAML files the user saves and loads, and built-in presets made by the
advisor for each task and base family.

A preset is a mapping of TrainConfig keys (plus `model_type`, the tab's family field) to values; the folder
holds `<name>.yaml`, written atomically and never over an existing file unless asked. Built-ins are named
`builtin: <task> / <family>` and are computed, not stored (the advisor's rules are the one source).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .config import ConfigError, TrainConfig, coerce, unknown_key_message
from .io_utils import atomic_write_text
from .family import FAMILIES
from .tuning.advisor import suggest

BUILTIN_PREFIX = "builtin: "
BUILTIN_TASKS = ("style", "character", "object", "concept")
BUILTIN_FAMILIES = FAMILIES
BUILTIN_IMAGES = 30          # a typical first dataset; the advisor scales epochs from the image count
EXTRA_KEYS = ("model_type",)  # the tab's own fields a preset may carry
#: what a preset never carries: where the data and outputs of one run live
NOT_IN_PRESETS = ("train_data_dir", "output_dir", "output_name", "overwrite")


class PresetError(ValueError):
    """A preset that cannot be saved or loaded; the message says what to do."""


def default_folder(host=None) -> str:
    """`lora_train_presets` beside the host's run folders (default: the current folder's)."""
    if host is not None:
        return os.path.join(os.path.dirname(os.path.abspath(host.runs_dir())), "lora_train_presets")
    return os.path.abspath("lora_train_presets")


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not name or name.startswith(BUILTIN_PREFIX.strip()) or not re.fullmatch(r"[\w .+-]{1,80}", name):
        raise PresetError(f"preset name '{name}' is not usable: use letters, digits, space, _ . + - (not "
                          f"'{BUILTIN_PREFIX.strip()}', which names the built-in presets).")
    return name


def clean(values: Dict[str, Any]) -> Dict[str, Any]:
    """Keep the keys a preset may hold (TrainConfig keys and the tab's model_type), typed as the config types
    them; unknown keys are an error naming the nearest valid key."""
    valid = {f.name: f for f in TrainConfig.__dataclass_fields__.values()}
    out: Dict[str, Any] = {}
    for k, v in (values or {}).items():
        if k in NOT_IN_PRESETS:
            continue
        if k in EXTRA_KEYS:
            out[k] = v
            continue
        if k not in valid:
            raise PresetError(unknown_key_message(k, list(valid) + list(EXTRA_KEYS)))
        out[k] = coerce(k, v, valid[k]) if v is not None else None
    return out


def save_preset(folder: str, name: str, values: Dict[str, Any], overwrite: bool = False) -> str:
    name = _check_name(name)
    data = clean(values)
    TrainConfig.from_dict({k: v for k, v in data.items() if k not in EXTRA_KEYS})  # what we write must load
    path = os.path.join(folder, name + ".yaml")
    if os.path.exists(path) and not overwrite:
        raise PresetError(f"preset '{name}' exists already ({path}): choose another name or overwrite it.")
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(path, f"# lora_train preset '{name}'\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def builtin_preset(task: str, family: str) -> Dict[str, Any]:
    s = suggest(BUILTIN_IMAGES, task=task, base=family, vram_gb=None)
    out = {k: v for k, v in s.to_config_dict().items() if k not in NOT_IN_PRESETS}
    out["model_type"] = family
    return out


def builtin_names() -> List[str]:
    return [f"{BUILTIN_PREFIX}{t} / {f}" for f in BUILTIN_FAMILIES for t in BUILTIN_TASKS]


def list_presets(folder: str, builtins: bool = True) -> List[str]:
    mine = []
    if os.path.isdir(folder):
        mine = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml") and not f.startswith("."))
    return mine + (builtin_names() if builtins else [])


def load_preset(folder: str, name: str) -> Dict[str, Any]:
    if name.startswith(BUILTIN_PREFIX):
        task, _, family = name[len(BUILTIN_PREFIX):].partition(" / ")
        if task not in BUILTIN_TASKS or family not in BUILTIN_FAMILIES:
            raise PresetError(f"no built-in preset '{name}': choose one of {', '.join(builtin_names())}.")
        return builtin_preset(task, family)
    path = os.path.join(folder, _check_name(name) + ".yaml")
    if not os.path.isfile(path):
        raise PresetError(f"no preset '{name}' in {folder}: saved presets are {', '.join(list_presets(folder, False)) or 'none'}.")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise PresetError(f"preset file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PresetError(f"preset file '{path}' must hold key: value lines.")
    try:
        return clean(data)
    except ConfigError as exc:
        raise PresetError(f"preset '{name}': {exc}") from exc


def delete_preset(folder: str, name: str) -> None:
    path = os.path.join(folder, _check_name(name) + ".yaml")
    if os.path.isfile(path):
        os.remove(path)


def apply(values: Dict[str, Any], preset: Dict[str, Any], keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """`values` with the preset's keys (only `keys` when given) replaced."""
    out = dict(values)
    for k, v in preset.items():
        if keys is None or k in keys:
            out[k] = v
    return out
