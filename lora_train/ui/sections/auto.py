"""Auto & queue: the Auto button (folder -> published LoRA with a report), the queue of runs, presets.

`layout(c)` builds the section's components inside its `gr.Tab` and keeps them on the tab's namespace `c`;
`wire(c, blocks)` connects its events once every section exists (the Settings fields are read from `c`).
No `from __future__ import annotations` here: gradio reads handler annotations.
"""

import gradio as gr

from .. import autorun, jobs, logic
from .. import queue as queue_mod
from ..compat import make, on, update
from .common import err as _err, keep

QUEUE_HEADERS = ["#", "id", "name", "status", "ETA", "message"]


def layout(c) -> None:
    gr.Markdown("**Auto** checks the dataset folder, captions the images that have none, takes the advisor's "
                "settings (a field you changed in Settings wins), trains with a held-out validation split, "
                "publishes the epoch with the best validation loss under the LoRA name, draws a base / best / "
                "last grid and writes a report.")
    with gr.Row():
        auto_btn = make(gr.Button, "Auto LoRA", variant="primary", elem_id="lora_train_auto")
        auto_lr_find = make(gr.Checkbox, value=False, label="LR range test first (about 100 extra steps)",
                            elem_id="lora_train_auto_lr_find")
        report_btn = make(gr.Button, "Show the report", elem_id="lora_train_auto_report_btn")
    auto_msg = make(gr.Markdown, "", elem_id="lora_train_auto_msg")
    with gr.Row():
        report_md = make(gr.Markdown, "No auto run yet.", elem_id="lora_train_auto_report")
        grid_img = make(gr.Image, label="A/B grid", type="filepath", interactive=False, elem_id="lora_train_auto_grid")
    gr.Markdown("**Queue**: runs one after another with the settings they were added with; it survives a page "
                "reload (and is kept in `queue.json` beside the run folders).")
    with gr.Row():
        q_add = make(gr.Button, "Add the current settings", elem_id="lora_train_queue_add")
        q_start = make(gr.Button, "Start queue", variant="primary", elem_id="lora_train_queue_start")
        q_pause = make(gr.Button, "Pause after the current run", elem_id="lora_train_queue_pause")
        q_refresh = make(gr.Button, "Refresh queue", elem_id="lora_train_queue_refresh")
    q_table = make(gr.Dataframe, headers=QUEUE_HEADERS, value=[], interactive=False, elem_id="lora_train_queue")
    with gr.Row():
        q_id = make(gr.Textbox, value="", label="Entry id (from the table)", elem_id="lora_train_queue_id")
        q_up = make(gr.Button, "Up", elem_id="lora_train_queue_up")
        q_down = make(gr.Button, "Down", elem_id="lora_train_queue_down")
        q_remove = make(gr.Button, "Remove entry", elem_id="lora_train_queue_remove")
        q_cancel = make(gr.Button, "Cancel entry", variant="stop", elem_id="lora_train_queue_cancel")
    q_msg = make(gr.Markdown, "", elem_id="lora_train_queue_msg")
    gr.Markdown("**Presets**: named settings (YAML files); the built-in ones come from the advisor per task and "
                "base family.")
    with gr.Row():
        p_pick = make(gr.Dropdown, choices=autorun.preset_names(c.host), value=None, label="Preset",
                      allow_custom_value=True, elem_id="lora_train_preset")
        p_load = make(gr.Button, "Load preset", elem_id="lora_train_preset_load")
        p_name = make(gr.Textbox, value="", label="Save the current settings as", elem_id="lora_train_preset_name")
        p_save = make(gr.Button, "Save preset", elem_id="lora_train_preset_save")
    p_msg = make(gr.Markdown, "", elem_id="lora_train_preset_msg")
    keep(c, {"auto_btn": auto_btn, "auto_lr_find": auto_lr_find, "auto_msg": auto_msg, "report_btn": report_btn,
             "report_md": report_md, "auto_grid_img": grid_img, "q_add": q_add, "q_start": q_start, "q_pause": q_pause,
             "q_refresh": q_refresh, "q_table": q_table, "q_id": q_id, "q_up": q_up, "q_down": q_down,
             "q_remove": q_remove, "q_cancel": q_cancel, "q_msg": q_msg, "p_pick": p_pick, "p_load": p_load,
             "p_name": p_name, "p_save": p_save, "p_msg": p_msg})


def wire(c, blocks) -> None:
    host, values_of, setting_inputs = c.host, c.values_of, c.setting_inputs
    queue = queue_mod.queue_for(host, lambda cfg, spec: logic.start_training(host, cfg, spec))

    def do_auto(path, trig, task_v, vram_v, lr_find, *vals):
        try:
            job = autorun.start_auto(host, path, values_of(vals), task_v, vram_v, trig, lr_find)
        except Exception as exc:
            return _err(exc)
        return (f"Started auto mode for **{job.name}**. Progress shows in the Train section; press **Show the "
                f"report** when it is done. Closing this page does not stop it.")

    on(c.auto_btn.click, do_auto, [c.folder, c.trigger, c.task, c.vram, c.auto_lr_find] + setting_inputs,
       [c.auto_msg])

    def do_report():
        job = jobs.current()
        md, grid = autorun.auto_report(job.snapshot() if job is not None else None)
        return md, grid

    on(c.report_btn.click, do_report, [], [c.report_md, c.auto_grid_img])

    def q_view(msg=""):
        eta = queue.eta_seconds()
        tail = f"Queue ETA: {jobs.fmt_seconds(eta)}." if eta is not None else ""
        return queue.table(), " ".join(x for x in (msg, tail) if x)

    def do_queue_add(path, trig, *vals):
        try:
            cfg, spec = logic.build_config(host, values_of(vals), path, trig)
            e = queue.add(cfg, spec)
        except Exception as exc:
            return q_view(_err(exc))
        return q_view(f"Added **{e['name']}** (id `{e['id']}`).")

    on(c.q_add.click, do_queue_add, [c.folder, c.trigger] + setting_inputs, [c.q_table, c.q_msg])

    def act(fn, label):
        def handler(entry_id):
            try:
                fn((entry_id or "").strip())
            except Exception as exc:
                return q_view(_err(logic.UserError(str(exc)) if isinstance(exc, (KeyError, ValueError)) else exc))
            return q_view(label)
        return handler

    on(c.q_up.click, act(lambda i: queue.move(i, -1), "Moved up."), [c.q_id], [c.q_table, c.q_msg])
    on(c.q_down.click, act(lambda i: queue.move(i, 1), "Moved down."), [c.q_id], [c.q_table, c.q_msg])
    on(c.q_remove.click, act(queue.remove, "Removed."), [c.q_id], [c.q_table, c.q_msg])
    on(c.q_cancel.click, act(queue.cancel, "Cancelled."), [c.q_id], [c.q_table, c.q_msg])
    on(c.q_start.click, lambda: (queue.start(), q_view("Queue started: one run at a time."))[1], [],
       [c.q_table, c.q_msg])
    on(c.q_pause.click, lambda: (queue.pause(), q_view("No further run will start."))[1], [], [c.q_table, c.q_msg])
    on(c.q_refresh.click, lambda: q_view(), [], [c.q_table, c.q_msg])
    on(blocks.load, lambda: q_view(), [], [c.q_table, c.q_msg])

    def do_save_preset(name, *vals):
        try:
            path = autorun.save_preset(host, name, values_of(vals))
        except Exception as exc:
            return update(), _err(logic.UserError(str(exc)) if isinstance(exc, ValueError) else exc)
        return update(choices=autorun.preset_names(host), value=(name or "").strip()), f"Saved `{path}`."

    on(c.p_save.click, do_save_preset, [c.p_name] + setting_inputs, [c.p_pick, c.p_msg])

    def do_load_preset(name, *vals):
        try:
            preset = autorun.load_preset(host, name or "")
        except Exception as exc:
            return (update(),) * len(setting_inputs) + (_err(logic.UserError(str(exc))),)
        keys = c.setting_keys
        outs = tuple(update(value=preset[k]) if k in preset else update() for k in keys)
        return outs + (f"Loaded **{name}**: {', '.join(k for k in keys if k in preset)}.",)

    on(c.p_load.click, do_load_preset, [c.p_pick] + setting_inputs, setting_inputs + [c.p_msg])
