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

This module holds the entry points (from_kohya, load_kohya, load_any, export_config) and what the front doors share
(layer_config, node_config); each section of a kohya config is read in its own module: common.py (reading files,
the key tables, value forms), dataset.py (dataset_config), networks.py (network modules and network_args),
training_args.py (the rest), export.py (TrainConfig -> kohya TOML).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from ..config import ConfigError, TrainConfig
from ..io_utils import atomic_write_text
from .common import KohyaConfigError, KohyaImport, resolve_path, flatten, is_dataset_config, is_kohya_path, read_file
from .dataset import map_dataset_config
from .training_args import map_training_args
from .export import to_kohya_toml


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
        dc_file = resolve_path(str(dc_path), base_dir)
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
