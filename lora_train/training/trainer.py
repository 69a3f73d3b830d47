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
import torch.nn.functional as F

from .. import __version__
from ..models import conditioning
from ..networks import lora as lora_mod
from ..config import TrainConfig
from ..data.dataset import ImageDataset, load_dataset
from ..io_utils import atomic_write_text, next_free_name, save_image
from ..models.base import BaseModel
from ..models.loading import load_base_model

log = logging.getLogger(__name__)

Event = Dict[str, Any]
Callback = Callable[[Event], None]

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                "sd2-512": "stable-diffusion-v2-512/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}


def architecture(kind: str, prediction_type: str) -> str:
    """modelspec.architecture as kohya writes it: SD2 epsilon models are the 512-base ones."""
    if kind == "sd2" and prediction_type == "epsilon":
        return ARCHITECTURE["sd2-512"]
    return ARCHITECTURE.get(kind, ARCHITECTURE["sd1"])


class TrainingStopped(Exception):
    pass


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
        ev = {"kind": kind, **data}
        for cb in self.callbacks:
            cb(ev)
        diag = getattr(self, "diagnoser", None)
        if diag is not None and kind in ("start", "step", "val_loss", "nan"):
            for f in diag.handle_event(ev):
                self.findings.append(f)
                fev = {"kind": "diagnosis", "finding": f.to_dict(), "message": str(f)}
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
                                    f"(it holds {STATE_DIRNAME}/step-*/), or train without --resume.")
        from accelerate import Accelerator

        self.device = resolve_device(cfg.device)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=self.device.type == "cpu")
        self.device = self.accelerator.device
        if self.resume_from is None:
            check_outputs_free(cfg)  # every process checks before any process writes
        self.accelerator.wait_for_everyone()
        if self.dataset is None:
            self.dataset = load_dataset(cfg.train_data_dir, cfg.resolution, cfg.trigger_word, cfg.caption_extension)
        for w in self.dataset.warnings:
            self.emit("warning", message=w)
        if self.model is None:
            self.model = load_base_model(cfg.base_model, cfg.prediction_type, allow_pickle=cfg.allow_pickle)
        elif cfg.prediction_type != "auto":
            self.model.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
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
        from ..data.cache import LatentCache, module_identity

        m, ds = self.model, self.dataset
        vae = m.vae.to(self.device)
        scale = m.vae_scale
        if getattr(self, "_vae_id", None) is None:
            self._vae_id = module_identity(vae, extra=f"latent_dist.mean*{scale:g}")
        cache = LatentCache(self._cache_folder(self.cfg.latent_cache, "latents"), self._vae_id)

        def encode(px: torch.Tensor) -> torch.Tensor:
            lat = vae.encode(px.to(self.device, vae.dtype)).latent_dist.mean * scale
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
        from ..data.cache import TextEmbeddingCache, module_identity

        caps = sorted({it.caption for it in self.dataset.items} | set(extra))
        if getattr(self, "_te_id", None) is None:
            self._te_id = "+".join(module_identity(te, extra=f"conditioning.encode/{self.model.kind}")
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
                if ".lora_A." in n or ".lora_B." in n:
                    if lora_mod.DEFAULT_ADAPTER in n:
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
                      os.path.join(tmp, "adapter.safetensors"))
            torch.save({"optimizer": snap["optimizer"], "scheduler": snap["scheduler"], "gen": snap["gen"],
                        "torch_rng": snap["torch_rng"], "cuda_rng": snap.get("cuda_rng")},
                       os.path.join(tmp, "torch_state.pt"))
            np_state = snap["numpy_rng"]
            meta = {
                "version": 1, "pos": snap["pos"], "history": snap["history"], "val_history": snap["val_history"],
                "recoveries": snap["recoveries"], "ramp": snap["ramp"],
                "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                              float(np_state[4])],
                "python_rng": [snap["python_rng"][0], list(snap["python_rng"][1]), snap["python_rng"][2]],
                "config": self.cfg.to_dict(),
            }
            with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as fh:
                json.dump(meta, fh)
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
        ts = torch.load(os.path.join(d, "torch_state.pt"), weights_only=True)
        npr = meta["numpy_rng"]
        snap = {
            "params": load_file(os.path.join(d, "adapter.safetensors")),
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
            warm = max(10, cfg.lr_warmup_steps)
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
        cfg = self.cfg
        self._prepare()
        m, ds, acc = self.model, self.dataset, self.accelerator
        self.gen = gen = self._seed_all(cfg.seed)
        paths = output_paths(cfg)
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
        self.nan_message = ""
        self.last_good = None
        from ..tuning.advisor import Diagnoser

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
        from ..data.cache import CachingStopped

        try:
            with acc.main_process_first():  # with a disk cache, the other processes then read what it wrote
                latents = self._cache_latents()
                latents_flip = self._cache_latents(flip=True) if cfg.flip_aug else None
                text_cache = None if cfg.train_text_encoder else self._cache_text(dropout_caps)
        except CachingStopped as exc:
            self.emit("warning", message=f"stopped while caching: {exc}")
            res = TrainResult(output_dir=os.path.abspath(cfg.output_dir), lora_path=None, epoch_files=[],
                              config_path=paths["config"], loss_csv=paths["loss_csv"], loss_png=paths["loss_png"],
                              steps=0, epochs_done=0, stopped=True, message=str(exc))
            self.emit("done", result=res)
            return res
        if self.device.type != "cpu":
            m.vae.to("cpu")
            if text_cache is not None:  # frozen encoders are done once their outputs are cached: free the GPU
                for te in m.text_encoders:
                    te.to("cpu")
        train_idx, val_idx = self._split()
        val_groups: Dict[Tuple[int, ...], List[int]] = {}
        for i in val_idx:  # validation images batched by latent size (buckets)
            val_groups.setdefault(tuple(latents[i].shape), []).append(i)

        # adapters (seeded so that two runs with one seed are identical)
        torch.manual_seed(cfg.seed)
        adapter = lora_mod.DEFAULT_ADAPTER
        lora_mod.inject(m.unet, lora_mod.unet_target_modules(m.unet), cfg.lora_rank, cfg.alpha, adapter)
        params = [{"params": lora_mod.lora_parameters(m.unet, adapter), "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:  # SDXL: both text encoders, one param group each, both at te_lr
            for te in m.text_encoders:
                lora_mod.inject(te, lora_mod.te_target_modules(te), cfg.lora_rank, cfg.alpha, adapter)
                params.append({"params": lora_mod.lora_parameters(te, adapter), "lr": cfg.te_lr})
        base_dtype = self.weight_dtype if self.device.type != "cpu" else None
        m.unet.to(self.device, dtype=base_dtype) if base_dtype else m.unet.to(self.device)
        if cfg.train_text_encoder and base_dtype:
            for te in m.text_encoders:
                te.to(self.device, dtype=base_dtype)
        trainable = [p for g in params for p in g["params"]]
        te_trainable = [p for g in params[1:] for p in g["params"]]
        for p in trainable:  # LoRA weights always train in fp32
            p.data = p.data.float()
            p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            for te in (m.text_encoders if cfg.train_text_encoder else []):
                if hasattr(te, "gradient_checkpointing_enable"):
                    te.gradient_checkpointing_enable()

        from .optim import describe, make_optimizer

        optimizer = make_optimizer(cfg.optimizer, params, self.device, cfg.weight_decay,
                                   (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon, cfg.optimizer_args)
        self.optimizer_desc = describe(optimizer)

        # data order: batches of one bucket each, a pure function of (seed, epoch); with N processes a global
        # batch is batch_size x N samples and each process trains on its slice (data parallel)
        from ..data.buckets import BucketBatchSampler

        world, rank = acc.num_processes, acc.process_index
        local_bs, global_bs = cfg.batch_size, cfg.batch_size * world
        train_set = set(train_idx)
        expanded = [i for i in ds.expanded() if i in train_set]
        plan = ds.bucket_plan
        sampler = BucketBatchSampler(plan.item_bucket if plan is not None else [0] * len(ds.items), global_bs,
                                     seed=cfg.seed, expanded=expanded)
        n_samples = len(expanded)
        batches_per_epoch = len(sampler)
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
        total_steps = cfg.max_train_steps or steps_per_epoch * cfg.epochs
        total_epochs = math.ceil(total_steps / steps_per_epoch)
        if cfg.lr_warmup_steps >= total_steps and cfg.lr_scheduler not in ("constant",):
            self.emit("warning", message=f"lr_warmup_steps ({cfg.lr_warmup_steps}) >= total steps ({total_steps}): "
                                         f"the learning rate never reaches {cfg.learning_rate:g}. Lower "
                                         f"lr_warmup_steps to about 10% of the steps.")
        from diffusers.optimization import get_scheduler

        sched_kw = {}
        if cfg.lr_scheduler == "cosine_with_restarts":
            sched_kw["num_cycles"] = cfg.lr_scheduler_num_cycles
        if cfg.lr_scheduler == "polynomial":
            sched_kw["power"] = cfg.lr_scheduler_power
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=total_steps, **sched_kw)
        unet, optimizer = acc.prepare(m.unet, optimizer)
        if cfg.torch_compile:  # only the training forward goes through the compiled module; saving reads m.unet
            unet = torch.compile(unet)
        cuda = self.device.type == "cuda"

        def to_dev(x: torch.Tensor) -> torch.Tensor:  # pinned host memory: the copy overlaps the GPU's work
            return x.pin_memory().to(self.device, non_blocking=True) if cuda else x.to(self.device)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self._meta_common = dict(n_images=len(train_idx), n_samples=n_samples, batches_per_epoch=batches_per_epoch,
                                 total_steps=total_steps, total_epochs=total_epochs)
        self.pos = {"step": 0, "epoch": 0, "batch": batches_per_epoch, "order": []}
        if self.resume_from is not None:
            self.load_state(self.resume_from)
        else:
            self.last_good = self._snapshot()

        self.started_at = time.time()
        start_step = self.pos["step"]
        self.emit("start", total_steps=total_steps, total_epochs=total_epochs, images=len(train_idx),
                  samples=n_samples, device=str(self.device), steps_per_epoch=steps_per_epoch,
                  resumed_at=start_step, validation_images=len(val_idx), processes=world,
                  effective_batch=global_bs * cfg.gradient_accumulation_steps)
        sched = m.noise_scheduler
        T = sched.config.num_train_timesteps
        pred_type = m.prediction_type
        in_dtype = base_dtype or torch.float32
        stopped = nan_stop = False
        epoch_files: List[str] = []
        t_last = time.time()
        unet.train()
        accum = cfg.gradient_accumulation_steps
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        while self.pos["step"] < total_steps and not stopped:
            if self.pos["batch"] >= batches_per_epoch:  # start a new epoch
                self.pos["epoch"] += 1
                self.pos["batch"] = 0
                self.pos["order"] = sampler.batches(self.pos["epoch"])
            epoch, order = self.pos["epoch"], self.pos["order"]
            micro, running = 0, []
            for b in range(self.pos["batch"], batches_per_epoch):
                if self.stop_event.is_set():
                    stopped = True
                    break
                batch = list(order[b])
                if world > 1 and len(batch) < global_bs:  # a short last batch: every process needs samples
                    batch += [batch[j % len(batch)] for j in range(global_bs - len(batch))]
                n = len(batch)
                lo, hi = (rank * local_bs, (rank + 1) * local_bs) if world > 1 else (0, n)
                # random draws for the whole global batch, then this process's slice: the same numbers per
                # sample whatever the process count
                flips = (torch.rand(n, generator=gen) < 0.5).tolist() if latents_flip is not None else [False] * n
                shape = (n,) + tuple(latents[batch[0]].shape)
                noise = torch.randn(shape, generator=gen)
                if cfg.noise_offset:
                    noise = noise + cfg.noise_offset * torch.randn((n, shape[1], 1, 1), generator=gen)
                t = torch.randint(0, T, (n,), generator=gen)
                caps = [ds.items[i].caption for i in batch]
                if cfg.caption_dropout_rate > 0:
                    drop = (torch.rand(n, generator=gen) < cfg.caption_dropout_rate).tolist()
                    caps = ["" if d else c for c, d in zip(caps, drop)]
                idx, flips, caps = batch[lo:hi], flips[lo:hi], caps[lo:hi]
                t_cpu = t[lo:hi]
                noise, t = to_dev(noise[lo:hi]), to_dev(t_cpu)
                lat = to_dev(torch.stack([(latents_flip if f else latents)[i] for i, f in zip(idx, flips)]))
                noisy = sched.add_noise(lat, noise, t)
                target = noise if pred_type == "epsilon" else sched.get_velocity(lat, noise, t)
                with acc.autocast():
                    if text_cache is not None:
                        cond = text_cache.stack(caps)
                    else:
                        cond = conditioning.encode(m, caps, self.device)
                    # SDXL: per-sample original size / crop / target size from the item's resize + crop plan
                    tids = (conditioning.time_ids_for_items(ds, idx, cfg.resolution, flips)
                            if m.text_encoder_2 is not None else None)
                    ehs, added = conditioning.unet_inputs(m, cond, tids, in_dtype, self.device, cfg.resolution)
                    pred = unet(noisy.to(in_dtype), t, ehs, added_cond_kwargs=added).sample
                loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
                if cfg.min_snr_gamma:
                    snr = compute_snr(sched, t_cpu).to(self.device)  # from the CPU copy: no device->host sync
                    w = torch.clamp(snr, max=cfg.min_snr_gamma)
                    w = w / (snr + 1) if pred_type == "v_prediction" else w / snr
                    loss = loss * w
                loss = loss.mean()
                if self.loss_hook is not None:
                    loss = self.loss_hook(self.pos["step"] + 1, loss)
                if loss.requires_grad:  # a non-finite loss makes non-finite gradients: caught below, not applied
                    acc.backward(loss / accum)
                running.append(loss.detach().float())
                micro += 1
                last_batch = b == batches_per_epoch - 1
                if micro % accum != 0 and not last_batch:
                    continue
                if world > 1 and te_trainable:  # the text encoder is not DDP-wrapped: average its grads here
                    for p in te_trainable:
                        if p.grad is not None:
                            p.grad = acc.reduce(p.grad, "mean")
                step_loss_t = torch.stack(running).mean()
                running = []
                norm = acc.clip_grad_norm_(trainable, max_norm)
                ok_t = torch.isfinite(step_loss_t)
                if norm is not None and cfg.mixed_precision != "fp16":  # fp16: the grad scaler skips inf steps
                    ok_t = ok_t & torch.isfinite(torch.as_tensor(norm).to(ok_t.device))
                vals = torch.stack([step_loss_t, ok_t.float(),
                                    torch.as_tensor(norm if norm is not None else 0.0).float().to(ok_t.device)])
                if world > 1:
                    vals = torch.stack([acc.reduce(vals[0], "mean"), acc.reduce(vals[1], "min"), vals[2]])
                step_loss, ok, norm_v = vals.cpu().tolist()  # the one host sync of a step
                if not ok:
                    optimizer.zero_grad(set_to_none=True)
                    bad = ("loss", step_loss) if not math.isfinite(step_loss) else ("gradient", norm_v)
                    if not self._on_nonfinite(*bad):
                        nan_stop = stopped = True
                        break
                    self.pos["batch"] = b + 1
                    continue
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.pos["step"] += 1
                self.pos["batch"] = b + 1
                self._apply_ramp()
                global_step = self.pos["step"]
                now = time.time()
                elapsed = now - self.started_at
                its = (global_step - start_step) / elapsed if elapsed > 0 else 0.0
                rec = {"step": global_step, "epoch": epoch, "loss": step_loss,
                       "lr": float(optimizer.param_groups[0]["lr"])}
                self.history.append(rec)
                if global_step % cfg.log_every_n_steps == 0 or global_step == total_steps:
                    self.emit("step", total_steps=total_steps, total_epochs=total_epochs, its=its,
                              eta=(total_steps - global_step) / its if its > 0 else None,
                              step_time=now - t_last, **rec)
                if cfg.sample_every_n_steps and global_step % cfg.sample_every_n_steps == 0:
                    self._sample(global_step, epoch)
                if cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0 and global_step < total_steps:
                    path = step_path(cfg, global_step)
                    self._save_lora(path, epoch, global_step)
                    epoch_files.append(path)
                    self.emit("checkpoint", path=path, epoch=epoch, step=global_step)
                if cfg.save_state_every_n_steps and global_step % cfg.save_state_every_n_steps == 0:
                    self.save_state()
                t_last = time.time()
                if global_step >= total_steps:
                    break
            if stopped:
                break
            if self.pos["batch"] < batches_per_epoch:  # max steps reached mid-epoch
                break
            global_step = self.pos["step"]
            if val_groups:
                vl = self._validation_loss(val_groups, latents, text_cache)
                self.val_history.append({"step": global_step, "epoch": epoch, "val_loss": vl})
                self.emit("val_loss", step=global_step, epoch=epoch, val_loss=vl)
                unet.train()
            if cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
                self._sample(global_step, epoch)
            self.emit("epoch", epoch=epoch, step=global_step,
                      mean_loss=float(np.mean([h["loss"] for h in self.history if h["epoch"] == epoch] or [0.0])))
            if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and global_step < total_steps:
                path = epoch_path(cfg, epoch)
                self._save_lora(path, epoch, global_step)
                epoch_files.append(path)
                self.emit("checkpoint", path=path, epoch=epoch, step=global_step)
            if cfg.save_state_every_n_epochs and epoch % cfg.save_state_every_n_epochs == 0:
                self.save_state()

        global_step, epoch = self.pos["step"], self.pos["epoch"]
        final = None
        if not nan_stop and global_step > start_step and self._last_state_step != global_step:
            self.save_state()  # resumable from exactly here: after a stop, or to train on to a longer end
        if global_step > 0 and not nan_stop:
            final = paths["lora"]
            self._save_lora(final, epoch, global_step)
            self.emit("checkpoint", path=final, epoch=epoch, step=global_step, final=True)
        self._write_logs(paths)
        if acc.is_main_process:
            cfg.save(paths["config"])
        acc.wait_for_everyone()
        res = TrainResult(output_dir=os.path.abspath(cfg.output_dir), lora_path=final, epoch_files=epoch_files,
                          config_path=paths["config"], loss_csv=paths["loss_csv"], loss_png=paths["loss_png"],
                          steps=global_step, epochs_done=epoch, stopped=stopped, losses=[h["loss"] for h in self.history],
                          seconds=time.time() - self.started_at, nan_stopped=nan_stop, message=self.nan_message,
                          val_losses=[v["val_loss"] for v in self.val_history], recoveries=self.recoveries,
                          findings=[f.to_dict() for f in self.findings])
        unet.eval()
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
            tids = conditioning.time_ids_for_items(ds, idx, self.cfg.resolution) if m.text_encoder_2 is not None else None
            total += fixed_noise_loss(m, lat, cond, seed=self.cfg.validation_seed, time_ids=tids) * n
            count += n
        return total / count

    # ------------------------------------------------------------------ outputs
    def metadata(self, epoch: int, step: int) -> Dict[str, str]:
        cfg, m, ds, mc = self.cfg, self.model, self.dataset, self._meta_common
        now = time.time()
        res = f"({cfg.resolution}, {cfg.resolution})"
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(cfg.lora_rank),
            "ss_network_alpha": f"{cfg.alpha:g}",
            "ss_network_args": json.dumps({}),
            "ss_learning_rate": f"{cfg.learning_rate:g}",
            "ss_unet_lr": f"{cfg.learning_rate:g}",
            "ss_text_encoder_lr": f"{cfg.te_lr:g}" if cfg.train_text_encoder else "0",
            "ss_network_train_unet_only": str(not cfg.train_text_encoder),
            "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
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
        if cfg.trigger_word:
            meta["modelspec.trigger_phrase"] = cfg.trigger_word
        return meta

    def _sample(self, step: int, epoch: int) -> None:
        if not self.accelerator.is_main_process:
            return
        from ..sampler import sample_in_training

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

    def _save_lora(self, path: str, epoch: int, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        lw = lora_mod.extract(self.model)
        for (_, _), (d, u, _) in lw.modules.items():
            if not (torch.isfinite(d).all() and torch.isfinite(u).all()):
                raise FloatingPointError(f"non-finite LoRA weights at step {step}; nothing written to {path}. "
                                         f"Halve learning_rate and add warmup.")
        lora_mod.save_kohya(lw, path, self.model.kind, self.metadata(epoch, step), overwrite=True)

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
        from ..plots import loss_plot

        img = loss_plot([h["step"] for h in self.history], [h["loss"] for h in self.history],
                        title=f"{self.cfg.output_name}: training loss",
                        val_steps=[v["step"] for v in self.val_history],
                        val_losses=[v["val_loss"] for v in self.val_history])
        save_image(img, paths["loss_png"])


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio per timestep: diffusers' `training_utils.compute_snr`, or the same formula where that
    module cannot be imported (diffusers 0.31 beside the WebUI's transformers 4.30.2 fails on
    `transformers.integrations.deepspeed`)."""
    try:
        from diffusers.training_utils import compute_snr as _snr
    except (ImportError, AttributeError):
        _snr = None
    if _snr is not None:
        return _snr(noise_scheduler, timesteps)
    ac = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return ac / (1.0 - ac)  # (sqrt(ac) / sqrt(1 - ac))^2


def pred_dtype(unet, device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    return weight_dtype if device.type != "cpu" else torch.float32


def train(cfg: TrainConfig, callback: Optional[Callback] = None, model: Optional[BaseModel] = None,
          stop_event: Optional[threading.Event] = None, resume_from: Optional[str] = None) -> TrainResult:
    return Trainer(cfg, model=model, callback=callback, stop_event=stop_event, resume_from=resume_from).run()


@torch.no_grad()
def fixed_noise_loss(model: BaseModel, latents: torch.Tensor, text_embeds, seed: int = 0,
                     n_draws: int = 4, time_ids: Optional[torch.Tensor] = None) -> float:
    """Denoising MSE with noise and timesteps held fixed by `seed` (deterministic validation loss).

    latents: (N, C, H, W) already scaled; text_embeds: (N, L, D), or for SDXL {"hidden", "pooled"} with optional
    (N, 6) `time_ids` (default: the latents' size uncropped). Each image gets `n_draws` noise draws at
    timesteps spread evenly over the schedule.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sched = model.noise_scheduler
    T = sched.config.num_train_timesteps
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    total, count = 0.0, 0
    for d in range(n_draws):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.full((latents.shape[0],), int((d + 0.5) * T / n_draws), dtype=torch.long)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if model.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        ehs, added = conditioning.unet_inputs(model, text_embeds, time_ids, dtype, device,
                                              resolution=latents.shape[-1] * vae_factor)
        pred = model.unet(noisy.to(device, dtype), t.to(device), ehs, added_cond_kwargs=added).sample
        total += float(F.mse_loss(pred.float().cpu(), target.float(), reduction="sum"))
        count += target.numel()
    return total / count
