"""`make_captioner(name, **options)`: the captioners by name (backends.py, and vlm.py for chat VLMs)."""
from __future__ import annotations

import difflib

from .backends import CaptionerError, Captioner, HostCaptioner, TemplateCaptioner, TransformersCaptioner, WD14Tagger
from .vlm import VLMCaptioner

BACKENDS = ("template", "transformers", "vlm", "wd14", "host")
_ALIASES = {"blip": "transformers", "git": "transformers", "florence": "transformers", "florence2": "transformers",
            "hf": "transformers", "tagger": "wd14", "wd": "wd14", "onnx": "wd14", "filename": "template",
            "qwen-vl": "vlm", "qwen2.5-vl": "vlm", "qwen3-vl": "vlm", "llava": "vlm", "joycaption": "vlm"}


def make_captioner(backend: str, **opts) -> Captioner:
    """Build a captioner by name: template | transformers | wd14 | host (aliases: blip, git, florence, tagger).

    Options go to the backend's constructor; unknown options are an error, ``None`` values are dropped.
    ``host`` needs ``fn=`` (the host's interrogator).
    """
    key = (backend or "").strip().lower()
    key = _ALIASES.get(key, key)
    cls = {"template": TemplateCaptioner, "transformers": TransformersCaptioner, "wd14": WD14Tagger,
           "host": HostCaptioner, "vlm": VLMCaptioner}.get(key)
    if cls is None:
        near = difflib.get_close_matches(key, list(BACKENDS) + list(_ALIASES), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise CaptionerError(backend or "?", f"unknown captioning backend '{backend}'{hint}",
                             fix="choose one of " + ", ".join(BACKENDS))
    opts = {k: v for k, v in opts.items() if v is not None}
    import inspect

    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in opts if k not in params]
    if unknown:
        valid = [p for p in params if p != "self"]
        raise CaptionerError(key, f"unknown option(s) {', '.join(unknown)}", fix="valid options: " + ", ".join(valid))
    return cls(**opts)
