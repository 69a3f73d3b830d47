"""The Trainer's kohya options as one extension of the run (`KohyaExtras`, attached through the Trainer's named
hooks, trainer.HOOKS): repeats and reg images, loss masks, the tracker, block-wise network shapes and lr groups,
network_weights, the EMA, the per-step loss extras, their state files and ss_* metadata. It keeps its own state
(reg_info, loss_masks, ema) and never writes the Trainer's. The options themselves live in their own modules: models/text_chunks (clip_skip, max_token_length),
data/caption_aug (shuffle / keep_tokens / tag dropout), training/noise (loss types, Huber schedule, multires and
input-perturbation noise), data/reg_masks (reg images, loss masks), networks/blocks (block-wise lr / dims),
training/ema, training/tracking (TensorBoard / wandb).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

from ..data import masks, reg_images
from .. import families
from ..models import conditioning
from ..networks import blocks
from ..networks import lora as lora_mod
from . import noise as noise_mod
from . import tracking
from .ema import LoraEMA

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


def metadata(cfg, trainer, reg: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """ss_* entries of the kohya options, as sd-scripts' train_network.py records them (`reg`: the reg images'
    counts and folders)."""
    reg = reg or {}
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
    ds = getattr(trainer, "dataset", None)
    if reg and ds is not None:  # kohya counts training and reg samples apart
        train_idx = set(getattr(trainer, "train_idx", range(len(ds.items))))
        meta["ss_num_train_images"] = str(sum(it.repeats for i, it in enumerate(ds.items)
                                              if not it.is_reg and i in train_idx))
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


# ------------------------------------------------------------------------------------------------ data
class KohyaExtras:
    """The kohya options' part of a run, called at the Trainer's hooks (trainer.HOOKS)."""

    name = "kohya"

    def __init__(self) -> None:
        self.reg_info: Dict[str, Any] = {}
        self.loss_masks: Optional[List[Optional[torch.Tensor]]] = None
        self.ema: Optional[LoraEMA] = None

    def after_dataset(self, tr) -> None:
        """num_repeats of the images directly in train_data_dir, and the reg images (balanced as kohya)."""
        cfg, ds = tr.cfg, tr.dataset
        if cfg.num_repeats != 1:
            for it in ds.items:
                if not it.is_reg and os.path.dirname(os.path.abspath(it.path)) == os.path.abspath(ds.root):
                    it.repeats = cfg.num_repeats
        if cfg.reg_data_dir and not any(it.is_reg for it in ds.items):
            self.reg_info = reg_images.add_reg_images(ds, cfg.reg_data_dir, cfg.resolution, cfg.caption_extension)
            ds.warnings.append(f"reg images: {self.reg_info['n_images']} image(s), {self.reg_info['n_samples']} "
                               f"samples per epoch beside the training samples, loss weight "
                               f"{cfg.prior_loss_weight:g} (prior_loss_weight).")

    def after_split(self, tr, train_idx: List[int], val_idx: List[int]) -> Tuple[List[int], List[int]]:
        """Reg images are never held out for validation; loss masks; the TensorBoard / wandb tracker. Returns the
        (train, validation) split."""
        cfg, ds = tr.cfg, tr.dataset
        reg = {i for i, it in enumerate(ds.items) if it.is_reg}
        if reg and val_idx:
            moved = [i for i in val_idx if i in reg]
            val_idx = [i for i in val_idx if i not in reg]
            train_idx = sorted(train_idx + moved)
        self.loss_masks = None
        if cfg.masked_loss:
            shapes = [tuple(tr.latents[i].shape) for i in range(len(ds.items))]
            self.loss_masks, notes = masks.build(ds, shapes, cfg.alpha_mask, cfg.mask_dir)
            for n in notes:
                tr.emit("warning", message=n)
        tracker = tracking.make(tr, cfg) if getattr(tr.accelerator, "is_main_process", True) else None
        if tracker is not None:
            tr.add_callback(tracker)
            tr.emit("info", message=f"logging ({cfg.log_with}) to {tracker.dir}")
        return train_idx, val_idx

    def loss_kwargs(self, tr, idx: Sequence[int], flips: Sequence[bool], t_cpu: torch.Tensor,
                    in_noise: Optional[torch.Tensor], shape: Tuple[int, ...]) -> Dict[str, Any]:
        """The extra keyword arguments of loss.diffusion_loss for this micro-batch (only the options that are on)."""
        cfg, ds = tr.cfg, tr.dataset
        kw: Dict[str, Any] = {}
        fn = noise_mod.loss_fn(cfg, t_cpu, tr.model.noise_scheduler)
        if fn is not None:
            kw["elementwise"] = fn
        if in_noise is not None:
            kw["input_noise"] = in_noise
        if self.loss_masks is not None:
            mk = masks.batch_masks(self.loss_masks, idx, flips, shape)
            if mk is not None:
                kw["mask"] = mk.to(tr.device)
        if any(ds.items[i].is_reg for i in idx):
            kw["weights"] = torch.tensor([cfg.prior_loss_weight if ds.items[i].is_reg else 1.0 for i in idx],
                                         device=tr.device)
        return kw

    def shape_network(self, tr, params: List[Dict[str, Any]], names: List[str]
                      ) -> Tuple[List[Dict[str, Any]], List[str]]:
        """Block dims / alphas, zero-lr blocks, network_weights, block-wise lr groups (shape_network below); the
        EMA of the LoRA weights. Returns the param groups and their names."""
        params, names = shape_network(tr, params, names)
        self.ema = LoraEMA(tr.trainable_named(), tr.cfg.ema_decay) if tr.cfg.ema_decay else None
        return params, names

    def after_optimizer_step(self, tr) -> None:
        if self.ema is not None:
            self.ema.update()

    def weights_to_save(self, tr):
        """The LoRA weights to write: the EMA copy when ema_decay is set (None: the trained weights)."""
        if self.ema is None:
            return None
        with self.ema.swapped():
            return lora_mod.extract(tr.model)

    def save_state(self, tr, folder: str) -> None:
        if self.ema is not None:
            save_file(self.ema.state_dict(), os.path.join(folder, EMA_STATE))

    def load_state(self, tr, folder: str) -> None:
        if self.ema is None:
            return
        path = os.path.join(folder, EMA_STATE)
        if not os.path.isfile(path):
            tr.emit("warning", message=f"the state in '{folder}' has no EMA weights (saved without ema_decay): the "
                                       f"EMA starts again from the resumed weights.")
            self.ema.shadow = [p.detach().float().clone() for p in self.ema.params]
            return
        self.ema.load_state_dict(load_file(path))

    def metadata(self, tr) -> Dict[str, str]:
        return metadata(tr.cfg, tr, self.reg_info)


EMA_STATE = "ema.lrstate"


# ------------------------------------------------------------------------------------------------ loss
def noises(cfg, noise: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(noise, input noise or None): multires noise replaces the noise; ip_noise_gamma perturbs the input only."""
    if cfg.multires_noise_iterations:
        noise = noise_mod.pyramid_noise_like(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, gen)
    inn = noise_mod.input_noise(noise, cfg.ip_noise_gamma, gen) if cfg.ip_noise_gamma else None
    return noise, inn


# ------------------------------------------------------------------------------------------------ network
def _component_modules(tr) -> List[Tuple[str, torch.nn.Module]]:
    m = tr.model
    comps = [("unet", m.unet)]
    if tr.cfg.train_text_encoder:  # te (SD1/SD2), te1 + te2 (SDXL), the CLIP encoders of Flux / SD3 (never T5)
        comps += list(conditioning.Conditioner(m).text_encoders)
    return comps


def _most_common(values: List[float]) -> float:
    return max(set(values), key=values.count)


def shape_network(tr, params: List[Dict[str, Any]], given_names: List[str]
                  ) -> Tuple[List[Dict[str, Any]], List[str]]:
    """After the default injection: block dims / alphas and zero-lr blocks (re-injected as kohya creates them),
    the rank from network_weights (dim_from_weights), the start weights (network_weights), block-wise lr groups.
    Returns the param groups and their names (unchanged when no option is on)."""
    cfg, m = tr.cfg, tr.model
    adapter = lora_mod.DEFAULT_ADAPTER
    is_sdxl = families.of(m).sgm_unet_names  # SDXL's block layout
    try:
        lrw = blocks.lr_weights(is_sdxl, cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight,
                                cfg.block_lr_zero_threshold)
        da = blocks.dims_alphas(is_sdxl, cfg.block_dims, cfg.block_alphas, cfg.lora_rank, cfg.alpha)
    except blocks.BlockError as exc:
        raise ValueError(str(exc)) from exc
    if lrw is not None or da is not None or cfg.network_weights:
        plain = cfg.network_type == "lora" and not cfg.conv_rank and not cfg.loraplus_lr_ratio
        if not plain or families.of(m).flow:
            raise ValueError("block-wise lr / dims (down_lr_weight, mid_lr_weight, up_lr_weight, block_dims) and "
                             "network_weights work with plain LoRA on SD1.x / SD2.x / SDXL (network_type lora, no "
                             f"conv_rank, no loraplus_lr_ratio); this run is {cfg.network_type} on {m.kind}: "
                             "remove those options or use plain LoRA.")
    start = lora_mod.load_file(cfg.network_weights, m) if cfg.network_weights else None
    rank, alpha = cfg.lora_rank, cfg.alpha
    if start is not None and cfg.dim_from_weights:
        rank = _most_common([int(d.shape[0]) for d, _, _ in start.modules.values()])
        alpha = _most_common([float(a) for _, _, a in start.modules.values()])
    reshaped = (lrw is not None and 0.0 in lrw) or da is not None or (rank, alpha) != (cfg.lora_rank, cfg.alpha)
    if reshaped:
        torch.manual_seed(cfg.seed)
        for comp, mod in _component_modules(tr):
            targets = lora_mod.unet_target_modules(mod) if comp == "unet" else lora_mod.te_target_modules(mod)
            lora_mod.remove_adapter(mod, adapter)
            if isinstance(getattr(mod, "peft_config", None), dict):  # injected again below, with the new shapes
                mod.peft_config.pop(adapter, None)
                if not mod.peft_config:
                    del mod.peft_config
            plan: Dict[str, Tuple[int, float]] = {}
            for path in targets:
                d, a = rank, alpha
                if comp == "unet":
                    b = blocks.block_index(lora_mod.kohya_name(comp, path, m.kind), is_sdxl)
                    if da is not None and b >= 0:
                        d, a = int(da["dims"][b]), float(da["alphas"][b])
                    if lrw is not None and b >= 0 and lrw[b] == 0:
                        d = 0
                    if start is not None and cfg.dim_from_weights and (comp, path) in start.modules:
                        d, a = int(start.modules[(comp, path)][0].shape[0]), float(start.modules[(comp, path)][2])
                if d > 0:
                    plan[path] = (d, a)
            if not plan:
                raise ValueError("the block-wise options leave no LoRA module in the UNet (every block has rank 0 or "
                                 "lr weight 0): give some blocks a rank and a weight above block_lr_zero_threshold.")
            base = _most_common([d for d, _ in plan.values()])
            lora_mod.inject(mod, list(plan), base, float(base), adapter,
                            rank_pattern={p: d for p, (d, _) in plan.items() if d != base})
            named = dict(mod.named_modules())
            for p, (d, a) in plan.items():
                named[p].lora_alpha[adapter] = float(a)
            lora_mod.set_strength(mod, 1.0, adapter)
    if start is not None:
        _load_start(tr, start)
    comps = _component_modules(tr)
    groups: List[Dict[str, Any]] = []
    names: List[str] = []
    unet = m.unet
    if lrw is not None:
        by_block: Dict[int, List[torch.nn.Parameter]] = {}
        for path, layer in lora_mod.lora_layers(unet, adapter):
            b = blocks.block_index(lora_mod.kohya_name("unet", path, m.kind), is_sdxl)
            by_block.setdefault(b, []).extend(list(layer.lora_A[adapter].parameters())
                                              + list(layer.lora_B[adapter].parameters()))
        for b in sorted(by_block):
            w = lrw[b] if b >= 0 else 1.0
            g = {"params": by_block[b], "lr": cfg.learning_rate * w}
            if groups:
                g["unet_block"] = b  # not a text-encoder group (trainer.te_trainable)
            groups.append(g)
            names.append(f"unet_block{b}")
    elif reshaped or start is not None:
        groups.append({"params": lora_mod.lora_parameters(unet, adapter), "lr": cfg.learning_rate})
        names.append("unet")
    if groups:
        for comp, mod in comps[1:]:
            groups.append({"params": lora_mod.lora_parameters(mod, adapter), "lr": cfg.te_lr})
            names.append(comp)
        return groups, names
    return params, given_names


def _load_start(tr, start) -> None:
    """Copy network_weights into the injected adapter (shapes must match; see dim_from_weights)."""
    adapter = lora_mod.DEFAULT_ADAPTER
    comps = dict(_component_modules(tr))
    loaded, dropped = 0, []
    for (comp, path), (down, up, alpha) in start.modules.items():
        mod = comps.get(comp)
        layer = dict(mod.named_modules()).get(path) if mod is not None else None
        if layer is None or adapter not in getattr(layer, "lora_A", {}):
            dropped.append(lora_mod.kohya_name(comp, path, tr.model.kind))
            continue
        if not lora_mod.set_pair(layer, adapter, down, up, alpha):
            raise ValueError(f"network_weights '{tr.cfg.network_weights}': module {lora_mod.kohya_name(comp, path, tr.model.kind)} "
                             f"has rank {down.shape[0]} but this run's LoRA has rank "
                             f"{layer.lora_A[adapter].weight.shape[0]} there: set dim_from_weights: true (or lora_rank "
                             f"{down.shape[0]}).")
        loaded += 1
    if not loaded:
        raise ValueError(f"network_weights '{tr.cfg.network_weights}': none of its modules is in this run's LoRA "
                         f"(another base model kind?).")
    msg = f"network_weights: started from {loaded} module(s) of '{tr.cfg.network_weights}'"
    if dropped:
        msg += (f"; {len(dropped)} module(s) of the file are not trained by this run and are left out (e.g. "
                f"{dropped[0]}{'; set train_text_encoder: true to keep the text encoder part' if any('_te' in d for d in dropped) else ''})")
    tr.emit("info" if not dropped else "warning", message=msg + ".")
