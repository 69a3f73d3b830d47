"""The training loop: data and caches, the network, optimizer and schedule, the steps (accumulation, clipping,
non-finite checks), validation, events and stop, extensions at named HOOKS. Its state (resume, NaN recovery) is in
state.py, its files in outputs.py, devices and precision in device.py."""
from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import families
from ..config import TrainConfig
from ..data.buckets import BucketBatchSampler
from ..data import caption_aug
from ..data.cache import CachingStopped, LatentCache, TextEmbeddingCache, module_identity
from ..data.dataset import ImageDataset, load_dataset
from ..models import conditioning
from ..models.base import BaseModel
from ..models.loading import load_base_model
from ..models import text_chunks
from ..networks import lora as lora_mod
from ..networks import network
from . import flow as flow_train
from . import kohya_extras
from .kohya_extras import KohyaExtras
from . import loss as loss_mod
from . import cpu_bf16
from .memory import BlockSwap, apply_fp8_base, cast_except_fp8
from .device import resolve_device, resolve_precision
from .events import TrainEvent
from .outputs import OutputsMixin, TrainResult, check_outputs_free, epoch_path, output_paths, step_path
from .state import STATE_DIRNAME, StateMixin, list_states
from .optim import describe, make_optimizer

log = logging.getLogger(__name__)

Callback = Callable[[TrainEvent], None]

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


#: where an extension of the run takes part (each an optional method of it; `tr` is the Trainer):
#:   after_dataset(tr)                                   the dataset is loaded (repeats, reg images)
#:   after_split(tr, train_idx, val_idx) -> (train, val)  the validation split is made (caches are ready)
#:   shape_network(tr, groups, names) -> (groups, names)  the adapters are injected (reshape, lr groups)
#:   loss_kwargs(tr, idx, flips, t, in_noise, shape) -> {}  extra arguments of the loss of a micro-batch
#:   after_optimizer_step(tr)                             an update was applied
#:   weights_to_save(tr) -> weights or None               the weights a LoRA file gets (None: the trained ones)
#:   save_state(tr, folder) / load_state(tr, folder)      its part of a resumable state
#:   metadata(tr) -> {}                                   its ss_* entries
HOOKS = ("after_dataset", "after_split", "shape_network", "loss_kwargs", "after_optimizer_step", "weights_to_save",
         "save_state", "load_state", "metadata")


class Trainer(StateMixin, OutputsMixin):
    """One run: prepare(), then step() until done (run() does both and writes the files). Resumable state and
    NaN recovery: state.StateMixin; files, metadata, samples and logs: outputs.OutputsMixin."""

    def __init__(self, cfg: TrainConfig, model: Optional[BaseModel] = None, dataset: Optional[ImageDataset] = None,
                 callback: Optional[Callback] = None, stop_event: Optional[threading.Event] = None,
                 resume_from: Optional[str] = None, loss_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                 diagnoser: Any = None, extensions: Sequence[Any] = ()):
        """diagnoser: the caller's live diagnosis (tuning.advisor.Diagnoser, or anything with
        `handle_event(event) -> findings`): it sees the start / step / val_loss / nan events, and its findings go
        out as `diagnosis` events and into the result. extensions: objects with some of the HOOKS methods, called
        after the built-in ones (`kohya`: the kohya options, KohyaExtras)."""
        self.cfg = cfg.validate()
        self.diagnoser = diagnoser
        self.kohya = KohyaExtras()
        self.extensions: List[Any] = [self.kohya, *extensions]
        self.group_names: List[str] = []
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

    # ------------------------------------------------------------------ events and hooks
    def add_callback(self, callback: Callback) -> None:
        """Another receiver of the run's events (an extension's tracker, a front door's progress)."""
        self.callbacks.append(callback)

    def _hooks(self, name: str):
        """The extensions' methods for one of HOOKS, in order."""
        assert name in HOOKS, name
        return [getattr(ext, name) for ext in self.extensions if callable(getattr(ext, name, None))]

    def emit(self, event: str, **data: Any) -> None:
        acc = getattr(self, "accelerator", None)
        if acc is not None and not acc.is_main_process:
            return  # with several processes only the main one reports
        ev = TrainEvent.make(event, **data)
        for cb in self.callbacks:
            cb(ev)
        diag = self.diagnoser
        if diag is not None and event in ("start", "step", "val_loss", "nan"):
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
        if cfg.mixed_precision == "auto":
            self.cfg = cfg = cfg.replace(mixed_precision=resolve_precision("auto", self.device))
        self.accelerator = Accelerator(mixed_precision=cpu_bf16.accelerate_precision(cfg.mixed_precision, self.device),
                                       cpu=self.device.type == "cpu")  # CPU + bf16: fp32 compute (training/cpu_bf16.py)
        self.device = self.accelerator.device
        if self.resume_from is None:
            check_outputs_free(cfg)  # every process checks before any process writes
        self.accelerator.wait_for_everyone()
        if self.dataset is None:
            self.dataset = load_dataset(cfg.train_data_dir, cfg.resolution, cfg.trigger_word, cfg.caption_extension)
        for hook in self._hooks("after_dataset"):  # kohya: num_repeats, reg images (reg_data_dir)
            hook(self)
        for w in self.dataset.warnings:
            self.emit("warning", message=w)
        if self.model is None:
            self.model = load_base_model(cfg.base_model, cfg.prediction_type, allow_pickle=cfg.allow_pickle,
                                         files=cfg.component_files)
        elif cfg.prediction_type != "auto" and not flow_train.is_flow(self.model) and \
                not families.of(self.model).in_place:
            self.model.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        if flow_train.is_flow(self.model):  # Flux / SD3: conditioning and timestep options into model.extra
            flow_train.configure(self.model, cfg)
            if cfg.min_snr_gamma:
                self.emit("warning", message="min_snr_gamma does not apply to flow matching (Flux / SD3) and is "
                                             "ignored; weighting_scheme (logit_normal, sigma_sqrt, cosmap) is the "
                                             "flow-matching weighting.")
        for w in text_chunks.configure(self.model, cfg.clip_skip, cfg.max_token_length):  # kohya text options
            self.emit("warning", message=w)
        for f in self._caption_findings():  # empty / duplicate / too long (captions/checks.py); hints: caption step
            if f.severity == "warning":
                self.emit("warning", message=str(f))
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

    def _caption_findings(self):
        """The caption checks of the dataset (captions/checks.py); the length counted with the model's own tokenizer
        where the family's text is read by it (CLIP; Qwen / Mistral), the bundled T5 one for T5 families, against
        the family's limit (CLIP: the run's max_token_length)."""
        from ..captions.checks import check_captions

        fam, m = families.of(self.model), self.model
        tok = getattr(m, "tokenizer", None) if fam.caption_tokenizer in ("clip", "other") else None
        limit = fam.caption_tokens
        if limit == 75:
            limit = int(self.cfg.max_token_length or 75)
        entries = [(it.path, it.caption) for it in self.dataset.items]
        return check_captions(entries, "", m.kind, limit=limit, tokenizer=tok if callable(tok) else None)

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
        vae, fam = m.vae.to(self.device), families.of(m)
        if getattr(self, "_vae_id", None) is None:
            self._vae_id = module_identity(vae, extra=fam.latent_tag(m))
        cache = LatentCache(self._cache_folder(self.cfg.latent_cache, "latents"), self._vae_id)

        def encode(px: torch.Tensor) -> torch.Tensor:
            return fam.encode_latents(m, vae, px.to(self.device, vae.dtype)).float().cpu()

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
    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train: data and caches, network, optimizer and schedule, the epochs of steps, then the files."""
        if not self.prepare():
            return self.early_result
        while self.pos["step"] < self.total_steps and not self.stopped:
            if self.stop_event.is_set():  # before the epoch counter moves: a stop at an epoch's end is in that epoch
                self.stopped = True
                break
            self._next_epoch_if_done()
            self._train_epoch()
            if self.stopped or self.pos["batch"] < self.batches_per_epoch:  # stopped, or max steps mid-epoch
                break
            self._end_of_epoch(self.pos["epoch"])
        if self._ended_mid_epoch():  # max_train_steps inside an epoch: the final file gets its validation loss too
            self._record_validation(self.pos["epoch"])
        return self._finish()

    # ------------------------------------------------------------------ the public surface of one step
    def prepare(self) -> bool:
        """Everything before the first step: the model and data, caches, the network, optimizer and schedule, the
        position. False when a stop during caching ended the run (`early_result` holds its TrainResult)."""
        self._prepare()
        self.early_result = self._prepare_data()
        if self.early_result is not None:
            return False
        self._build_network()
        self._build_optimizer_and_schedule()
        self._begin()
        return True

    def step(self, lr: Optional[float] = None) -> Optional[float]:
        """One optimizer step on the next batch(es) of the run's data order (micro-batches accumulated as the run
        does; a new epoch's order when one ends), with everything the run applies to a step. `lr`: this step's
        learning rate instead of the schedule's (other param groups keep their ratio to the first: LoRA+,
        text encoder, block-wise lr). Returns the step's loss, or None for a non-finite step (not applied)."""
        accum, running = self.cfg.gradient_accumulation_steps, []
        while True:
            self._next_epoch_if_done()
            b = self.pos["batch"]
            running.append(self._forward_backward(list(self.pos["order"][b])))
            self.pos["batch"] = b + 1
            if len(running) % accum == 0 or self.pos["batch"] == self.batches_per_epoch:
                break
        if lr is not None:
            for g, ratio in zip(self.optimizer.param_groups, self._lr_ratios()):
                g["lr"] = lr * ratio
        done = self._optimizer_step(running)
        if done is None:
            return None
        self.pos["step"] += 1
        return done[0]

    @torch.no_grad()
    def probe_loss(self, items: Sequence[int], noise: torch.Tensor, timesteps: torch.Tensor) -> float:
        """The run's loss (its loss type, masks, prior weights, min-SNR, conditioning) of these items with the
        given noise and timesteps, captions as written, no flip and no update: a fixed-noise measure."""
        was = self.train_unet.training
        self.train_unet.eval()
        try:
            caps = [self.dataset.items[i].caption for i in items]
            loss = self._loss(list(items), [False] * len(items), caps, noise, timesteps, None)
        finally:
            self.train_unet.train(was)
        return float(loss)

    def release(self) -> None:
        """Drop what the run holds beside the model: caches, optimizer, schedule, snapshots, the compiled forward,
        block-swap hooks and accelerate's references. The model stays as trained (its owner restores or drops it)."""
        if getattr(self, "block_swap", None) is not None:
            self.block_swap.remove()
        for k in ("latents", "latents_flip", "text_cache", "optimizer", "lr_scheduler", "train_unet", "last_good",
                  "param_groups", "trainable", "te_trainable", "block_swap"):
            if hasattr(self, k):
                setattr(self, k, None)
        acc = getattr(self, "accelerator", None)
        if acc is not None:
            acc.free_memory()

    def _lr_ratios(self) -> List[float]:
        groups = self.optimizer.param_groups
        first = groups[0].get("initial_lr", groups[0]["lr"]) or 1.0
        return [g.get("initial_lr", g["lr"]) / first for g in groups]

    def _next_epoch_if_done(self) -> None:
        if self.pos["batch"] >= self.batches_per_epoch:
            self.pos["epoch"] += 1
            self.pos["batch"] = 0
            self.pos["order"] = self.sampler.batches(self.pos["epoch"])

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
        for hook in self._hooks("after_split"):  # kohya: reg images train only, loss masks, TensorBoard / wandb
            self.train_idx, self.val_idx = hook(self, self.train_idx, self.val_idx)
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
        if families.of(m).in_place:
            return self._build_in_place_network(spec, adapter)
        if flow_train.is_flow(m) and (cfg.network_type == "locon" or (cfg.conv_rank or 0) > 0):
            self.emit("warning", message=f"{m.kind} transformers have no ResNet convolutions: conv_rank / LoCon do "
                                         f"not apply, the run trains {spec.type} on the Linear layers.")
        params = network.build(m.unet, "unet", spec, cfg.learning_rate, adapter)
        n_unet = len(params)
        if cfg.train_text_encoder:
            for _, te in conditioning.Conditioner(m).text_encoders:  # Flux / SD3: the CLIP encoders, never T5
                params += network.build(te, "te", spec, cfg.te_lr, adapter)
        names = ["unet"] + [c for c, _ in (conditioning.Conditioner(m).text_encoders if cfg.train_text_encoder
                                            else [])]
        for hook in self._hooks("shape_network"):  # kohya: block dims / lr, network_weights, EMA
            params, names = hook(self, params, names)
        self.group_names = names
        base_dtype = self.weight_dtype if self.device.type != "cpu" else None
        if cfg.fp8_base:  # cast in CPU memory first: a 12 B transformer never sits on the GPU in 16 bits
            n8 = apply_fp8_base(m.unet, base_dtype or torch.float32)  # block Linears: to fp8 from the stored dtype
            cast_except_fp8(m.unet, base_dtype or torch.float32)  # the rest to the compute dtype
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

    def _build_in_place_network(self, spec, adapter: str) -> None:
        """A host's own model (ComfyUI in place): the family puts the adapters in and says their parameter groups;
        the base weights stay where and in the dtype the host keeps them (its casts run at each forward)."""
        cfg, m, fam = self.cfg, self.model, families.of(self.model)
        if cfg.train_text_encoder:
            self.emit("warning", message="train_text_encoder: in-place training trains the diffusion model only; "
                                         "the text encoder stays as loaded.")
        if cfg.fp8_base or cfg.blocks_to_swap:
            self.emit("warning", message="fp8_base / blocks_to_swap: in place the host keeps the weights as it "
                                         "loaded them (its fp8 files and partial loading); the options are not used.")
        params = fam.build_network(m, spec, cfg.learning_rate, adapter)
        names = ["unet"]
        for hook in self._hooks("shape_network"):  # kohya: block dims / lr, network_weights, EMA
            params, names = hook(self, params, names)
        self.group_names = names
        self.in_dtype = self.weight_dtype if self.device.type != "cpu" else torch.float32
        self.param_groups = params
        self.trainable = [p for g in params for p in g["params"]]
        self.te_trainable = []
        for p in self.trainable:
            p.data = p.data.float()
            p.requires_grad_(True)
        m.unet.to(self.device)
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
        self.emit("info", message=fam.describe(m))

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
        fam = families.of(m)
        if fam.in_place:  # the host model's own schedule (ComfyUI in place)
            t = fam.sample_timesteps(m, cfg, n, shape[-2:], gen)
        elif flow_train.is_flow(m):  # sigma x 1000 by timestep_sampling (training/flow.py)
            t = flow_train.sample_timesteps(m, cfg, n, shape[-2:], gen)
        else:
            t = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
        noise, in_noise = kohya_extras.noises(cfg, noise, gen)  # multires / input perturbation noise
        caps = caption_aug.augment([ds.items[i].caption for i in batch], cfg)  # kohya shuffle / keep / tag dropout
        if cfg.caption_dropout_rate > 0:
            drop = (torch.rand(n, generator=gen) < cfg.caption_dropout_rate).tolist()
            caps = ["" if d else c for c, d in zip(caps, drop)]
        idx, flips, caps = batch[lo:hi], flips[lo:hi], caps[lo:hi]
        loss = self._loss(idx, flips, caps, noise[lo:hi], t[lo:hi], None if in_noise is None else in_noise[lo:hi])
        if self.loss_hook is not None:
            loss = self.loss_hook(self.pos["step"] + 1, loss)
        if loss.requires_grad:  # a non-finite loss makes non-finite gradients: caught by the step, not applied
            acc.backward(loss / cfg.gradient_accumulation_steps)
        return loss.detach().float()

    def _loss(self, idx: List[int], flips: List[bool], caps: List[str], noise: torch.Tensor, t_cpu: torch.Tensor,
              in_noise: Optional[torch.Tensor]) -> torch.Tensor:
        """The loss of this process's samples (loss.diffusion_loss with the run's options) from their draws."""
        cfg, m, ds, acc = self.cfg, self.model, self.dataset, self.accelerator
        latents, latents_flip = self.latents, self.latents_flip
        noise, t = self._to_device(noise), self._to_device(t_cpu)
        lat = self._to_device(torch.stack([(latents_flip if f else latents)[i] for i, f in zip(idx, flips)]))
        with acc.autocast():
            cond = self.text_cache.stack(caps, families.of(m).collate) if self.text_cache is not None else conditioning.encode(m, caps,
                                                                                                         self.device)
        # SDXL: per-sample original size / crop / target size from the item's resize + crop plan
        tids = conditioning.time_ids_for_items(ds, idx, cfg.resolution, flips) if conditioning.is_sdxl(m) else None
        return loss_mod.diffusion_loss(m, lat, cond, noise, t, unet=self.train_unet, min_snr_gamma=cfg.min_snr_gamma,
                                       time_ids=tids, resolution=cfg.resolution, in_dtype=self.in_dtype,
                                       snr_timesteps=t_cpu, autocast=acc.autocast,  # min-SNR from the CPU copy
                                       **self._loss_kwargs(idx, flips, t_cpu, in_noise, lat.shape))

    def _loss_kwargs(self, idx, flips, t_cpu, in_noise, shape) -> Dict[str, Any]:
        """The extensions' extra loss arguments for a micro-batch (kohya: loss type, input noise, masks, reg
        weights), merged."""
        kw: Dict[str, Any] = {}
        in_noise = None if in_noise is None else self._to_device(in_noise)
        for hook in self._hooks("loss_kwargs"):
            kw.update(hook(self, idx, flips, t_cpu, in_noise, shape))
        return kw

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
        for hook in self._hooks("after_optimizer_step"):  # kohya: the EMA
            hook(self)
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

    @torch.no_grad()
    def _validation_loss(self, groups: Dict[Tuple[int, ...], List[int]], latents, text_cache) -> float:
        """Deterministic denoising loss of the held-out images (fixed noise and timesteps), mean per element."""
        m, ds = self.model, self.dataset
        total, count = 0.0, 0
        for shape, idx in sorted(groups.items()):
            caps = [ds.items[i].caption for i in idx]
            cond = (text_cache.stack(caps, families.of(m).collate) if text_cache is not None
                    else conditioning.map_cond(conditioning.encode(m, caps, self.device), lambda t: t.float()))
            lat = latents.stack(idx) if hasattr(latents, "stack") else torch.stack([latents[i] for i in idx])
            n = lat.numel()
            tids = conditioning.time_ids_for_items(ds, idx, self.cfg.resolution) if conditioning.is_sdxl(m) else None
            total += loss_mod.fixed_noise_loss(m, lat, cond, seed=self.cfg.validation_seed, time_ids=tids,
                                      min_snr_gamma=self.cfg.min_snr_gamma) * n
            count += n
        return total / count
