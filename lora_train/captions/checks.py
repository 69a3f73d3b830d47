"""Caption checks before training (every front door shows them): each finding names the files and the fix.

- empty captions (the image trains on the trigger alone, or on nothing);
- duplicate captions (the same text on different images) and near-duplicates (word sets 90 % alike, at least 4
  words): the model cannot tell those images apart by their text;
- captions longer than the family's text encoder reads (`families` caption_tokens, counted with its tokenizer
  where it is bundled: CLIP, T5; estimated from the words for Qwen / Mistral): the end is cut, silently;
- a trigger word that some captions lack;
- what should be learned, named in the captions: words that stand in nearly every caption (>= 80 % of at least
  5) besides the trigger, or the `concept` words the user says the LoRA is for. kohya's and the rivals' advice:
  leave the learned concept out of the captions, so the trigger carries it.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'_-]*")
#: words too common to mean anything about the concept
STOPWORDS = frozenset("""a an the of and or in on at to with from by for is are was were be been it its this that
these those there here as into over under near its their his her him she he they them we you i my your our
photo image picture showing shows shown view close up background foreground""".split())


@dataclass
class CaptionFinding:
    check: str            # empty | duplicate | near_duplicate | too_long | trigger_missing | concept_named
    files: List[str]
    problem: str
    fix: str
    severity: str = "warning"

    def __str__(self) -> str:
        names = ", ".join(os.path.basename(f) for f in self.files[:6]) + (" ..." if len(self.files) > 6 else "")
        return f"captions: {self.problem} ({names}). {self.fix}"


def words(text: str) -> List[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def token_counter(kind: Optional[str], tokenizer=None) -> Tuple[Callable[[str], int], bool]:
    """(count(text) -> tokens, exact?) for a family: its tokenizer when given, else the bundled CLIP / T5 one,
    else an estimate (1.3 tokens a word, what BPE tokenizers give English prose)."""
    from .. import families

    if tokenizer is not None:
        return (lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])), True
    which = families.get(kind).caption_tokenizer if kind else "other"
    try:
        if which in ("clip", "t5"):
            from ..models import flow

            tok = flow.clip_tokenizer() if which == "clip" else flow.t5_tokenizer()
            return (lambda t: len(tok(t, add_special_tokens=False)["input_ids"])), True
    except (OSError, ValueError, ImportError):
        pass
    return (lambda t: int(round(1.3 * len(words(t))))), False


def check_captions(entries: Sequence[Tuple[str, str]], trigger: str = "", kind: Optional[str] = None,
                   concept: str = "", limit: Optional[int] = None, tokenizer=None,
                   near: float = 0.9) -> List[CaptionFinding]:
    """The findings for (image path, caption) pairs (module docstring). `limit`: the tokens the text encoder
    reads (default: the family's caption_tokens; None and no family: not checked)."""
    out: List[CaptionFinding] = []
    entries = [(p, (c or "").strip()) for p, c in entries]
    trig = (trigger or "").strip().lower()

    empty = [p for p, c in entries if not c or (trig and c.lower() == trig)]
    if empty:
        out.append(CaptionFinding("empty", empty, f"{len(empty)} image(s) have an empty caption (or the trigger "
                                  f"alone)", "Caption them (the caption step, or write the .txt files): describe "
                                  "what is in each image besides the concept."))
    by_text: Dict[str, List[str]] = {}
    for p, c in entries:
        if c:
            by_text.setdefault(c.lower(), []).append(p)
    for text, paths in by_text.items():
        if len(paths) > 1:
            out.append(CaptionFinding("duplicate", paths, f"{len(paths)} images have the same caption "
                                      f"\"{text[:60]}\"", "Describe what differs between them (pose, setting, "
                                      "lighting, framing), or the LoRA learns them as one picture."))
    uniq = [(paths[0], set(words(t)) - STOPWORDS) for t, paths in by_text.items()]
    seen = set()
    for i, (pa, wa) in enumerate(uniq):
        if len(wa) < 4:
            continue
        for pb, wb in uniq[i + 1:]:
            if len(wb) < 4 or (pa, pb) in seen:
                continue
            if len(wa & wb) / len(wa | wb) >= near:
                seen.add((pa, pb))
                out.append(CaptionFinding("near_duplicate", [pa, pb], "two captions are nearly the same",
                                          "Make each caption say what is particular to its image."))
    if limit is None and kind:
        from .. import families

        limit = families.get(kind).caption_tokens
    if limit:
        count, exact = token_counter(kind, tokenizer)
        long = [(p, n) for p, c in entries if c and (n := count(c)) > limit]
        if long:
            worst = max(n for _, n in long)
            out.append(CaptionFinding("too_long", [p for p, _ in long], f"{len(long)} caption(s) are longer than "
                                      f"the {limit} tokens the text encoder reads ({'' if exact else 'about '}"
                                      f"{worst} at most): the end is cut", "Shorten them, put what matters first"
                                      + (", or set max_token_length 225 (CLIP chunks)" if limit == 75 else "")
                                      + "."))
    if trig:
        missing = [p for p, c in entries if c and trig not in c.lower()]
        if missing and len(missing) < len(entries):
            out.append(CaptionFinding("trigger_missing", missing, f"{len(missing)} caption(s) lack the trigger "
                                      f"'{trigger}'", f"Put '{trigger}' first in them (the caption step's trigger "
                                      f"option does it), or set trigger_word so it is added when training."))
        elif missing:
            out.append(CaptionFinding("trigger_missing", missing, f"no caption has the trigger '{trigger}'",
                                      "It is added first when training (trigger_word); nothing to do unless you "
                                      "meant another word.", severity="info"))
    texts = [c for _, c in entries if c]
    concept_words = set(words(concept)) - STOPWORDS
    if concept_words:
        named = [p for p, c in entries if concept_words & set(words(c))]
        if named:
            out.append(CaptionFinding("concept_named", named, f"{len(named)} caption(s) name the concept "
                                      f"('{concept}')", "Leave what the LoRA should learn out of the captions: "
                                      "the trigger carries it; describe the rest of each image."))
    elif len(texts) >= 5:
        df = Counter(w for c in texts for w in set(words(c)) - STOPWORDS - set(words(trigger)))
        common = sorted(w for w, n in df.items() if n >= 0.8 * len(texts))
        if common:
            paths = [p for p, c in entries if set(common) & set(words(c))]
            out.append(CaptionFinding("concept_named", paths, f"the word(s) {', '.join(common[:6])} stand in "
                                      f"{min(df[w] for w in common)}+ of {len(texts)} captions", "If they describe "
                                      "what the LoRA should learn (the face, the style), take them out so the "
                                      "trigger carries it; if they are true of every image and not the concept, "
                                      "keep them.", severity="info"))
    return out


def check_dataset(ds, kind: Optional[str] = None, tokenizer=None, concept: str = "") -> List[CaptionFinding]:
    """The checks for a loaded ImageDataset (its items' captions as training reads them, trigger included)."""
    trig = getattr(ds, "trigger_word", "") or ""
    return check_captions([(it.path, it.caption) for it in ds.items], trig, kind, concept, tokenizer=tokenizer)
