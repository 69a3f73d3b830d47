"""kohya's per-step caption processing: shuffle_caption, keep_tokens, keep_tokens_separator, caption_tag_dropout_rate.

As sd-scripts' `BaseDataset.process_caption`: the caption is split at commas into tags; the first `keep_tokens` tags
(or, when the caption holds `keep_tokens_separator`, the tags before it, and those after a second separator) stay
where they are; the other tags are shuffled (shuffle_caption) and each is dropped with probability
caption_tag_dropout_rate; the caption is joined again with ", ". Draws come from Python's `random` module, which
the Trainer seeds and keeps in its resumable state.

When any of these is on, captions differ from step to step, so their text embeddings are not cached.
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence

SEPARATOR = ","


def varies(cfg) -> bool:
    """True when captions change from step to step (the text cache is then not used)."""
    return bool(cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0)


def _tags(text: str) -> List[str]:
    return [t.strip() for t in text.split(SEPARATOR) if t.strip()]


def process_caption(caption: str, shuffle: bool = False, keep_tokens: int = 0, keep_tokens_separator: str = "",
                    tag_dropout_rate: float = 0.0, rng: Optional[random.Random] = None) -> str:
    """One caption as kohya processes it for one step (module docstring)."""
    if not (shuffle or tag_dropout_rate > 0):
        return caption
    rng = rng or random  # type: ignore[assignment]
    suffix: List[str] = []
    if keep_tokens_separator and keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(keep_tokens_separator, 1)
        if keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(keep_tokens_separator, 1)
            suffix = _tags(suffix_part)
        fixed, flex = _tags(fixed_part), _tags(flex_part)
    else:
        tags = [t.strip() for t in caption.strip().split(SEPARATOR)]
        fixed, flex = (tags[:keep_tokens], tags[keep_tokens:]) if keep_tokens > 0 else ([], tags)
    if shuffle:
        rng.shuffle(flex)
    if tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def augment(captions: Sequence[str], cfg, rng: Optional[random.Random] = None) -> List[str]:
    """The captions of a batch for this step, with the config's kohya caption options."""
    if not varies(cfg):
        return list(captions)
    return [process_caption(c, cfg.shuffle_caption, cfg.keep_tokens, cfg.keep_tokens_separator,
                            cfg.caption_tag_dropout_rate, rng) if c else c for c in captions]
