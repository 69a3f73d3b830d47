"""The training loop: accelerate precision/devices, accumulation, schedulers, epoch files, events, stop."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import __version__
from ..config import TrainConfig
from ..data.buckets import BucketBatchSampler
from ..data import caption_aug
from ..data.cache import CachingStopped, LatentCache, TextEmbeddingCache, module_identity
from ..data.dataset import ImageDataset, load_dataset
from ..io_utils import atomic_write_text, follow_umask, next_free_name, save_image
from ..models import conditioning
from ..models.base import BaseModel
from ..models.loading import load_base_model
from ..models import text_chunks
from ..networks import lora as lora_mod
from ..networks import network
from ..plots import loss_plot
from ..sampler import sample_in_training
from ..tuning.advisor import Diagnoser
from . import flow as flow_train
from . import kohya_extras
from . import loss as loss_mod
from . import cpu_bf16
from .memory import BlockSwap, apply_fp8_base
from .events import TrainEvent
from .optim import describe, make_optimizer

log = logging.getLogger(__name__)

Callback = Callable[[TrainEvent], None]

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                "sd2-512": "stable-diffusion-v2-512/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}


def architecture(kind: str, prediction_type: str) -> str:
    """modelspec.architecture as kohya writes it: SD2 epsilon models are the 512-base ones."""
    if kind == "sd2" and prediction_type == "epsilon":
        return ARCHITECTURE["sd2-512"]
    return ARCHITECTURE.get(kind, ARCHITECTURE["sd1"])


class ZeroLoRAError(ValueError):
    """Training ended with every lora_up (B) matrix exactly zero: the file would do nothing, so none is written."""


@dataclass
class TrainResult:
    output_dir: str
    lora_path: Optional[str]
    epoch_files: List[str]
    config_path: str
    loss_csv: str
    loss_png: str
    steps: int
    epochs_done: int
    stopped: bool
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    nan_stopped: bool = False
    message: str = ""
    val_losses: List[float] = field(default_factory=list)
    recoveries: int = 0
    findings: List[Dict[str, Any]] = field(default_factory=list)  # advisor.Finding.to_dict() of the live diagnosis


def output_paths(cfg: TrainConfig) -> Dict[str, str]:
    d, n = cfg.output_dir, cfg.output_name
    return {"lora": os.path.join(d, f"{n}.safetensors"), "config": os.path.join(d, f"{n}.yaml"),
            "loss_csv": os.path.join(d, f"{n}_loss.csv"), "loss_png": os.path.join(d, f"{n}_loss.png")}


def epoch_path(cfg: TrainConfig, epoch: int) -> str:
    return os.path.join(cfg.output_dir, f"{cfg.output_name}-{epoch:06d}.safetensors")


def step_path(cfg: TrainConfig, step: int) -> str:
    """kohya's name for a LoRA saved every N steps."""
    return os.path.join(cfg.output_dir, f"{cfg.output_name}-step{step:08d}.safetensors")


def check_outputs_free(cfg: TrainConfig) -> None:
    if cfg.overwrite:
        return
    taken = [p for p in output_paths(cfg).values() if os.path.exists(p)]
    taken += [epoch_path(cfg, e) for e in range(1, cfg.epochs + 1) if os.path.exists(epoch_path(cfg, e))]
    if taken:
        free = next_free_name(cfg.output_dir, cfg.output_name)
        raise FileExistsError(f"'{taken[0]}' exists already and is never overwritten by default: use "
                              f"output_name '{free}' (free), or pass --overwrite to replace it.")


WARMUP_MAX_FRACTION = 0.1


def effective_warmup(asked: int, total_steps: int, scheduler: str) -> Tuple[int, str]:
    """(warm-up steps the schedule uses, why it differs from `asked` or "").

    A warm-up longer than ~10% of the optimizer steps is cut to 10% (rounded down, at least 0): a warm-up as long
    as the run never reaches the learning rate, and after one step of a 100-step warm-up every lora_up is still
    exactly zero (a LoRA that does nothing). `constant` ignores warm-up."""
    if scheduler == "constant" or asked <= 0:
        return max(0, asked), ""
    cap = int(total_steps * WARMUP_MAX_FRACTION)
    if asked <= cap:
        return asked, ""
    where = "as long as the run or longer" if asked >= total_steps else f"more than {WARMUP_MAX_FRACTION:.0%} of it"
    return cap, (f"lr_warmup_steps {asked} is {where} ({total_steps} optimizer steps): using {cap} warm-up steps "
                 f"({WARMUP_MAX_FRACTION:.0%} of the run) so that the learning rate reaches its full value; "
                 f"set lr_warmup_steps to {cap} or less to silence this.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def encode_prompts(model: BaseModel, captions: List[str], device: torch.device):
    """Text conditioning of captions: last hidden state (SD1/SD2), {"hidden", "pooled"} (SDXL); conditioning.py."""
    return conditioning.encode(model, captions, device)


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


class Trainer:
    def __init__(self, cfg: TrainConfig, model: Optional[BaseModel] = None, dataset: Optional[ImageDataset] = None,
                 callback: Optional[Callback] = None, stop_event: Optional[threading.Event] = None,
                 resume_from: Optional[str] = None, loss_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None):
        self.cfg = cfg.validate()
        self.model = model
        self.dataset = dataset
        self.callbacks: List[Callback] = [callback] if callback else []
        self.stop_event = stop_event or threading.Event()
        self.resume_from = resume_from
        self.loss_hook = loss_hook  # fault injection in tests: (step, loss) -> loss
        self.history: List[Dict[str, float]] = []
        self.val_history: List[Dict[str, float]] = []
        self.started_at = 0.0
        self.recoveries = 0
        self.ramp: Optional[List[int]] = None  # [start_step, length] of a post-NaN warm-up
        self.cache_stats: Dict[str, Any] = {}
        self.findings: List[Any] = []
        self._last_state_step: Optional[int] = None

    # ------------------------------------------------------------------ events
    def emit(self, kind: str, **data: Any) -> None:
        acc = getattr(self, "accelerator", None)
        if acc is not None and not acc.is_main_process:
            return  # with several processes only the main one reports
        ev = TrainEvent.make(kind, **data)
        for cb in self.callbacks:
            cb(ev)
        diag = getattr(self, "diagnoser", None)
        if diag is not None and kind in ("start", "step", "val_loss", "nan"):
            for f in diag.handle_event(ev):
                self.findings.append(f)
                fev = TrainEvent.make("diagnosis", finding=f.to_dict(), message=str(f))
                for cb in self.callbacks:
                    cb(fev)

    def stop(self) -> None:
        """Ask the loop to end after the current step; what was trained is saved."""
        self.stop_event.set()

    # ------------------------------------------------------------------ setup
    def _prepare(self):
        cfg = self.cfg
        if self.resume_from is not None and not list_states(self.resume_from, self._state_name(self.resume_from)):
            raise FileNotFoundError(f"no resumable state in '{self.resume_from}': give the run's output folder "
                                    f"(it holds {STATE_DIRNAME}/<name>-step-*/; a run leaves one when stopped, or "
                                    f"with save_state: true), or train without --resume.")
        from accelerate import Accelerator

        self.device = resolve_device(cfg.device)
        self.accelerator = Accelerator(mixed_precision=cpu_bf16.accelerate_precision(cfg.mixed_precision, self.device),
                                       cpu=self.device.type == "cpu")  # CPU + bf16: fp32 compute (training/cpu_bf16.py)
        self.device = self.accelerator.device
        if self.resume_from is None:
            check_outputs_free(cfg)  # every process checks before any process writes
        self.accelerator.wait_for_everyone()
        if self.dataset is None:
            self.dataset = load_dataset(cfg.train_data_dir, cfg.resolution, cfg.trigger_word, cfg.caption_extension)
        kohya_extras.after_dataset(self)  # num_repeats, reg images (reg_data_dir)
        for w in self.dataset.warnings:
            self.emit("warning", message=w)
        if self.model is None:
            files = {k: getattr(cfg, k) for k in ("ae", "clip_l", "clip_g", "t5xxl") if getattr(cfg, k)}
            self.model = load_base_model(cfg.base_model, cfg.prediction_type, allow_pickle=cfg.allow_pickle,
                                         **({"files": files} if files else {}))  # Flux / SD3 component files
        elif cfg.prediction_type != "auto" and not flow_train.is_flow(self.model):
            self.model.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        if flow_train.is_flow(self.model):  # Flux / SD3: conditioning and timestep options into model.extra
            flow_train.configure(self.model, cfg)
            if cfg.min_snr_gamma:
                self.emit("warning", message="min_snr_gamma does not apply to flow matching (Flux / SD3) and is "
                                             "ignored; weighting_scheme (logit_normal, sigma_sqrt, cosmap) is the "
                                             "flow-matching weighting.")
        for w in text_chunks.configure(self.model, cfg.clip_skip, cfg.max_token_length):  # kohya text options
            self.emit("warning", message=w)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

    def _seed_all(self, seed: int) -> torch.Generator:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        return torch.Generator(device="cpu").manual_seed(seed)

    def _cache_folder(self, mode: str, kind: str) -> Optional[str]:
        if mode != "disk":
            return None
        return os.path.join(self.cfg.cache_dir or os.path.join(self.cfg.output_dir, "cache"), kind)

    def _caching_progress(self, what: str):
        def report(done: int, total: int) -> None:
            self.emit("caching", what=what, done=done, total=total)
        return report

    @torch.no_grad()
    def _cache_latents(self, flip: bool = False):
        """Latents of every item (its bucket or the square resolution), encoded once; a sequence by item index.

        Disk mode keys entries by image content, size, crop, flip and VAE, so a changed image is re-encoded and
        nothing else, and memory stays flat however many images there are."""
        m, ds = self.model, self.dataset
        vae = m.vae.to(self.device)
        scale, shift = m.vae_scale, m.vae_shift
        if getattr(self, "_vae_id", None) is None:
            self._vae_id = module_identity(vae, extra=f"latent_dist.mean*{scale:g}" + (f"-{shift:g}" if shift else ""))
        cache = LatentCache(self._cache_folder(self.cfg.latent_cache, "latents"), self._vae_id)

        def encode(px: torch.Tensor) -> torch.Tensor:
            lat = (vae.encode(px.to(self.device, vae.dtype)).latent_dist.mean - shift) * scale
            return lat.float().cpu()

        store = cache.get_or_encode(ds, encode, flip=flip, batch_size=4,
                                    progress=self._caching_progress("latents (flipped)" if flip else "latents"),
                                    should_stop=self.stop_event.is_set)
        self.cache_stats[f"latents{'_flip' if flip else ''}"] = cache.stats
        return store

    @torch.no_grad()
    def _cache_text(self, extra: Sequence[str] = ()):
        """caption -> conditioning of the frozen text encoder(s) (conditioning.encode: a tensor, or SDXL's
        {"hidden", "pooled"}), encoded once (memory or disk)."""
        caps = sorted({it.caption for it in self.dataset.items} | set(extra))
        if getattr(self, "_te_id", None) is None:
            self._te_id = "+".join(module_identity(te, extra=f"conditioning.encode/{self.model.kind}"
                                                   f"/{text_chunks.options(self.model)}"
                                                   + flow_train.flow.encode_tag(self.model))
                                   for te in self.model.text_encoders)
        cache = TextEmbeddingCache(self._cache_folder(self.cfg.text_cache, "text"), self._te_id)
        store = cache.get_or_encode(caps, lambda chunk: conditioning.map_cond(
            conditioning.encode(self.model, chunk, self.device), lambda t: t.float().cpu()),
                                    progress=self._caching_progress("text embeddings"),
                                    should_stop=self.stop_event.is_set)
        self.cache_stats["text"] = cache.stats
        return store

    def _split(self) -> Tuple[List[int], List[int]]:
        """(train item indices, validation item indices), deterministic for validation_seed."""
        n = len(self.dataset.items)
        k = int(round(n * self.cfg.validation_split))
        if k == 0 or n - k < 1:
            return list(range(n)), []
        val = sorted(random.Random(self.cfg.validation_seed).sample(range(n), k))
        vs = set(val)
        return [i for i in range(n) if i not in vs], val
    # ------------------------------------------------------------------ state (resume)
    def _trainable_named(self) -> Dict[str, torch.nn.Parameter]:
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
            "params": {k: v.detach().clone() for k, v in self._trainable_named().items()},
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
        named = self._trainable_named()
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
            kohya_extras.save_state_extra(self, tmp)  # EMA weights
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
            return all(bool(torch.isfinite(p).all()) for p in self._trainable_named().values())
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
        missing = set(self._trainable_named()) ^ set(snap["params"])
        if missing:
            raise ValueError(f"the state in '{d}' does not fit this config (different LoRA modules, e.g. "
                             f"{sorted(missing)[0]}): resume with the config it was saved with.")
        self._restore(snap)
        kohya_extras.load_state_extra(self, d)  # EMA weights
        self.last_good = snap
        self.emit("resumed", path=d, step=self.pos["step"], epoch=self.pos["epoch"])

    # ------------------------------------------------------------------ NaN handling
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

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train: data and caches, network, optimizer and schedule, the epochs of steps, then the files."""
        self._prepare()
        early = self._prepare_data()
        if early is not None:
            return early
        self._build_network()
        self._build_optimizer_and_schedule()
        self._begin()
        while self.pos["step"] < self.total_steps and not self.stopped:
            if self.stop_event.is_set():  # before the epoch counter moves: a stop at an epoch's end is in that epoch
                self.stopped = True
                break
            if self.pos["batch"] >= self.batches_per_epoch:  # start a new epoch
                self.pos["epoch"] += 1
                self.pos["batch"] = 0
                self.pos["order"] = self.sampler.batches(self.pos["epoch"])
            self._train_epoch()
            if self.stopped or self.pos["batch"] < self.batches_per_epoch:  # stopped, or max steps mid-epoch
                break
            self._end_of_epoch(self.pos["epoch"])
        if self._ended_mid_epoch():  # max_train_steps inside an epoch: the final file gets its validation loss too
            self._record_validation(self.pos["epoch"])
        return self._finish()

    def _ended_mid_epoch(self) -> bool:
        return (not self.stopped and not self.nan_stop and self.pos["step"] >= self.total_steps
                and self.pos["step"] > self.start_step and 0 < self.pos["batch"] < self.batches_per_epoch)

    def _prepare_data(self) -> Optional[TrainResult]:
        """Seed, output folder, frozen base modules, buckets, latent / text caches, train-validation split.

        Returns a TrainResult when a stop during caching ends the run before it trains, else None."""
        cfg, m, ds, acc = self.cfg, self.model, self.dataset, self.accelerator
        self.gen = self._seed_all(cfg.seed)
        self.paths = paths = output_paths(cfg)
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
        self.nan_message = ""
        self.last_good = None
        self.stopped = self.nan_stop = False
        self.epoch_files: List[str] = []

        self.diagnoser = Diagnoser(cfg)
        self.started_at = time.time()

        m.unet.requires_grad_(False)
        m.vae.requires_grad_(False)
        for te in m.text_encoders:
            te.requires_grad_(False)
        for te in m.text_encoders:
            te.to(self.device)
        if cfg.enable_bucket:
            plan = ds.make_buckets(step=cfg.bucket_reso_steps, min_res=cfg.min_bucket_reso,
                                   max_res=cfg.max_bucket_reso, no_upscale=cfg.bucket_no_upscale)
            self.emit("info", message=plan.summary(ds.expanded()))
        dropout_caps = [""] if cfg.caption_dropout_rate > 0 else []
        try:
            with acc.main_process_first():  # with a disk cache, the other processes then read what it wrote
                self.latents = self._cache_latents()
                self.latents_flip = self._cache_latents(flip=True) if cfg.flip_aug else None
                self.text_cache = None if cfg.train_text_encoder or caption_aug.varies(cfg) \
                    else self._cache_text(dropout_caps)  # shuffled / dropped tags: encoded every step
        except CachingStopped as exc:
            self.emit("warning", message=f"stopped while caching: {exc}")
            res = TrainResult(output_dir=os.path.abspath(cfg.output_dir), lora_path=None, epoch_files=[],
                              config_path=paths["config"], loss_csv=paths["loss_csv"], loss_png=paths["loss_png"],
                              steps=0, epochs_done=0, stopped=True, message=str(exc))
            self.emit("done", result=res)
            return res
        if self.device.type != "cpu":
            m.vae.to("cpu")
            if self.text_cache is not None:  # frozen encoders are done once their outputs are cached: free the GPU
                for te in m.text_encoders:
                    te.to("cpu")
        self.train_idx, self.val_idx = self._split()
        kohya_extras.after_split(self)  # reg images train only, loss masks, TensorBoard / wandb
        self.val_groups: Dict[Tuple[int, ...], List[int]] = {}
        for i in self.val_idx:  # validation images batched by latent size (buckets)
            self.val_groups.setdefault(tuple(self.latents[i].shape), []).append(i)
        return None

    def _build_network(self) -> None:
        """Inject the LoRA adapters (seeded: two runs with one seed are identical), one param group per trained
        module (SDXL: both text encoders at te_lr), base weights in the mixed-precision dtype on the device, LoRA
        weights in fp32, gradient checkpointing."""
        cfg, m = self.cfg, self.model
        torch.manual_seed(cfg.seed)
        adapter = lora_mod.DEFAULT_ADAPTER
        spec = network.NetworkSpec.from_config(cfg, m.kind)  # the network type, its targets and LoRA+ groups
        if flow_train.is_flow(m) and (cfg.network_type == "locon" or (cfg.conv_rank or 0) > 0):
            self.emit("warning", message=f"{m.kind} transformers have no ResNet convolutions: conv_rank / LoCon do "
                                         f"not apply, the run trains {spec.type} on the Linear layers.")
        params = network.build(m.unet, "unet", spec, cfg.learning_rate, adapter)
        n_unet = len(params)
        if cfg.train_text_encoder:
            for _, te in conditioning.Conditioner(m).text_encoders:  # Flux / SD3: the CLIP encoders, never T5
                params += network.build(te, "te", spec, cfg.te_lr, adapter)
        params = kohya_extras.shape_network(self, params)  # block dims / lr, network_weights, EMA
        base_dtype = self.weight_dtype if self.device.type != "cpu" else None
        if cfg.fp8_base:  # cast in CPU memory first: a 12 B transformer never sits on the GPU in 16 bits
            m.unet.to(dtype=base_dtype or torch.float32)
            n8 = apply_fp8_base(m.unet, base_dtype or torch.float32)
            self.emit("info", message=f"fp8_base: {n8} frozen Linear layers stored as float8_e4m3fn, computed in "
                                      f"{str(base_dtype or torch.float32).replace('torch.', '')}.")
            m.unet.to(self.device)
        elif base_dtype:
            m.unet.to(self.device, dtype=base_dtype)
        elif cpu_bf16.applies(cfg.mixed_precision, self.device):  # frozen weights stored bf16, computed fp32
            n16 = cpu_bf16.store_frozen_bf16(m.unet)
            if not cfg.gradient_checkpointing:
                m.unet.enable_gradient_checkpointing()  # else autograd keeps each upcast weight: the fp32 copy again
            self.emit("info", message=f"bf16 on the CPU: {n16} frozen layers stored in bf16, computed in fp32 "
                                      f"(gradient checkpointing on).")
        else:
            m.unet.to(self.device)
            if next(m.unet.parameters()).dtype != torch.float32:  # CPU: fp32 (a Flux / SD3 file may load in bf16)
                m.unet.to(dtype=torch.float32)
        if cfg.train_text_encoder and base_dtype:
            for _, te in conditioning.Conditioner(m).text_encoders:
                te.to(self.device, dtype=base_dtype)
        self.in_dtype = base_dtype or torch.float32
        self.param_groups = params
        self.trainable = [p for g in params for p in g["params"]]
        self.te_trainable = [p for g in params[n_unet:] if "unet_block" not in g for p in g["params"]]
        for p in self.trainable:  # LoRA weights always train in fp32
            p.data = p.data.float()
            p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            for _, te in (conditioning.Conditioner(m).text_encoders if cfg.train_text_encoder else []):
                if hasattr(te, "gradient_checkpointing_enable"):
                    te.gradient_checkpointing_enable()

    def _build_optimizer_and_schedule(self) -> None:
        """Optimizer (optim.make_optimizer), data order, step counts, warm-up (at most 10% of the run), lr schedule,
        accelerate's wrapping and the optional torch.compile of the training forward."""
        cfg, ds, acc = self.cfg, self.dataset, self.accelerator
        optimizer = make_optimizer(cfg.optimizer, self.param_groups, self.device, cfg.weight_decay,
                                   (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon, cfg.optimizer_args)
        self.optimizer_desc = describe(optimizer)

        # data order: batches of one bucket each, a pure function of (seed, epoch); with N processes a global
        # batch is batch_size x N samples and each process trains on its slice (data parallel)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.local_bs, self.global_bs = cfg.batch_size, cfg.batch_size * self.world
        train_set = set(self.train_idx)
        expanded = [i for i in ds.expanded() if i in train_set]
        plan = ds.bucket_plan
        self.sampler = BucketBatchSampler(plan.item_bucket if plan is not None else [0] * len(ds.items),
                                          self.global_bs, seed=cfg.seed, expanded=expanded)
        n_samples = len(expanded)
        self.batches_per_epoch = len(self.sampler)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.total_steps = total_steps = cfg.max_train_steps or self.steps_per_epoch * cfg.epochs
        self.total_epochs = math.ceil(total_steps / self.steps_per_epoch)
        self.warmup_steps, why = effective_warmup(cfg.lr_warmup_steps, total_steps, cfg.lr_scheduler)
        if why:
            self.emit("warning", message=why, asked=cfg.lr_warmup_steps, used=self.warmup_steps,
                      total_steps=total_steps)
        from diffusers.optimization import get_scheduler

        sched_kw = {}
        if cfg.lr_scheduler == "cosine_with_restarts":
            sched_kw["num_cycles"] = cfg.lr_scheduler_num_cycles
        if cfg.lr_scheduler == "polynomial":
            sched_kw["power"] = cfg.lr_scheduler_power
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=self.warmup_steps,
                                     num_training_steps=total_steps, **sched_kw)
        unet, optimizer = acc.prepare(self.model.unet, optimizer)
        # blocks_to_swap: the last N blocks' frozen weights back to CPU memory, moved in around their forward
        self.block_swap = BlockSwap(self.model.unet, cfg.blocks_to_swap, self.device) if cfg.blocks_to_swap else None
        if cfg.torch_compile:  # only the training forward goes through the compiled module; saving reads m.unet
            unet = torch.compile(unet)
        self.train_unet = unet
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self._meta_common = dict(n_images=len(self.train_idx), n_samples=n_samples,
                                 batches_per_epoch=self.batches_per_epoch, total_steps=total_steps,
                                 total_epochs=self.total_epochs)

    def _begin(self) -> None:
        """Position (step, epoch, batch, data order), a resumed state or the first last-good snapshot, `start`."""
        cfg = self.cfg
        self.pos = {"step": 0, "epoch": 0, "batch": self.batches_per_epoch, "order": []}
        if self.resume_from is not None:
            self.load_state(self.resume_from)
        else:
            self.last_good = self._snapshot()
        self.started_at = time.time()
        self.start_step = self.pos["step"]
        self.emit("start", total_steps=self.total_steps, total_epochs=self.total_epochs, images=len(self.train_idx),
                  samples=self._meta_common["n_samples"], device=str(self.device),
                  steps_per_epoch=self.steps_per_epoch, resumed_at=self.start_step,
                  validation_images=len(self.val_idx), processes=self.world,
                  effective_batch=self.global_bs * cfg.gradient_accumulation_steps)
        self.t_last = time.time()
        self.train_unet.train()

    def _train_epoch(self) -> None:
        """The batches of the current epoch from pos["batch"] on: micro-batches accumulated into optimizer steps.
        Returns at a stop request (self.stopped), a non-finite stop (self.nan_stop), the last step of the run, or
        the end of the epoch."""
        accum, bpe = self.cfg.gradient_accumulation_steps, self.batches_per_epoch
        order = self.pos["order"]
        micro, running = 0, []
        for b in range(self.pos["batch"], bpe):
            if self.stop_event.is_set():
                self.stopped = True
                return
            running.append(self._forward_backward(list(order[b])))
            micro += 1
            if micro % accum != 0 and b != bpe - 1:
                continue
            done = self._optimizer_step(running)
            running = []
            if done is None:  # non-finite: not applied
                if self.nan_stop:
                    return
                self.pos["batch"] = b + 1
                continue
            self.pos["step"] += 1
            self.pos["batch"] = b + 1
            self._apply_ramp()
            self._after_step(*done)
            if self.pos["step"] >= self.total_steps:
                return

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Host -> device; on CUDA from pinned memory, so that the copy overlaps the GPU's work."""
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def _forward_backward(self, batch: List[int]) -> torch.Tensor:
        """One micro-batch: the random draws for the whole global batch (flip, noise and noise offset, timesteps,
        caption dropout; the same numbers per sample whatever the process count), this process's slice, the loss
        (loss.diffusion_loss) and its backward. Returns the detached float loss."""
        cfg, m, ds, acc, gen = self.cfg, self.model, self.dataset, self.accelerator, self.gen
        if self.world > 1 and len(batch) < self.global_bs:  # a short last batch: every process needs samples
            batch += [batch[j % len(batch)] for j in range(self.global_bs - len(batch))]
        n = len(batch)
        lo, hi = (self.rank * self.local_bs, (self.rank + 1) * self.local_bs) if self.world > 1 else (0, n)
        latents, latents_flip = self.latents, self.latents_flip
        flips = (torch.rand(n, generator=gen) < 0.5).tolist() if latents_flip is not None else [False] * n
        shape = (n,) + tuple(latents[batch[0]].shape)
        noise = loss_mod.offset_noise(torch.randn(shape, generator=gen), cfg.noise_offset, gen)
        if flow_train.is_flow(m):  # sigma x 1000 by timestep_sampling (training/flow.py)
            t = flow_train.sample_timesteps(m, cfg, n, shape[-2:], gen)
        else:
            t = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
        noise, in_noise = kohya_extras.noises(cfg, noise, gen)  # multires / input perturbation noise
        caps = caption_aug.augment([ds.items[i].caption for i in batch], cfg)  # kohya shuffle / keep / tag dropout
        if cfg.caption_dropout_rate > 0:
            drop = (torch.rand(n, generator=gen) < cfg.caption_dropout_rate).tolist()
            caps = ["" if d else c for c, d in zip(caps, drop)]
        idx, flips, caps = batch[lo:hi], flips[lo:hi], caps[lo:hi]
        t_cpu = t[lo:hi]
        noise, t = self._to_device(noise[lo:hi]), self._to_device(t_cpu)
        lat = self._to_device(torch.stack([(latents_flip if f else latents)[i] for i, f in zip(idx, flips)]))
        with acc.autocast():
            cond = self.text_cache.stack(caps) if self.text_cache is not None else conditioning.encode(m, caps,
                                                                                                         self.device)
        # SDXL: per-sample original size / crop / target size from the item's resize + crop plan
        tids = conditioning.time_ids_for_items(ds, idx, cfg.resolution, flips) if conditioning.is_sdxl(m) else None
        loss = loss_mod.diffusion_loss(m, lat, cond, noise, t, unet=self.train_unet, min_snr_gamma=cfg.min_snr_gamma,
                                       time_ids=tids, resolution=cfg.resolution, in_dtype=self.in_dtype,
                                       snr_timesteps=t_cpu, autocast=acc.autocast,  # min-SNR from the CPU copy
                                       **kohya_extras.loss_kwargs(self, idx, flips, t_cpu, None if in_noise is None
                                                                  else self._to_device(in_noise[lo:hi]), lat.shape))
        if self.loss_hook is not None:
            loss = self.loss_hook(self.pos["step"] + 1, loss)
        if loss.requires_grad:  # a non-finite loss makes non-finite gradients: caught by the step, not applied
            acc.backward(loss / cfg.gradient_accumulation_steps)
        return loss.detach().float()

    def _optimizer_step(self, running: List[torch.Tensor]) -> Optional[Tuple[float, float]]:
        """Accumulated gradients -> one update: text-encoder grads averaged over processes, clipping, one host
        sync (loss, finite?, grad norm), then optimizer and schedule. Returns (step loss, lr the update used), or
        None when a non-finite loss / gradient was not applied (recovered, or self.nan_stop set)."""
        cfg, acc, optimizer = self.cfg, self.accelerator, self.optimizer
        if self.world > 1 and self.te_trainable:  # the text encoder is not DDP-wrapped: average its grads here
            for p in self.te_trainable:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, "mean")
        step_loss_t = torch.stack(running).mean()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        norm = acc.clip_grad_norm_(self.trainable, max_norm)
        ok_t = torch.isfinite(step_loss_t)
        if norm is not None and cfg.mixed_precision != "fp16":  # fp16: the grad scaler skips inf steps
            ok_t = ok_t & torch.isfinite(torch.as_tensor(norm).to(ok_t.device))
        vals = torch.stack([step_loss_t, ok_t.float(),
                            torch.as_tensor(norm if norm is not None else 0.0).float().to(ok_t.device)])
        if self.world > 1:
            vals = torch.stack([acc.reduce(vals[0], "mean"), acc.reduce(vals[1], "min"), vals[2]])
        step_loss, ok, norm_v = vals.cpu().tolist()  # the one host sync of a step
        if not ok:
            optimizer.zero_grad(set_to_none=True)
            bad = ("loss", step_loss) if not math.isfinite(step_loss) else ("gradient", norm_v)
            if not self._on_nonfinite(*bad):
                self.nan_stop = self.stopped = True
            return None
        step_lr = float(optimizer.param_groups[0]["lr"])  # the lr this update uses (before the schedule moves)
        self.last_lrs, self.last_grad_norm = [float(g["lr"]) for g in optimizer.param_groups], norm_v  # tracking
        optimizer.step()
        kohya_extras.after_optimizer_step(self)  # EMA
        self.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss, step_lr

    def _after_step(self, step_loss: float, step_lr: float) -> None:
        """After an update: the loss log, the `step` event, samples, step checkpoints and states every N steps."""
        cfg = self.cfg
        global_step, epoch = self.pos["step"], self.pos["epoch"]
        now = time.time()
        elapsed = now - self.started_at
        its = (global_step - self.start_step) / elapsed if elapsed > 0 else 0.0
        rec = {"step": global_step, "epoch": epoch, "loss": step_loss, "lr": step_lr}
        self.history.append(rec)
        if global_step % cfg.log_every_n_steps == 0 or global_step == self.total_steps:
            self.emit("step", total_steps=self.total_steps, total_epochs=self.total_epochs, its=its,
                      eta=(self.total_steps - global_step) / its if its > 0 else None,
                      step_time=now - self.t_last, **rec)
        if cfg.sample_every_n_steps and global_step % cfg.sample_every_n_steps == 0:
            self._sample(global_step, epoch)
        if cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0 and global_step < self.total_steps:
            self._checkpoint(step_path(cfg, global_step), epoch, global_step)
        if cfg.save_state_every_n_steps and global_step % cfg.save_state_every_n_steps == 0:
            self.save_state()
        self.t_last = time.time()

    def _checkpoint(self, path: str, epoch: int, step: int) -> None:
        if self._save_lora(path, epoch, step):
            self.epoch_files.append(path)
            self.emit("checkpoint", path=path, epoch=epoch, step=step)

    def _end_of_epoch(self, epoch: int) -> None:
        """After an epoch's last step: validation loss, samples, the `epoch` event, the epoch file, a state."""
        cfg = self.cfg
        global_step = self.pos["step"]
        self._record_validation(epoch)
        if cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            self._sample(global_step, epoch)
        self.emit("epoch", epoch=epoch, step=global_step,
                  mean_loss=float(np.mean([h["loss"] for h in self.history if h["epoch"] == epoch] or [0.0])))
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and global_step < self.total_steps:
            self._checkpoint(epoch_path(cfg, epoch), epoch, global_step)
        if cfg.save_state_every_n_epochs and epoch % cfg.save_state_every_n_epochs == 0:
            self.save_state()
        elif cfg.nan_policy == "recover":  # no state on disk: the point a non-finite step rolls back to
            self.last_good = self._snapshot()

    def _record_validation(self, epoch: int) -> None:
        """The held-out images' validation loss at this step, kept in the history and sent as `val_loss`."""
        if not self.val_groups:
            return
        vl = self._validation_loss(self.val_groups, self.latents, self.text_cache)
        self.val_history.append({"step": self.pos["step"], "epoch": epoch, "val_loss": vl})
        self.emit("val_loss", step=self.pos["step"], epoch=epoch, val_loss=vl)
        self.train_unet.train()

    def _finish(self) -> TrainResult:
        """The end of a run: a resumable state (after a stop, or when asked), the final LoRA (an all-zero one is an
        error), the loss log and plot, the config; the `done` event with the TrainResult."""
        cfg, acc, paths = self.cfg, self.accelerator, self.paths
        global_step, epoch = self.pos["step"], self.pos["epoch"]
        final = None
        if global_step > self.start_step and self._last_state_step != global_step \
                and self._wants_final_state(self.stopped):
            self.save_state()  # resumable from exactly here: after a stop, or (asked) to train on to a longer end
        self.emit("phase", message="saving the LoRA file and the loss log ...")
        try:
            if global_step > 0 and not self.nan_stop:
                final = paths["lora"]
                self._save_lora(final, epoch, global_step, final=True)
                self.emit("checkpoint", path=final, epoch=epoch, step=global_step, final=True)
        finally:
            self._write_logs(paths)
            if acc.is_main_process:
                cfg.save(paths["config"])
        acc.wait_for_everyone()
        res = TrainResult(output_dir=os.path.abspath(cfg.output_dir), lora_path=final, epoch_files=self.epoch_files,
                          config_path=paths["config"], loss_csv=paths["loss_csv"], loss_png=paths["loss_png"],
                          steps=global_step, epochs_done=epoch, stopped=self.stopped,
                          losses=[h["loss"] for h in self.history], seconds=time.time() - self.started_at,
                          nan_stopped=self.nan_stop, message=self.nan_message,
                          val_losses=[v["val_loss"] for v in self.val_history], recoveries=self.recoveries,
                          findings=[f.to_dict() for f in self.findings])
        self.train_unet.eval()
        self.emit("done", result=res)
        return res

    @torch.no_grad()
    def _validation_loss(self, groups: Dict[Tuple[int, ...], List[int]], latents, text_cache) -> float:
        """Deterministic denoising loss of the held-out images (fixed noise and timesteps), mean per element."""
        m, ds = self.model, self.dataset
        total, count = 0.0, 0
        for shape, idx in sorted(groups.items()):
            caps = [ds.items[i].caption for i in idx]
            cond = (text_cache.stack(caps) if text_cache is not None
                    else conditioning.map_cond(conditioning.encode(m, caps, self.device), lambda t: t.float()))
            lat = latents.stack(idx) if hasattr(latents, "stack") else torch.stack([latents[i] for i in idx])
            n = lat.numel()
            tids = conditioning.time_ids_for_items(ds, idx, self.cfg.resolution) if conditioning.is_sdxl(m) else None
            total += fixed_noise_loss(m, lat, cond, seed=self.cfg.validation_seed, time_ids=tids,
                                      min_snr_gamma=self.cfg.min_snr_gamma) * n
            count += n
        return total / count

    # ------------------------------------------------------------------ outputs
    def metadata(self, epoch: int, step: int) -> Dict[str, str]:
        cfg, m, ds, mc = self.cfg, self.model, self.dataset, self._meta_common
        now = time.time()
        res = f"({cfg.resolution}, {cfg.resolution})"
        meta = {
            "ss_network_dim": str(cfg.lora_rank),
            "ss_network_alpha": f"{cfg.alpha:g}",
            "ss_learning_rate": f"{cfg.learning_rate:g}",
            "ss_unet_lr": f"{cfg.learning_rate:g}",
            "ss_text_encoder_lr": f"{cfg.te_lr:g}" if cfg.train_text_encoder else "0",
            "ss_network_train_unet_only": str(not cfg.train_text_encoder),
            "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_lr_warmup_steps": str(getattr(self, "warmup_steps", cfg.lr_warmup_steps)),
            "ss_optimizer": self.optimizer_desc,
            "ss_max_grad_norm": f"{cfg.max_grad_norm:g}",
            "ss_num_train_images": str(mc["n_samples"]),
            "ss_num_reg_images": "0",
            "ss_num_batches_per_epoch": str(mc["batches_per_epoch"]),
            "ss_num_epochs": str(mc["total_epochs"]),
            "ss_epoch": str(epoch),
            "ss_steps": str(step),
            "ss_max_train_steps": str(mc["total_steps"]),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_total_batch_size": str(cfg.batch_size * cfg.gradient_accumulation_steps
                                       * self.accelerator.num_processes),
            "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
            "ss_resolution": res,
            "ss_seed": str(cfg.seed),
            "ss_mixed_precision": cfg.mixed_precision,
            "ss_full_fp16": "False",
            "ss_v2": str(m.kind == "sd2"),
            "ss_base_model_version": BASE_VERSION.get(m.kind, "sd_v1"),
            "ss_sd_model_name": m.name,
            "ss_sd_model_hash": m.model_hash()[:8],
            "ss_new_sd_model_hash": m.model_hash(),
            "ss_prediction_type": m.prediction_type,
            "ss_clip_skip": "None",
            "ss_noise_offset": f"{cfg.noise_offset:g}" if cfg.noise_offset else "None",
            "ss_min_snr_gamma": f"{cfg.min_snr_gamma:g}" if cfg.min_snr_gamma else "None",
            "ss_caption_dropout_rate": f"{cfg.caption_dropout_rate:g}",
            "ss_flip_aug": str(cfg.flip_aug),
            "ss_tag_frequency": json.dumps(ds.tag_frequency()),
            "ss_dataset_dirs": json.dumps({os.path.basename(ds.root): {"n_repeats": 1, "img_count": ds.image_count}}),
            "ss_training_started_at": f"{self.started_at:.3f}",
            "ss_training_finished_at": f"{now:.3f}",
            "ss_output_name": cfg.output_name,
            "ss_training_comment": f"trained with lora_train {__version__}",
            "ss_caption_extension": cfg.caption_extension,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture(m.kind, m.prediction_type),
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if m.kind == "sdxl"
            else "diffusers",
            "modelspec.title": cfg.output_name,
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
            "modelspec.prediction_type": "v" if m.prediction_type == "v_prediction" else "epsilon",  # ModelSpec
            "modelspec.date": datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if flow_train.is_flow(m):  # Flux / SD3: base model version, architecture, timestep options
            meta.update(flow_train.metadata(m, cfg))
        meta.update(network.metadata(network.NetworkSpec.from_config(cfg, m.kind), m.kind))  # ss_network_module, _args
        meta.update(kohya_extras.metadata(cfg, self))  # the kohya options (issue 18)
        if cfg.trigger_word:
            meta["modelspec.trigger_phrase"] = cfg.trigger_word
        return meta

    def _sample(self, step: int, epoch: int) -> None:
        if not self.accelerator.is_main_process:
            return
        cfg, m = self.cfg, self.model
        offloaded = [te for te in m.text_encoders if next(te.parameters()).device != self.device]
        if self.device.type != "cpu":
            for mod in [m.vae] + offloaded:
                mod.to(self.device)
        img = sample_in_training(m, lora_mod.DEFAULT_ADAPTER, cfg.sample_prompts, cfg.sample_seed, cfg.sample_steps,
                                 cfg.sample_cfg, cfg.resolution)
        if self.device.type != "cpu":
            for mod in [m.vae] + offloaded:
                mod.to("cpu")
        path = os.path.join(cfg.output_dir, "samples", f"{cfg.output_name}_e{epoch:04d}_s{step:06d}.png")
        save_image(img, path)
        self.emit("sample", path=path, step=step, epoch=epoch)

    def _save_lora(self, path: str, epoch: int, step: int, final: bool = False) -> bool:
        """Write the LoRA (kohya layout + metadata); False when it is skipped. Non-finite weights are an error;
        all-zero lora_up weights (a LoRA that does nothing) are an error for the final file and a skipped
        checkpoint with a warning before it."""
        if not self.accelerator.is_main_process:
            return True
        lw = kohya_extras.extract_for_save(self)  # the EMA copy when ema_decay is set
        finite, nonzero = network.check_finite_and_nonzero(lw)
        if not finite:
            raise FloatingPointError(f"non-finite LoRA weights at step {step}; nothing written to {path}. "
                                     f"Halve learning_rate and add warmup.")
        if step > 0 and (lw.modules or lw.extra) and not nonzero:
            if not final:
                self.emit("warning", message=f"step {step}: every lora_up weight is still zero (warm-up); "
                                             f"checkpoint '{path}' skipped.")
                return False
            raise ZeroLoRAError(
                f"after {step} optimizer step(s) every lora_up weight is still exactly zero: this LoRA would do "
                f"nothing, so '{path}' was not written (learning rate used: "
                f"{', '.join(f'{h:.3g}' for h in sorted({r['lr'] for r in self.history})) or 'none'}). Train more "
                f"steps (max_train_steps / epochs), use less warm-up (lr_warmup_steps), or a higher learning_rate.")
        lora_mod.save_kohya(lw, path, self.model.kind, self.metadata(epoch, step), overwrite=True)
        return True

    def _write_logs(self, paths: Dict[str, str]) -> None:
        if not self.accelerator.is_main_process:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "epoch", "loss", "lr", "val_loss"])
        val = {v["step"]: v["val_loss"] for v in self.val_history}
        for h in self.history:
            vl = val.get(h["step"])
            w.writerow([h["step"], h["epoch"], f"{h['loss']:.6g}", f"{h['lr']:.6g}",
                        "" if vl is None else f"{vl:.6g}"])
        atomic_write_text(paths["loss_csv"], buf.getvalue())
        img = loss_plot([h["step"] for h in self.history], [h["loss"] for h in self.history],
                        title=f"{self.cfg.output_name}: training loss",
                        val_steps=[v["step"] for v in self.val_history],
                        val_losses=[v["val_loss"] for v in self.val_history])
        save_image(img, paths["loss_png"])


def train(cfg: TrainConfig, callback: Optional[Callback] = None, model: Optional[BaseModel] = None,
          stop_event: Optional[threading.Event] = None, resume_from: Optional[str] = None) -> TrainResult:
    return Trainer(cfg, model=model, callback=callback, stop_event=stop_event, resume_from=resume_from).run()


@torch.no_grad()
def fixed_noise_loss(model: BaseModel, latents: torch.Tensor, text_embeds, seed: int = 0,
                     n_draws: int = 4, time_ids: Optional[torch.Tensor] = None,
                     min_snr_gamma: Optional[float] = None) -> float:
    """The training loss (loss.diffusion_loss) with noise and timesteps held fixed by `seed` (deterministic
    validation loss), mean over images and draws.

    latents: (N, C, H, W) already scaled; text_embeds: (N, L, D), or for SDXL {"hidden", "pooled"} with optional
    (N, 6) `time_ids` (default: the latents' size uncropped). Each image gets `n_draws` noise draws at
    timesteps spread evenly over the schedule; min_snr_gamma weights them as the training loop does.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    T = model.noise_scheduler.config.num_train_timesteps
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    lat = latents.float().to(device)
    total = 0.0
    for d in range(n_draws):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.full((latents.shape[0],), int((d + 0.5) * T / n_draws), dtype=torch.long)
        per_sample = loss_mod.diffusion_loss(model, lat, text_embeds, noise.to(device), t.to(device),
                                             min_snr_gamma=min_snr_gamma, time_ids=time_ids,
                                             resolution=latents.shape[-1] * vae_factor, in_dtype=dtype,
                                             snr_timesteps=t, reduction="none")
        total += float(per_sample.double().sum())
    return total / (n_draws * latents.shape[0])
