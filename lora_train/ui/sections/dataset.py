"""Dataset: the folder, its images and captions (editor, auto-caption, tag table).

`layout(c)` builds the section's components inside its `gr.Tab` and keeps them on the tab's namespace `c`;
`wire(c, blocks)` connects its events once every section exists (other sections' components are read from `c`).
No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation of a handler.
"""
import os

import gradio as gr

from .. import compat, jobs, logic
from ..compat import make, on, update
from .common import err as _err, keep


def layout(c) -> None:
    backends = c.backends
    with gr.Row():
        folder = make(gr.Textbox, label="Dataset folder (images + same-name .txt captions)",
                      placeholder="/path/to/images", elem_id="lora_train_folder", scale=4)
        load_btn = make(gr.Button, "Load", elem_id="lora_train_load", scale=1)
    ds_status = make(gr.Markdown, "Type the folder of your training images and press Load.",
                     elem_id="lora_train_ds_status")
    gallery = make(gr.Gallery, label="Images (click one to edit its caption)", columns=6,
                   height="auto" if compat.MAJOR >= 4 else 520,  # every row of thumbnails, not a cut second row
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
            model_path = make(gr.Textbox, label="Model folder or cached repo id (transformers / vision-language / WD14; "
                                                "empty = the default if cached)",
                              elem_id="lora_train_caption_model")
            mode = make(gr.Dropdown, choices=["skip", "overwrite", "append"], value="skip",
                        label="Images that have a caption", elem_id="lora_train_caption_mode")
            style = make(gr.Dropdown, choices=list(logic.CAPTION_STYLES), value="auto",
                         label="Style (vision-language model; auto: the loaded model's family)",
                         elem_id="lora_train_caption_style")
        found = logic.caption_models(c.host)
        found_models = make(gr.Dropdown, choices=found, value=None, label=f"Captioning models found here "
                            f"({len(found)}; picking one fills the model folder)", elem_id="lora_train_caption_found")
        with gr.Row():
            preview_btn = make(gr.Button, "Preview on 3 images", elem_id="lora_train_caption_preview")
            caption_btn = make(gr.Button, "Caption the folder", elem_id="lora_train_autocaption")
        autocap_msg = make(gr.Markdown, "Nothing is downloaded: model captioners need their files on "
                                        "this machine; the template captioner needs nothing.")
    tags_md = make(gr.Markdown, "", elem_id="lora_train_tags")
    keep(c, {"autocap_msg": autocap_msg, "backend": backend, "caption_box": caption_box, "caption_btn": caption_btn, "caption_msg": caption_msg, "ds_status": ds_status, "folder": folder, "gallery": gallery, "image_pick": image_pick, "load_btn": load_btn, "mode": mode, "model_path": model_path, "save_cap_btn": save_cap_btn, "tags_md": tags_md, "trigger": trigger, "style": style, "preview_btn": preview_btn, "found_models": found_models})


def wire(c, blocks) -> None:
    (host, backends, folder_state, rows_state, autocap_msg, backend, caption_box, caption_btn, caption_msg, ds_status, folder, gallery, image_pick, load_btn, mode, model_path, save_cap_btn, tags_md, trigger) = \
        (c.host, c.backends, c.folder_state, c.rows_state, c.autocap_msg, c.backend, c.caption_box, c.caption_btn, c.caption_msg, c.ds_status, c.folder, c.gallery, c.image_pick, c.load_btn, c.mode, c.model_path, c.save_cap_btn, c.tags_md, c.trigger)
    style, preview_btn, found_models = c.style, c.preview_btn, c.found_models
    on(found_models.change, lambda v: v or update(), [found_models], [model_path])
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

    def do_autocaption(path, label, model, mode_v, trig, pick, style_v="auto", preview=0):
        if not path:
            return (update(),) * 7 + ("**Cannot do that:** load a dataset folder first.",)
        try:
            job = jobs.claim("caption")
            msg = jobs.run_here(job, lambda j: logic.auto_caption(
                host, path, backends.get(label, "template"), model, mode_v, trig,
                should_stop=j.stop_event.is_set, style=style_v, preview=preview))
            return show_folder(path, pick) + (msg,)
        except Exception as exc:
            return (update(),) * 7 + (_err(exc),)

    on(caption_btn.click, do_autocaption, [folder_state, backend, model_path, mode, trigger, image_pick, style],
       ds_outputs + [autocap_msg])
    on(preview_btn.click, lambda *a: do_autocaption(*a, preview=3),
       [folder_state, backend, model_path, mode, trigger, image_pick, style], ds_outputs + [autocap_msg])
