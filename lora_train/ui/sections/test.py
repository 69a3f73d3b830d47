"""Test: A/B grids of a LoRA (strength x seed or x epoch) through the host, the tag, Send to txt2img.

`layout(c)` builds the section's components inside its `gr.Tab` and keeps them on the tab's namespace `c`;
`wire(c, blocks)` connects its events once every section exists (other sections' components are read from `c`).
No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation of a handler.
"""

import gradio as gr

from .. import logic
from ..compat import make, on, update
from .common import SEND_TO_TXT2IMG_JS, err as _err, has_txt2img, keep


def layout(c) -> None:
    (host, defaults) = \
        (c.host, c.defaults)
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
    keep(c, {"by_epoch": by_epoch, "gen_cfg": gen_cfg, "gen_size": gen_size, "gen_steps": gen_steps, "grid_btn": grid_btn, "grid_img": grid_img, "grid_msg": grid_msg, "lora_pick": lora_pick, "lora_refresh": lora_refresh, "negative": negative, "prompt": prompt, "seeds": seeds, "send_btn": send_btn, "strengths": strengths, "tag_box": tag_box})


def wire(c, blocks) -> None:
    (host, by_epoch, gen_cfg, gen_size, gen_steps, grid_btn, grid_img, grid_msg, lora_pick, lora_refresh, negative, prompt, seeds, send_btn, strengths, tag_box) = \
        (c.host, c.by_epoch, c.gen_cfg, c.gen_size, c.gen_steps, c.grid_btn, c.grid_img, c.grid_msg, c.lora_pick, c.lora_refresh, c.negative, c.prompt, c.seeds, c.send_btn, c.strengths, c.tag_box)
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
