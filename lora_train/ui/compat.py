"""Small shims over the gradio API subset shared by 3.41 (AUTOMATIC1111 1.10), 4.40 (Forge) and the current
release (6.x at the time of writing).

- `make(cls, **kw)` builds a component with only the keyword arguments this gradio accepts (e.g. a
  Gallery's `columns`, an Image's `show_download_button` vs `buttons`);
- `on(event, fn, inputs, outputs, js=..., **kw)` wires an event, passing `js` as `_js` on gradio 3 and
  dropping options this gradio lacks (`show_progress` values, `queue`, ...);
- `poll(blocks, seconds, fn, outputs)` runs `fn` every few seconds: `gr.Timer` where it exists (4.40+),
  else `Blocks.load(..., every=)` (gradio 3, needs the queue, which the WebUI and our app enable);
- `update(**kw)` is `gr.update` (present in all three).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

import gradio as gr

VERSION = tuple(int(p) for p in (getattr(gr, "__version__", "0").split(".") + ["0", "0"])[:2] if p.isdigit())
MAJOR = VERSION[0] if VERSION else 0


def _params(fn: Callable) -> Optional[set]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None  # accepts anything
    return set(sig.parameters)


def accepted(fn: Callable, kw: Dict[str, Any]) -> Dict[str, Any]:
    """`kw` without the keys `fn` does not take (all of it when `fn` takes **kwargs)."""
    names = _params(fn)
    return dict(kw) if names is None else {k: v for k, v in kw.items() if k in names}


def make(cls, *args, **kw):
    """Component `cls(*args, **kw)` with the keyword arguments this gradio does not know left out."""
    return cls(*args, **accepted(cls.__init__, kw))


def on(event: Callable, fn: Optional[Callable], inputs: Any = None, outputs: Any = None,
       js: Optional[str] = None, **kw):
    """Wire `event` (e.g. `button.click`); `js` is a JS function (name or arrow function) run in the page."""
    names = _params(event)
    opts = dict(kw)
    if js is not None:
        if names is None or "js" in names:
            opts["js"] = js
        elif "_js" in names:
            opts["_js"] = js
        else:  # pragma: no cover - every supported gradio has one of them
            raise RuntimeError(f"gradio {gr.__version__}: event listeners take neither js nor _js")
    if names is not None:
        opts = {k: v for k, v in opts.items() if k in names}
    return event(fn, inputs=inputs if inputs is not None else [], outputs=outputs if outputs is not None else [],
                 **opts)


def update(**kw) -> Any:
    return gr.update(**kw)


def has_timer() -> bool:
    return hasattr(gr, "Timer")


def poll(blocks, seconds: float, fn: Callable, inputs: Sequence = (), outputs: Sequence = ()) -> Any:
    """Call `fn` every `seconds` while the page is open (state kept in Python shows up on every page)."""
    if has_timer():
        timer = gr.Timer(seconds)
        return on(timer.tick, fn, list(inputs), list(outputs), show_progress="hidden")
    return on(blocks.load, fn, list(inputs), list(outputs), every=seconds, show_progress="hidden")


def gallery_items(items: List[tuple]) -> List[tuple]:
    """(image, caption) pairs in the form every supported gradio's Gallery takes."""
    return [(im, cap) for im, cap in items]
