"""sd-scripts' dataset_config TOML ([general], [[datasets]], [[datasets.subsets]]) -> our dataset keys."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from ..data.folder import REPEAT_RE
from .common import (CAPTION_OPTIONS, DATASET_KEYS, KohyaConfigError, SUBSET_KEYS, is_default, parse_resolution,
                     resolve_path)


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
            merged["image_dir"] = resolve_path(str(merged["image_dir"]), base_dir)
            (reg if merged.get("is_reg") else train).append(merged)
            for k, v in merged.items():
                if k not in SUBSET_KEYS and k not in DATASET_KEYS and not is_default(v):
                    not_used[f"{where}.{k}"] = v
        for k, v in dparams.items():
            if k not in DATASET_KEYS and k not in SUBSET_KEYS and not is_default(v):
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
            ours["resolution"], note = parse_resolution(v, "resolution")
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
        ours["mask_dir"] = resolve_path(str(first["conditioning_data_dir"]), base_dir)
    for t in train + reg:
        for k in ("caption_prefix", "caption_suffix", "color_aug", "random_crop", "face_crop_aug_range",
                  "token_warmup_min", "token_warmup_step", "caption_dropout_every_n_epochs", "secondary_separator",
                  "enable_wildcard", "cache_info", "custom_attributes", "caption_separator"):
            if k in t and not is_default(t[k]) and not (k == "token_warmup_min" and t[k] == 1):
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


