"""Caption text operations: trigger word, find-and-replace, tag dedupe / add / remove / sort with ``keep_tokens``
fixed, comparison, append, tag frequency. Pure string functions (no I/O).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..data.folder import split_tags




# ============================================================================ caption text operations
Pairs = Sequence[Tuple[str, str]]


def parse_pairs(items: Iterable[str]) -> List[Tuple[str, str]]:
    """["old=new", ...] -> [(old, new)]; the first '=' separates (for the CLI's --replace)."""
    out = []
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"'{item}' is not OLD=NEW (use an empty NEW to delete: 'OLD=')")
        old, new = item.split("=", 1)
        if not old:
            raise ValueError(f"'{item}': OLD is empty")
        out.append((old, new))
    return out


def _norm(tag: str) -> str:
    return " ".join(tag.lower().split())


def has_trigger(caption: str, trigger: str) -> bool:
    """True when the caption already starts with the trigger (as a tag or as its first word)."""
    if not trigger:
        return True
    tags = split_tags(caption)
    if not tags:
        return False
    first, t = _norm(tags[0]), _norm(trigger)
    return first == t or first.startswith(t + " ")


def process_caption(text: str, trigger: Optional[str] = None, replace: Pairs = (), dedupe: bool = False,
                    keep_tokens: Optional[int] = None, *, replace_tags: Pairs = (), remove_tags: Iterable[str] = (),
                    add_tags: Iterable[str] = (), sort: Optional[str] = None) -> str:
    """Apply the caption edits, in this order:

    1. ``replace``: plain find-and-replace on the text ((old, new) pairs, in order);
    2. ``replace_tags`` / ``remove_tags`` / ``add_tags``: whole comma-separated tags, case-insensitive;
    3. ``trigger``: put first (moved there if it is elsewhere; never duplicated; a caption that already starts
       with it, e.g. "sks person on a beach", is left as it is);
    4. ``dedupe``: drop later repeats of a tag (case-insensitive);
    5. ``sort="alpha"``: sort the tags after the fixed ones.
    The first ``keep_tokens`` tags (kohya semantics; the trigger counts as the first) stay fixed: not moved by
    the sort. With only ``replace`` the text keeps its own formatting; tag edits re-join with ", ".
    """
    for old, new in replace or ():
        if old:
            text = text.replace(old, new)
    tag_ops = bool(replace_tags or remove_tags or add_tags or trigger or dedupe or sort or keep_tokens)
    if not tag_ops:
        return " ".join(text.split())
    if sort not in (None, "", "none", "alpha"):
        raise ValueError(f"sort must be None or 'alpha', not {sort!r}")
    tags = [" ".join(t.split()) for t in split_tags(text)]
    if replace_tags:
        mapping = {_norm(o): n.strip() for o, n in replace_tags}
        tags = [mapping.get(_norm(t), t) for t in tags]
        tags = [t for t in tags if t]
    if remove_tags:
        drop = {_norm(t) for t in remove_tags}
        tags = [t for t in tags if _norm(t) not in drop]
    for t in add_tags or ():
        t = " ".join(t.split()).strip(", ")
        if t and _norm(t) not in {_norm(x) for x in tags}:
            tags.append(t)
    fixed_n = max(0, int(keep_tokens or 0))
    if trigger:
        trig = " ".join(trigger.split())
        if not has_trigger(", ".join(tags), trig):
            tags = [trig] + [t for t in tags if _norm(t) != _norm(trig)]
        fixed_n = max(fixed_n, 1)
    fixed, rest = tags[:fixed_n], tags[fixed_n:]
    if dedupe:
        seen = {_norm(t) for t in fixed}
        kept_fixed, fseen = [], set()
        for t in fixed:  # repeats inside the fixed part go too, the first stays in place
            if _norm(t) not in fseen:
                kept_fixed.append(t)
                fseen.add(_norm(t))
        fixed, out = kept_fixed, []
        for t in rest:
            if _norm(t) not in seen:
                out.append(t)
                seen.add(_norm(t))
        rest = out
    if sort == "alpha":
        rest = sorted(rest, key=lambda t: (_norm(t), t))
    return ", ".join(fixed + rest)


def same_caption(a: str, b: str) -> bool:
    """Equal up to spacing around and inside tags (what the dataset loader would see as the same)."""
    return [" ".join(t.split()) for t in split_tags(a or "")] == [" ".join(t.split()) for t in split_tags(b or "")]


def append_caption(existing: str, new: str) -> str:
    existing, new = existing.strip().rstrip(","), new.strip()
    if not existing:
        return new
    if not new:
        return existing
    return f"{existing}, {new}"


def tag_frequency_of(captions: Iterable[Tuple[str, str]]) -> Dict[str, Dict[str, int]]:
    """{folder: {tag: count}} from (folder, caption) pairs (the structure of ImageDataset.tag_frequency)."""
    freq: Dict[str, Counter] = {}
    for folder, caption in captions:
        c = freq.setdefault(folder, Counter())
        for tag in split_tags(caption or ""):
            c[tag] += 1
    return {k: dict(v) for k, v in freq.items()}


def format_tag_frequency(freq: Dict[str, Dict[str, int]], top: int = 20) -> str:
    lines = []
    for folder, tags in freq.items():
        items = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"{folder}: {len(items)} distinct tag(s)")
        for tag, n in items[:top]:
            lines.append(f"  {n:5d}  {tag}")
        if len(items) > top:
            lines.append(f"  ... {len(items) - top} more")
    return "\n".join(lines)
