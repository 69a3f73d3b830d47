"""The "LoRA Train" gradio tab, shared by the AUTOMATIC1111 / Forge extension and the standalone app.

`build_tab(host)` returns a `gradio.Blocks` (built, not launched) for any `lora_train.hosts.Host`. gradio is
imported only when the tab is built, so importing this package (e.g. for the WebUI host adapter) needs none.
"""
from __future__ import annotations


def build_tab(host):
    """The whole tab as a `gradio.Blocks` for `host` (see `lora_train.ui.tab`)."""
    from .tab import build_tab as _build

    return _build(host)


__all__ = ["build_tab"]
