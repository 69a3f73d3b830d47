"""Tuning knowledge built in: settings advisor, lr rescaling, config checks and live loss diagnosis.

Every rule here is written up, with its reason and source figures, in docs/tuning.md. The numbers live in
the module-level tables below so that the docs, the tests and the code name the same values.

Public API
    suggest(image_count, task, base, vram_gb, batch_size, gradient_accumulation_steps, accumulation_scaling,
            ...) -> Suggestion
    rescale_lr(lr, old_batch, old_accum, new_batch, new_accum, scaling) -> (new_lr, reason)
    lr_for_batch(batch, scaling) -> (lr, reason)
    check_config(cfg, samples_per_epoch=None) -> [warning, ...]
    Diagnoser(...).update(step, loss, val_loss=None) -> [Finding, ...];  .summary() -> [Finding, ...]
    diagnose(losses, val=None, ...) -> [Finding, ...]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple
from ..config import LR_BY_BATCH, TrainConfig, learning_rate_for
from ..family import FAMILIES
from . import flow_advice
from .network_advice import check_network, network_advice
from . import kohya_advice

# ----------------------------------------------------------------------------- the rules, as data
TASKS = ("style", "character", "face", "object", "concept", "other")
BASES = FAMILIES  # flux / sd3: tuning/flow_advice.py
SCALINGS = ("sqrt", "linear")
DETAILS = ("simple", "normal", "demanding")

#: LR_BY_BATCH (config.py): learning rate of the UNet LoRA by batch, alpha = rank, AdamW (practitioner table).
#: under SMALL_SET images the start is 1e-4..1.5e-4 (and more epochs).
SMALL_SET = 50
LARGE_SET = 200
LR_SMALL_SET = (1e-4, 1.5e-4)
#: demanding detail (faces, logos) at rank 16 may take 2.5e-4 (at batch 4, i.e. x1.25 of the table).
LR_DEMANDING_RANK16 = 2.5e-4
DEMANDING_FACTOR = LR_DEMANDING_RANK16 / LR_BY_BATCH[4]

#: rank per task for (simple, normal, demanding) detail.
RANK_BY_TASK: Dict[str, Tuple[int, int, int]] = {
    "style": (4, 8, 12),       # 4-6 simple style, 8-12 a specific style
    "character": (8, 12, 16),  # 8-12 faces / characters; 16 for demanding detail
    "face": (8, 12, 16),
    "object": (6, 8, 16),      # 16 for logos / fine printed detail
    "concept": (4, 8, 12),
    "other": (4, 8, 16),
}
RANK_UPPER = 16   # upper bound for most LoRAs
RANK_FLAG = 32    # above this: flagged
RANK_SHORT_VRAM = 8  # when VRAM is short, rank is lowered to this before the batch is touched

#: VRAM (GB) -> (smallest, largest) batch that fits, SD1 at 512 px. SDXL (and SD1/SD2 at >= 768 px) halve it.
#: The published tiers are <=8: 1-2, 12-16: 4-8, >20: 8-16; the gaps (8-12, 16-20) take the neighbouring
#: values: (lower bound exclusive, upper bound inclusive unless noted) -> range.
VRAM_TIERS: List[Tuple[str, Tuple[int, int]]] = [
    ("<=8 GB", (1, 2)),     # v <= 8
    ("8-12 GB", (2, 4)),    # 8 < v < 12
    ("12-16 GB", (4, 8)),   # 12 <= v <= 16
    ("16-20 GB", (4, 8)),   # 16 < v <= 20
    (">20 GB", (8, 16)),    # v > 20
]


def vram_tier(vram_gb: float) -> Tuple[str, Tuple[int, int]]:
    """The tier (name, SD1-at-512 batch range) of a card with `vram_gb` GB."""
    v = float(vram_gb)
    i = 0 if v <= 8 else 1 if v < 12 else 2 if v <= 16 else 3 if v <= 20 else 4
    return VRAM_TIERS[i]


VRAM_ASSUMED_UNKNOWN = 8.0  # VRAM unknown (no CUDA here, nothing passed): plan for the smallest tier

NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024, "flux": 1024, "sd3": 1024}
#: total images seen (epochs x images x repeats) aimed at, and the epoch bounds, by dataset size.
TARGET_VIEWS_SMALL = 2000
TARGET_VIEWS = 1500
EPOCHS_SMALL = (10, 100)
EPOCHS_MEDIUM = (10, 30)
EPOCHS_LARGE = (5, 10)
#: warmup: 100 steps for runs of 1000-1999 steps, 200 from 2000 on; shorter runs warm up for 10%.
WARMUP = (100, 200)
WARMUP_FULL_FROM = 1000
WARMUP_LONG_FROM = 2000
WARMUP_SHORT_FRACTION = 0.1
#: check_config: an lr more than this factor away from the table (after accumulation rescaling) is flagged.
LR_FAR_FACTOR = 3.0


def _r3(x: float) -> float:
    """Round to 3 significant digits (lrs are shown and written like that)."""
    return float(f"{x:.3g}")


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


# ----------------------------------------------------------------------------- lr rules
def lr_for_batch(batch: int, scaling: str = "sqrt") -> Tuple[float, str]:
    """UNet lr for a per-step batch from the table; other batches scale from the largest table batch below."""
    _check_choice("accumulation_scaling", scaling, SCALINGS)
    if batch < 1:
        raise ValueError(f"batch size {batch} is not valid: use 1 or more.")
    if batch in LR_BY_BATCH:
        return LR_BY_BATCH[batch], f"batch {batch} -> {LR_BY_BATCH[batch]:.3g} (table 4: 2e-4, 2: 1.5e-4, 1: 1e-4)"
    anchor = max(b for b in LR_BY_BATCH if b <= batch)
    lr = learning_rate_for(batch, scaling)
    return lr, (f"batch {batch} is not in the table: {LR_BY_BATCH[anchor]:.3g} at batch {anchor} x {scaling}"
                f"({batch}/{anchor}) = {lr:.3g}")


def batch_change_offer(lr: float, old: Tuple[int, int], new: Tuple[int, int], scalings: Sequence[str] = ("sqrt",)
                       ) -> List[Tuple[str, float, str]]:
    """What every front door offers when batch x accumulation moved from `old` to `new` while the lr stayed:
    [(scaling, rescaled lr, why)] per scaling; empty when the effective batch or the lr does not change."""
    if tuple(old) == tuple(new):
        return []
    out = []
    for scaling in scalings:
        new_lr, why = rescale_lr(lr, old[0], old[1], new[0], new[1], scaling)
        if new_lr != lr:
            out.append((scaling, new_lr, why))
    return out


def rescale_lr(lr: float, old_batch: int, old_accum: int, new_batch: int, new_accum: int,
               scaling: str = "sqrt") -> Tuple[float, str]:
    """The lr to use when the batch size or gradient accumulation changes (what front ends offer).

    Effective batch = batch x accumulation steps; the lr follows its ratio by sqrt (default) or linearly.
    """
    _check_choice("scaling", scaling, SCALINGS)
    for name, v in (("old_batch", old_batch), ("old_accum", old_accum), ("new_batch", new_batch),
                    ("new_accum", new_accum)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} = {v!r} is not valid: use an integer >= 1.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr = {lr!r} is not valid: use a positive number.")
    old_eff, new_eff = old_batch * old_accum, new_batch * new_accum
    ratio = new_eff / old_eff
    factor = math.sqrt(ratio) if scaling == "sqrt" else ratio
    new_lr = _r3(lr * factor)
    if old_eff == new_eff:
        return float(lr), (f"effective batch stays {new_eff} ({new_batch} x {new_accum}): lr unchanged at "
                           f"{lr:.3g}")
    how = f"sqrt({new_eff}/{old_eff}) = {factor:.3g}" if scaling == "sqrt" else f"{new_eff}/{old_eff} = {factor:.3g}"
    return new_lr, (f"effective batch {old_batch} x {old_accum} = {old_eff} -> {new_batch} x {new_accum} = "
                    f"{new_eff}: lr {lr:.3g} x {how} ({scaling} scaling) = {new_lr:.3g}")


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


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r} is not valid: allowed {', '.join(allowed)}.")


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
    halve = base in ("sdxl", "flux", "sd3") or res >= 768
    if halve:
        lo, hi = max(1, lo // 2), max(1, hi // 2)
        why = "SDXL" if base == "sdxl" else f"{res} px"
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
    halved = base == "sdxl" or res >= 768
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
    if base in flow_advice.FLOW_BASES:  # Flux / SD3.5: their own lr, rank, sampling and memory tiers
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


# ----------------------------------------------------------------------------- live diagnosis
SEVERITIES = ("info", "warning", "error")


@dataclass
class Finding:
    """One diagnosis. `suggestion` names exactly one knob (`knob`, a TrainConfig key) to change."""

    kind: str       # non_finite | divergence | oscillation | plateau | overfitting
    severity: str   # info | warning | error
    message: str
    numbers: Dict[str, float]
    suggestion: str
    knob: str
    step: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message, "numbers": dict(self.numbers),
                "suggestion": self.suggestion, "knob": self.knob, "step": self.step}

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind} at step {self.step}: {self.message} -> {self.suggestion}"


def format_findings(findings: Sequence[Finding]) -> str:
    if not findings:
        return "diagnosis: nothing unusual in the loss curve."
    return "diagnosis:\n" + "\n".join(f"- {f}" for f in findings)


def _linfit(y: Sequence[float]) -> Tuple[float, float, List[float]]:
    """slope, t statistic of the slope, residuals of a least-squares line through y over 0..n-1."""
    n = len(y)
    xm = (n - 1) / 2.0
    ym = sum(y) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    slope = sum((i - xm) * (v - ym) for i, v in enumerate(y)) / sxx
    resid = [v - (ym + slope * (i - xm)) for i, v in enumerate(y)]
    dof = max(1, n - 2)
    se = math.sqrt(sum(r * r for r in resid) / dof / sxx)
    if se == 0:
        t = 0.0 if slope == 0 else math.copysign(float("inf"), slope)
    else:
        t = slope / se
    return slope, t, resid


def _var(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    m = sum(xs) / n
    return sum((x - m) ** 2 for x in xs) / (n - 1)


class Diagnoser:
    """Watches the loss (and validation loss) and reports what went wrong, with one knob to turn.

    Feed it every optimizer step: `update(step, loss, val_loss=None)` returns the findings new at this step;
    `summary()` returns every finding emitted so far. A kind is emitted once, then stays quiet until its
    condition has been false at `rearm` (10) consecutive block checks; a non-finite loss re-arms at the next
    finite one, overfitting at a new validation minimum, and an early plateau never.

    Diffusion loss jumps from step to step because the timestep is random, so the trend patterns are judged
    on block means (`block` = 10 steps each) over the last `window` = 20 blocks, checked at every block end, and a
    pattern must hold at CONFIRM consecutive checks (divergence 3, oscillation 2, plateau 3) before it is
    reported. Thresholds (see docs/tuning.md for how they were set):
      divergence:  over >= 10 blocks, fitted rise >= `divergence_rise` (30%) of the mean with slope t >=
                   `divergence_t` (4.5); or, at once, the last block mean >= `spike_factor` (3x) the median of the
                   blocks before it;
      oscillation: no trend (|t| < 2 or fitted change < `trend_flat` 10%), block means spread around the trend
                   line by >= `oscillation_cv` (20%) of their mean, and that spread >= `oscillation_excess` (4x)
                   what the noise inside blocks explains (so plain diffusion noise is not reported);
      plateau:     within the first `plateau_fraction` (30%) of the run (first 300 steps if the total is
                   unknown), after >= `plateau_min_steps` (80) steps, no significant trend (|t| < 2), less than
                   `plateau_gain` (5%) fitted fall since the start, and neither oscillation nor divergence;
      overfitting: >= 3 validation points, the latest >= (1 + `overfit_rise`) x the minimum (5%), the minimum at
                   least 2 points back, and the training loss lower after the minimum than before it.
    """

    CONFIRM = {"divergence": 3, "oscillation": 2, "plateau": 3}
    NO_REARM = ("plateau",)  # "early" happens once

    def __init__(self, cfg=None, total_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None,
                 learning_rate: Optional[float] = None, batch_size: Optional[int] = None,
                 lr_warmup_steps: Optional[int] = None, epochs: Optional[int] = None, block: int = 10,
                 window: int = 20, min_blocks: int = 5, rearm: int = 10, divergence_rise: float = 0.3,
                 divergence_t: float = 4.5, spike_factor: float = 3.0, trend_flat: float = 0.1,
                 oscillation_cv: float = 0.2, oscillation_excess: float = 4.0, plateau_fraction: float = 0.3,
                 plateau_unknown_steps: int = 300, plateau_min_steps: int = 80, plateau_gain: float = 0.05,
                 overfit_points: int = 3, overfit_rise: float = 0.05,
                 confirm: Optional[Dict[str, int]] = None):
        self.cfg = cfg  # the kohya options the overfitting advice names (kohya_advice.overfitting_hint)
        self.learning_rate = learning_rate if learning_rate is not None else getattr(cfg, "learning_rate", None)
        self.batch_size = batch_size if batch_size is not None else getattr(cfg, "batch_size", None)
        self.lr_warmup_steps = (lr_warmup_steps if lr_warmup_steps is not None
                                else getattr(cfg, "lr_warmup_steps", None))
        self.epochs = epochs if epochs is not None else getattr(cfg, "epochs", None)
        if total_steps is None and cfg is not None and getattr(cfg, "max_train_steps", None):
            total_steps = cfg.max_train_steps
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.block, self.window, self.min_blocks, self.rearm = int(block), int(window), int(min_blocks), int(rearm)
        self.divergence_rise, self.divergence_t = divergence_rise, divergence_t
        self.spike_factor, self.trend_flat = spike_factor, trend_flat
        self.oscillation_cv, self.oscillation_excess = oscillation_cv, oscillation_excess
        self.plateau_fraction, self.plateau_unknown_steps = plateau_fraction, plateau_unknown_steps
        self.plateau_min_steps, self.plateau_gain = plateau_min_steps, plateau_gain
        self.overfit_points, self.overfit_rise = overfit_points, overfit_rise
        self.confirm = dict(self.CONFIRM, **(confirm or {}))
        self.steps: List[int] = []
        self.losses: List[float] = []
        self.val: List[Tuple[int, float]] = []
        self.findings: List[Finding] = []
        self._active: Dict[str, bool] = {}
        self._streak: Dict[str, int] = {}
        self._quiet: Dict[str, int] = {}
        self._last_finite: Optional[Tuple[int, float]] = None
        self._overfit_min_step: Optional[int] = None

    # -------------------------------------------------------------- plumbing
    def handle_event(self, ev: Dict[str, Any]) -> List[Finding]:
        """Convenience for the trainer's event stream: reads `start` (total_steps, steps_per_epoch), `step`
        (step, loss), `val_loss` / `validation` (step, val_loss) and `nan` (step, value) events."""
        kind = ev.get("kind")
        if kind == "start":
            self.total_steps = ev.get("total_steps", self.total_steps)
            self.steps_per_epoch = ev.get("steps_per_epoch", self.steps_per_epoch)
            return []
        last = self.steps[-1] if self.steps else 0
        if kind == "step" and ev.get("loss") is not None:
            return self.update(int(ev["step"]), ev.get("loss"), ev.get("val_loss"))
        if kind in ("val_loss", "validation") and ev.get("val_loss") is not None:
            return self.update(int(ev.get("step", last)), None, ev["val_loss"])
        if kind == "nan" and ev.get("value") is not None:
            value = float(ev["value"])
            if not math.isfinite(value):
                if ev.get("what") in ("val_loss", "validation"):
                    return self.update(int(ev.get("step", last)), None, value)
                return self.update(int(ev.get("step", last)), value)
        return []

    def summary(self) -> List[Finding]:
        """Every finding emitted so far, in order (each kind once per occurrence)."""
        return list(self.findings)

    def _judge(self, out: List[Finding], kind: str, holds: bool, make) -> None:
        """Emit `make()` when `holds` has been true at `confirm` consecutive checks and the kind is armed."""
        if holds:
            self._quiet[kind] = 0
            self._streak[kind] = self._streak.get(kind, 0) + 1
            if not self._active.get(kind) and self._streak[kind] >= self.confirm.get(kind, 1):
                self._fire(out, make())
        else:
            self._streak[kind] = 0
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            if self._active.get(kind) and self._quiet[kind] >= self.rearm and kind not in self.NO_REARM:
                self._active[kind] = False

    def _fire(self, out: List[Finding], f: Finding) -> None:
        self._active[f.kind] = True
        self.findings.append(f)
        out.append(f)

    # -------------------------------------------------------------- update
    def update(self, step: int, loss: Optional[float], val_loss: Optional[float] = None) -> List[Finding]:
        """Record one optimizer step (loss may be None when only a validation loss arrives)."""
        out: List[Finding] = []
        if loss is not None:
            loss = float(loss)
            if not math.isfinite(loss):
                self._non_finite(out, step, loss, "training")
            else:
                self._active["non_finite"] = False
                self._last_finite = (step, loss)
                self.steps.append(int(step))
                self.losses.append(loss)
                if len(self.losses) % self.block == 0:
                    self._check_trends(out, step)
        if val_loss is not None:
            val_loss = float(val_loss)
            if not math.isfinite(val_loss):
                self._non_finite(out, step, val_loss, "validation")
            else:
                self.val.append((int(step), val_loss))
                self._check_overfitting(out, step)
        return out

    def _non_finite(self, out: List[Finding], step: int, value: float, which: str) -> None:
        if self._active.get("non_finite"):
            return
        nums: Dict[str, float] = {"step": step, "loss": value}
        good = ""
        if self._last_finite is not None:
            nums["last_finite_step"], nums["last_finite_loss"] = self._last_finite
            good = f" (last finite loss {self._last_finite[1]:.4g} at step {self._last_finite[0]})"
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < WARMUP[0] and step <= 2 * WARMUP[0]:
            knob = "lr_warmup_steps"
            sugg = (f"set lr_warmup_steps to {WARMUP[0]} (now {self.lr_warmup_steps}): the loss broke in the first "
                    f"steps at full learning rate; resume from the last good checkpoint")
        else:
            lr = self.learning_rate
            knob = "learning_rate"
            sugg = ("halve learning_rate" + (f" ({lr:.3g} -> {lr / 2:.3g})" if lr else "")
                    + " and resume from the last good checkpoint")
        self._fire(out, Finding("non_finite", "error", f"{which} loss is {value} at step {step}{good}: the "
                                                       f"weights are being destroyed", nums, sugg, knob, step))

    def _blocks(self, last_n: Optional[int] = None) -> Tuple[List[float], List[float]]:
        """Means and variances of complete blocks (the last `last_n` blocks)."""
        nb = len(self.losses) // self.block
        first = 0 if last_n is None else max(0, nb - last_n)
        means, variances = [], []
        for b in range(first, nb):
            chunk = self.losses[b * self.block:(b + 1) * self.block]
            means.append(sum(chunk) / len(chunk))
            variances.append(_var(chunk))
        return means, variances

    def _check_trends(self, out: List[Finding], step: int) -> None:
        means, variances = self._blocks(self.window)
        n = len(means)
        if n < self.min_blocks:
            return
        mean = sum(means) / n
        if mean <= 0:
            return
        slope, t, resid = _linfit(means)
        rel = slope * (n - 1) / mean

        # divergence: a sustained significant rise over a full window, or a sudden jump
        prev = sorted(means[:-1])
        k = len(prev)
        median_prev = prev[k // 2] if k % 2 else 0.5 * (prev[k // 2 - 1] + prev[k // 2])
        spike = median_prev > 0 and means[-1] >= self.spike_factor * median_prev
        rising = n >= max(self.min_blocks, self.window // 2) and rel >= self.divergence_rise and t >= self.divergence_t
        if spike and not rising and not self._active.get("divergence"):
            self._streak["divergence"] = self.confirm["divergence"]  # a jump needs no confirmation

        def divergence() -> Finding:
            all_means, _ = self._blocks()
            best = min(all_means)
            lr = self.learning_rate
            sugg = ("halve learning_rate" + (f" ({lr:.3g} -> {lr / 2:.3g})" if lr else "")
                    + " and restart from the checkpoint before the rise")
            msg = (f"the loss is rising: block mean {means[-1]:.4g} vs best {best:.4g}; fitted change over the last "
                   f"{n * self.block} steps {rel:+.0%}" + (" (sudden jump)" if spike and not rising else ""))
            return Finding("divergence", "error" if means[-1] >= 2 * best else "warning", msg,
                           {"step": step, "rel_change": rel, "t": t, "last_block_mean": means[-1],
                            "best_block_mean": best, "window_steps": n * self.block}, sugg, "learning_rate", step)

        self._judge(out, "divergence", rising or spike, divergence)

        # oscillation: big spread of block means around the trend line, more than in-block noise explains
        no_trend = abs(t) < 2.0 or abs(rel) < self.trend_flat
        spread = math.sqrt(sum(r * r for r in resid) / max(1, n - 2))
        cv = spread / mean
        within = sum(variances) / len(variances)
        excess = (self.block * spread ** 2 / within) if within > 0 else (float("inf") if spread > 0 else 0.0)
        oscillating = no_trend and cv >= self.oscillation_cv and excess >= self.oscillation_excess

        def oscillation() -> Finding:
            lr, bs = self.learning_rate, self.batch_size
            if lr is not None and lr <= LR_BY_BATCH[1] and bs is not None:
                knob = "batch_size"
                sugg = (f"raise batch_size from {bs} to {bs * 2}: the learning rate ({lr:.3g}) is already at the low "
                        f"end of the table, a larger batch averages the swings out")
            else:
                knob = "learning_rate"
                sugg = ("lower learning_rate by half" + (f" ({lr:.3g} -> {lr / 2:.3g})" if lr else "")
                        + ": the steps overshoot")
            msg = (f"the loss swings without settling: block means spread {cv:.0%} of their mean around the trend, "
                   f"{excess:.1f}x what step noise explains, over the last {n * self.block} steps")
            return Finding("oscillation", "warning", msg,
                           {"step": step, "relative_spread": cv, "excess_over_noise": excess, "t": t,
                            "rel_change": rel, "window_steps": n * self.block}, sugg, knob, step)

        self._judge(out, "oscillation", oscillating and not (rising or spike), oscillation)
        self._check_plateau(out, step, blocked=oscillating or rising or spike)

    def _check_plateau(self, out: List[Finding], step: int, blocked: bool) -> None:
        limit = (self.plateau_fraction * self.total_steps) if self.total_steps else self.plateau_unknown_steps
        if step > limit or len(self.losses) < self.plateau_min_steps:
            return
        means, _ = self._blocks()
        n = len(means)
        if n < self.min_blocks or means[0] <= 0:
            return
        slope, t, _ = _linfit(means)
        fall = -slope * (n - 1) / means[0]
        flat = -2.0 < t < 2.0 and fall < self.plateau_gain and not blocked  # swinging or rising: lr is not low

        def plateau() -> Finding:
            lr = self.learning_rate
            if lr is None or lr < LR_DEMANDING_RANK16:
                knob = "learning_rate"
                sugg = ("raise learning_rate by 0.5e-4" + (f" ({lr:.3g} -> {lr + 0.5e-4:.3g})" if lr else "")
                        + "; check the samples first: diffusion loss often looks flat while the LoRA learns")
            else:
                knob = "epochs"
                more = f" ({self.epochs} -> {int(math.ceil(self.epochs * 1.5))})" if self.epochs else ""
                sugg = f"train more epochs{more}: the learning rate ({lr:.3g}) is already at the top of the usual range"
            msg = (f"the loss has not fallen in the first {len(self.losses)} steps: fitted fall {fall:.1%} "
                   f"(t = {t:.2f})")
            return Finding("plateau", "info", msg, {"step": step, "fall": fall, "t": t, "first_block_mean": means[0],
                                                    "last_block_mean": means[-1]}, sugg, knob, step)

        self._judge(out, "plateau", flat, plateau)

    def _check_overfitting(self, out: List[Finding], step: int) -> None:
        if len(self.val) < self.overfit_points:
            return
        vals = [v for _, v in self.val]
        i_min = min(range(len(vals)), key=lambda i: vals[i])
        s_min, v_min = self.val[i_min]
        if self._overfit_min_step is not None and s_min != self._overfit_min_step:
            self._active["overfitting"] = False  # a new minimum: re-armed
        if self._active.get("overfitting"):
            return
        latest = vals[-1]
        if not (len(vals) - 1 - i_min >= 2 and latest >= v_min * (1 + self.overfit_rise)):
            return
        before = [l for s, l in zip(self.steps, self.losses) if s <= s_min]
        after = [l for s, l in zip(self.steps, self.losses) if s > s_min]
        if not (before and after):
            return
        span = min(len(after), len(before))
        tb = sum(before[-span:]) / span
        ta = sum(after) / len(after)
        if not ta < tb:
            return
        self._overfit_min_step = s_min
        spe = self.steps_per_epoch
        if spe:
            best_epoch = max(1, int(math.ceil(s_min / spe)))
            knob = "epochs"
            now = f" (now {self.epochs})" if self.epochs else ""
            sugg = (f"set epochs to {best_epoch}{now}: validation was lowest at step {s_min}, epoch {best_epoch}; "
                    f"the epoch file of that epoch is the one to keep")
        else:
            knob = "max_train_steps"
            sugg = f"set max_train_steps to {s_min}: validation was lowest there"
        msg = (f"validation loss rose from {v_min:.4g} (step {s_min}) to {latest:.4g} while the training loss fell "
               f"({tb:.4g} -> {ta:.4g}): the LoRA is memorising the training images"
               f"{kohya_advice.overfitting_hint(self.cfg)}")
        self._fire(out, Finding("overfitting", "warning", msg,
                                {"step": step, "val_min": v_min, "val_min_step": s_min, "val_latest": latest,
                                 "train_before": tb, "train_after": ta}, sugg, knob, step))


def diagnose(losses: Sequence[float], val: Optional[Sequence[Tuple[int, float]]] = None, **kw: Any) -> List[Finding]:
    """Run a Diagnoser over a finished history: losses[i] is step i+1; val holds (step, val_loss) pairs."""
    d = Diagnoser(**kw)
    pending = sorted(val or [])
    j = 0
    for i, loss in enumerate(losses):
        step = i + 1
        d.update(step, loss)
        while j < len(pending) and pending[j][0] <= step:
            d.update(pending[j][0], None, pending[j][1])
            j += 1
    for s, v in pending[j:]:
        d.update(s, None, v)
    return d.summary()
