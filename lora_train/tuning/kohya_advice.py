"""What the advisor and the diagnosis say about the kohya options (issue 18), each with its reason.

- `add_suggestions(s, image_count, task, base, model_name, captions)`: clip_skip 2 for SD1.x anime models (their
  name says so: NovelAI-derived checkpoints are trained and used at CLIP skip 2), regularization images for a
  character / face with few images, shuffle_caption + keep_tokens 1 for tag captions, max_token_length 225 for
  captions longer than 75 tokens.
- `check(cfg)`: warnings for risky kohya settings (clip_skip on SDXL, shuffling away the trigger word, an EMA too
  slow for the run, reg images that weigh nothing, ...).
- `overfitting_hint(cfg)`: the diagnosis' extra advice when the validation loss rises.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

from .. import families

#: checkpoint-name hints of SD1.x models trained / used at CLIP skip 2 (NovelAI-derived anime models)
ANIME_HINTS = ("anime", "anything", "animefull", "novelai", "nai", "counterfeit", "orangemix", "abyssorange",
               "pastel", "meina", "anylora", "waifu", "cetus", "hassaku", "aom", "kohaku", "mistoon", "dark_sushi",
               "darksushi", "rev_animated", "revanimated", "clip2", "clipskip2", "clip_skip_2")
FEW_CHARACTER_IMAGES = 20
REG_TASKS = ("character", "face", "object")


def wants_clip_skip_2(model_name: str) -> bool:
    words = re.split(r"[^a-z0-9_]+", (model_name or "").lower())
    name = (model_name or "").lower()
    return any(h in words or (len(h) > 3 and h in name) for h in ANIME_HINTS)


def _looks_like_tags(captions: Sequence[str]) -> bool:
    caps = [c for c in captions if c]
    if not caps:
        return False
    tagged = sum(1 for c in caps if c.count(",") >= 3 and max(len(t.split()) for t in c.split(",")) <= 4)
    return tagged >= 0.6 * len(caps)


def add_suggestions(s, image_count: int, task: str, base: str, model_name: str = "",
                    captions: Optional[Sequence[str]] = None, tokenizer=None) -> None:
    """Add the kohya options that matter for this run to a `Suggestion` (settings with reasons, or notes)."""
    if families.get(base).anime_clip_skip and wants_clip_skip_2(model_name):
        s.add("clip_skip", 2, f"'{model_name}' looks like an anime SD1.5 model (NovelAI lineage): those are trained "
                              f"and used at CLIP skip 2, so the LoRA should learn with the same text features")
    if task in REG_TASKS and image_count < FEW_CHARACTER_IMAGES:
        s.notes.append(f"only {image_count} image(s) of a {task}: regularization images (reg_data_dir, kohya N_class "
                       f"folders of the class, e.g. '1_woman', ~{max(2 * image_count, 20)} images made with the base "
                       f"model) with prior_loss_weight 1.0 keep the class from collapsing onto your {task}; kohya "
                       f"repeats them to the number of training samples.")
    caps = list(captions or [])
    if _looks_like_tags(caps):
        s.add("shuffle_caption", True, "the captions are comma-separated tags: shuffling them each step stops the "
                                       "LoRA from binding to the tag order")
        s.add("keep_tokens", 1, "keeps the first tag (the trigger word) in front while the rest is shuffled")
    if caps and tokenizer is not None:
        longest = max(len(tokenizer(c, add_special_tokens=False).input_ids) for c in caps)
        if longest > 75:
            mtl = 150 if longest <= 150 else 225
            s.add("max_token_length", mtl, f"the longest caption has {longest} tokens: with 75 the rest would be "
                                           f"cut; {mtl} encodes it in 75-token chunks as the WebUIs do")


def check(cfg, total_steps: Optional[int] = None) -> List[str]:
    out: List[str] = []
    if cfg.shuffle_caption and cfg.keep_tokens == 0 and not cfg.keep_tokens_separator and cfg.trigger_word:
        out.append(f"shuffle_caption with keep_tokens 0 moves the trigger word '{cfg.trigger_word}' around: set "
                   f"keep_tokens 1 to keep it first.")
    if cfg.reg_data_dir and cfg.prior_loss_weight == 0:
        out.append("reg_data_dir is set but prior_loss_weight is 0: the reg images cost time and teach nothing; "
                   "use 1.0 (kohya's default).")
    if cfg.ema_decay and total_steps:
        horizon = 1.0 / (1.0 - cfg.ema_decay)
        if horizon > total_steps / 2:
            out.append(f"ema_decay {cfg.ema_decay:g} averages over ~{horizon:.0f} steps, more than half of the "
                       f"{total_steps} steps: the saved EMA copy lags far behind; use "
                       f"{max(0.5, 1 - 4.0 / total_steps):.3g} or less.")
    if cfg.loss_type in ("huber", "smooth_l1") and cfg.min_snr_gamma:
        out.append("min_snr_gamma together with a Huber loss weights the same noisy timesteps down twice; kohya "
                   "allows it, but start with one of them.")
    if cfg.masked_loss and cfg.flip_aug and cfg.mask_dir:
        pass  # masks are mirrored with their images
    return out


def overfitting_hint(cfg) -> str:
    """Extra advice for the overfitting finding: reg images / caption shuffling when they are off."""
    if cfg is None:
        return ""
    hints = []
    if not getattr(cfg, "reg_data_dir", ""):
        hints.append("regularization images (reg_data_dir, prior_loss_weight 1.0)")
    if not getattr(cfg, "shuffle_caption", False):
        hints.append("shuffle_caption with keep_tokens 1 for tag captions")
    return ("; also consider " + " or ".join(hints)) if hints else ""
