"""TrainConfig -> kohya TOML (`export-config --kohya`): the sections sd-scripts reads back to train the same thing."""
from __future__ import annotations

from typing import Any, Dict

from ..config import TrainConfig
from .common import KohyaConfigError, NETWORK_ARG_KEYS
from .networks import network_to_kohya


def to_kohya_dict(cfg: TrainConfig) -> Dict[str, Dict[str, Any]]:
    """TrainConfig -> sd-scripts training arguments, in the sections SD-Trainer writes (sd-scripts flattens them)."""
    def some(d: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in d.items() if v is not None and v != ""}

    net = network_to_kohya(cfg)
    nargs = net["network_args"] + [f"{k}={getattr(cfg, k)}" for k in NETWORK_ARG_KEYS
             if getattr(cfg, k) not in ("", 0, 0.0) and not (k == "block_lr_zero_threshold")]
    if cfg.block_lr_zero_threshold and (cfg.down_lr_weight or cfg.mid_lr_weight or cfg.up_lr_weight):
        nargs.append(f"block_lr_zero_threshold={cfg.block_lr_zero_threshold:g}")
    extra_opt = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.optimizer_args.items()]
    opt_args = [f"weight_decay={cfg.weight_decay:g}", f"betas={cfg.adam_beta1:g},{cfg.adam_beta2:g}",
                f"eps={cfg.adam_epsilon:g}"] + extra_opt
    return {
        "model_arguments": some({
            "pretrained_model_name_or_path": cfg.base_model,
            "v_parameterization": cfg.prediction_type == "v_prediction" if cfg.prediction_type != "auto" else None,
            "network_weights": cfg.network_weights, "dim_from_weights": cfg.dim_from_weights or None,
        }),
        "dataset_arguments": some({
            "train_data_dir": cfg.train_data_dir, "reg_data_dir": cfg.reg_data_dir,
            "prior_loss_weight": cfg.prior_loss_weight, "resolution": f"{cfg.resolution},{cfg.resolution}",
            "caption_extension": cfg.caption_extension, "enable_bucket": cfg.enable_bucket,
            "min_bucket_reso": cfg.min_bucket_reso, "max_bucket_reso": cfg.max_bucket_reso,
            "bucket_reso_steps": cfg.bucket_reso_steps, "bucket_no_upscale": cfg.bucket_no_upscale,
            "shuffle_caption": cfg.shuffle_caption, "keep_tokens": cfg.keep_tokens,
            "keep_tokens_separator": cfg.keep_tokens_separator, "caption_dropout_rate": cfg.caption_dropout_rate,
            "caption_tag_dropout_rate": cfg.caption_tag_dropout_rate, "flip_aug": cfg.flip_aug,
            "max_token_length": cfg.max_token_length if cfg.max_token_length != 75 else None,
            "masked_loss": cfg.masked_loss, "alpha_mask": cfg.alpha_mask,
            "cache_latents": True, "cache_latents_to_disk": cfg.latent_cache == "disk",
            "validation_split": cfg.validation_split or None, "validation_seed": cfg.validation_seed,
        }),
        "additional_network_arguments": some({
            "network_module": net["network_module"], "network_dim": cfg.lora_rank, "network_alpha": cfg.alpha,
            "network_dropout": net["network_dropout"], "network_train_unet_only": not cfg.train_text_encoder,
            "network_args": nargs or None, "loraplus_lr_ratio": cfg.loraplus_lr_ratio,
        }),
        "optimizer_arguments": some({
            "optimizer_type": cfg.optimizer, "learning_rate": cfg.learning_rate, "unet_lr": cfg.learning_rate,
            "text_encoder_lr": cfg.te_lr if cfg.train_text_encoder else None, "optimizer_args": opt_args,
            "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps,
            "lr_scheduler_num_cycles": cfg.lr_scheduler_num_cycles, "lr_scheduler_power": cfg.lr_scheduler_power,
            "max_grad_norm": cfg.max_grad_norm,
        }),
        "training_arguments": some({
            "train_batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "max_train_epochs": cfg.epochs, "max_train_steps": cfg.max_train_steps, "seed": cfg.seed,
            # kohya has no "auto": ours trains in bf16 on a GPU that has it (write fp16 for an older card)
            "mixed_precision": "bf16" if cfg.mixed_precision == "auto" else cfg.mixed_precision,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "clip_skip": cfg.clip_skip, "noise_offset": cfg.noise_offset or None,
            "multires_noise_iterations": cfg.multires_noise_iterations or None,
            "multires_noise_discount": cfg.multires_noise_discount if cfg.multires_noise_iterations else None,
            "ip_noise_gamma": cfg.ip_noise_gamma or None, "min_snr_gamma": cfg.min_snr_gamma,
            "loss_type": cfg.loss_type, "huber_schedule": cfg.huber_schedule if cfg.loss_type in ("huber", "smooth_l1")
            else None, "huber_c": cfg.huber_c if cfg.loss_type in ("huber", "smooth_l1") else None,
            "huber_scale": cfg.huber_scale if cfg.loss_type in ("huber", "smooth_l1") else None,
            "ema_decay": cfg.ema_decay or None,  # not an sd-scripts key: this trainer reads it back
        }),
        "sample_prompt_arguments": some({
            "sample_every_n_steps": cfg.sample_every_n_steps or None,
            "sample_every_n_epochs": cfg.sample_every_n_epochs or None,
        }),
        "saving_arguments": some({
            "output_dir": cfg.output_dir, "output_name": cfg.output_name, "save_model_as": "safetensors",
            "save_every_n_epochs": cfg.save_every_n_epochs or None,
            "save_every_n_steps": cfg.save_every_n_steps or None, "save_state": cfg.save_state,
        }),
        "logging_arguments": some({
            "log_with": cfg.log_with, "logging_dir": cfg.logging_dir, "log_prefix": cfg.log_prefix,
        }),
    }


def to_kohya_toml(cfg: TrainConfig) -> str:
    try:
        import tomlkit  # optional: only export-config writes TOML (requirements.txt); hosts may lack it
    except ImportError:
        raise KohyaConfigError("export", "writing a kohya TOML needs the 'tomlkit' package: `pip install "
                               "tomlkit`.") from None
    doc = tomlkit.document()
    doc.add(tomlkit.comment("kohya sd-scripts training arguments (train_network.py --config_file), written by "
                            "lora_train export-config --kohya"))
    if cfg.sample_prompts:
        doc.add(tomlkit.comment("sample prompts (kohya reads them from a file given as sample_prompts): "
                                + " | ".join(cfg.sample_prompts)))
    for section, values in to_kohya_dict(cfg).items():
        if values:
            doc[section] = values
    return tomlkit.dumps(doc)
