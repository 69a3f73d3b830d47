"""The "LoRA Train" tab: Dataset, Settings, Train and Test sections, as one `gradio.Blocks`.

`build_tab(host)` builds it (not launched) for any `lora_train.hosts.Host`; the WebUI registers it with
`script_callbacks.on_ui_tabs(lambda: [(build_tab(host), "LoRA Train", "lora_train")])` and
`python -m lora_train ui` launches it with a `StandaloneHost`. Written against the gradio API that 3.41
(AUTOMATIC1111 1.10), 4.40 (Forge) and the current release share (see `compat`); the work itself is in
`logic` (no gradio) and long jobs live in `jobs` (module state: a reloaded page shows the running job).

No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation of a handler.
"""
import logging
import os
import traceback
from typing import Any, Dict

import gradio as gr

from ..config import OPTIMIZERS, SCHEDULERS
from . import compat, jobs, logic
from .compat import make, on, update

log = logging.getLogger(__name__)

#: name of the JS function (javascript/ of the WebUI extension) that puts its argument into the txt2img prompt
SEND_TO_TXT2IMG_JS = "loraTrainSendToTxt2img"
#: JS function that refreshes the WebUI's Lora cards (extra networks) once per newly published LoRA
REFRESH_CARDS_JS = "loraTrainRefreshCards"
POLL_SECONDS = 1.0
#: the button our page script clicks about once a second while the tab is shown (WebUI hosts: no server timer)
POLL_BUTTON_ID = "lora_train_poll"


def keep_out_of_ui_config(*components) -> None:
    """Fields whose value changes from run to run (the last LoRA, the loaded checkpoint) are not frozen into
    the WebUI's ui-config.json: its loader skips a component with `do_not_save_to_config`."""
    for c in components:
        c.do_not_save_to_config = True


def _err(exc: BaseException) -> str:
    if isinstance(exc, (logic.UserError, jobs.JobBusy)):
        return f"**Cannot do that:** {exc}"
    log.error("lora_train tab: %s", traceback.format_exc())
    return f"**Error:** {type(exc).__name__}: {exc}"


def has_txt2img(host) -> bool:
    """Whether the host has a txt2img tab to send a prompt to (the WebUI hosts: `Host.has_txt2img`)."""
    return bool(host.has_txt2img)


def build_tab(host) -> "gr.Blocks":
    defaults = logic.default_settings(host)
    base_choices, _base_default = logic.default_base(host)
    try:
        out_dir = host.output_dir()
    except Exception as exc:  # shown, not fatal: Start will say it again
        out_dir = f"(unknown: {exc})"
    backends = logic.caption_backends(host)

    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(f"### LoRA Train\nHost: **{getattr(host, 'name', 'host')}**. New LoRA files go to `{out_dir}`, "
                    f"each run under a new name (e.g. `name_v2`), so the host never shows an older file.")
        folder_state = gr.State("")
        rows_state = gr.State([])
        basis_state = gr.State([int(defaults["batch_size"]), int(defaults["gradient_accumulation_steps"])])
        finder_lr_state = gr.State(None)
        seen_state = gr.State(-1)

        with gr.Tabs():
            # ------------------------------------------------------------------ Dataset
            with gr.Tab("Dataset"):
                with gr.Row():
                    folder = make(gr.Textbox, label="Dataset folder (images + same-name .txt captions)",
                                  placeholder="/path/to/images", elem_id="lora_train_folder", scale=4)
                    load_btn = make(gr.Button, "Load", elem_id="lora_train_load", scale=1)
                ds_status = make(gr.Markdown, "Type the folder of your training images and press Load.",
                                 elem_id="lora_train_ds_status")
                gallery = make(gr.Gallery, label="Images (click one to edit its caption)", columns=6, height=360,
                               object_fit="contain", allow_preview=False, elem_id="lora_train_gallery")
                with gr.Row():
                    image_pick = make(gr.Dropdown, choices=[], label="Image", elem_id="lora_train_image", scale=1)
                    caption_box = make(gr.Textbox, label="Caption", lines=2, elem_id="lora_train_caption", scale=3)
                    save_cap_btn = make(gr.Button, "Save caption", elem_id="lora_train_save_caption", scale=1)
                caption_msg = make(gr.Markdown, "", elem_id="lora_train_caption_msg")
                trigger = make(gr.Textbox, label="Trigger word (added to captions that lack it, in training and "
                                                 "auto-captions)", elem_id="lora_train_trigger")
                with make(gr.Accordion, "Auto-caption", open=False):
                    with gr.Row():
                        backend = make(gr.Dropdown, choices=list(backends), value=list(backends)[0],
                                       label="Captioner", elem_id="lora_train_backend")
                        model_path = make(gr.Textbox, label="Model folder or cached repo id (transformers / WD14; "
                                                            "empty = the default if cached)",
                                          elem_id="lora_train_caption_model")
                        mode = make(gr.Dropdown, choices=["skip", "overwrite", "append"], value="skip",
                                    label="Images that have a caption", elem_id="lora_train_caption_mode")
                    caption_btn = make(gr.Button, "Caption the folder", elem_id="lora_train_autocaption")
                    autocap_msg = make(gr.Markdown, "Nothing is downloaded: model captioners need their files on "
                                                    "this machine; the template captioner needs nothing.")
                tags_md = make(gr.Markdown, "", elem_id="lora_train_tags")

            # ------------------------------------------------------------------ Settings
            with gr.Tab("Settings"):
                S: Dict[str, Any] = {}
                with gr.Row():
                    S["base_model"] = make(gr.Dropdown, choices=base_choices, value=defaults["base_model"],
                                           allow_custom_value=True, label="Base model (default: the loaded checkpoint)",
                                           elem_id="lora_train_base")
                    S["model_type"] = make(gr.Dropdown, choices=list(logic.MODEL_TYPES), value="auto",
                                           label="Model type", elem_id="lora_train_model_type")
                    S["output_name"] = make(gr.Textbox, value=defaults["output_name"], label="LoRA name",
                                            elem_id="lora_train_name")
                with gr.Row():
                    S["learning_rate"] = make(gr.Number, value=defaults["learning_rate"], label="Learning rate",
                                              elem_id="lora_train_lr")
                    S["lora_rank"] = make(gr.Number, value=defaults["lora_rank"], precision=0, label="Rank",
                                          elem_id="lora_train_rank")
                    S["lora_alpha"] = make(gr.Number, value=defaults["lora_alpha"], label="Alpha",
                                           elem_id="lora_train_alpha")
                    S["batch_size"] = make(gr.Number, value=defaults["batch_size"], precision=0, label="Batch size",
                                           elem_id="lora_train_batch")
                    S["gradient_accumulation_steps"] = make(gr.Number, value=defaults["gradient_accumulation_steps"],
                                                            precision=0, label="Gradient accumulation",
                                                            elem_id="lora_train_accum")
                with gr.Row():
                    rescale_md = make(gr.Markdown, "", elem_id="lora_train_rescale")
                    rescale_btn = make(gr.Button, "Apply the rescaled learning rate", visible=False,
                                       elem_id="lora_train_rescale_apply")
                with gr.Row():
                    S["epochs"] = make(gr.Number, value=defaults["epochs"], precision=0, label="Epochs",
                                       elem_id="lora_train_epochs")
                    S["max_train_steps"] = make(gr.Number, value=0, precision=0, label="Max steps (0: use epochs)",
                                                elem_id="lora_train_max_steps")
                    S["lr_scheduler"] = make(gr.Dropdown, choices=list(SCHEDULERS), value=defaults["lr_scheduler"],
                                             label="Scheduler", elem_id="lora_train_scheduler")
                    S["lr_warmup_steps"] = make(gr.Number, value=defaults["lr_warmup_steps"], precision=0,
                                                label="Warmup steps", elem_id="lora_train_warmup")
                    S["optimizer"] = make(gr.Dropdown, choices=list(OPTIMIZERS), value=defaults["optimizer"],
                                          label="Optimizer", elem_id="lora_train_optimizer")
                with gr.Row():
                    S["resolution"] = make(gr.Number, value=defaults["resolution"], precision=0, label="Resolution",
                                           elem_id="lora_train_resolution")
                    S["train_text_encoder"] = make(gr.Checkbox, value=False, label="Train the text encoder too",
                                                   elem_id="lora_train_te")
                    S["mixed_precision"] = make(gr.Dropdown, choices=list(logic.PRECISIONS), value="no",
                                                label="Mixed precision (GPU)", elem_id="lora_train_precision")
                    S["seed"] = make(gr.Number, value=defaults["seed"], precision=0, label="Seed",
                                     elem_id="lora_train_seed")
                    S["save_every_n_epochs"] = make(gr.Number, value=defaults["save_every_n_epochs"], precision=0,
                                                    label="Save every N epochs (0: final only)",
                                                    elem_id="lora_train_save_every")
                with gr.Row():
                    task = make(gr.Dropdown, choices=list(logic.TASKS), value="style", label="What you train",
                                elem_id="lora_train_task")
                    vram = make(gr.Number, value=0, label="VRAM GB for the advice (0: detect)",
                                elem_id="lora_train_vram")
                    suggest_btn = make(gr.Button, "Suggest", variant="primary", elem_id="lora_train_suggest")
                suggest_md = make(gr.Markdown, "Suggest fills the fields from your dataset size, task and VRAM, "
                                               "each value with its reason.", elem_id="lora_train_suggest_md")
                with make(gr.Accordion, "LR finder (learning-rate range test)", open=False):
                    with gr.Row():
                        finder_steps = make(gr.Number, value=100, precision=0, label="LR finder steps",
                                            elem_id="lora_train_finder_steps")
                        finder_btn = make(gr.Button, "Run the LR finder", elem_id="lora_train_finder")
                        finder_apply = make(gr.Button, "Use the suggested learning rate", visible=False,
                                            elem_id="lora_train_finder_apply")
                    finder_md = make(gr.Markdown, "Trains a throw-away LoRA while the lr grows; the model is left "
                                                  "as it was.", elem_id="lora_train_finder_md")
                    finder_plot = make(gr.Image, label="LR finder", type="pil", interactive=False,
                                       elem_id="lora_train_finder_plot")

            # ------------------------------------------------------------------ Train
            with gr.Tab("Train"):
                with gr.Row():
                    start_btn = make(gr.Button, "Start training", variant="primary", elem_id="lora_train_start")
                    stop_btn = make(gr.Button, "Stop (saves what it has)", variant="stop", elem_id="lora_train_stop")
                    refresh_btn = make(gr.Button, "Refresh", elem_id="lora_train_refresh")
                train_msg = make(gr.Markdown, "", elem_id="lora_train_train_msg")
                status_md = make(gr.Markdown, "No job has run yet.", elem_id="lora_train_status")
                loss_img = make(gr.Image, label="Loss", type="pil", interactive=False, elem_id="lora_train_loss")
                diag_md = make(gr.Markdown, "", elem_id="lora_train_diagnosis")
                version_box = make(gr.Textbox, value="", visible=False, elem_id="lora_train_version")
                published_box = make(gr.Textbox, value="", visible=False, elem_id="lora_train_published")
                poll_btn = None
                if host.polls_from_page:  # hidden by the extension's style.css; clicked by javascript/
                    poll_btn = make(gr.Button, "lora_train poll", elem_id=POLL_BUTTON_ID,
                                    elem_classes=["lora-train-hidden"])

            # ------------------------------------------------------------------ Test
            with gr.Tab("Test"):
                try:
                    names = logic.lora_names(host)
                except Exception:
                    names = []
                with gr.Row():
                    lora_pick = make(gr.Dropdown, choices=names, value=names[0] if names else None,
                                     allow_custom_value=True, label="LoRA", elem_id="lora_train_test_lora")
                    lora_refresh = make(gr.Button, "Refresh list", elem_id="lora_train_test_refresh")
                prompt = make(gr.Textbox, label="Prompt (may hold <lora:name:w>)", lines=2,
                              value=f"a picture {logic.lora_tag(names[0], 1.0)}" if names else "a picture",
                              elem_id="lora_train_prompt")
                negative = make(gr.Textbox, label="Negative prompt", elem_id="lora_train_negative")
                with gr.Row():
                    strengths = make(gr.Textbox, value="0.5, 0.8, 1", label="Strengths (a base column is added)",
                                     elem_id="lora_train_strengths")
                    seeds = make(gr.Textbox, value="1, 2", label="Seeds", elem_id="lora_train_seeds")
                    by_epoch = make(gr.Checkbox, value=False, label="Rows: every epoch file",
                                    elem_id="lora_train_by_epoch")
                with gr.Row():
                    gen_steps = make(gr.Number, value=20, precision=0, label="Sampling steps",
                                     elem_id="lora_train_gen_steps")
                    gen_cfg = make(gr.Number, value=7.0, label="CFG scale", elem_id="lora_train_gen_cfg")
                    gen_size = make(gr.Number, value=defaults["resolution"], precision=0, label="Size",
                                    elem_id="lora_train_gen_size")
                    grid_btn = make(gr.Button, "Generate grid", variant="primary", elem_id="lora_train_grid")
                grid_msg = make(gr.Markdown, "", elem_id="lora_train_grid_msg")
                grid_img = make(gr.Image, label="Grid", type="pil", interactive=False, elem_id="lora_train_grid_img")
                with gr.Row():
                    tag_box = make(gr.Textbox, value=logic.lora_tag(names[0]) if names else "",
                                   label="Tag to use in prompts", elem_id="lora_train_tag")
                    if has_txt2img(host):
                        send_btn = make(gr.Button, "Send to txt2img", elem_id="lora_train_send")
                    else:
                        send_btn = None
                        make(gr.Markdown, "Send to txt2img works inside the WebUI; here, copy the tag into your "
                                          "prompts.", elem_id="lora_train_send_note")
        keep_out_of_ui_config(S["base_model"], lora_pick, prompt, tag_box, version_box, published_box)

        setting_keys = list(logic.SETTING_KEYS)
        setting_inputs = [S[k] for k in setting_keys]

        def values_of(vals) -> Dict[str, Any]:
            return dict(zip(setting_keys, vals))

        # -------------------------------------------------------------- dataset handlers
        def show_folder(path, sel=None):
            rows = logic.caption_rows(path)
            names = [os.path.basename(r[0]) for r in rows]
            pick = sel if sel in names else (names[0] if names else None)
            cap = next((r[1] for r in rows if os.path.basename(r[0]) == pick), "")
            n_cap = sum(1 for r in rows if r[1].strip())
            msg = f"`{path}`: {len(rows)} image(s), {n_cap} with a caption."
            if not rows:
                msg += " No images found (png, jpg, jpeg, webp, bmp; kohya N_name subfolders are read too)."
            return (path, rows, compat.gallery_items(logic.thumbnails(rows)), msg,
                    update(choices=names, value=pick), cap, logic.tag_table(path))

        def do_load(path):
            try:
                real = logic.dataset_folder(host, path)
                jobs.REMEMBERED["folder"] = path
                return show_folder(real) + ("",)
            except Exception as exc:
                return ("", [], [], _err(exc), update(choices=[], value=None), "", "", "")

        ds_outputs = [folder_state, rows_state, gallery, ds_status, image_pick, caption_box, tags_md]

        def do_page_open():
            # a reopened page: the folder last loaded in this process (Start/Suggest read this box)
            return update(value=jobs.REMEMBERED.get("folder", "")) if jobs.REMEMBERED.get("folder") else update()

        on(blocks.load, do_page_open, [], [folder])
        on(load_btn.click, do_load, [folder], ds_outputs + [caption_msg])
        on(folder.submit, do_load, [folder], ds_outputs + [caption_msg])

        def do_pick(name, rows):
            for r in rows or []:
                if os.path.basename(r[0]) == name:
                    return r[1]
            return ""

        # `input` (a user's choice) rather than `change`, which also fires when Load sets the list and would
        # then overwrite a caption being typed
        on(getattr(image_pick, "input", image_pick.change), do_pick, [image_pick, rows_state], [caption_box])

        def do_select(rows, evt: gr.SelectData):
            i = evt.index if not isinstance(evt.index, (list, tuple)) else evt.index[0]
            if rows and 0 <= int(i) < len(rows):
                return update(value=os.path.basename(rows[int(i)][0])), rows[int(i)][1]
            return update(), update()

        if hasattr(gallery, "select"):
            on(gallery.select, do_select, [rows_state], [image_pick, caption_box])

        def do_save_caption(path, rows, name, text):
            if not path:
                return (update(), update(), update(), update(), update(), update(), update(),
                        "**Cannot do that:** load a dataset folder first.")
            match = [r[0] for r in rows or [] if os.path.basename(r[0]) == name]
            if not match:
                return (update(),) * 7 + ("**Cannot do that:** choose an image first.",)
            try:
                msg = logic.save_caption(path, match[0], text)
                return show_folder(path, name) + (msg,)
            except Exception as exc:
                return (update(),) * 7 + (_err(exc),)

        on(save_cap_btn.click, do_save_caption, [folder_state, rows_state, image_pick, caption_box],
           ds_outputs + [caption_msg])

        def do_autocaption(path, label, model, mode_v, trig, pick):
            if not path:
                return (update(),) * 7 + ("**Cannot do that:** load a dataset folder first.",)
            try:
                job = jobs.claim("caption")
                msg = jobs.run_here(job, lambda j: logic.auto_caption(
                    host, path, backends.get(label, "template"), model, mode_v, trig,
                    should_stop=j.stop_event.is_set))
                return show_folder(path, pick) + (msg,)
            except Exception as exc:
                return (update(),) * 7 + (_err(exc),)

        on(caption_btn.click, do_autocaption, [folder_state, backend, model_path, mode, trigger, image_pick],
           ds_outputs + [autocap_msg])

        # -------------------------------------------------------------- settings handlers
        suggest_outputs = [S[k] for k in logic.SUGGEST_FIELDS] + [S["max_train_steps"], suggest_md, basis_state,
                                                                 rescale_md, rescale_btn]

        def do_suggest(path, trig, task_v, vram_v, *vals):
            v = values_of(vals)
            try:
                values, md = logic.suggest_settings(host, path, task_v, v["model_type"], v["base_model"], vram_v,
                                                    v["gradient_accumulation_steps"], v["resolution"], trig)
            except Exception as exc:
                return (update(),) * (len(logic.SUGGEST_FIELDS) + 1) + (_err(exc), update(), update(),
                                                                         update(visible=False))
            outs = [update(value=values[k]) if k in values else update() for k in logic.SUGGEST_FIELDS]
            basis = [int(values.get("batch_size", v["batch_size"])),
                     int(values.get("gradient_accumulation_steps", v["gradient_accumulation_steps"]))]
            return tuple(outs) + (update(value=0), md, basis, "", update(visible=False))

        on(suggest_btn.click, do_suggest, [folder, trigger, task, vram] + setting_inputs, suggest_outputs)

        def do_offer(lr, batch, accum, basis):
            new_lr, text = logic.rescale_offer(lr, basis, batch, accum)
            return text, update(visible=new_lr is not None)

        for comp in (S["batch_size"], S["gradient_accumulation_steps"]):
            on(comp.change, do_offer, [S["learning_rate"], S["batch_size"], S["gradient_accumulation_steps"],
                                       basis_state], [rescale_md, rescale_btn])

        def do_apply_rescale(lr, batch, accum, basis):
            new_lr, _text = logic.rescale_offer(lr, basis, batch, accum)
            if new_lr is None:
                return update(), basis, "", update(visible=False)
            return (update(value=new_lr), [int(batch), int(accum)],
                    f"Learning rate set to {new_lr:.3g} for batch {int(batch)} x accumulation {int(accum)}.",
                    update(visible=False))

        on(rescale_btn.click, do_apply_rescale, [S["learning_rate"], S["batch_size"],
                                                 S["gradient_accumulation_steps"], basis_state],
           [S["learning_rate"], basis_state, rescale_md, rescale_btn])

        def do_lr_typed(batch, accum, basis, offer):
            # the user typed a learning rate: it now belongs to the current batch x accumulation
            try:
                return [int(batch), int(accum)]
            except (TypeError, ValueError):
                return basis

        if hasattr(S["learning_rate"], "input"):
            on(S["learning_rate"].input, do_lr_typed, [S["batch_size"], S["gradient_accumulation_steps"],
                                                       basis_state, rescale_md], [basis_state])

        def do_finder(path, trig, steps_v, *vals):
            try:
                cfg, spec = logic.build_config(host, values_of(vals), path, trig, name_override="lr_finder")
                res = logic.run_lr_finder(host, cfg, spec, steps_v)
            except Exception as exc:
                return None, _err(exc), None, update(visible=False)
            md = res.summary() + ("\n\n" + "\n".join(f"- {n}" for n in res.notes) if res.notes else "")
            return res.plot, md, res.suggested_lr, update(visible=True, value=f"Use {res.suggested_lr:.3g}")

        on(finder_btn.click, do_finder, [folder, trigger, finder_steps] + setting_inputs,
           [finder_plot, finder_md, finder_lr_state, finder_apply])

        def do_finder_apply(lr, batch, accum):
            if lr is None:
                return update(), update()
            return update(value=lr), [int(batch), int(accum)]

        on(finder_apply.click, do_finder_apply, [finder_lr_state, S["batch_size"], S["gradient_accumulation_steps"]],
           [S["learning_rate"], basis_state])

        # -------------------------------------------------------------- train handlers
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
                return (update(), update(), update(), seen, update(), update(), update(), update())
            img = logic.loss_image(snap)
            lora_updates = (update(), update(), update(), update())
            if snap and snap["kind"] == "train" and snap["status"] in ("done", "stopped") and snap.get("lora_path"):
                try:
                    names_now = logic.lora_names(host)
                except Exception:
                    names_now = []
                name = snap["name"]
                lora_updates = (update(choices=names_now, value=name),
                                update(value=f"a picture {logic.lora_tag(name, 1.0)}"),
                                update(value=logic.lora_tag(name)), update(value=name))
            return ((logic.job_status(snap), img if img is not None else update(), logic.job_diagnosis(snap), key)
                    + lora_updates)

        poll_outputs = [status_md, loss_img, diag_md, seen_state, lora_pick, prompt, tag_box, published_box]
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

        # -------------------------------------------------------------- test handlers
        def do_grid(prompt_v, neg, name, st, sd, ep, steps_v, cfg_v, size_v):
            try:
                img, msg = logic.run_grid(host, prompt_v, neg, name, st, sd, ep, steps_v, cfg_v, size_v)
            except Exception as exc:
                return None, _err(exc)
            return img, msg

        on(grid_btn.click, do_grid, [prompt, negative, lora_pick, strengths, seeds, by_epoch, gen_steps, gen_cfg,
                                     gen_size], [grid_img, grid_msg])

        def do_lora_refresh():
            try:
                host.refresh_loras()
                names_now = logic.lora_names(host)
            except Exception as exc:
                return update(), _err(exc)
            return update(choices=names_now), f"{len(names_now)} LoRA file(s) in {', '.join(host.lora_dirs())}."

        on(lora_refresh.click, do_lora_refresh, [], [lora_pick, grid_msg])

        def do_lora_pick(name):
            return logic.lora_tag(name or "")

        on(lora_pick.change, do_lora_pick, [lora_pick], [tag_box])
        if send_btn is not None:
            on(send_btn.click, None, [tag_box], [], js=SEND_TO_TXT2IMG_JS)

    return blocks
