"""ComfyUI node: Train LoRA (on the graph's MODEL / CLIP / VAE, published under a free name)."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Tuple

from lora_train.config import DEFAULT_NAME, NETWORK_TYPES, OPTIMIZERS, SCHEDULERS
from lora_train.hosts.comfyui import ComfyUIHost, pil_to_image, save_preview

from .common import log, PRECISION_CHOICES, DEFAULTS, INT_MAX, _values_hash, clean_lora_name
from .names import CATEGORY, DATASET_TYPE


# ============================================================================= training
def _device_and_precision(choice: str) -> Tuple[str, str]:
    import torch

    try:
        import comfy.model_management as mm

        device = mm.get_torch_device()
    except Exception:  # noqa: BLE001 - fakes / very old ComfyUI
        device = torch.device("cpu")
    from lora_train.training.device import resolve_precision

    return str(device), resolve_precision(choice, device)


def advice_lines(res, cfg) -> List[str]:
    """The live diagnosis summary, and the table's lr when the run's lr is far from the start for its effective
    batch (config.LR_BY_BATCH: 1 -> 1e-4, 2 -> 1.5e-4, 4 -> 2e-4; one knob at a time)."""
    from lora_train.config import learning_rate_for
    from lora_train.tuning.advisor import Finding, format_findings

    out = [format_findings([Finding(**f) for f in res.findings])]
    eff = cfg.batch_size * cfg.gradient_accumulation_steps
    lr = learning_rate_for(eff)
    if abs(cfg.learning_rate - lr) > 0.25 * lr:
        out.append(f"lr note: effective batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} = {eff}; the "
                   f"table's start for it is {lr:.3g}; this run used {cfg.learning_rate:.3g}. If you changed batch "
                   f"or accumulation, set learning_rate to {lr:.3g} (or wire Suggest settings in).")
    return out


#: the Train node's network type inputs (optional: workflows saved before them keep working)
NETWORK_INPUTS = {
    "network_type": (list(NETWORK_TYPES), {"default": "lora", "tooltip": "lora; locon (+ ResNet convs: styles, "
                                                                        "textures); loha / lokr (LyCORIS, small files); "
                                                                        "dora (often better at a lower lr)."}),
    "conv_rank": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "Rank of the ResNet 3x3 convolutions "
                                                                         "(0: off; locon: 0 = rank)."}),
    "conv_alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 1.0,
                             "tooltip": "Alpha of the convolutions; 0 = same as conv_rank."}),
    "factor": ("INT", {"default": -1, "min": -1, "max": 1024, "tooltip": "LoKr Kronecker factor (-1: automatic)."}),
    "full_matrix": ("BOOLEAN", {"default": False, "tooltip": "LoKr: full matrices instead of a low-rank w2."}),
    "dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": "lora / locon: input dropout."}),
    "rank_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                               "tooltip": "loha / lokr / dora: drop rows of the weight delta while training."}),
    "module_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                 "tooltip": "loha / lokr / dora: skip a module while training."}),
    "loraplus_lr_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 1.0,
                                    "tooltip": "LoRA+: the up/B matrices train at ratio x lr (e.g. 16); 0: off."}),
}

#: the Train node's optional kohya options (kohya names; 0 / empty = from kohya_config, or off)
KOHYA_TRAIN_OPTIONS = {
    "kohya_config": ("STRING", {"default": "", "tooltip": "Optional kohya training TOML (or kohya_ss .json): keys "
                                "without a widget here (e.g. min_snr_gamma, block weights) are taken from it; the "
                                "widgets win."}),
    "clip_skip": ("INT", {"default": 0, "min": 0, "max": 12, "tooltip": "SD1/SD2: 2 for anime SD1.5 models (as "
                          "kohya / the WebUI's CLIP skip); 0 or 1: off."}),
    "max_token_length": (["75", "150", "225"], {"default": "75", "tooltip": "Long captions: 75-token chunks, "
                                                "each with BOS/EOS, as the WebUIs encode prompts."}),
    "shuffle_caption": ("BOOLEAN", {"default": False, "tooltip": "Shuffle the comma-separated tags every step."}),
    "keep_tokens": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Tags kept in front when shuffling."}),
    "caption_tag_dropout_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                           "tooltip": "Drop each (not kept) tag with this probability."}),
    "reg_data_dir": ("STRING", {"default": "", "tooltip": "Regularization images (kohya N_class folders)."}),
    "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                    "tooltip": "Loss weight of the reg images."}),
    "loss_type": (["l2", "l1", "huber", "smooth_l1"], {"default": "l2", "tooltip": "kohya loss type (huber: "
                  "huber_schedule snr, huber_c 0.1 unless kohya_config says otherwise)."}),
    "network_weights": ("STRING", {"default": "", "tooltip": "Start from this LoRA file (same rank, or "
                                   "dim_from_weights in kohya_config)."}),
    "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9999, "step": 0.0001,
                            "tooltip": "EMA of the LoRA weights (e.g. 0.999); the saved file is the EMA copy."}),
}


#: the Train node's Flux / SD3 memory option and the in-place switch (optional inputs)
FLOW_TRAIN_OPTIONS = {
    "fp8_base": (["auto", "on", "off"], {"default": "auto", "tooltip": "Flux / SD3.5: store the frozen "
                 "transformer weights in fp8 while training. auto: on for >= 4 B parameter models on a GPU "
                 "(Flux.1, SD3.5 Large). SD1 / SDXL: ignored."}),
    "in_place": (["auto", "on", "off"], {"default": "auto", "tooltip": "Train the graph's own MODEL in place "
                 "(ComfyUI's weights, fp8 and offloading as loaded; no copy): every family ComfyUI loads. auto: in "
                 "place for all but SD1.x / SDXL / Flux.1 / SD3 (which are read into a trainer copy unless on)."}),
}

class LoraTrainTrain:
    DESCRIPTION = ("Train a LoRA on the MODEL / CLIP / VAE of the graph, inside ComfyUI (no subprocess). Saves a "
                   "new file in the loras folder (never overwrites: my_lora_v2, ...), with kohya metadata.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model to train on (MODEL of a checkpoint loader)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (CLIP of the same loader)."}),
            "vae": ("VAE", {"tooltip": "Its VAE (VAE of the same loader); encodes the training images."}),
            "dataset": (DATASET_TYPE, {"tooltip": "Images and captions from 'Dataset from folder' / 'Caption dataset'."}),
            "lora_name": ("STRING", {"default": DEFAULT_NAME, "tooltip": "File name of the new LoRA; a free name is "
                                                                      "taken when it exists (my_lora_v2, ...)."}),
            "learning_rate": ("FLOAT", {"default": DEFAULTS.learning_rate, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                        "tooltip": "UNet learning rate (text encoder: half of it)."}),
            "rank": ("INT", {"default": DEFAULTS.lora_rank, "min": 1, "max": 256, "tooltip": "LoRA rank (dim): capacity and file size."}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 1.0,
                                "tooltip": "LoRA alpha; scale = alpha / rank. 0 = same as rank."}),
            "batch_size": ("INT", {"default": DEFAULTS.batch_size, "min": 1, "max": 64, "tooltip": "Images per step."}),
            "gradient_accumulation": ("INT", {"default": DEFAULTS.gradient_accumulation_steps, "min": 1, "max": 128,
                                              "tooltip": "Steps whose gradients are summed before an update."}),
            "epochs": ("INT", {"default": DEFAULTS.epochs, "min": 1, "max": 10000, "tooltip": "Passes over the dataset."}),
            "max_steps": ("INT", {"default": 0, "min": 0, "max": 1000000,
                                  "tooltip": "Stop after this many optimizer steps; 0 = use epochs."}),
            "lr_scheduler": (list(SCHEDULERS), {"default": DEFAULTS.lr_scheduler, "tooltip": "How the learning rate changes."}),
            "warmup_steps": ("INT", {"default": DEFAULTS.lr_warmup_steps, "min": 0, "max": 100000,
                                     "tooltip": "Learning-rate warmup steps."}),
            "optimizer": (list(OPTIMIZERS), {"default": DEFAULTS.optimizer, "tooltip": "Optimizer (AdamW8bit needs bitsandbytes, "
                                                                              "Prodigy needs prodigyopt)."}),
            "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "Also train the text encoder."}),
            "training_seed": ("INT", {"default": DEFAULTS.seed, "min": 0, "max": INT_MAX,
                                      "tooltip": "Seed of the run (same seed + same inputs = same LoRA)."}),
            "save_every_n_epochs": ("INT", {"default": DEFAULTS.save_every_n_epochs, "min": 0, "max": 10000,
                                            "tooltip": "Also save name-00000N files every N epochs (0 = final only); "
                                                       "the sweep can compare them."}),
            "mixed_precision": (list(PRECISION_CHOICES), {"default": "auto", "tooltip": "auto: bf16/fp16 on CUDA, fp32 on CPU."}),
        }, "optional": {**NETWORK_INPUTS, **KOHYA_TRAIN_OPTIONS, **FLOW_TRAIN_OPTIONS},
            "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("lora_name", "lora_path", "loss_plot", "report")
    OUTPUT_TOOLTIPS = ("The new LoRA as ComfyUI lists it (for the sweep / LoRA loaders).", "Full path of the file.",
                       "Loss curve.", "What was trained and where it went.")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **kw):
        # Only the widget values (links are not passed here); ComfyUI re-runs also when an upstream node changed.
        return _values_hash(**{k: v for k, v in kw.items() if isinstance(v, (str, int, float, bool))})

    def train(self, model, clip, vae, dataset, lora_name, learning_rate, rank, alpha, batch_size,
              gradient_accumulation, epochs, max_steps, lr_scheduler, warmup_steps, optimizer, train_text_encoder,
              training_seed, save_every_n_epochs, mixed_precision="auto", unique_id=None, network_type="lora",
              conv_rank=0, conv_alpha=0.0, factor=-1, full_matrix=False, dropout=0.0, rank_dropout=0.0,
              module_dropout=0.0, loraplus_lr_ratio=0.0, kohya_config="", clip_skip=0,
              max_token_length="75", shuffle_caption=False, keep_tokens=0, caption_tag_dropout_rate=0.0,
              reg_data_dir="", prior_loss_weight=1.0, loss_type="l2", network_weights="", ema_decay=0.0,
              fp8_base="auto", in_place="auto"):
        from lora_train.config import TrainConfig
        from lora_train.plots import loss_plot
        from lora_train.run import train_for_host

        host = ComfyUIHost(model, clip, vae, node_id=unique_id, in_place=in_place)
        device, precision = _device_and_precision(mixed_precision)
        inplace = host.trains_in_place()
        # Flux / SD3 copies only (hosts/comfyui_flow.py); in place ComfyUI keeps its own weights as it loaded them
        plan = None if inplace else host.memory_plan(device, fp8_base)
        from lora_train.kohya.toml_config import node_config

        node_kw = dict(
            train_data_dir=dataset.folder, caption_extension=dataset.caption_extension,
            trigger_word=dataset.trigger_word, resolution=dataset.resolution, base_model="comfyui",
            output_name=clean_lora_name(lora_name), lora_rank=int(rank),
            lora_alpha=float(alpha) if alpha and alpha > 0 else None, train_text_encoder=bool(train_text_encoder),
            learning_rate=float(learning_rate), optimizer=optimizer, lr_scheduler=lr_scheduler,
            lr_warmup_steps=int(warmup_steps), batch_size=int(batch_size),
            gradient_accumulation_steps=int(gradient_accumulation), epochs=int(epochs),
            max_train_steps=int(max_steps) if max_steps and max_steps > 0 else None, seed=int(training_seed),
            mixed_precision=precision, device=device, save_every_n_epochs=int(save_every_n_epochs),
            save_state_every_n_epochs=0, save_state_every_n_steps=0, network_type=network_type,
            conv_rank=int(conv_rank), conv_alpha=float(conv_alpha) if conv_alpha and conv_alpha > 0 else None,
            factor=int(factor), full_matrix=bool(full_matrix), dropout=float(dropout), rank_dropout=float(rank_dropout),
            module_dropout=float(module_dropout),
            loraplus_lr_ratio=float(loraplus_lr_ratio) if loraplus_lr_ratio and loraplus_lr_ratio > 0 else None,
            **({"fp8_base": plan.fp8_base} if plan else {}))
        kohya_options = dict(kohya_config=kohya_config, clip_skip=clip_skip, max_token_length=max_token_length,
                             shuffle_caption=shuffle_caption, keep_tokens=keep_tokens,
                             caption_tag_dropout_rate=caption_tag_dropout_rate, reg_data_dir=reg_data_dir,
                             prior_loss_weight=prior_loss_weight, loss_type=loss_type,
                             network_weights=network_weights, ema_decay=ema_decay)
        cfg = TrainConfig.from_dict(node_config(node_kw, getattr(dataset, "kohya", {}), kohya_options))
        ds = dataset.load()
        holder: Dict[str, Any] = {}
        stopped_by_user = [False]

        def user_stop() -> None:
            stopped_by_user[0] = True
            if "trainer" in holder:
                holder["trainer"].stop()  # ends after this step and saves what was trained

        def on_event(ev: Dict[str, Any]) -> None:
            kind = ev.get("kind")
            if stopped_by_user[0] or host.interrupted():
                user_stop()
                return
            try:
                if kind == "start":
                    host.progress(0, int(ev.get("total_steps") or 1))
                elif kind == "step":
                    host.progress(int(ev["step"]), int(ev["total_steps"]))
            except Exception as exc:  # noqa: BLE001
                # ComfyUI's progress hook (main.py) raises InterruptProcessingException when Cancel was pressed
                # (and clears the flag): stop cleanly instead of letting it kill the run unsaved.
                if type(exc).__name__ != "InterruptProcessingException":
                    raise
                user_stop()
                return
            if kind == "step" and (ev["step"] % 10 == 0 or ev["step"] == ev["total_steps"]):
                log.info("lora_train: step %s/%s loss %.4f", ev["step"], ev["total_steps"], ev["loss"])

        t0 = time.time()
        run = train_for_host(host, cfg, None, dataset=ds, callback=on_event,
                             on_trainer=lambda t: holder.__setitem__("trainer", t))
        holder.clear()
        res, name, loras_dir = run.result, run.name, host.output_dir()
        published = run.published
        final = run.lora_path or ""
        losses = res.losses
        if res.loss_png and os.path.isfile(res.loss_png):
            from PIL import Image

            with Image.open(res.loss_png) as im:
                plot = im.convert("RGB")
        else:
            plot = loss_plot(list(range(1, len(losses) + 1)), losses, title=f"{name} loss")
        lines = [f"LoRA '{name}': {res.steps} steps, {res.epochs_done} epoch(s) in {time.time() - t0:.0f} s on {device}"
                 f"{' (stopped by interrupt: what was trained is saved)' if stopped_by_user[0] else ''}."]
        if final:
            lines.append(f"saved {final}")
        if len(published) > 1:
            lines.append("epoch files: " + ", ".join(os.path.basename(p) for p in published[:-1]))
        if losses:
            k = max(1, len(losses) // 10)
            lines.append(f"loss: first {sum(losses[:k]) / k:.4f}, last {sum(losses[-k:]) / k:.4f} (mean of {k} steps)")
        if res.message:
            lines.append(res.message)
        lines.extend(run.warnings)
        if plan:
            lines.append(plan.text)
        lines.extend(advice_lines(res, cfg))
        lines.append(f"run folder (config, loss log): {res.output_dir}")
        report = "\n".join(lines)
        log.info(report)
        if stopped_by_user[0]:
            import comfy.model_management as mm

            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()  # end the prompt as ComfyUI's own interrupt does
        if not final:
            raise RuntimeError(f"training produced no LoRA file: {res.message or 'no step was trained'}")
        if inplace:  # ComfyUI's own key map and load_lora on the file we wrote, for this MODEL
            done, total, missing = host.applies(final)
            if missing:
                raise RuntimeError(f"ComfyUI applies {done} of {total} LoRA modules of {final}; not applied: "
                                   f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Report this "
                                   f"with the model's name.")
            report += f"\nComfyUI applies {done} of {total} LoRA modules of the file (its own key map)."
        lora_listed = os.path.relpath(final, loras_dir).replace(os.sep, "/")
        return {"ui": {"text": [report], "images": [save_preview(plot, "lora_train_loss")]},
                "result": (lora_listed, final, pil_to_image(plot), report)}
