"""The "LoRA Train" tab: Dataset, Settings, Train and Test sections (one module each in `sections/`), as one
`gradio.Blocks`.

`build_tab(host)` builds it (not launched) for any `lora_train.hosts.Host`; the WebUI registers it with
`script_callbacks.on_ui_tabs(lambda: [(build_tab(host), "LoRA Train", "lora_train")])` and
`python -m lora_train ui` launches it with a `StandaloneHost`. Written against the gradio API that 3.41
(AUTOMATIC1111 1.10), 4.40 (Forge) and the current release share (see `compat`); the work itself is in
`logic` (no gradio) and long jobs live in `jobs` (module state: a reloaded page shows the running job).
"""
import types
from typing import Any, Dict

import gradio as gr

from . import logic
from .compat import on, update
from .sections import auto, dataset, settings, test, train
from .sections.common import keep_out_of_ui_config

SECTIONS = (("Dataset", dataset), ("Settings", settings), ("Train", train), ("Test", test), ("Auto & queue", auto))


def build_tab(host) -> "gr.Blocks":
    defaults = logic.default_settings(host)
    base_choices, _base_default = logic.default_base(host)
    try:
        out_dir = host.output_dir()
    except Exception as exc:  # shown, not fatal: Start will say it again
        out_dir = f"(unknown: {exc})"
    setting_keys = list(logic.SETTING_KEYS)

    def values_of(vals) -> Dict[str, Any]:
        return dict(zip(setting_keys, vals))

    c = types.SimpleNamespace(host=host, defaults=defaults, base_choices=base_choices, S={},
                              backends=logic.caption_backends(host), setting_keys=setting_keys, values_of=values_of)
    with gr.Blocks(analytics_enabled=False) as blocks:
        shown_as = getattr(host, "title", host.name)
        gr.Markdown(f"### LoRA Train\nRunning in **{shown_as}**. New LoRA files go to `{out_dir}`, "
                    f"each run under a new name (e.g. `name_v2`), so the host never shows an older file.")
        c.folder_state = gr.State("")
        c.rows_state = gr.State([])
        c.basis_state = gr.State([int(defaults["batch_size"]), int(defaults["gradient_accumulation_steps"])])
        c.finder_lr_state = gr.State(None)
        c.seen_state = gr.State(-1)
        with gr.Tabs():
            for title, section in SECTIONS:
                with gr.Tab(title):
                    section.layout(c)
        keep_out_of_ui_config(c.S["base_model"], c.lora_pick, c.prompt, c.tag_box, c.version_box, c.published_box)
        c.setting_inputs = [c.S[k] for k in setting_keys]
        for _title, section in SECTIONS:
            section.wire(c, blocks)
        wire_remembered_settings(c, blocks)
    return blocks


def wire_remembered_settings(c, blocks) -> None:
    """Every Settings field keeps its value across a page reload: each change is remembered (logic), and a page
    that opens gets the remembered values back."""
    def remember(key):
        def handler(value):
            logic.remember_setting(key, value)
        return handler

    for key, comp in zip(c.setting_keys, c.setting_inputs):
        on(comp.change, remember(key), [comp], [], show_progress="hidden")

    def restore():
        saved = logic.remembered_settings()
        return tuple(update(value=saved[k]) if k in saved else update() for k in c.setting_keys)

    on(blocks.load, restore, [], c.setting_inputs)
