"""What a run writes: the file names (final, epoch and step files; the run folder's config, loss log and plot),
the result, the LoRA files with their ss_* / modelspec.* metadata, samples during training and the logs
(OutputsMixin, mixed into training.trainer.Trainer)."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from .. import __version__, families
from ..config import TrainConfig
from ..io_utils import atomic_write_text, next_free_name, save_image
from ..names import epoch_file, step_file
from ..networks import lora as lora_mod
from ..networks import network
from ..plots import loss_plot
from ..sampler import sample_in_training
from . import flow as flow_train


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
    return os.path.join(cfg.output_dir, epoch_file(cfg.output_name, epoch))


def step_path(cfg: TrainConfig, step: int) -> str:
    """kohya's name for a LoRA saved every N steps."""
    return os.path.join(cfg.output_dir, step_file(cfg.output_name, step))


def check_outputs_free(cfg: TrainConfig) -> None:
    if cfg.overwrite:
        return
    taken = [p for p in output_paths(cfg).values() if os.path.exists(p)]
    taken += [epoch_path(cfg, e) for e in range(1, cfg.epochs + 1) if os.path.exists(epoch_path(cfg, e))]
    if taken:
        free = next_free_name(cfg.output_dir, cfg.output_name)
        raise FileExistsError(f"'{taken[0]}' exists already and is never overwritten by default: use "
                              f"output_name '{free}' (free), or pass --overwrite to replace it.")



class OutputsMixin:
    """The Trainer's files: checkpoints, the final file and logs, metadata, samples."""

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

    def _checkpoint(self, path: str, epoch: int, step: int) -> None:
        if self._save_lora(path, epoch, step):
            self.epoch_files.append(path)
            self.emit("checkpoint", path=path, epoch=epoch, step=step)

    def metadata(self, epoch: int, step: int) -> Dict[str, str]:
        cfg, m, ds, mc = self.cfg, self.model, self.dataset, self._meta_common
        fam = families.of(m)
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
            "ss_v2": str(fam.ss_v2),
            "ss_base_model_version": fam.base_model_version,
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
            "modelspec.architecture": fam.architecture_for(m.prediction_type),
            "modelspec.implementation": fam.implementation,
            "modelspec.title": cfg.output_name,
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
            "modelspec.prediction_type": "v" if m.prediction_type == "v_prediction" else "epsilon",  # ModelSpec
            "modelspec.date": datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if flow_train.is_flow(m):  # Flux / SD3: base model version, architecture, timestep options
            meta.update(flow_train.metadata(m, cfg))
        if fam.in_place:  # the host's model: its family's version, its objective (families/comfyui.py)
            meta.update(fam.run_metadata(m))
        meta.update(network.metadata(network.NetworkSpec.from_config(cfg, m.kind), m.kind))  # ss_network_module, _args
        for hook in self._hooks("metadata"):  # kohya: the kohya options' ss_* keys
            meta.update(hook(self))
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
        lw = next((w for w in (hook(self) for hook in self._hooks("weights_to_save")) if w is not None), None)
        if lw is None:  # kohya: the EMA copy when ema_decay is set
            fam = families.of(self.model)
            lw = fam.lora_weights(self.model, lora_mod.DEFAULT_ADAPTER) if fam.in_place else lora_mod.extract(self.model)
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

