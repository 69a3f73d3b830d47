"""What the tab's buttons do, without gradio: plain values in, plain values out (tested on their own).

Everything host-specific goes through the `Host` methods (check_path, lora_dirs/output_dir, refresh_loras,
loaded_checkpoint/checkpoints, base_model, memory_freed, generate, interrupted, progress). The core modules
(torch, diffusers) are imported inside the functions, so building the tab needs only gradio.
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..family import FAMILIES, family_of
from ..names import check_name, is_epoch_file
from ..config import DEFAULT_NAME, PRECISIONS, ConfigError, TrainConfig  # noqa: F401  (PRECISIONS: the tab's choices)
from . import advanced, jobs

# ----------------------------------------------------------------------------- settings fields
#: the Settings fields of the tab, in the order the handlers receive them: (key, default)
SETTING_KEYS = ["base_model", "model_type", "output_name", "learning_rate", "lora_rank", "lora_alpha", "batch_size",
                "gradient_accumulation_steps", "epochs", "max_train_steps", "lr_scheduler", "lr_warmup_steps",
                "optimizer", "resolution", "train_text_encoder", "mixed_precision", "seed", "save_every_n_epochs"]
#: the network type fields (issue 17), after the others
NETWORK_KEYS = ["network_type", "conv_rank", "conv_alpha", "factor", "full_matrix", "dropout", "rank_dropout",
                "module_dropout", "loraplus_lr_ratio"]
SETTING_KEYS += NETWORK_KEYS
SETTING_KEYS += advanced.TAB_KEYS  # Advanced (kohya options) and the loaded kohya config (ui/advanced.py)
MODEL_TYPES = ("auto",) + FAMILIES
TASKS = ("style", "character", "face", "object", "concept", "other")
#: suggestion keys the tab has a field for
SUGGEST_FIELDS = ("learning_rate", "lora_rank", "lora_alpha", "batch_size", "gradient_accumulation_steps", "epochs",
                  "lr_scheduler", "lr_warmup_steps", "resolution", "train_text_encoder", "mixed_precision",
                  "save_every_n_epochs", "clip_skip", "shuffle_caption", "keep_tokens")
#: the tab's VRAM field, as the advisor's note names it
VRAM_FIELD = "the 'VRAM GB for the advice' field (Settings)"


class UserError(ValueError):
    """Bad input in the tab; the message says what to do."""


def is_tiny(spec: Optional[str]) -> bool:
    return str(spec or "").strip().lower().startswith("tiny")


def default_base(host) -> Tuple[List[str], str]:
    """(choices, default) of the base-model field: the host's checkpoints, the loaded one first/selected."""
    try:
        ckpts = dict(host.checkpoints() or {})
    except Exception:
        ckpts = {}
    try:
        loaded = host.loaded_checkpoint()
    except Exception:
        loaded = None
    choices = list(ckpts)
    default = ""
    if loaded:
        default = loaded[0]
        if default not in choices:
            choices.insert(0, default)
    elif choices:
        default = choices[0]
    return choices, default


def resolve_base(host, value: str) -> Tuple[Optional[str], str]:
    """(spec for host.base_model, the path/name written into the config) of the base-model field.

    The loaded checkpoint gives spec None (the host uses its in-memory weights where it can)."""
    value = (value or "").strip()
    loaded = None
    try:
        loaded = host.loaded_checkpoint()
    except Exception:
        pass
    if not value:
        if not loaded:
            raise UserError("no base model: the host has no checkpoint loaded; choose one (or type 'tiny' for "
                            "the demo model).")
        return None, loaded[1]
    found = host.find_checkpoint(value)  # the host's own names: title with or without hash, file name, path
    if found is not None:
        path, is_loaded = found
        return (None if is_loaded else path), path
    if is_tiny(value):
        return value, value
    path = host.check_path(value, "base model", must_exist=True, folder=False)
    return path, path


def guess_model_type(model_type: str, base_value: str) -> str:
    """The family chosen in the tab, else the base model's (lora_train.family: its folder, file header or name)."""
    if model_type in FAMILIES:
        return model_type
    return family_of(base_value)[0]


def default_settings(host) -> Dict[str, Any]:
    _choices, base = default_base(host)
    tiny = is_tiny(_loaded_path(host) or base)
    cfg = TrainConfig().validate()
    return {"base_model": base, "model_type": "auto", "output_name": DEFAULT_NAME, "learning_rate": cfg.learning_rate,
            "lora_rank": cfg.lora_rank, "lora_alpha": float(cfg.lora_rank), "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "epochs": cfg.epochs,
            "max_train_steps": 0, "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps,
            "optimizer": cfg.optimizer, "resolution": 64 if tiny else 512, "train_text_encoder": False,
            "mixed_precision": cfg.mixed_precision, "seed": cfg.seed, "save_every_n_epochs": cfg.save_every_n_epochs,
            **network_settings(cfg), **advanced.default_values()}


def network_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """The network fields' values of a config (0 in the tab means "empty": conv_alpha = conv_rank, no LoRA+)."""
    return {"network_type": cfg.network_type, "conv_rank": cfg.conv_rank, "conv_alpha": float(cfg.conv_alpha or 0),
            "factor": cfg.factor, "full_matrix": cfg.full_matrix, "dropout": cfg.dropout,
            "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
            "loraplus_lr_ratio": float(cfg.loraplus_lr_ratio or 0)}


def network_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """TrainConfig keys from the tab's network fields (missing fields: the defaults)."""
    d = TrainConfig().validate()
    get = lambda k, default: default if values.get(k) in (None, "") else values.get(k)  # noqa: E731

    def num(k: str, name: str) -> float:
        v = get(k, 0)
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise UserError(f"{name} '{v}' is not a number.") from None
        if not math.isfinite(f) or f < 0:
            raise UserError(f"{name} {v} is not valid: use a number >= 0 (0: off).")
        return f

    return {"network_type": get("network_type", d.network_type), "conv_rank": _int(get("conv_rank", 0), "conv rank", 0),
            "conv_alpha": num("conv_alpha", "conv alpha") or None, "factor": _int(get("factor", d.factor), "LoKr factor", -1),
            "full_matrix": bool(get("full_matrix", False)), "dropout": num("dropout", "dropout"),
            "rank_dropout": num("rank_dropout", "rank dropout"), "module_dropout": num("module_dropout", "module dropout"),
            "loraplus_lr_ratio": num("loraplus_lr_ratio", "LoRA+ ratio") or None}


def _checkpoint_path(host, value: str) -> str:
    """The file a base-model field names as the host shows it (a title with a hash, a name), else the value."""
    try:
        found = host.find_checkpoint(value) if (value or "").strip() else None
    except Exception:
        found = None
    return found[0] if found else (value or "")


def _loaded_path(host) -> str:
    try:
        loaded = host.loaded_checkpoint()
    except Exception:
        return ""
    return loaded[1] if loaded else ""


def _int(v: Any, name: str, lo: int = 0) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{name} '{v}' is not a number: type a whole number.") from None
    if not math.isfinite(f) or f != int(f) or f < lo:
        raise UserError(f"{name} {v} is not valid: use a whole number >= {lo}.")
    return int(f)


def _float(v: Any, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{name} '{v}' is not a number.") from None
    if not math.isfinite(f) or f <= 0:
        raise UserError(f"{name} {v} is not valid: use a positive number, e.g. 1e-4.")
    return f


def remember_setting(key: str, value: Any) -> None:
    """A Settings field's value as the user left it: a reloaded or second page shows it again (this process
    only; the WebUI's ui-config.json holds the defaults)."""
    jobs.REMEMBERED.setdefault("settings", {})[key] = value


def remembered_settings() -> Dict[str, Any]:
    return dict(jobs.REMEMBERED.get("settings", {}))


# ----------------------------------------------------------------------------- dataset
def dataset_folder(host, folder: str) -> str:
    return host.check_path(folder, "dataset folder", must_exist=True, folder=True)


def caption_rows(folder: str) -> List[Tuple[str, str, str]]:
    """[(image path, caption, where it lives)] of a dataset folder, in the loader's order."""
    from ..captions import CaptionTable

    return [(r.path, r.caption, r.source) for r in CaptionTable(folder).rows()]


def thumbnails(rows: Sequence[Tuple[str, str, str]], size: int = 192) -> List[Tuple[Any, str]]:
    from ..captions import thumbnail
    from PIL import Image

    out = []
    for path, cap, _src in rows:
        im = thumbnail(path, size)
        if im is None:
            im = Image.new("RGB", (size, size), (128, 128, 128))
            cap = f"(unreadable) {cap}"
        out.append((im, f"{os.path.basename(path)}: {cap}" if cap else f"{os.path.basename(path)}: (no caption)"))
    return out


def tag_table(folder: str, top: int = 30) -> str:
    """Markdown table of the most frequent caption tags per folder."""
    from ..captions import CaptionTable

    freq = CaptionTable(folder).tag_frequency()
    if not freq:
        return "No captions yet: write some, or use auto-caption."
    lines = []
    for label, tags in freq.items():
        items = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"**{label}**: {len(items)} distinct tag(s)\n")
        lines.append("| count | tag |\n|---:|---|")
        for tag, n in items[:top]:
            safe = tag.replace("|", "\\|")
            lines.append(f"| {n} | {safe} |")
        if len(items) > top:
            lines.append(f"| ... | {len(items) - top} more |")
        lines.append("")
    return "\n".join(lines)


def save_caption(folder: str, path: str, text: str) -> str:
    """Write one caption (atomically, into its .txt sidecar or the folder's metadata file)."""
    from ..captions import CaptionConflict, CaptionTable

    table = CaptionTable(folder)
    table.edit(path, text)
    try:
        written = table.save()
    except CaptionConflict as exc:
        raise UserError(f"{exc} Reload the dataset and edit again.") from None
    name = os.path.basename(path)
    return f"saved the caption of {name} ({', '.join(os.path.basename(w) for w in written)})" if written else \
        f"the caption of {name} is unchanged"


def caption_backends(host) -> Dict[str, str]:
    """{label: backend key} the auto-caption dropdown offers (host interrogators first, when the host has some)."""
    out = {}
    for name in host_captioners(host):
        out[f"host: {name}"] = f"host:{name}"
    out["template (trigger, folder, file name)"] = "template"
    out["transformers image-to-text model (BLIP / GIT / Florence-2 folder)"] = "transformers"
    out["vision-language model (Qwen2.5-VL / Qwen3-VL / JoyCaption / LLaVA folder)"] = "vlm"
    out["WD14 tagger (ONNX, needs onnxruntime)"] = "wd14"
    return out


def host_captioners(host) -> Dict[str, Any]:
    """The host's own interrogators, if it offers any: `host.captioners() -> {name: fn(PIL) -> caption}`."""
    try:
        return dict(host.captioners() or {})
    except Exception:
        return {}


def caption_models(host) -> List[str]:
    """Local captioning model folders the tab offers: the host's caption model folders' subfolders with a
    config.json (transformers / vision-language) or a model.onnx (WD14), and the Hugging Face cache's repos whose
    name says VL / LLaVA / JoyCaption / Florence / BLIP (nothing is downloaded)."""
    from ..io_utils import hf_cache_dir

    out: List[str] = []
    try:
        dirs = list(host.caption_model_dirs() or [])
    except Exception:  # noqa: BLE001 - a host without the method
        dirs = []
    for d in dirs:
        for n in sorted(os.listdir(d)):
            p = os.path.join(d, n)
            if os.path.isfile(os.path.join(p, "config.json")) or os.path.isfile(os.path.join(p, "model.onnx")):
                out.append(p)
    hub = hf_cache_dir()
    if os.path.isdir(hub):
        for n in sorted(os.listdir(hub)):
            if n.startswith("models--") and re.search(r"(vl|llava|joycaption|florence|blip)", n, re.I):
                out.append(n[len("models--"):].replace("--", "/"))
    return out


#: the tab's caption-style choices (captions/styles.json); "auto" is the loaded model's family's style
CAPTION_STYLES = ("auto", "tags", "short", "detailed", "edit")


def caption_style(host, style: str) -> str:
    """The style to ask a VLM for: the one chosen, or the family of the host's model (styles.for_family)."""
    from ..captions import styles

    if style and style != "auto":
        return style
    return styles.for_family(_loaded_family(host))


def _loaded_family(host):
    """The family of the host's loaded model, None when there is none or it cannot be told."""
    path = _loaded_path(host)
    if not path:
        return None
    try:
        return family_of(path)[0]
    except Exception:  # noqa: BLE001 - no family: the checks and styles use their defaults
        return None


def auto_caption(host, folder: str, backend: str, model: str, mode: str, trigger: str,
                 should_stop=None, progress=None, style: str = "auto", preview: int = 0, concept: str = "") -> str:
    """Caption the folder (or, with `preview` N, the first N images without writing: what the captioner would
    write); then the caption checks of the folder (captions/checks.py)."""
    from ..captions import CaptionerError, caption_folder, make_captioner

    if backend.startswith("host:"):
        name = backend.split(":", 1)[1]
        fns = host_captioners(host)
        if name not in fns:
            raise UserError(f"the host has no interrogator '{name}' (it has: {', '.join(fns) or 'none'}).")
        captioner = make_captioner("host", fn=fns[name], name=name)
    else:
        opts = {}
        if backend == "template":
            opts["trigger"] = trigger or ""
        elif (model or "").strip():
            opts["model"] = model.strip()
        if backend == "vlm":
            opts["style"] = caption_style(host, style)
        try:
            captioner = make_captioner(backend, **opts)
        except CaptionerError as exc:
            raise UserError(str(exc)) from None
    with captioner:
        report = caption_folder(folder, captioner, mode="overwrite" if preview else mode, trigger=(trigger or None),
                                should_stop=should_stop, progress=progress, dry_run=bool(preview),
                                limit=int(preview) if preview else None)
    if preview:
        lines = [f"- `{os.path.basename(p)}`: {report.captions[p]}" for p in report.written]
        return "**Preview** (nothing written; Caption the folder writes them):\n" + "\n".join(lines)
    msg = report.summary()
    if report.failed:
        msg += ". Failed: " + "; ".join(report.failure_lines())
    if report.warnings:
        msg += "; " + "; ".join(report.warnings)
    return msg + caption_checks(host, folder, trigger, concept)


def caption_checks(host, folder: str, trigger: str = "", concept: str = "") -> str:
    """The caption checks of the folder for the host's model family, as Markdown lines ("" when none)."""
    from ..captions.checks import check_captions
    from ..captions.table import list_images

    entries = [(e.path, (e.row.caption or "") if e.row else "") for e in list_images(folder)]
    found = check_captions(entries, trigger or "", _loaded_family(host), concept)
    return "".join(f"\n- {f.severity}: {f}" for f in found)


# ----------------------------------------------------------------------------- settings helpers
def count_images(folder: str, resolution: int, trigger: str) -> Tuple[int, int]:
    """(distinct images, samples per epoch with kohya repeats) as the trainer will see them."""
    from ..data.dataset import load_dataset

    ds = load_dataset(folder, resolution, trigger or "")
    return ds.image_count, len(ds)


def suggest_settings(host, folder: str, task: str, model_type: str, base_value: str, vram_gb: Any,
                     accumulation: Any, resolution: Any, trigger: str = "", network_type: str = "lora"
                     ) -> Tuple[Dict[str, Any], str]:
    """Advisor values for the tab's fields and a markdown table of the reasons (for the chosen network type)."""
    from ..tuning.advisor import suggest

    if not (folder or "").strip():
        raise UserError("set the dataset folder first (Dataset section): the advice depends on how many images "
                        "there are.")
    real = dataset_folder(host, folder)
    kind = guess_model_type(model_type, _checkpoint_path(host, base_value) or _loaded_path(host))
    tiny = is_tiny(base_value) or (not base_value and is_tiny(_loaded_path(host)))
    res = 64 if tiny else None
    images, samples = count_images(real, res or 512, trigger)
    vram = None
    if vram_gb not in (None, "", 0, 0.0):
        vram = _float(vram_gb, "VRAM (GB)")
    accum = _int(accumulation or 1, "gradient accumulation", 1)
    s = suggest(images, task=task, base=kind, vram_gb=vram, gradient_accumulation_steps=accum,
                resolution=res, samples_per_epoch=samples, vram_field=VRAM_FIELD,
                network_type=network_type or "lora", model_name=os.path.basename(str(base_value or _loaded_path(host) or "")))
    values = {k: s.value(k) for k in SUGGEST_FIELDS if k in s.settings}
    if tiny:
        values["resolution"] = 64
    rows = ["| setting | value | why |", "|---|---|---|"]
    for key, value, reason in s.rows():
        v = f"{value:.3g}" if isinstance(value, float) else str(value)
        if tiny and key == "resolution":
            v, reason = "64", "the tiny demo model is built for 64 px"
        rows.append(f"| {key} | {v} | {reason.replace('|', '/')} |")
    head = (f"**{images} image(s)**, {samples} sample(s) per epoch, {kind}, task {task}: "
            f"{s.total_steps} steps in all.\n\n")
    notes = "\n".join(f"- {n}" for n in s.notes)
    return values, head + "\n".join(rows) + ("\n\n" + notes if notes else "")


def rescale_offer(lr: Any, basis: Sequence[int], batch: Any, accum: Any) -> Tuple[Optional[float], str]:
    """(new lr or None, text) when batch/accumulation moved away from those the lr was set for."""
    from ..tuning.advisor import batch_change_offer

    try:
        lr_v = _float(lr, "learning rate")
        b, a = _int(batch, "batch size", 1), _int(accum, "gradient accumulation", 1)
        ob, oa = int(basis[0]), int(basis[1])
    except (UserError, TypeError, ValueError, IndexError):
        return None, ""
    offer = batch_change_offer(lr_v, (ob, oa), (b, a))
    if not offer:
        return None, ""
    _scaling, new_lr, why = offer[0]
    return new_lr, f"The learning rate {lr_v:.3g} was set for batch {ob} x accumulation {oa}. Suggested: **{new_lr:.3g}** ({why})."


def build_config(host, values: Dict[str, Any], folder: str, trigger: str, name_override: Optional[str] = None
                 ) -> Tuple[TrainConfig, Optional[str]]:
    """(TrainConfig with a new free output name in the host's LoRA folder, base-model spec for host.base_model)."""
    if not (folder or "").strip():
        raise UserError("set the dataset folder first (Dataset section).")
    real = dataset_folder(host, folder)
    spec, base_path = resolve_base(host, values.get("base_model", ""))
    out_dir = host.output_dir()
    try:
        stem = check_name(values.get("output_name") or DEFAULT_NAME)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    max_steps = _int(values.get("max_train_steps") or 0, "max steps", 0)
    d0 = TrainConfig().validate()  # an empty field takes the config's default
    d = dict(train_data_dir=real, base_model=base_path, output_dir=out_dir, output_name=name_override or stem,
             trigger_word=(trigger or "").strip(), learning_rate=_float(values.get("learning_rate"), "learning rate"),
             lora_rank=_int(values.get("lora_rank"), "rank", 1),
             lora_alpha=float(values.get("lora_alpha") or _int(values.get("lora_rank"), "rank", 1)),
             batch_size=_int(values.get("batch_size"), "batch size", 1),
             gradient_accumulation_steps=_int(values.get("gradient_accumulation_steps"), "gradient accumulation", 1),
             epochs=_int(values.get("epochs"), "epochs", 1), max_train_steps=max_steps or None,
             lr_scheduler=values.get("lr_scheduler") or "cosine",
             lr_warmup_steps=_int(d0.lr_warmup_steps if values.get("lr_warmup_steps") in (None, "") else
                                  values.get("lr_warmup_steps"), "warmup steps", 0),
             optimizer=values.get("optimizer") or "AdamW", resolution=_int(values.get("resolution"), "resolution", 8),
             train_text_encoder=bool(values.get("train_text_encoder")),
             mixed_precision=values.get("mixed_precision") or d0.mixed_precision,
             seed=_int(d0.seed if values.get("seed") in (None, "") else values.get("seed"), "seed", 0),
             save_every_n_epochs=_int(d0.save_every_n_epochs if values.get("save_every_n_epochs") in (None, "") else
                                      values.get("save_every_n_epochs"), "save every N epochs", 0))
    d.update(network_config(values))
    try:
        d = advanced.with_kohya_file(values, d)  # the kohya file, then the fields
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        cfg = TrainConfig.from_dict(d)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if name_override is None:
        from ..run import name_run

        cfg = name_run(host, cfg)  # a free name (hosts cache LoRAs by name) and its run folder
    return cfg, spec


# ----------------------------------------------------------------------------- jobs
def start_training(host, cfg: TrainConfig, spec: Optional[str]) -> jobs.Job:
    """Claim the job slot and run the one train-and-publish path (`run.train_for_host`) in a background thread.
    `cfg` comes from `build_config` (already named)."""
    job = jobs.claim("train", cfg.output_name)
    job.touch(trigger=cfg.trigger_word or "", resolution=cfg.resolution)

    def work(job: jobs.Job) -> None:
        from ..run import train_for_host

        job.touch(message=f"loading the base model for '{cfg.output_name}' ...")
        run = train_for_host(host, cfg, spec, rename=False, stop_event=job.stop_event,
                             callback=lambda ev: job.on_train_event(ev, host),
                             on_trainer=lambda t: job.touch(message="training ...", trainer=t))
        res = run.result
        job.warnings.extend(run.warnings)
        status = "failed" if res.nan_stopped else ("stopped" if res.stopped else "done")
        where = run.lora_path or "(no file: no step was finished)"
        msg = (f"{'stopped' if res.stopped else 'finished'} after {res.steps} step(s), {res.epochs_done} epoch(s) "
               f"in {jobs.fmt_seconds(time.time() - job.started)} (training {jobs.fmt_seconds(res.seconds)}, the "
               f"rest loading, saving and publishing): {where}")
        if res.message:
            msg += f" - {res.message}"
        msg += f" (config, loss log and plot in {run.run_dir})"
        job.touch(result=res, lora_path=run.lora_path, files=run.published, trainer=None)
        jobs.finish(job, status, message=msg, error=res.message if res.nan_stopped else "")

    return jobs.run_in_thread(job, work)


def run_lr_finder(host, cfg: TrainConfig, spec: Optional[str], steps: int):
    """LR range test on the dataset and base model (in the calling thread, holding the job slot)."""
    from ..tuning.lr_finder import lr_range_test

    steps = _int(steps, "LR finder steps (about 100 is usual)", 2)
    job = jobs.claim("lr_find")

    def work(job: jobs.Job):
        job.touch(status="running", message="LR finder running ...")
        with host.memory_freed():
            model = host.base_model(spec)

            def cb(ev):
                job.touch(step=int(ev.get("step", 0)), total_steps=int(ev.get("total", steps)))
                host.progress(int(ev.get("step", 0)), steps, "LR finder")
                if host.interrupted():
                    job.stop()

            res = lr_range_test(cfg, model=model, steps=steps, callback=cb, stop_event=job.stop_event)
        jobs.finish(job, "done", message=res.summary())
        return res

    return jobs.run_here(job, work)


def lora_names(host) -> List[str]:
    """LoRA names in the host's folders (epoch files `name-0000NN` left out), newest first."""
    from ..prompt import LoraLibrary

    files = LoraLibrary(host.lora_dirs()).files()
    names = [n for n in files if not is_epoch_file(n)]
    names.sort(key=lambda n: (-os.path.getmtime(files[n]) if os.path.exists(files[n]) else 0, n))
    return names


def lora_tag(name: str, weight: float = 0.8) -> str:
    return f"<lora:{name}:{weight:g}>" if name else ""


def parse_floats(text: str, what: str) -> List[float]:
    from ..prompt import parse_floats as parse

    try:
        return parse(text, what)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def parse_ints(text: str, what: str) -> List[int]:
    from ..prompt import parse_ints as parse

    try:
        return parse(text, what)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run_grid(host, prompt: str, negative: str, lora_name: str, strengths: str, seeds: str, by_epoch: bool,
             steps: Any, cfg_scale: Any, size: Any):
    """A strength x seed (or x epoch file) grid generated by the host; the base column comes first."""
    from ..prompt import LoraLibrary, PromptError, parse_prompt
    from ..sampler import GenParams, build_grid, epoch_axis

    try:
        _text, tags = parse_prompt(prompt or "")
    except PromptError as exc:
        raise UserError(str(exc)) from None
    name = (lora_name or "").strip() or (tags[0].name if tags else "")
    if not name:
        raise UserError("say which LoRA to test: choose one, or put <lora:NAME:0.8> in the prompt.")
    lib = LoraLibrary(host.lora_dirs())
    try:
        lib.resolve(name)
    except PromptError as exc:
        raise UserError(str(exc)) from None
    if not any(t.name == name for t in tags):
        prompt = f"{prompt} {lora_tag(name, 1.0)}".strip()
    st = parse_floats(strengths, "strengths")
    sd = parse_ints(seeds, "seeds")
    size_v = _int(size, "size", 8)
    base = GenParams(prompt=prompt, negative_prompt=negative or "", seed=sd[0], steps=_int(steps, "steps", 1),
                     cfg_scale=float(cfg_scale or 7.0), width=size_v, height=size_v)
    epochs = epoch_axis(lib, name) if by_epoch else None
    job = jobs.claim("grid")

    def work(job: jobs.Job):
        job.touch(status="running", message=f"test grid for {name} ...")

        def prog(done, total):
            job.touch(step=done, total_steps=total)
            host.progress(done, total, f"test grid {done}/{total}")

        res = build_grid(host.generate, base, name, st, sd, epochs=epochs, progress=prog)
        jobs.finish(job, "done", message=f"grid of {res.rows} row(s) x {res.cols} column(s)")
        return res

    res = jobs.run_here(job, work)
    return res.image, (f"{name}: {res.rows} row(s) x {res.cols} column(s) ({', '.join(res.col_labels)}), rows: "
                       f"{', '.join(res.row_labels)}")


# ----------------------------------------------------------------------------- job view
def job_status(snap: Optional[Dict[str, Any]]) -> str:
    if not snap:
        return "No job has run yet."
    kind = {"train": "Training", "auto": "Auto LoRA", "lr_find": "LR finder", "grid": "Test grid",
            "caption": "Auto-caption"}.get(snap["kind"], snap["kind"])
    name = f" **{snap['name']}**" if snap.get("name") else ""
    parts = [f"{kind}{name}: **{snap['status']}**"]
    if snap.get("total_steps"):
        parts.append(f"step {snap['step']}/{snap['total_steps']}")
    if snap["kind"] in jobs.TRAINING_KINDS and snap.get("total_epochs"):
        parts.append(f"epoch {snap['epoch']}/{snap['total_epochs']}")
    if snap["status"] in jobs.RUNNING and snap.get("eta") is not None and snap["step"] < snap.get("total_steps", 0):
        parts.append(f"ETA {jobs.fmt_seconds(snap['eta'])}")
    if snap.get("its"):
        parts.append(f"{snap['its']:.2f} it/s")
    if snap.get("losses"):
        parts.append(f"loss {snap['losses'][-1]:.4g}")
    if snap["kind"] in jobs.TRAINING_KINDS:
        parts.append(f"VRAM {snap['vram']}" if snap.get("vram") else
                     ("VRAM: no CUDA device" + (f" (on {snap['device']})" if snap.get("device") else "")))
    text = " | ".join(parts)
    if snap.get("message"):
        text += f"\n\n{snap['message']}"
    if snap.get("error"):
        text += f"\n\n**Error:** {snap['error']}"
    return text


def job_diagnosis(snap: Optional[Dict[str, Any]]) -> str:
    if not snap or snap["kind"] not in jobs.TRAINING_KINDS:
        return ""
    lines = [f"- {f}" for f in snap.get("findings") or []]
    lines += [f"- warning: {w}" for w in snap.get("warnings") or []]
    if snap["status"] == "failed":
        return "Diagnosis: the run failed (the error is above)." + ("\n" + "\n".join(lines) if lines else "")
    if not lines:
        return "Diagnosis: nothing to report yet." if snap["status"] in jobs.RUNNING else "Diagnosis: no problem found."
    return "Diagnosis:\n" + "\n".join(lines)


def loss_points(snap: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The loss curve of a training job as rows {step, loss, series} (training, smoothed, validation): what the
    tab's line plot shows."""
    if not snap or snap["kind"] not in jobs.TRAINING_KINDS or not snap.get("losses"):
        return []
    from ..plots import ema

    rows = [{"step": int(x), "loss": float(y), "series": "training"} for x, y in zip(snap["steps"], snap["losses"])
            if math.isfinite(y)]
    if len(snap["losses"]) >= 10:
        rows += [{"step": int(x), "loss": float(y), "series": "smoothed"}
                 for x, y in zip(snap["steps"], ema(snap["losses"])) if math.isfinite(y)]
    rows += [{"step": int(x), "loss": float(y), "series": "validation"}
             for x, y in zip(snap.get("val_steps") or (), snap.get("val_losses") or ()) if math.isfinite(y)]
    return rows


def loss_image(snap: Optional[Dict[str, Any]]):
    if not snap or snap["kind"] not in jobs.TRAINING_KINDS or not snap.get("losses"):
        return None
    from ..plots import loss_plot

    return loss_plot(snap["steps"], snap["losses"], title=f"training loss: {snap['name']}",
                     val_steps=snap.get("val_steps") or (), val_losses=snap.get("val_losses") or ())


def test_fields(snap: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """After a training job published a LoRA: the Test section's fields for it (name, a prompt with the run's
    trigger word and the LoRA tag, the tag, the grid size = the training resolution); None otherwise."""
    if not snap or snap["kind"] not in jobs.TRAINING_KINDS or snap["status"] not in ("done", "stopped") \
            or not snap.get("lora_path"):
        return None
    name, trigger = snap["name"], (snap.get("trigger") or "").strip()
    prompt = f"{trigger}, a picture {lora_tag(name, 1.0)}" if trigger else f"a picture {lora_tag(name, 1.0)}"
    return {"name": name, "prompt": prompt, "tag": lora_tag(name), "size": int(snap.get("resolution") or 0) or None}
