"""Caption styles as data (styles.json beside this module; users pass their own file): the instruction a
vision-language captioner gets, how long its answer may be, and what form the caption takes. `for_family(kind)`
is the style the family's trainers caption with (families/ `caption_style`: tags or one sentence for the CLIP
families' fine-tunes, detailed natural language for the T5 / Qwen / Mistral-conditioned ones)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FILE = os.path.join(HERE, "styles.json")
FORMS = ("tags", "sentence", "paragraph", "instruction")


@dataclass(frozen=True)
class Style:
    name: str
    title: str
    prompt: str
    max_new_tokens: int = 128
    form: str = "paragraph"
    florence: str = ""
    images: int = 1


def load(path: Optional[str] = None) -> Dict[str, Style]:
    """The styles of `path` (default styles.json here); a user file's styles replace or add to the defaults. A
    style file that cannot be read, or a style without a prompt, is a ValueError naming the file and the key."""
    styles = _read(DEFAULT_FILE)
    if path:
        styles.update(_read(os.path.expanduser(path)))
    return styles


def _read(path: str) -> Dict[str, Style]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ValueError(f"caption styles file '{path}' cannot be read ({exc.strerror}): pass an existing JSON file "
                         f"(copy {DEFAULT_FILE} and edit it).") from None
    except ValueError as exc:
        raise ValueError(f"caption styles file '{path}' is not valid JSON ({exc}).") from None
    out = {}
    for name, d in data.items():
        if name.startswith("_"):
            continue
        if not isinstance(d, dict) or not str(d.get("prompt", "")).strip():
            raise ValueError(f"caption style '{name}' in '{path}' has no prompt: give it \"prompt\": \"...\".")
        form = d.get("form", "paragraph")
        if form not in FORMS:
            raise ValueError(f"caption style '{name}' in '{path}': form {form!r} is not one of {', '.join(FORMS)}.")
        out[name] = Style(name=name, title=str(d.get("title", name)), prompt=str(d["prompt"]).strip(),
                          max_new_tokens=int(d.get("max_new_tokens", 128)), form=form,
                          florence=str(d.get("florence", "")), images=int(d.get("images", 1)))
    return out


def get(name: str, path: Optional[str] = None) -> Style:
    styles = load(path)
    if name not in styles:
        raise ValueError(f"caption style {name!r} is not known: use one of {', '.join(styles)} (or add it to a "
                         f"styles file).")
    return styles[name]


def for_family(kind: Optional[str]) -> str:
    """The style a family is captioned in (families' `caption_style`); "detailed" for no family."""
    if not kind:
        return "detailed"
    from .. import families

    return families.get(kind).caption_style
