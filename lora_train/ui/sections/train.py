"""Train: Start / Stop, the job's status, loss plot and diagnosis, polled by the page.

`layout(c)` builds the section's components inside its `gr.Tab` and keeps them on the tab's namespace `c`;
`wire(c, blocks)` connects its events once every section exists (other sections' components are read from `c`).
No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation of a handler.
"""

import gradio as gr

from .. import compat, jobs, logic
from ..compat import make, on, update
from .common import POLL_BUTTON_ID, POLL_SECONDS, REFRESH_CARDS_JS, err as _err, keep


def layout(c) -> None:
    host = c.host
    with gr.Row():
        start_btn = make(gr.Button, "Start training", variant="primary", elem_id="lora_train_start")
        stop_btn = make(gr.Button, "Stop (saves what it has)", variant="stop", elem_id="lora_train_stop")
        refresh_btn = make(gr.Button, "Refresh", elem_id="lora_train_refresh")
    train_msg = make(gr.Markdown, "", elem_id="lora_train_train_msg")
    status_md = make(gr.Markdown, "No job has run yet.", elem_id="lora_train_status")
    loss_img = make(gr.Image, label="Loss", type="pil", interactive=False, height=340, width=680,
                    show_label=True, elem_id="lora_train_loss")
    diag_md = make(gr.Markdown, "", elem_id="lora_train_diagnosis")
    version_box = make(gr.Textbox, value="", visible=False, elem_id="lora_train_version")
    published_box = make(gr.Textbox, value="", visible=False, elem_id="lora_train_published")
    poll_btn = None
    if host.polls_from_page:  # hidden by the extension's style.css; clicked by javascript/
        poll_btn = make(gr.Button, "lora_train poll", elem_id=POLL_BUTTON_ID,
                        elem_classes=["lora-train-hidden"])
    keep(c, {"diag_md": diag_md, "loss_img": loss_img, "poll_btn": poll_btn, "published_box": published_box, "refresh_btn": refresh_btn, "start_btn": start_btn, "status_md": status_md, "stop_btn": stop_btn, "train_msg": train_msg, "version_box": version_box})


def wire(c, blocks) -> None:
    (host, seen_state, setting_inputs, values_of, folder, trigger, diag_md, loss_img, poll_btn, published_box, refresh_btn, start_btn, status_md, stop_btn, train_msg, version_box, lora_pick, prompt, tag_box) = \
        (c.host, c.seen_state, c.setting_inputs, c.values_of, c.folder, c.trigger, c.diag_md, c.loss_img, c.poll_btn, c.published_box, c.refresh_btn, c.start_btn, c.status_md, c.stop_btn, c.train_msg, c.version_box, c.lora_pick, c.prompt, c.tag_box)
    def do_start(path, trig, *vals):
        try:
            cfg, spec = logic.build_config(host, values_of(vals), path, trig)
            logic.start_training(host, cfg, spec)
        except Exception as exc:
            return _err(exc)
        return (f"Started training **{cfg.output_name}** ({cfg.output_dir}). The status below updates by "
                f"itself; closing this page does not stop the run.")

    on(start_btn.click, do_start, [folder, trigger] + setting_inputs, [train_msg])

    def do_stop():
        job = jobs.running()
        if job is None:
            return "Nothing is running."
        job.stop()
        return f"Stopping {job.describe()} after the current step (what was trained is saved) ..."

    on(stop_btn.click, do_stop, [], [train_msg])

    def job_key():
        job = jobs.current()
        return f"{id(job)}:{job.version}" if job is not None else "0:0"

    def render(seen):
        job = jobs.current()
        snap = job.snapshot() if job is not None else None
        version = (id(job), snap["version"]) if snap else (0, 0)
        key = f"{version[0]}:{version[1]}"
        if key == seen:
            return (update(),) * 3 + (seen,) + (update(),) * 6
        img = logic.loss_image(snap)
        lora_updates = (update(),) * 5
        test = logic.test_fields(snap)
        if test is not None:
            try:
                names_now = logic.lora_names(host)
            except Exception:
                names_now = []
            lora_updates = (update(choices=names_now, value=test["name"]), update(value=test["prompt"]),
                            update(value=test["tag"]), update(value=test["name"]),
                            update(value=test["size"]) if test["size"] else update())
        # the Start line belongs to the training run it started; another job (auto, a grid) or the end of the
        # run replaces it with the status below
        start_line = update() if snap and snap["kind"] == "train" and snap["status"] in jobs.RUNNING else ""
        if img is None:  # a training job without a loss yet clears the last run's plot; other jobs keep it
            img = None if snap and snap["kind"] in jobs.TRAINING_KINDS else update()
        return ((logic.job_status(snap), img, logic.job_diagnosis(snap), key)
                + lora_updates + (start_line,))

    poll_outputs = [status_md, loss_img, diag_md, seen_state, lora_pick, prompt, tag_box, published_box, c.gen_size,
                    train_msg]
    # The poll only updates a hidden version box (gradio 3 marks every output of a running event as busy,
    # which would make the Train section flicker every second); the visible parts are rendered when the
    # job's version changes. In the WebUI the page's own script clicks a hidden button while the tab is
    # shown: a server-side `every=` loop blocks the WebUI's "Reload UI" (gradio's Server.close waits on it).
    if poll_btn is not None:
        on(poll_btn.click, job_key, [], [version_box], show_progress="hidden")
    else:
        compat.poll(blocks, POLL_SECONDS, job_key, [], [version_box])
    on(version_box.change, render, [seen_state], poll_outputs, show_progress="hidden")
    on(refresh_btn.click, lambda: render(None), [], poll_outputs)
    # a newly published LoRA: the WebUI's Lora cards are refreshed in the page (its extra-networks refresh)
    on(published_box.change, None, [published_box], [], js=REFRESH_CARDS_JS)
