"""Settings: every training knob, Suggest (the advisor, with reasons), the rescale offer, the LR finder.

`layout(c)` builds the section's components inside its `gr.Tab` and keeps them on the tab's namespace `c`;
`wire(c, blocks)` connects its events once every section exists (other sections' components are read from `c`).
No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation of a handler.
"""

import gradio as gr

from ...config import NETWORK_TYPES, OPTIMIZERS, SCHEDULERS
from .. import logic
from ..compat import make, on, update
from . import advanced
from .common import err as _err, keep


def layout(c) -> None:
    (defaults, base_choices, S) = \
        (c.defaults, c.base_choices, c.S)
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
        S["mixed_precision"] = make(gr.Dropdown, choices=list(logic.PRECISIONS), value=defaults["mixed_precision"],
                                    label="Mixed precision (GPU)", elem_id="lora_train_precision")
        S["seed"] = make(gr.Number, value=defaults["seed"], precision=0, label="Seed",
                         elem_id="lora_train_seed")
        S["save_every_n_epochs"] = make(gr.Number, value=defaults["save_every_n_epochs"], precision=0,
                                        label="Save every N epochs (0: final only)",
                                        elem_id="lora_train_save_every")
    with make(gr.Accordion, "Network type: LoCon, LoHa, LoKr, DoRA, LoRA+", open=False):
        with gr.Row():
            S["network_type"] = make(gr.Dropdown, choices=list(NETWORK_TYPES), value=defaults["network_type"],
                                     label="Network type", elem_id="lora_train_network_type")
            S["conv_rank"] = make(gr.Number, value=defaults["conv_rank"], precision=0,
                                  label="Conv rank (ResNet 3x3; 0: off, LoCon: = rank)", elem_id="lora_train_conv_rank")
            S["conv_alpha"] = make(gr.Number, value=defaults["conv_alpha"], label="Conv alpha (0: = conv rank)",
                                   elem_id="lora_train_conv_alpha")
            S["loraplus_lr_ratio"] = make(gr.Number, value=defaults["loraplus_lr_ratio"],
                                          label="LoRA+ ratio (up/B lr x ratio; 0: off)", elem_id="lora_train_loraplus")
        with gr.Row():
            S["factor"] = make(gr.Number, value=defaults["factor"], precision=0, label="LoKr factor (-1: auto)",
                               elem_id="lora_train_lokr_factor")
            S["full_matrix"] = make(gr.Checkbox, value=defaults["full_matrix"], label="LoKr full matrix",
                                    elem_id="lora_train_lokr_full")
            S["dropout"] = make(gr.Number, value=defaults["dropout"], label="Dropout (lora, locon)",
                                elem_id="lora_train_dropout")
            S["rank_dropout"] = make(gr.Number, value=defaults["rank_dropout"], label="Rank dropout (loha, lokr, dora)",
                                     elem_id="lora_train_rank_dropout")
            S["module_dropout"] = make(gr.Number, value=defaults["module_dropout"],
                                       label="Module dropout (loha, lokr, dora)", elem_id="lora_train_module_dropout")
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
    advanced.layout(c)  # Advanced (kohya options), sections/advanced.py
    keep(c, {"finder_apply": finder_apply, "finder_btn": finder_btn, "finder_md": finder_md, "finder_plot": finder_plot, "finder_steps": finder_steps, "rescale_btn": rescale_btn, "rescale_md": rescale_md, "suggest_btn": suggest_btn, "suggest_md": suggest_md, "task": task, "vram": vram})


def wire(c, blocks) -> None:
    (host, basis_state, finder_lr_state, setting_inputs, values_of, S, folder, trigger, finder_apply, finder_btn, finder_md, finder_plot, finder_steps, rescale_btn, rescale_md, suggest_btn, suggest_md, task, vram) = \
        (c.host, c.basis_state, c.finder_lr_state, c.setting_inputs, c.values_of, c.S, c.folder, c.trigger, c.finder_apply, c.finder_btn, c.finder_md, c.finder_plot, c.finder_steps, c.rescale_btn, c.rescale_md, c.suggest_btn, c.suggest_md, c.task, c.vram)
    suggest_outputs = [S[k] for k in logic.SUGGEST_FIELDS] + [S["max_train_steps"], suggest_md, basis_state,
                                                             rescale_md, rescale_btn]

    def do_suggest(path, trig, task_v, vram_v, *vals):
        v = values_of(vals)
        try:
            values, md = logic.suggest_settings(host, path, task_v, v["model_type"], v["base_model"], vram_v,
                                                v["gradient_accumulation_steps"], v["resolution"], trig,
                                                v.get("network_type") or "lora")
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
    advanced.wire(c, blocks)
