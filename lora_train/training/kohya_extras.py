"""The Trainer's kohya options in one place (issue 18): ss_* metadata of the options, and (below) the per-step loss
extras. The options themselves live in their own modules: models/text_chunks (clip_skip, max_token_length),
data/caption_aug (shuffle / keep_tokens / tag dropout), training/noise (loss types, Huber schedule, multires and
input-perturbation noise), data/reg_masks (reg images, loss masks), networks/blocks (block-wise lr / dims),
training/ema, training/tracking (TensorBoard / wandb).
"""
from __future__ import annotations

import json
from typing import Any, Dict

BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas")


def _num(v: Any) -> str:
    return "None" if v in (None, 0, 0.0) else f"{v:g}"


def network_args(cfg) -> Dict[str, str]:
    """kohya's network_args (ss_network_args) of the block-wise options that are set."""
    out = {k: str(getattr(cfg, k)) for k in BLOCK_KEYS if getattr(cfg, k) not in ("", 0, 0.0)}
    if "block_lr_zero_threshold" in out:
        out["block_lr_zero_threshold"] = f"{cfg.block_lr_zero_threshold:g}"
    return out


def metadata(cfg, trainer) -> Dict[str, str]:
    """ss_* entries of the kohya options, as sd-scripts' train_network.py records them."""
    reg = getattr(trainer, "reg_info", None) or {}
    meta = {
        "ss_clip_skip": str(cfg.clip_skip) if cfg.clip_skip else "None",
        "ss_max_token_length": str(cfg.max_token_length),
        "ss_shuffle_caption": str(bool(cfg.shuffle_caption)),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_tag_dropout_rate": f"{cfg.caption_tag_dropout_rate:g}",
        "ss_prior_loss_weight": f"{cfg.prior_loss_weight:g}",
        "ss_num_reg_images": str(reg.get("n_images", 0)),
        "ss_reg_dataset_dirs": json.dumps(reg.get("dirs", {})),
        "ss_masked_loss": str(bool(cfg.masked_loss)),
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": f"{cfg.huber_c:g}",
        "ss_huber_scale": f"{cfg.huber_scale:g}",
        "ss_multires_noise_iterations": str(cfg.multires_noise_iterations) if cfg.multires_noise_iterations
        else "None",
        "ss_multires_noise_discount": f"{cfg.multires_noise_discount:g}",
        "ss_ip_noise_gamma": _num(cfg.ip_noise_gamma),
    }
    if cfg.keep_tokens_separator:
        meta["ss_keep_tokens_separator"] = cfg.keep_tokens_separator
    args = network_args(cfg)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    if cfg.ema_decay:
        meta["ss_ema_decay"] = f"{cfg.ema_decay:g}"  # not a kohya key: the saved weights are the EMA copy
    if cfg.network_weights:
        meta["ss_network_weights"] = cfg.network_weights
    return meta
