"""The training loop: accelerate precision/devices, accumulation, schedulers, epoch files, events, stop."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from . import lora as lora_mod
from .config import TrainConfig
from .dataset import ImageDataset, load_dataset
from .io_utils import atomic_write_text, next_free_name, save_image
from .models import BaseModel, load_base_model

log = logging.getLogger(__name__)

Event = Dict[str, Any]
Callback = Callable[[Event], None]

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}


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


def output_paths(cfg: TrainConfig) -> Dict[str, str]:
    d, n = cfg.output_dir, cfg.output_name
    return {"lora": os.path.join(d, f"{n}.safetensors"), "config": os.path.join(d, f"{n}.yaml"),
            "loss_csv": os.path.join(d, f"{n}_loss.csv"), "loss_png": os.path.join(d, f"{n}_loss.png")}


def epoch_path(cfg: TrainConfig, epoch: int) -> str:
    return os.path.join(cfg.output_dir, f"{cfg.output_name}-{epoch:06d}.safetensors")


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


def encode_prompts(model: BaseModel, captions: List[str], device: torch.device) -> torch.Tensor:
    """Last hidden state of the text encoder for a list of captions (SD1/SD2)."""
    tok = model.tokenizer(captions, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    return model.text_encoder(tok.input_ids.to(device))[0]


class Trainer:
    def __init__(self, cfg: TrainConfig, model: Optional[BaseModel] = None, dataset: Optional[ImageDataset] = None,
                 callback: Optional[Callback] = None, stop_event: Optional[threading.Event] = None):
        self.cfg = cfg.validate()
        self.model = model
        self.dataset = dataset
        self.callbacks: List[Callback] = [callback] if callback else []
        self.stop_event = stop_event or threading.Event()
        self.history: List[Dict[str, float]] = []
        self.started_at = 0.0

    # ------------------------------------------------------------------ events
    def emit(self, kind: str, **data: Any) -> None:
        ev = {"kind": kind, **data}
        for cb in self.callbacks:
            cb(ev)

    def stop(self) -> None:
        """Ask the loop to end after the current step; what was trained is saved."""
        self.stop_event.set()

    # ------------------------------------------------------------------ setup
    def _prepare(self):
        cfg = self.cfg
        check_outputs_free(cfg)
        if self.dataset is None:
            self.dataset = load_dataset(cfg.train_data_dir, cfg.resolution, cfg.trigger_word, cfg.caption_extension)
        for w in self.dataset.warnings:
            self.emit("warning", message=w)
        if self.model is None:
            self.model = load_base_model(cfg.base_model, cfg.prediction_type)
        elif cfg.prediction_type != "auto":
            self.model.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        from accelerate import Accelerator

        self.device = resolve_device(cfg.device)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=self.device.type == "cpu")
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

    def _seed_all(self, seed: int) -> torch.Generator:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        return torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def _cache_latents(self) -> List[torch.Tensor]:
        m, ds = self.model, self.dataset
        vae = m.vae.to(self.device)
        out = []
        for i in range(len(ds.items)):
            px = ds.load_pixels(i).unsqueeze(0).to(self.device)
            lat = vae.encode(px).latent_dist.mean * m.vae_scale
            out.append(lat[0].cpu())
        return out

    @torch.no_grad()
    def _cache_text(self) -> Dict[str, torch.Tensor]:
        caps = sorted({it.caption for it in self.dataset.items})
        out = {}
        for i in range(0, len(caps), 16):
            chunk = caps[i:i + 16]
            h = encode_prompts(self.model, chunk, self.device)
            for c, e in zip(chunk, h):
                out[c] = e.cpu()
        return out

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        cfg = self.cfg
        self._prepare()
        m, ds, acc = self.model, self.dataset, self.accelerator
        gen = self._seed_all(cfg.seed)
        paths = output_paths(cfg)
        os.makedirs(cfg.output_dir, exist_ok=True)

        m.unet.requires_grad_(False)
        m.vae.requires_grad_(False)
        for te in m.text_encoders:
            te.requires_grad_(False)
        m.text_encoder.to(self.device)
        latents = self._cache_latents()
        if self.device.type != "cpu":
            m.vae.to("cpu")
        text_cache = None if cfg.train_text_encoder else self._cache_text()

        # adapters (seeded so that two runs with one seed are identical)
        torch.manual_seed(cfg.seed)
        adapter = lora_mod.DEFAULT_ADAPTER
        unet_targets = lora_mod.unet_target_modules(m.unet)
        lora_mod.inject(m.unet, unet_targets, cfg.lora_rank, cfg.alpha, adapter)
        params = [{"params": lora_mod.lora_parameters(m.unet, adapter), "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            te_targets = lora_mod.te_target_modules(m.text_encoder)
            lora_mod.inject(m.text_encoder, te_targets, cfg.lora_rank, cfg.alpha, adapter)
            params.append({"params": lora_mod.lora_parameters(m.text_encoder, adapter), "lr": cfg.te_lr})
        base_dtype = self.weight_dtype if self.device.type != "cpu" else None
        m.unet.to(self.device, dtype=base_dtype) if base_dtype else m.unet.to(self.device)
        if cfg.train_text_encoder and base_dtype:
            m.text_encoder.to(self.device, dtype=base_dtype)
        trainable = [p for g in params for p in g["params"]]
        for p in trainable:  # LoRA weights always train in fp32
            p.data = p.data.float()
            p.requires_grad_(True)

        optimizer = torch.optim.AdamW(params, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                      weight_decay=cfg.weight_decay)
        n_samples = len(ds)
        batches_per_epoch = math.ceil(n_samples / cfg.batch_size)
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
        te_model = acc.prepare(m.text_encoder) if cfg.train_text_encoder else m.text_encoder
        self._meta_common = dict(n_images=ds.image_count, n_samples=n_samples, batches_per_epoch=batches_per_epoch,
                                 total_steps=total_steps, total_epochs=total_epochs)

        self.started_at = time.time()
        self.emit("start", total_steps=total_steps, total_epochs=total_epochs, images=ds.image_count,
                  samples=n_samples, device=str(self.device), steps_per_epoch=steps_per_epoch)
        sched = m.noise_scheduler
        T = sched.config.num_train_timesteps
        pred_type = m.prediction_type
        global_step, epoch, stopped = 0, 0, False
        epoch_files: List[str] = []
        losses: List[float] = []
        t_last = time.time()
        unet.train()
        while global_step < total_steps and not stopped:
            epoch += 1
            order = torch.randperm(n_samples, generator=gen).tolist()
            expanded = ds.expanded()
            micro = 0
            running = []
            for b in range(batches_per_epoch):
                if self.stop_event.is_set():
                    stopped = True
                    break
                idx = [expanded[j] for j in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
                lat = torch.stack([latents[i] for i in idx]).to(self.device)
                noise = torch.randn(lat.shape, generator=gen).to(self.device)
                t = torch.randint(0, T, (lat.shape[0],), generator=gen).to(self.device)
                noisy = sched.add_noise(lat, noise, t)
                target = noise if pred_type == "epsilon" else sched.get_velocity(lat, noise, t)
                with acc.autocast():
                    if text_cache is not None:
                        ehs = torch.stack([text_cache[ds.items[i].caption] for i in idx]).to(self.device)
                    else:
                        ehs = encode_prompts(m, [ds.items[i].caption for i in idx], self.device)
                    pred = unet(noisy.to(self.weight_dtype) if self.device.type != "cpu" else noisy, t,
                                ehs.to(pred_dtype(unet, self.device, self.weight_dtype))).sample
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                acc.backward(loss / cfg.gradient_accumulation_steps)
                running.append(loss.detach())
                micro += 1
                last_batch = b == batches_per_epoch - 1
                if micro % cfg.gradient_accumulation_steps != 0 and not last_batch:
                    continue
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                step_loss = float(torch.stack(running).mean())
                running = []
                losses.append(step_loss)
                now = time.time()
                elapsed = now - self.started_at
                its = global_step / elapsed if elapsed > 0 else 0.0
                rec = {"step": global_step, "epoch": epoch, "loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
                self.history.append(rec)
                if global_step % cfg.log_every_n_steps == 0 or global_step == total_steps:
                    self.emit("step", total_steps=total_steps, total_epochs=total_epochs, its=its,
                              eta=(total_steps - global_step) / its if its > 0 else None,
                              step_time=now - t_last, **rec)
                if cfg.sample_every_n_steps and global_step % cfg.sample_every_n_steps == 0:
                    self._sample(global_step, epoch)
                t_last = time.time()
                if global_step >= total_steps:
                    break
            if stopped:
                break
            if cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
                self._sample(global_step, epoch)
            self.emit("epoch", epoch=epoch, step=global_step,
                      mean_loss=float(np.mean([h["loss"] for h in self.history if h["epoch"] == epoch] or [0.0])))
            if (cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and global_step < total_steps):
                path = epoch_path(cfg, epoch)
                self._save_lora(path, epoch, global_step)
                epoch_files.append(path)
                self.emit("checkpoint", path=path, epoch=epoch, step=global_step)

        final = None
        if global_step > 0:
            final = paths["lora"]
            self._save_lora(final, epoch, global_step)
            self.emit("checkpoint", path=final, epoch=epoch, step=global_step, final=True)
        self._write_logs(paths)
        if acc.is_main_process:
            cfg.save(paths["config"])
        res = TrainResult(output_dir=os.path.abspath(cfg.output_dir), lora_path=final, epoch_files=epoch_files,
                          config_path=paths["config"], loss_csv=paths["loss_csv"], loss_png=paths["loss_png"],
                          steps=global_step, epochs_done=epoch, stopped=stopped, losses=losses,
                          seconds=time.time() - self.started_at)
        unet.eval()
        self.emit("done", result=res)
        return res

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
            "ss_optimizer": f"torch.optim.adamw.AdamW(weight_decay={cfg.weight_decay:g},"
                            f"betas=({cfg.adam_beta1:g}, {cfg.adam_beta2:g}))",
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
            "ss_noise_offset": "None",
            "ss_tag_frequency": json.dumps(ds.tag_frequency()),
            "ss_dataset_dirs": json.dumps({os.path.basename(ds.root): {"n_repeats": 1, "img_count": ds.image_count}}),
            "ss_training_started_at": f"{self.started_at:.3f}",
            "ss_training_finished_at": f"{now:.3f}",
            "ss_output_name": cfg.output_name,
            "ss_training_comment": f"trained with lora_train {__version__}",
            "ss_caption_extension": cfg.caption_extension,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": ARCHITECTURE.get(m.kind, ARCHITECTURE["sd1"]),
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if m.kind == "sdxl"
            else "diffusers",
            "modelspec.title": cfg.output_name,
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
            "modelspec.prediction_type": m.prediction_type,
            "modelspec.date": datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if cfg.trigger_word:
            meta["modelspec.trigger_phrase"] = cfg.trigger_word
        return meta

    def _sample(self, step: int, epoch: int) -> None:
        if not self.accelerator.is_main_process:
            return
        from .sampler import sample_in_training

        cfg, m = self.cfg, self.model
        if self.device.type != "cpu":
            m.vae.to(self.device)
        img = sample_in_training(m, lora_mod.DEFAULT_ADAPTER, cfg.sample_prompts, cfg.sample_seed, cfg.sample_steps,
                                 cfg.sample_cfg, cfg.resolution)
        if self.device.type != "cpu":
            m.vae.to("cpu")
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
        w.writerow(["step", "epoch", "loss", "lr"])
        for h in self.history:
            w.writerow([h["step"], h["epoch"], f"{h['loss']:.6g}", f"{h['lr']:.6g}"])
        atomic_write_text(paths["loss_csv"], buf.getvalue())
        from .plots import loss_plot

        img = loss_plot([h["step"] for h in self.history], [h["loss"] for h in self.history],
                        title=f"{self.cfg.output_name}: training loss")
        save_image(img, paths["loss_png"])


def pred_dtype(unet, device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    return weight_dtype if device.type != "cpu" else torch.float32


def train(cfg: TrainConfig, callback: Optional[Callback] = None, model: Optional[BaseModel] = None,
          stop_event: Optional[threading.Event] = None) -> TrainResult:
    return Trainer(cfg, model=model, callback=callback, stop_event=stop_event).run()


@torch.no_grad()
def fixed_noise_loss(model: BaseModel, latents: torch.Tensor, text_embeds: torch.Tensor, seed: int = 0,
                     n_draws: int = 4) -> float:
    """Denoising MSE with noise and timesteps held fixed by `seed` (deterministic validation loss).

    latents: (N, C, H, W) already scaled; text_embeds: (N, L, D). Each image gets `n_draws` noise draws at
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
        pred = model.unet(noisy.to(device, dtype), t.to(device), text_embeds.to(device, dtype)).sample
        total += float(F.mse_loss(pred.float().cpu(), target.float(), reduction="sum"))
        count += target.numel()
    return total / count
