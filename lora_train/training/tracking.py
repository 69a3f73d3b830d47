"""Logging to TensorBoard / wandb (kohya `log_with`, `logging_dir`, `log_prefix`).

A Trainer callback: every `step` event logs loss/current, loss/average (kohya's names), lr/<group> (the lr each
optimizer group used) and grad_norm; `val_loss` events log loss/validation; `sample` events log the sample image
(samples/image). TensorBoard files are written by the tensorboard package's own writer
(torch.utils.tensorboard.SummaryWriter) into <logging_dir>/<log_prefix><YYYYmmddHHMMSS>/ as kohya names its runs;
wandb is used when installed (its offline mode, WANDB_MODE=offline, is respected: it is wandb's own setting).
"""
from __future__ import annotations

import os
import time
from typing import Any, List, Optional

import numpy as np
from PIL import Image

WANTS_TB = ("tensorboard", "all")
WANTS_WANDB = ("wandb", "all")


class TrackingError(RuntimeError):
    pass


def run_dir(cfg) -> str:
    root = cfg.logging_dir or os.path.join(cfg.output_dir, "logs")
    return os.path.join(root, f"{cfg.log_prefix}{time.strftime('%Y%m%d%H%M%S')}")


class Tracker:
    """Callback(ev) writing the run's scalars and sample images; `close()` at the end (the `done` event)."""

    def __init__(self, trainer, cfg):
        self.trainer, self.cfg = trainer, cfg
        self.dir = run_dir(cfg)
        self.tb = None
        self.wandb = None
        self.losses: List[float] = []
        if cfg.log_with in WANTS_TB:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
            except ImportError:
                raise TrackingError("log_with tensorboard needs the 'tensorboard' package: `pip install "
                                    "tensorboard`, or set log_with to empty.") from None
            os.makedirs(self.dir, exist_ok=True)
            self.tb = SummaryWriter(log_dir=self.dir)
        if cfg.log_with in WANTS_WANDB:
            try:
                import wandb  # optional: only when asked for
            except ImportError:
                if cfg.log_with == "wandb":
                    raise TrackingError("log_with wandb needs the 'wandb' package: `pip install wandb` (and `wandb "
                                        "login`, or WANDB_MODE=offline), or use log_with tensorboard.") from None
                wandb = None
            if wandb is not None:
                os.makedirs(self.dir, exist_ok=True)
                self.wandb = wandb.init(project=cfg.log_prefix or "lora_train", name=cfg.output_name, dir=self.dir,
                                        config=cfg.to_dict(), reinit=True)

    def _scalars(self, step: int, values: dict) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(values), step=step)

    def __call__(self, ev) -> None:
        event = ev["kind"]
        if event == "step":
            self.losses.append(float(ev["loss"]))
            vals = {"loss/current": float(ev["loss"]), "loss/average": float(np.mean(self.losses))}
            names = getattr(self.trainer, "group_names", None) or []
            for i, lr in enumerate(getattr(self.trainer, "last_lrs", None) or [ev["lr"]]):
                vals[f"lr/{names[i] if i < len(names) else f'group{i}'}"] = float(lr)
            gn = getattr(self.trainer, "last_grad_norm", None)
            if gn is not None:
                vals["grad_norm"] = float(gn)
            self._scalars(int(ev["step"]), vals)
        elif event == "val_loss":
            self._scalars(int(ev["step"]), {"loss/validation": float(ev["val_loss"])})
        elif event == "epoch":
            self._scalars(int(ev["step"]), {"loss/epoch": float(ev.get("mean_loss") or 0.0)})
        elif event == "sample" and ev.get("path"):
            self._image(int(ev["step"]), ev["path"])
        elif event == "done":
            self.close()

    def _image(self, step: int, path: str) -> None:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        if self.tb is not None:
            self.tb.add_image("samples/image", arr, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb  # optional: present when self.wandb is set

            self.wandb.log({"samples/image": wandb.Image(arr)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def make(trainer, cfg) -> Optional[Tracker]:
    return Tracker(trainer, cfg) if cfg.log_with else None
