"""The tab's Auto button and presets (no gradio): the auto pipeline as the tab's one job, the fields a user set
as overrides of its automatic choices, and presets as field values."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .. import presets
from ..config import DEFAULT_NAME
from ..family import FAMILIES
from . import jobs, logic

#: fields whose value, when it differs from the tab's default, overrides the auto choice of the same key
OVERRIDABLE = ("learning_rate", "lora_rank", "lora_alpha", "batch_size", "gradient_accumulation_steps", "epochs",
               "max_train_steps", "lr_scheduler", "lr_warmup_steps", "optimizer", "resolution", "train_text_encoder",
               "mixed_precision", "seed", "save_every_n_epochs")


def overrides_from_fields(host, values: Dict[str, Any]) -> Dict[str, Any]:
    """The fields the user changed from the tab's defaults: they win over the auto choices."""
    defaults = logic.default_settings(host)
    out: Dict[str, Any] = {}
    for k in OVERRIDABLE:
        v = values.get(k)
        if v is None or v == "" or v == defaults.get(k):
            continue
        if k == "max_train_steps" and not v:
            continue
        if k in ("lora_rank", "batch_size", "gradient_accumulation_steps", "epochs", "max_train_steps",
                 "lr_warmup_steps", "resolution", "seed", "save_every_n_epochs"):
            v = int(v)
        elif k in ("learning_rate", "lora_alpha"):
            v = float(v)
        out[k] = v
    return out


def start_auto(host, folder: str, values: Dict[str, Any], task: str, vram: Any, trigger: str = "",
               lr_find: bool = False) -> jobs.Job:
    """Claim the job slot and run the auto pipeline in a background thread; the job's `result` is the
    AutoResult (its `report` is the Markdown the tab shows)."""
    # lazy: the auto pipeline imports torch and the captioners; the tab itself builds without them (the WebUIs'
    # gradio venvs of the tab-build tests have no torch)
    from ..auto.pipeline import AutoOptions, run_auto

    if not (folder or "").strip():
        raise logic.UserError("set the dataset folder first (Dataset section).")
    real = logic.dataset_folder(host, folder)
    spec, _path = logic.resolve_base(host, values.get("base_model", ""))
    name = (values.get("output_name") or DEFAULT_NAME).strip()
    fam = values.get("model_type") if values.get("model_type") in FAMILIES else None
    opts = AutoOptions(folder=real, name=name, task=task or "style", base=spec, family=fam,
                       vram=float(vram) if vram else None, trigger=(trigger or "").strip() or None,
                       lr_find=bool(lr_find), overrides=overrides_from_fields(host, values), rename=True)
    job = jobs.claim("auto", name)

    def work(job: jobs.Job) -> None:
        job.touch(status="running", message="auto: checking the folder ...")
        res = run_auto(host, opts, callback=lambda ev: job.on_train_event(ev, host), stop_event=job.stop_event,
                       log=lambda s: job.touch(message=f"auto: {s}"))
        job.touch(result=res, lora_path=res.lora_path, files=res.published, name=res.name,
                  trigger=res.config.trigger_word or "", resolution=res.config.resolution)
        jobs.finish(job, "done", message=f"auto: published **{res.name}** (epoch {res.chosen_epoch}), use "
                                         f"`{res.tag}`; report: {res.report_path}")

    return jobs.run_in_thread(job, work)


def auto_report(snap: Optional[Dict[str, Any]]) -> Tuple[str, Optional[str]]:
    """(Markdown to show, grid image path) of the last auto job."""
    if not snap or snap.get("kind") != "auto":
        return "No auto run yet.", None
    res = snap.get("result")
    if res is None:
        head = snap.get("error") or snap.get("message") or snap.get("status")
        return f"**{snap.get('status')}**: {head}", None
    return res.report, res.grid_path


# ----------------------------------------------------------------------------- presets
def preset_names(host) -> List[str]:
    return presets.list_presets(presets.default_folder(host))


def save_preset(host, name: str, values: Dict[str, Any], overwrite: bool = False) -> str:
    keep = {k: v for k, v in values.items() if k in OVERRIDABLE or k == "model_type"}
    if not keep.get("max_train_steps"):
        keep.pop("max_train_steps", None)
    return presets.save_preset(presets.default_folder(host), name, logic_types(keep), overwrite=overwrite)


def logic_types(values: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(values)
    for k, v in values.items():
        if isinstance(v, float) and v.is_integer() and k not in ("learning_rate", "lora_alpha"):
            out[k] = int(v)
    return out


def load_preset(host, name: str) -> Dict[str, Any]:
    return presets.load_preset(presets.default_folder(host), name)


