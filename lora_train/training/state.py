"""A run's resumable state and its recovery from a non-finite step: the state folders (<output_dir>/state/<name>-
step-N/: adapter and optimizer / RNG files, the trainer's position and logs), their listing, and the Trainer's
snapshot / restore / save / load and NaN-recovery methods (StateMixin, mixed into training.trainer.Trainer)."""
from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..io_utils import follow_umask
from ..networks import lora as lora_mod
from ..networks import network


STATE_DIRNAME = "state"
#: a state's adapter (safetensors) and optimizer/RNG (torch) files: extensions no host lists as a LoRA (a stopped
#: run's state may sit in a folder a host reads); states written as adapter.safetensors / torch_state.pt still load
STATE_ADAPTER, STATE_TORCH = "adapter.lrstate", "torch_state.lrstate"
OLD_STATE_FILES = {STATE_ADAPTER: "adapter.safetensors", STATE_TORCH: "torch_state.pt"}


def state_file(folder: str, name: str) -> str:
    """A state folder's file `name` (STATE_ADAPTER / STATE_TORCH), or the name an older version wrote."""
    path = os.path.join(folder, name)
    old = os.path.join(folder, OLD_STATE_FILES[name])
    return old if not os.path.exists(path) and os.path.exists(old) else path


def list_states(run_dir: str, name: Optional[str] = None) -> List[str]:
    """Resumable states of a run folder (or one state folder itself), oldest first.

    States are `<run_dir>/state/<output_name>-step-<N>/`, so runs of several names can share one output folder;
    `name` picks one run. Without it a folder holding the states of several runs is an error that names them."""
    if os.path.isfile(os.path.join(run_dir, "trainer.json")):
        return [run_dir]
    root = os.path.join(run_dir, STATE_DIRNAME)
    if not os.path.isdir(root):
        return []
    found = []
    for n in os.listdir(root):
        m = re.match(r"^(?:(.+)-)?step-(\d+)$", n)
        if m and os.path.isfile(os.path.join(root, n, "trainer.json")):
            found.append((m.group(1) or "", int(m.group(2)), n))
    if name is not None:
        found = [f for f in found if f[0] == name]
    elif len({f[0] for f in found}) > 1:
        raise ValueError(f"'{run_dir}' holds the states of several runs ({', '.join(sorted({f[0] for f in found}))}): "
                         f"resume with the config (output_name) of the run you want.")
    return [os.path.join(root, n) for _, _, n in sorted(found, key=lambda f: f[1])]



class StateMixin:
    """The Trainer's resumable state and NaN recovery (uses the Trainer's model, optimizer, schedule, position)."""

    def trainable_named(self) -> Dict[str, torch.nn.Parameter]:
        out = {}
        mods = [("unet", self.model.unet), ("te", self.model.text_encoder)]
        if self.model.text_encoder_2 is not None:
            mods.append(("te2", self.model.text_encoder_2))
        for prefix, mod in mods:
            for n, p in mod.named_parameters():
                if network.is_trainable_name(n, lora_mod.DEFAULT_ADAPTER):
                    out[f"{prefix}.{n}"] = p
        return out

    def _snapshot(self) -> Dict[str, Any]:
        """Everything needed to continue bit for bit, in memory."""
        import copy

        snap = {
            "params": {k: v.detach().clone() for k, v in self.trainable_named().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.lr_scheduler.state_dict()),
            "gen": self.gen.get_state().clone(),
            "torch_rng": torch.random.get_rng_state().clone(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "pos": dict(self.pos),
            "history": list(self.history), "val_history": list(self.val_history),
            "recoveries": self.recoveries, "ramp": list(self.ramp) if self.ramp else None,
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            snap["cuda_rng"] = torch.cuda.get_rng_state_all()
        return snap

    def _restore(self, snap: Dict[str, Any], params_and_optimizer_only: bool = False) -> None:
        named = self.trainable_named()
        with torch.no_grad():
            for k, v in snap["params"].items():
                named[k].copy_(v)
        self.optimizer.load_state_dict(snap["optimizer"])
        if params_and_optimizer_only:
            return
        self.lr_scheduler.load_state_dict(snap["scheduler"])
        self.gen.set_state(snap["gen"])
        torch.random.set_rng_state(snap["torch_rng"])
        np.random.set_state(snap["numpy_rng"])
        random.setstate(snap["python_rng"])
        if "cuda_rng" in snap and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(snap["cuda_rng"])
        self.pos = dict(snap["pos"])
        self.history, self.val_history = list(snap["history"]), list(snap["val_history"])
        self.recoveries, self.ramp = snap["recoveries"], snap["ramp"]

    def save_state(self) -> Optional[str]:
        """Write a resumable state folder atomically; keep the last `save_state_keep`."""
        if not self.accelerator.is_main_process:
            return None
        import shutil
        import tempfile

        from safetensors.torch import save_file

        snap = self._snapshot()
        root = os.path.join(self.cfg.output_dir, STATE_DIRNAME)
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, f"{self.cfg.output_name}-step-{self.pos['step']:08d}")
        tmp = tempfile.mkdtemp(prefix=".tmp-state-", dir=root)
        try:
            save_file({k: v.float().cpu().contiguous() for k, v in snap["params"].items()},
                      os.path.join(tmp, STATE_ADAPTER))
            torch.save({"optimizer": snap["optimizer"], "scheduler": snap["scheduler"], "gen": snap["gen"],
                        "torch_rng": snap["torch_rng"], "cuda_rng": snap.get("cuda_rng")},
                       os.path.join(tmp, STATE_TORCH))
            np_state = snap["numpy_rng"]
            meta = {
                "version": 1, "pos": snap["pos"], "history": snap["history"], "val_history": snap["val_history"],
                "recoveries": snap["recoveries"], "ramp": snap["ramp"],
                "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                              float(np_state[4])],
                "python_rng": [snap["python_rng"][0], list(snap["python_rng"][1]), snap["python_rng"][2]],
                "config": self.cfg.to_dict(),
            }
            for hook in self._hooks("save_state"):  # kohya: the EMA weights
                hook(self, tmp)
            with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as fh:
                json.dump(meta, fh)
            follow_umask(tmp)  # readable by a host running as another user, like every file we write
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        for old in list_states(self.cfg.output_dir, self.cfg.output_name)[:-self.cfg.save_state_keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.last_good = snap
        self._last_state_step = self.pos["step"]
        self.emit("state", path=final, step=self.pos["step"])
        return final

    def _wants_final_state(self, stopped: bool) -> bool:
        """A resumable state at the end of a run: always after a stop (user, host interrupt, non-finite loss), else
        only when asked (`save_state`, or a periodic `save_state_every_n_*`). A finished run leaves none by
        default: at SD1.5 a state is ~55 MB, and a host lists every .safetensors/.pt under its LoRA folder."""
        cfg = self.cfg
        if stopped:
            return all(bool(torch.isfinite(p).all()) for p in self.trainable_named().values())
        return bool(cfg.save_state or cfg.save_state_every_n_steps or cfg.save_state_every_n_epochs)

    def _state_name(self, path: str) -> Optional[str]:
        """The run name to resume in `path`: this config's output_name when that folder holds its states."""
        if os.path.isfile(os.path.join(path, "trainer.json")):
            return None
        return self.cfg.output_name if list_states(path, self.cfg.output_name) else None

    def load_state(self, path: str) -> None:
        from safetensors.torch import load_file

        states = list_states(path, self._state_name(path))
        d = states[-1]
        with open(os.path.join(d, "trainer.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        ts = torch.load(state_file(d, STATE_TORCH), weights_only=True)
        npr = meta["numpy_rng"]
        snap = {
            "params": load_file(state_file(d, STATE_ADAPTER)),
            "optimizer": ts["optimizer"], "scheduler": ts["scheduler"], "gen": ts["gen"],
            "torch_rng": ts["torch_rng"],
            "numpy_rng": (npr[0], np.array(npr[1], dtype=np.uint32), npr[2], npr[3], npr[4]),
            "python_rng": (meta["python_rng"][0], tuple(meta["python_rng"][1]), meta["python_rng"][2]),
            "pos": meta["pos"], "history": meta["history"], "val_history": meta["val_history"],
            "recoveries": meta["recoveries"], "ramp": meta["ramp"],
        }
        if ts.get("cuda_rng") is not None:
            snap["cuda_rng"] = ts["cuda_rng"]
        missing = set(self.trainable_named()) ^ set(snap["params"])
        if missing:
            raise ValueError(f"the state in '{d}' does not fit this config (different LoRA modules, e.g. "
                             f"{sorted(missing)[0]}): resume with the config it was saved with.")
        self._restore(snap)
        for hook in self._hooks("load_state"):  # kohya: the EMA weights
            hook(self, d)
        self.last_good = snap
        self.emit("resumed", path=d, step=self.pos["step"], epoch=self.pos["epoch"])

    def _on_nonfinite(self, what: str, value: float) -> bool:
        """Returns True to continue (recovered), False to stop."""
        cfg = self.cfg
        step = self.pos["step"] + 1
        advice = ("halve learning_rate, add warm-up (lr_warmup_steps 100-200), and resume from the last good "
                  f"state with --resume {cfg.output_dir}")
        if cfg.nan_policy == "recover" and self.recoveries < cfg.nan_max_recoveries and self.last_good is not None:
            self.recoveries += 1
            self._restore(self.last_good, params_and_optimizer_only=True)
            old = [g["lr"] for g in self.optimizer.param_groups]
            self.lr_scheduler.base_lrs = [b * 0.5 for b in self.lr_scheduler.base_lrs]
            warm = max(10, self.warmup_steps)
            self.ramp = [self.pos["step"], warm]
            self.emit("nan", step=step, what=what, value=value, action="recover", recovery=self.recoveries,
                      lr_before=old[0], lr_base_after=self.lr_scheduler.base_lrs[0], warmup_steps=warm,
                      message=f"non-finite {what} at step {step}: rolled back to step {self.last_good['pos']['step']}'s "
                              f"weights, halved the learning rate to {self.lr_scheduler.base_lrs[0]:.3g} and added "
                              f"{warm} warm-up steps (recovery {self.recoveries}/{cfg.nan_max_recoveries}).")
            return True
        self.nan_message = (f"non-finite {what} ({value}) at step {step}: training stopped; the update was not "
                            f"applied and the files written so far are finite. Next: {advice}.")
        self.emit("nan", step=step, what=what, value=value, action="stop", message=self.nan_message)
        return False

    def _apply_ramp(self) -> None:
        if not self.ramp:
            return
        start, length = self.ramp
        k = (self.pos["step"] - start) / float(length)
        if k >= 1:
            self.ramp = None
            return
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * max(k, 1.0 / length)

