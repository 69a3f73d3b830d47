"""`<lora:name:w>` prompt syntax as the WebUI parses it, and LoRA name resolution in folders.

WebUI rules (extra_networks_lora): `<lora:NAME>` = 1.0; `<lora:NAME:W>` sets both text encoder and UNet;
`<lora:NAME:TE:UNET>` positional split; named `te=`, `unet=` (and `dyn=`, accepted and ignored) override.
"""
from __future__ import annotations

import difflib
import os
import re
from .names import EXT, epoch_of
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

# Same shape as the WebUI's extra-network regex: <kind:params>
_TAG_RE = re.compile(r"<(\w+):([^>]*)>")
LORA_KINDS = ("lora", "lyco")


class PromptError(ValueError):
    """A malformed `<lora:...>` tag or a LoRA name that does not resolve."""


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float = 1.0
    unet: float = 1.0
    text: str = ""  # the tag as written

    def tag(self) -> str:
        if self.te == self.unet:
            return f"<lora:{self.name}:{self.te:g}>"
        return f"<lora:{self.name}:te={self.te:g}:unet={self.unet:g}>"


def _num(value: str, tag: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptError(f"malformed tag {tag}: {what} '{value}' is not a number. Write it as "
                          f"<lora:name:0.8> or <lora:name:te=0.5:unet=0.8>.") from None


def parse_prompt(prompt: str) -> Tuple[str, List[LoraTag]]:
    """Return (text with the LoRA tags removed, tags in order)."""
    tags: List[LoraTag] = []

    def repl(m: "re.Match") -> str:
        kind, body = m.group(1), m.group(2)
        if kind.lower() not in LORA_KINDS:
            return m.group(0)
        tag = m.group(0)
        parts = body.split(":")
        positional = [p for p in parts if "=" not in p]
        named: Dict[str, str] = {}
        for p in parts:
            if "=" in p:
                k, _, v = p.partition("=")
                named[k.strip()] = v.strip()
        if not positional or not positional[0].strip():
            raise PromptError(f"malformed tag {tag}: it needs a LoRA name, as in <lora:my_style:0.8>.")
        unknown = set(named) - {"te", "unet", "dyn"}
        if unknown:
            raise PromptError(f"malformed tag {tag}: unknown option(s) {', '.join(sorted(unknown))}; "
                              f"allowed te=, unet=, dyn=.")
        if len(positional) > 4:
            raise PromptError(f"malformed tag {tag}: too many ':' parts.")
        name = positional[0].strip()
        te = _num(positional[1].strip(), tag, "weight") if len(positional) > 1 else 1.0
        te = _num(named["te"], tag, "te weight") if "te" in named else te
        unet = _num(positional[2].strip(), tag, "unet weight") if len(positional) > 2 else te
        unet = _num(named["unet"], tag, "unet weight") if "unet" in named else unet
        tags.append(LoraTag(name=name, te=te, unet=unet, text=tag))
        return ""

    if prompt.count("<") != prompt.count(">") and re.search(r"<lora:[^>]*$", prompt):
        raise PromptError("malformed prompt: a <lora:...> tag is not closed with '>'.")
    text = _TAG_RE.sub(repl, prompt)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)  # collapse the ", ," a removed tag leaves
    text = re.sub(r"\s{2,}", " ", text)
    text = re.sub(r"\s+,", ",", text).strip().strip(",").strip()
    return text, tags


def with_strength(prompt: str, name: str, strength: float) -> str:
    """The prompt with the tag for `name` set to `strength` (removed at 0; added when absent)."""
    out, found = [], False

    def repl(m: "re.Match") -> str:
        nonlocal found
        if m.group(1).lower() in LORA_KINDS and m.group(2).split(":")[0].strip() == name:
            found = True
            return "" if strength == 0 else f"<lora:{name}:{strength:g}>"
        return m.group(0)

    new = _TAG_RE.sub(repl, prompt)
    if not found and strength != 0:
        new = f"{new} <lora:{name}:{strength:g}>"
    return re.sub(r"\s{2,}", " ", new).strip()


class LoraLibrary:
    """LoRA files by name (file stem, case as on disk) in one or more folders, searched recursively."""

    def __init__(self, dirs: Sequence[str]):
        self.dirs = [d for d in dirs if d]

    def files(self) -> Dict[str, str]:
        found: Dict[str, str] = {}
        for d in self.dirs:
            if not os.path.isdir(d):
                continue
            for root, _dirs, names in os.walk(d, followlinks=False):
                for n in sorted(names):
                    if n.lower().endswith(".safetensors") and not n.startswith("."):
                        found.setdefault(os.path.splitext(n)[0], os.path.join(root, n))
        return found

    def resolve(self, name: str) -> str:
        files = self.files()
        if name in files:
            return files[name]
        lower = {k.lower(): v for k, v in files.items()}
        if name.lower() in lower:
            return lower[name.lower()]
        close = difflib.get_close_matches(name, list(files), n=5, cutoff=0.4)
        where = ", ".join(self.dirs) or "(no LoRA folder configured)"
        hint = f" Closest names: {', '.join(close)}." if close else f" Known: {', '.join(sorted(files)[:10]) or 'none'}."
        raise PromptError(f"unknown LoRA '{name}' (looked in {where}).{hint}")

    def epochs_of(self, name: str) -> List[Tuple[Optional[int], str]]:
        """[(epoch, path)] for `name-0000NN` files beside the final `name` file, final last (epoch None)."""
        final = self.resolve(name)
        folder, stem = os.path.dirname(final), os.path.splitext(os.path.basename(final))[0]
        eps = sorted((e, os.path.join(folder, n)) for n in os.listdir(folder)
                     if n.endswith(EXT) and (e := epoch_of(n, stem)) is not None)
        return [(e, p) for e, p in eps] + [(None, final)]


def parse_floats(text: str, what: str) -> List[float]:
    """A list of numbers typed by a user (`0.5, 0.8 1`; commas, semicolons or spaces); ValueError says how to
    write it. Shared by the CLI, the tab and the ComfyUI nodes."""
    out = []
    for part in re.split(r"[,\s;]+", str(text or "").strip()):
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"{what}: '{part}' is not a number; write a comma-separated list such as 0.5, 0.75, 1"
                             ) from None
    if not out:
        raise ValueError(f"{what} is empty: write a comma-separated list such as 0.5, 0.75, 1")
    return out


def parse_ints(text: str, what: str) -> List[int]:
    """Like `parse_floats`, whole numbers only (seeds, epochs)."""
    vals = parse_floats(text, what)
    bad = [v for v in vals if not float(v).is_integer()]
    if bad:
        raise ValueError(f"{what}: {bad[0]:g} is not a whole number; write e.g. 1, 2, 3")
    return [int(v) for v in vals]
