"""The one train-and-publish path every front door uses: the tab (WebUI, Forge, standalone app), the ComfyUI
Train node and the CLI.

    free the host's memory -> its base model -> Trainer -> publish the LoRA files into the host's LoRA folder
    (free name, temp + rename, never over a file) -> refresh the host's list and caches -> memory given back
    (also on error or stop: `Host.memory_freed`).

Front doors differ only in how they show the events and the result.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .config import TrainConfig
from .hosts.base import USED_NAMES, Host
from .io_utils import atomic_path
from .models.single_file import unet_dtype
from .training import cpu_bf16
from .training.events import TrainEvent
from .training.device import resolve_device
from .training.outputs import TrainResult
from .training.trainer import Trainer
from .tuning.advisor import Diagnoser


@dataclasses.dataclass
class HostRun:
    """What a run left: the name it got, the trainer's result, the files published into the LoRA folder."""

    name: str
    result: TrainResult
    lora_path: Optional[str]  # the final LoRA as published (None: no step was trained, or not published)
    published: List[str]
    warnings: List[str]
    run_dir: str


def name_run(host: Host, cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` with a LoRA name that is free for this host (`name`, `name_v2`, ...: hosts cache LoRA files
    by name, so a name is never reused) and its run folder under `host.runs_dir()`."""
    out = dataclasses.replace(cfg)
    out.output_name = host.free_name(cfg.output_name)
    out.output_dir = os.path.join(host.runs_dir(), out.output_name)
    out.overwrite = False
    return out


def publish(files: Sequence[Union[Optional[str], Tuple[str, str]]], lora_dir: str) -> Tuple[List[str], List[str]]:
    """Copy a run's LoRA files into the host's LoRA folder (temp + rename, never over an existing file); a file
    already in that folder stays where it is. An entry is a path (published under its own name) or (path, file
    name to publish it as). Returns (published paths, problems)."""
    written: List[str] = []
    problems: List[str] = []
    os.makedirs(lora_dir, exist_ok=True)
    for entry in files:
        src, as_name = entry if isinstance(entry, tuple) else (entry, None)
        if not src or not os.path.isfile(src):
            continue
        dest = os.path.join(lora_dir, as_name or os.path.basename(src))
        if os.path.exists(dest) and os.path.samefile(src, dest):
            written.append(dest)
            continue
        if os.path.exists(dest):
            problems.append(f"'{dest}' exists already and was not replaced; the run's file is '{src}'")
            continue
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        written.append(dest)
    return written, problems


def publish_to_host(host: Host, files: Sequence[Union[Optional[str], Tuple[str, str]]]
                    ) -> Tuple[List[str], List[str]]:
    """publish() into the host's LoRA folder, then the host's LoRA list refreshed (a failed refresh is a
    warning: the files are there). Returns (published paths, warnings)."""
    written, warnings = publish(files, host.output_dir())
    try:
        host.refresh_loras()
    except Exception as exc:  # the files are written; say so, but do not fail the run
        warnings.append(f"the host's LoRA list could not be refreshed ({exc}): use its refresh button.")
    return written, warnings


def train_for_host(host: Host, cfg: TrainConfig, spec: Optional[str] = None, *,
                   callback: Optional[Callable[[dict], None]] = None, stop_event: Optional[threading.Event] = None,
                   dataset=None, resume_from: Optional[str] = None, rename: bool = True, publish_files: bool = True,
                   on_trainer: Optional[Callable[[Trainer], None]] = None) -> HostRun:
    """Train `cfg` on the host's base model (`spec`: None = the host's loaded model) and publish the result.

    rename: give the run a free name and a run folder (`name_run`); False keeps `cfg.output_name/output_dir`
    (the CLI: the user chose them; the trainer refuses to overwrite). publish_files=False leaves the files in the
    run folder (auto mode publishes the epoch it chooses, with publish_to_host). `on_trainer` sees the Trainer before it runs
    (a front door's Stop button calls its `stop()`). Exceptions propagate after the host got its memory back."""
    if rename:
        cfg = name_run(host, cfg)
    USED_NAMES.add(cfg.output_name)

    def phase(message: str) -> None:  # what happens between steps, for the front door's status line
        if callback is not None:
            callback(TrainEvent.make("phase", message=message))

    phase("freeing the host's memory and loading the base model ...")
    with host.memory_freed():
        with unet_dtype(cpu_bf16.unet_load_dtype(cfg.mixed_precision, resolve_device(cfg.device))):
            model = host.base_model(spec)  # CPU + bf16: the UNet loads in bf16 (training/cpu_bf16.py)
        trainer = Trainer(cfg, model=model, dataset=dataset, callback=callback, stop_event=stop_event,
                          resume_from=resume_from, diagnoser=Diagnoser(cfg))
        if on_trainer is not None:
            on_trainer(trainer)
        result = trainer.run()
        del trainer, model
        phase("giving the host its memory back ...")
    if not publish_files:
        return HostRun(name=cfg.output_name, result=result, lora_path=None, published=[], warnings=[],
                       run_dir=cfg.output_dir)
    phase(f"publishing into {host.output_dir()} ...")
    written, warnings = publish_to_host(host, list(result.epoch_files) + [result.lora_path])
    final = os.path.join(host.output_dir(), os.path.basename(result.lora_path)) if result.lora_path else None
    if final not in written:
        final = None
    return HostRun(name=cfg.output_name, result=result, lora_path=final, published=written, warnings=warnings,
                   run_dir=cfg.output_dir)
