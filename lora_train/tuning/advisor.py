"""The settings advisor: `suggest` (settings for a first run, each with its reason) and `check_config` (warnings
for a config); the rules it applies are data in tuning/rules.py, the live loss diagnosis is tuning/diagnosis.py
(both re-exported here for the front doors).

Public API
    suggest(image_count, task, base, vram_gb, batch_size, gradient_accumulation_steps, accumulation_scaling,
            ...) -> Suggestion
    check_config(cfg, samples_per_epoch=None) -> [warning, ...]
    rules: rescale_lr, lr_for_batch, batch_change_offer;  diagnosis: Diagnoser, Finding, diagnose, format_findings
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import TrainConfig
from .. import families
from . import flow_advice
from .network_advice import check_network, network_advice
from . import kohya_advice
from .diagnosis import Diagnoser, Finding, diagnose, format_findings  # noqa: F401  (the front doors' API)
from .rules import (  # noqa: F401  (the tables and lr rules, for the front doors)
    BASES, LR_BY_BATCH, DEMANDING_FACTOR, DETAILS, EPOCHS_LARGE, EPOCHS_MEDIUM, EPOCHS_SMALL, LARGE_SET, LR_DEMANDING_RANK16,
    LR_FAR_FACTOR, LR_SMALL_SET, NATIVE_RESOLUTION, RANK_BY_TASK, RANK_FLAG, RANK_SHORT_VRAM, RANK_UPPER,
    SCALINGS, SMALL_SET, TARGET_VIEWS, TARGET_VIEWS_SMALL, TASKS, VRAM_ASSUMED_UNKNOWN, VRAM_TIERS, WARMUP,
    WARMUP_FULL_FROM, WARMUP_LONG_FROM, WARMUP_SHORT_FRACTION, _check_choice, _fmt, _r3, batch_change_offer,
    lr_for_batch, rescale_lr, vram_tier)

# ----------------------------------------------------------------------------- the suggestion
@dataclass
class Setting:
    key: str
    value: Any
    reason: str


@dataclass
class Suggestion:
    """Settings with a one-line reason each. `s.learning_rate` reads a value; `s.reason("learning_rate")` its
    reason; `to_config_dict()` keeps the keys TrainConfig accepts."""

    settings: Dict[str, Setting] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    inputs: Dict[str, Any] = field(default_factory=dict)
    total_steps: int = 0
    steps_per_epoch: int = 0

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings:
            return settings[name].value
        raise AttributeError(name)

    def add(self, key: str, value: Any, reason: str) -> None:
        self.settings[key] = Setting(key, value, reason)

    def drop(self, key: str) -> None:
        """A setting that does not apply (e.g. a text-encoder lr where no text encoder trains)."""
        self.settings.pop(key, None)

    def value(self, key: str) -> Any:
        return self.settings[key].value

    def reason(self, key: str) -> str:
        return self.settings[key].reason

    def rows(self) -> List[Tuple[str, Any, str]]:
        return [(s.key, s.value, s.reason) for s in self.settings.values()]

    def to_config_dict(self) -> Dict[str, Any]:
        valid = set(TrainConfig.keys())
        return {k: s.value for k, s in self.settings.items() if k in valid}

    def table(self) -> str:
        rows = [("setting", "value", "why")] + [(k, _fmt(v), r) for k, v, r in self.rows()]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 3}")
        out = "\n".join(lines)
        if self.notes:
            out += "\n\nnotes:\n" + "\n".join(f"- {n}" for n in self.notes)
        return out



def detect_vram_gb() -> Optional[float]:
    """Total memory of CUDA device 0 in GB, or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return float(torch.cuda.get_device_properties(0).total_memory) / 2 ** 30
    except Exception:  # a broken driver must not break the advisor
        return None


def _cuda_bf16() -> Optional[bool]:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return bool(torch.cuda.is_bf16_supported())
    except Exception:
        return None


def vram_batch_range(vram_gb: float, base: str = "sd1", resolution: Optional[int] = None) -> Tuple[int, int, str]:
    """(smallest, largest) batch that fits in `vram_gb`, and the tier named. SDXL, or >= 768 px, halves it."""
    _check_choice("base", base, BASES)
    res = resolution or NATIVE_RESOLUTION[base]
    tier, (lo, hi) = vram_tier(vram_gb)
    tier += " tier"
    fam = families.get(base)
    halve = fam.native_resolution >= 1024 or res >= 768
    if halve:
        lo, hi = max(1, lo // 2), max(1, hi // 2)
        why = f"{res} px" if fam.flow else fam.title
        return lo, hi, f"{tier} ({why} halves the SD1-at-512 batch)"
    return lo, hi, f"{tier} (SD1 at 512)"


def _epochs_for(image_count: int, samples: int) -> Tuple[int, str]:
    if image_count < SMALL_SET:
        target, (lo, hi), label = TARGET_VIEWS_SMALL, EPOCHS_SMALL, f"under {SMALL_SET} images"
    elif image_count <= LARGE_SET:
        target, (lo, hi), label = TARGET_VIEWS, EPOCHS_MEDIUM, f"{SMALL_SET}-{LARGE_SET} images"
    else:
        target, (lo, hi), label = TARGET_VIEWS, EPOCHS_LARGE, f"over {LARGE_SET} images"
    raw = math.ceil(target / samples)
    epochs = min(hi, max(lo, raw))
    return epochs, (f"{label}: about {target} image views / {samples} per epoch, kept in {lo}-{hi} epochs "
                    f"(small sets need more passes)")


#: epoch files a suggested run keeps at most (plus the final file)
EPOCH_FILES_AIMED = 10


def save_every_for(epochs: int) -> int:
    """Save every N epochs so that a run keeps about EPOCH_FILES_AIMED epoch files or fewer."""
    return max(1, math.ceil(int(epochs) / EPOCH_FILES_AIMED))


def _warmup_for(total_steps: int) -> Tuple[int, str]:
    if total_steps >= WARMUP_LONG_FROM:
        return WARMUP[1], f"cosine default 100-200 warmup steps: {WARMUP[1]} for a {total_steps}-step run"
    if total_steps >= WARMUP_FULL_FROM:
        return WARMUP[0], f"cosine default 100-200 warmup steps: {WARMUP[0]} for a {total_steps}-step run"
    w = int(round(WARMUP_SHORT_FRACTION * total_steps))
    return w, (f"the default 100-200 would be too much of a {total_steps}-step run: "
               f"{int(WARMUP_SHORT_FRACTION * 100)}% of it")


def _check_inputs(image_count, task, base, accumulation_scaling, detail, gradient_accumulation_steps, batch_size,
                  vram_gb) -> None:
    _check_choice("task", task, TASKS)
    _check_choice("base", base, BASES)
    _check_choice("accumulation_scaling", accumulation_scaling, SCALINGS)
    _check_choice("detail", detail, DETAILS)
    if not isinstance(image_count, int) or isinstance(image_count, bool) or image_count < 1:
        raise ValueError(f"image_count = {image_count!r}: the dataset needs at least 1 image.")
    if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps = {gradient_accumulation_steps!r}: use an integer >= 1.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size = {batch_size!r}: use an integer >= 1.")
    if vram_gb is not None and not (isinstance(vram_gb, (int, float)) and vram_gb > 0):
        raise ValueError(f"vram_gb = {vram_gb!r}: give the GPU memory in GB, e.g. 8.")


def _vram_plan(s: "Suggestion", vram_gb: Optional[float], vram_field: str) -> Tuple[float, str, bool]:
    """(the VRAM to plan for, how to name it, whether it is known): given, detected, or the smallest tier."""
    vram_known = vram_gb is not None
    detected = False
    if vram_gb is None:
        vram_gb = detect_vram_gb()
        vram_known = detected = vram_gb is not None
    if vram_known:
        vram_text = f"{vram_gb:g} GB" + (" (detected)" if detected else "")
        plan_vram = float(vram_gb)
    else:
        plan_vram = VRAM_ASSUMED_UNKNOWN
        vram_text = f"VRAM unknown (planned as {VRAM_ASSUMED_UNKNOWN:g} GB)"
        s.notes.append(f"VRAM unknown (no CUDA GPU found here): planned for the smallest tier "
                       f"(<= {VRAM_ASSUMED_UNKNOWN:g} GB). Set {vram_field} to the card you will train on.")
    return plan_vram, vram_text, vram_known


def _rank_and_batch(s: "Suggestion", task: str, detail: str, batch_size: Optional[int], image_count: int,
                    samples: int, vram_text: str, lo: int, hi: int, tier: str, short_vram: bool
                    ) -> Tuple[int, str, int, str]:
    """(rank, why, batch, why): the task's rank; the VRAM tier's batch (a user's batch is kept: rank is lowered
    first when it does not fit)."""
    rank = RANK_BY_TASK[task][DETAILS.index(detail)]
    rank_reason = {
        "style": "4-6 for a simple style, 8-12 for a specific style",
        "character": "8-12 for a character; 16 for demanding detail",
        "face": "8-12 for faces; 16 for demanding detail",
        "object": "an object: 8; 16 for logos / fine printed detail",
        "concept": "a concept or pose: 4-8",
        "other": "8 is a safe middle; 16 is the upper bound for most LoRAs",
    }[task]
    rank_reason = f"{task}, {detail} detail: {rank_reason}"

    # --- batch
    if batch_size is not None:
        batch = batch_size
        batch_reason = f"your choice ({vram_text}: the {tier} fits {lo}-{hi})"
        if batch > hi:
            new_rank = min(rank, 4)
            batch_reason = (f"your choice, above the {lo}-{hi} that fits {vram_text} ({tier}): rank lowered "
                            f"and gradient checkpointing on first; lower the batch only if it still runs out of "
                            f"memory")
            if new_rank < rank:
                rank_reason = f"lowered from {rank} to {new_rank} so that your batch {batch} fits ({rank_reason})"
                rank = new_rank
            s.notes.append(f"batch {batch} is above what usually fits ({lo}-{hi} for {tier}): expect "
                           f"out-of-memory errors; rank and checkpointing were changed first, as the rule says.")
    else:
        batch = lo
        batch_reason = f"{vram_text}, {tier}: {lo}-{hi} fits; the lower end leaves room for rank and captions"
        if image_count < SMALL_SET and batch > 2:
            batch = 2
            batch_reason += f"; capped at 2 for under {SMALL_SET} images (lr 1e-4..1.5e-4, more steps)"
        if batch > samples:
            batch = samples
            batch_reason += f"; capped at the {samples} samples per epoch"
    if short_vram and rank > RANK_SHORT_VRAM:
        rank_reason = (f"VRAM short ({tier}): lowered from {rank} to {RANK_SHORT_VRAM} before touching the batch "
                       f"({rank_reason})")
        rank = RANK_SHORT_VRAM
    return rank, rank_reason, batch, batch_reason


def _learning_rate(batch: int, accum: int, accumulation_scaling: str, image_count: int, rank: int, detail: str
                   ) -> Tuple[float, List[str]]:
    """The start lr and its reasons: the batch table, the small-set range, demanding detail, accumulation."""
    lr, lr_reason = lr_for_batch(batch, accumulation_scaling)
    parts = [lr_reason]
    if image_count < SMALL_SET:
        capped = min(max(lr, LR_SMALL_SET[0]), LR_SMALL_SET[1])
        if capped != lr:
            parts.append(f"under {SMALL_SET} images start at {LR_SMALL_SET[0]:.3g}..{LR_SMALL_SET[1]:.3g}: "
                         f"{capped:.3g}")
            lr = capped
        else:
            parts.append(f"under {SMALL_SET} images: within the 1e-4..1.5e-4 start")
    elif image_count <= LARGE_SET and batch == 4:
        parts.append(f"the default start for {SMALL_SET}-{LARGE_SET} images at batch 4")
    if rank >= RANK_UPPER and detail == "demanding" and image_count >= SMALL_SET:
        new = _r3(lr * DEMANDING_FACTOR)
        parts.append(f"demanding detail at rank {rank} may take x{DEMANDING_FACTOR:g} (2.5e-4 at batch 4): {new:.3g}")
        lr = new
    if accum > 1:
        new, why = rescale_lr(lr, batch, 1, batch, accum, accumulation_scaling)
        parts.append(why)
        lr = new
    return _r3(lr), parts


def _precision(vram_known: bool) -> Tuple[str, str]:
    bf16 = _cuda_bf16()
    if not vram_known:
        return "no", "no CUDA GPU here: full fp32 (mixed precision needs a GPU)"
    if bf16 is False:
        return "fp16", "this GPU has no bf16: fp16 halves activation memory"
    return "bf16", "bf16 on RTX 30xx / A100 or newer (stable, half the memory); fp16 on older cards"


def _checkpointing(base: str, res: int, plan_vram: float, batch_size: Optional[int], batch: int, hi: int,
                   tier: str) -> Tuple[bool, str]:
    halved = families.get(base).native_resolution >= 1024 or res >= 768
    checkpointing = plan_vram <= (16.0 if halved else 8.0) or (batch_size is not None and batch > hi)
    return checkpointing, (f"{'VRAM short' if checkpointing else 'enough VRAM'} ({tier}): "
                           + ("recompute activations to save memory (about 20-30% slower)" if checkpointing
                              else "off, it only costs speed here"))


def suggest(image_count: int, task: str = "other", base: str = "sd1", vram_gb: Optional[float] = None,
            batch_size: Optional[int] = None, gradient_accumulation_steps: int = 1,
            accumulation_scaling: str = "sqrt", detail: str = "normal", resolution: Optional[int] = None,
            samples_per_epoch: Optional[int] = None, vram_field: str = "--vram GB",
            network_type: str = "lora", model_name: str = "", captions: Optional[Sequence[str]] = None,
            tokenizer: Any = None) -> Suggestion:
    """Settings for a first run, each with its reason.

    image_count: distinct training images; samples_per_epoch: images x kohya repeats (default image_count).
    task: style | character | face | object | concept | other.  base: sd1 | sd2 | sdxl.
    vram_gb: GPU memory; None detects CUDA device 0 (no CUDA: unknown, planned as the smallest tier).
    batch_size: a batch the user insists on (kept; rank is lowered first if it does not fit).
    gradient_accumulation_steps / accumulation_scaling: effective batch = batch x steps, lr rescaled by sqrt
    (default) or linearly.  detail: simple | normal | demanding (faces, logos: rank 16).
    vram_field: how the front end lets the user give the VRAM, named in the note when it is unknown.
    network_type: lora | locon | loha | lokr | dora (tuning/network_advice.py: its rank, lr, factor, convs).
    model_name / captions / tokenizer: for the kohya options (tuning/kohya_advice.py: clip_skip 2 for anime SD1.5
    models, reg images for few character images, caption shuffling for tags, long captions).
    """
    _check_inputs(image_count, task, base, accumulation_scaling, detail, gradient_accumulation_steps, batch_size,
                  vram_gb)
    samples = int(samples_per_epoch or image_count)
    res = int(resolution or NATIVE_RESOLUTION[base])
    accum = gradient_accumulation_steps
    s = Suggestion(inputs=dict(image_count=image_count, samples_per_epoch=samples, task=task, base=base,
                               vram_gb=vram_gb, batch_size=batch_size, gradient_accumulation_steps=accum,
                               accumulation_scaling=accumulation_scaling, detail=detail, resolution=res))

    # --- VRAM
    plan_vram, vram_text, vram_known = _vram_plan(s, vram_gb, vram_field)
    lo, hi, tier = vram_batch_range(plan_vram, base, res)
    short_vram = lo <= 1

    # --- rank (lowered before batch when VRAM is short), batch
    rank, rank_reason, batch, batch_reason = _rank_and_batch(s, task, detail, batch_size, image_count, samples,
                                                             vram_text, lo, hi, tier, short_vram)

    # --- learning rate
    lr, lr_parts = _learning_rate(batch, accum, accumulation_scaling, image_count, rank, detail)

    # --- epochs, steps, warmup
    epochs, epochs_reason = _epochs_for(image_count, samples)
    batches_per_epoch = math.ceil(samples / batch)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total = steps_per_epoch * epochs
    warmup, warmup_reason = _warmup_for(total)

    # --- precision, memory savers
    precision, prec_reason = _precision(vram_known)
    checkpointing, ckpt_reason = _checkpointing(base, res, plan_vram, batch_size, batch, hi, tier)

    s.add("learning_rate", lr, "; ".join(lr_parts))
    s.add("text_encoder_lr", _r3(lr / 2), "half the UNet lr; the text encoder is easy to overcook "
                                          "(used only when train_text_encoder is on)")
    s.add("train_text_encoder", False, "UNet only is the safe first run; turn it on if the trigger word does "
                                       "not take")
    s.add("lora_rank", rank, rank_reason + (f"; {RANK_UPPER} is the upper bound for most, over {RANK_FLAG} is "
                                            f"flagged" if rank < RANK_UPPER else ""))
    s.add("lora_alpha", float(rank), "alpha = rank (scale 1.0), the scale the learning rates above assume")
    s.add("batch_size", batch, batch_reason)
    s.add("gradient_accumulation_steps", accum,
          (f"effective batch {batch} x {accum} = {batch * accum}; lr rescaled by {accumulation_scaling}"
           if accum > 1 else "1: no accumulation; raise it for a larger effective batch without more VRAM "
                             "(the lr is then rescaled)"))
    s.add("epochs", epochs, f"{epochs_reason}: {steps_per_epoch} steps/epoch, {total} steps in all")
    every = save_every_for(epochs)
    s.add("save_every_n_epochs", every,
          f"an epoch file every {every} epoch(s): {epochs // every} file(s) to compare in the A/B grid "
          f"(about {EPOCH_FILES_AIMED} at most), not one per epoch")
    s.add("lr_scheduler", "cosine", "cosine with warmup is the sane default: smooth decay, no cliff at the end")
    s.add("lr_warmup_steps", warmup, warmup_reason)
    s.add("mixed_precision", precision, prec_reason)
    s.add("resolution", res, f"native resolution of {base}")
    s.add("gradient_checkpointing", checkpointing, ckpt_reason)
    s.add("cache_latents", True, "each image is VAE-encoded once instead of every step (the encoder is frozen)")
    s.add("cache_text_embeddings", True, "the text encoder is frozen, so each caption is encoded once")
    if base in flow_advice.FLOW_BASES:  # Flux / SD3.5 / Qwen-Image: their own lr, rank, sampling, memory tiers
        flow_advice.apply(s, base, plan_vram, vram_text, image_count, task, detail, resolution is not None)
        batches_per_epoch = math.ceil(samples / s.value("batch_size"))
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        total = steps_per_epoch * epochs
        s.add("epochs", epochs, f"{epochs_reason}: {steps_per_epoch} steps/epoch, {total} steps in all")
        s.add("lr_warmup_steps", *_warmup_for(total))
    flow = base in flow_advice.FLOW_BASES  # their lr and rank are flow_advice's
    for key, value, reason in network_advice(network_type, task, s.value("learning_rate") if flow else lr,
                                             s.value("lora_rank") if flow else rank, flow):
        s.add(key, value, reason)
    s.total_steps, s.steps_per_epoch = total, steps_per_epoch
    kohya_advice.add_suggestions(s, image_count, task, base, model_name, captions, tokenizer)
    return s


# ----------------------------------------------------------------------------- config checks
def check_config(cfg, samples_per_epoch: Optional[int] = None) -> List[str]:
    """Warnings for risky settings of a TrainConfig (empty list: nothing risky found)."""
    out: List[str] = []
    if cfg.lora_rank > RANK_FLAG:
        out.append(f"lora_rank {cfg.lora_rank} is over {RANK_FLAG}: large files and easy overfitting for little "
                   f"gain; {RANK_UPPER} is the upper bound for most LoRAs.")
    if cfg.alpha > 2 * cfg.lora_rank:
        out.append(f"lora_alpha {cfg.alpha:g} is more than twice lora_rank {cfg.lora_rank}: the update is scaled "
                   f"x{cfg.alpha / cfg.lora_rank:g}, which acts like a higher learning rate.")
    base = str(cfg.base_model or "")
    if not base.startswith("tiny"):
        table_lr, _ = lr_for_batch(cfg.batch_size, "sqrt")
        acc = cfg.gradient_accumulation_steps
        sq, lin = table_lr * math.sqrt(acc), table_lr * acc
        lo, hi = min(sq, lin) / LR_FAR_FACTOR, max(sq, lin) * LR_FAR_FACTOR
        if not lo <= cfg.learning_rate <= hi:
            out.append(f"learning_rate {cfg.learning_rate:.3g} is far from the usual {sq:.3g} for batch "
                       f"{cfg.batch_size} x accumulation {acc} (more than x{LR_FAR_FACTOR:g} off): expect "
                       f"{'divergence or burnt images' if cfg.learning_rate > hi else 'almost no learning'}.")
    if cfg.train_text_encoder and cfg.te_lr > cfg.learning_rate:
        out.append(f"text_encoder_lr {cfg.te_lr:.3g} is above the UNet learning_rate {cfg.learning_rate:.3g}: "
                   f"the text encoder is the more fragile part; use about half the UNet lr.")
    total = cfg.max_train_steps
    if total is None:
        samples = samples_per_epoch
        if samples is None and cfg.train_data_dir:
            try:
                from ..data.dataset import load_dataset

                samples = len(load_dataset(cfg.train_data_dir, cfg.resolution, cfg.trigger_word,
                                           cfg.caption_extension))
            except Exception:
                samples = None
        if samples:
            if cfg.batch_size > samples:
                out.append(f"batch_size {cfg.batch_size} is larger than the {samples} samples per epoch: every "
                           f"step sees the whole set; lower batch_size.")
            total = math.ceil(math.ceil(samples / cfg.batch_size) / cfg.gradient_accumulation_steps) * cfg.epochs
    out += kohya_advice.check(cfg, total)
    if total is not None and cfg.lr_scheduler != "constant" and cfg.lr_warmup_steps >= total:
        out.append(f"lr_warmup_steps {cfg.lr_warmup_steps} >= the {total} total steps: the learning rate never "
                   f"reaches {cfg.learning_rate:.3g}; use about 10% of the steps.")
    out += check_network(cfg)
    return out
