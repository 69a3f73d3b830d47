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
        gr.Markdown(f"### LoRA Train\nHost: **{host.name}**. New LoRA files go to `{out_dir}`, "
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
    return blocks
