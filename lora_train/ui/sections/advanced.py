"""Advanced (kohya options) inside Settings: the kohya-named fields and "Load kohya config" (ui/advanced.py).

`layout(c)` adds the fields to `c.S` inside an accordion; `wire(c, blocks)` connects the Load button.
No `from __future__ import annotations` here: gradio reads handler annotations.
"""

import gradio as gr

from .. import advanced
from ..compat import make, on, update
from .common import err as _err, keep


def layout(c) -> None:
    S = c.S
    d = advanced.default_values()
    with make(gr.Accordion, "Advanced (kohya options)", open=False):
        with gr.Row():
            path = make(gr.Textbox, value="", label="Load kohya config (.toml / kohya_ss .json path)",
                        elem_id="lora_train_kohya_path")
            load_btn = make(gr.Button, "Load kohya config", elem_id="lora_train_kohya_load")
            upload = make(gr.File, label="... or drop the file here", file_types=[".toml", ".json"],
                          elem_id="lora_train_kohya_file")
        msg = make(gr.Markdown, "", elem_id="lora_train_kohya_msg")
        S["kohya_config"] = make(gr.Textbox, value="", visible=False, elem_id="lora_train_kohya_config")
        fields = list(advanced.FIELDS)
        for start in range(0, len(fields), 4):
            with gr.Row():
                for key, field, label, choices in fields[start:start + 4]:
                    eid = f"lora_train_adv_{key}"
                    if field == "bool":
                        S[key] = make(gr.Checkbox, value=d[key], label=label, elem_id=eid)
                    elif field == "choice":
                        S[key] = make(gr.Dropdown, choices=list(choices), value=d[key], label=label, elem_id=eid)
                    elif field in ("int", "number"):
                        S[key] = make(gr.Number, value=d[key], precision=0 if field == "int" else None, label=label,
                                      elem_id=eid)
                    else:
                        S[key] = make(gr.Textbox, value=d[key], label=label, elem_id=eid)
    keep(c, {"kohya_path": path, "kohya_load": load_btn, "kohya_msg": msg, "kohya_file": upload})


def wire(c, blocks) -> None:
    keys = list(c.setting_keys)
    outputs = [c.S[k] for k in keys] + [c.folder, c.kohya_msg]

    def do_load_kohya(path):
        try:
            values, folder, md = advanced.load_for_tab(path, keys)
        except Exception as exc:
            return (update(),) * (len(keys) + 1) + (_err(exc),)
        return tuple(update(value=values[k]) if k in values else update() for k in keys) + (
            update(value=folder) if folder else update(), md)

    on(c.kohya_load.click, do_load_kohya, [c.kohya_path], outputs)

    def do_upload_kohya(f):
        # gradio 4+ gives the uploaded file's path, gradio 3.41 a tempfile wrapper with .name; None when cleared
        path = getattr(f, "name", f) if f is not None else ""
        if not path:
            return (update(),) * (len(keys) + 3)
        return do_load_kohya(str(path)) + (update(value=str(path)),)

    on(c.kohya_file.change, do_upload_kohya, [c.kohya_file], outputs + [c.kohya_path])
