"""Auto mode: one call from an image folder to a published LoRA with a report.

    check the folder (refuse before any work where training cannot work)
    -> caption the images that have none (host interrogator, else a local captioning model already on disk,
       else template + trigger)
    -> settings from the advisor (each with its reason; optionally an LR range test first)
    -> train with a held-out validation split and epoch files (the one path: run.train_for_host, into the run
       folder)
    -> choose the epoch by validation loss (auto/choose.py says how ties and noise are handled), name the runner-up
    -> publish the chosen epoch under NAME into the host's LoRA folder (every epoch also as NAME-00000E)
    -> A/B grid: base / chosen / last epoch at several strengths (host.generate: the host's own sampler)
    -> report.md in the run folder (auto/report.py)

Every automatic choice can be overridden: `overrides` holds TrainConfig keys (the same `--key value` flags and
fields as a normal run); a key given there wins and the report says "your choice".
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from ..captions import caption_folder, make_captioner
from ..config import TrainConfig
from ..data.folder import FolderError, scan_folder
from ..hosts.base import USED_NAMES, Host
from ..metrics import colour_distance
from ..family import family_of as model_family
from ..models.loading import TINY_SPECS
from ..names import EXT, check_name, epoch_file
from ..run import publish_to_host, train_for_host
from ..sampler import GenParams, build_grid
from ..tuning.advisor import TASKS, detect_vram_gb, suggest
from . import choose as choose_mod

MIN_IMAGES = 3           # at least 2 to train on and 1 held out to choose the epoch by
MIN_SIDE = 64            # pixels: smaller images carry too little to learn from
VAL_FRACTION = 0.15      # held out for the validation loss (at least one image)
DEFAULT_STRENGTHS = (0.5, 0.75, 1.0)
DEFAULT_SEEDS = (1, 2)


class AutoRefused(ValueError):
    """The folder cannot train; the message says why and what to do. Raised before anything is written."""


@dataclass
class Choice:
    """One automatic decision: what, the value, why, and whether the user set it."""

    step: str
    key: str
    value: Any
    reason: str
    user: bool = False


@dataclass
class AutoOptions:
    folder: str
    name: str
    task: str = "style"
    base: Optional[str] = None          # base model spec (None: the host's loaded model)
    family: Optional[str] = None        # sd1 | sd2 | sdxl (None: from the base model)
    vram: Optional[float] = None
    trigger: Optional[str] = None       # default: the name
    captioner: str = "auto"             # auto | template | host | transformers | vlm | wd14
    caption_model: str = ""             # vlm / transformers / wd14: a local model folder (auto + a VLM folder: vlm)
    lr_find: bool = False               # an LR range test before training (costs about 100 steps)
    tolerance: Optional[float] = None   # epoch choice tie tolerance; None = the noise sigma
    strengths: Sequence[float] = DEFAULT_STRENGTHS
    seeds: Sequence[int] = DEFAULT_SEEDS
    prompt: Optional[str] = None        # grid prompt (default: the trigger and the commonest caption)
    sample_steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    overrides: Dict[str, Any] = field(default_factory=dict)   # TrainConfig keys: the user's choices win
    rename: bool = True                 # take a free name (NAME_v2 ...) when NAME is taken; False: refuse


@dataclass
class AutoResult:
    name: str
    run_dir: str
    lora_path: str                      # the published chosen epoch, NAME.safetensors in the LoRA folder
    published: List[str]
    chosen_epoch: int
    runner_up: Optional[int]
    last_epoch: int
    epoch_choice: choose_mod.EpochChoice
    choices: List[Choice]
    config: TrainConfig
    grid_path: Optional[str]
    report_path: str
    report: str
    tag: str
    strength: float
    captions_written: List[str]
    captions_kept: List[str]
    findings: List[Dict[str, Any]]
    warnings: List[str]
    train_result: Any = None


# ----------------------------------------------------------------------------- 1. check
@dataclass
class FolderCheck:
    rows: list
    images: int
    samples: int
    uncaptioned: List[str]
    warnings: List[str]


def check_folder(folder: str, min_images: int = MIN_IMAGES) -> FolderCheck:
    """Read the folder as the trainer will (data/folder.scan_folder) and open every image. Raises AutoRefused
    (nothing written) when training cannot work: no folder, too few images, unreadable or tiny images."""
    try:
        scan = scan_folder(folder)
    except FolderError as exc:
        raise AutoRefused(f"cannot train: {exc} Give the folder that holds the training images.") from exc
    if scan.meta_problems:
        raise AutoRefused("cannot train: the metadata file is not usable: " + "; ".join(scan.meta_problems))
    rows = scan.rows
    if len(rows) < min_images:
        raise AutoRefused(f"cannot train: '{folder}' holds {len(rows)} image(s); auto mode needs at least "
                          f"{min_images} (some to train on and one held out to choose the epoch by). Add images "
                          f"(15-50 is a good start for a style or a character).")
    bad: List[str] = [f"{os.path.basename(p)} ({why})" for p, why in scan.broken]
    small: List[str] = []
    for r in rows:
        try:
            with Image.open(r.path) as im:
                im.verify()
            with Image.open(r.path) as im:
                w, h = im.size
        except Exception as exc:  # any decoder error means the trainer could not read it either
            bad.append(f"{os.path.basename(r.path)} ({type(exc).__name__})")
            continue
        if min(w, h) < MIN_SIDE:
            small.append(f"{os.path.basename(r.path)} ({w}x{h})")
    if bad:
        raise AutoRefused(f"cannot train: {len(bad)} image(s) cannot be read: {', '.join(bad[:5])}"
                          f"{' ...' if len(bad) > 5 else ''}. Re-save or remove them.")
    if small:
        raise AutoRefused(f"cannot train: {len(small)} image(s) are under {MIN_SIDE} px on a side: "
                          f"{', '.join(small[:5])}. Use larger images or remove these.")
    warnings = list(scan.notes)
    if scan.unused_dirs:
        warnings.append(f"subfolders not read (not kohya N_name): {', '.join(scan.unused_dirs)}")
    if len(rows) < 10:
        warnings.append(f"only {len(rows)} images: expect a LoRA that copies them closely; 15-50 is a better start.")
    return FolderCheck(rows=rows, images=len(rows), samples=sum(r.repeats for r in rows),
                       uncaptioned=[r.path for r in rows if not r.caption], warnings=warnings)


# ----------------------------------------------------------------------------- helpers
def family_of(spec: Optional[str], host: Optional[Host] = None) -> Tuple[str, str]:
    """(family, how it was told) of the base model: `spec`, else the host's loaded checkpoint (lora_train.family)."""
    s = (spec or "").strip()
    if not s and host is not None and host.loaded_checkpoint():
        s = host.loaded_checkpoint()[1]
    return model_family(s)


def fit_to_step_cap(values: Dict[str, Any], choices: List[Choice], user: Dict[str, Any], samples: int) -> None:
    """With max_train_steps set, the epochs and the epoch files follow the steps the run will make: the advisor's
    epoch count would otherwise be a promise the cap breaks, and epoch files every N epochs may never be
    written. Keys the user set are left as they are."""
    cap = int(values["max_train_steps"])
    per_step = int(values.get("batch_size", 1) or 1) * int(values.get("gradient_accumulation_steps", 1) or 1)
    spe = max(1, math.ceil(samples / per_step))
    epochs = max(1, math.ceil(cap / spe))
    if "epochs" not in user and epochs < int(values.get("epochs", epochs)):
        _decide(choices, "epochs", epochs, f"max_train_steps {cap} ends the run in epoch {epochs} ({spe} step(s) "
                                           f"per epoch; the advisor said {values['epochs']} epochs)")
        values["epochs"] = epochs
    every = int(values.get("save_every_n_epochs") or 0)
    if "save_every_n_epochs" not in user and (every == 0 or every > 1 and epochs // every < 2):
        _decide(choices, "save_every_n_epochs", 1, f"an epoch file each epoch: the {cap}-step cap leaves "
                                                   f"{epochs} epoch(s) for the validation loss to choose among")
        values["save_every_n_epochs"] = 1


def pick_captioner(host: Optional[Host], choice: str, trigger: str, model: str = "", family: Optional[str] = None):
    """(captioner, name, reason): a vision-language model folder given (in the family's caption style), else the
    host's interrogator, else a local captioning model already on disk, else template + trigger (never a
    download)."""
    if choice == "vlm" or (choice in ("auto", "", None) and model):
        from ..captions import styles

        style = styles.for_family(family)
        return (make_captioner("vlm", model=model or None, style=style), f"vlm ({os.path.basename(model)})",
                f"a vision-language model, asked in the {style} style {family or 'the base'} is captioned in")
    if choice not in ("auto", "", None):
        if choice == "host":
            fns = host.captioners() if host is not None else {}
            if not fns:
                raise AutoRefused("captioner 'host': this host has no interrogator; use auto or template.")
            name, fn = next(iter(fns.items()))
            return make_captioner("host", fn=fn, name=name), f"host ({name})", "your choice"
        if choice == "template":
            return (make_captioner("template", template="{trigger}, {words}", trigger=trigger),
                    "template", "your choice: '{trigger}, {words}' (file name words after the trigger)")
        return make_captioner(choice, **({"model": model} if model else {})), choice, "your choice"
    fns = host.captioners() if host is not None else {}
    if fns:
        name, fn = next(iter(fns.items()))
        return make_captioner("host", fn=fn, name=name), f"host ({name})", "the host's own interrogator is the best one here"
    try:
        from ..captions.backends import DEFAULT_TRANSFORMERS_MODEL, _cached_file  # a local model only if cached

        if _cached_file(DEFAULT_TRANSFORMERS_MODEL, "config.json"):
            return (make_captioner("transformers"), f"transformers ({DEFAULT_TRANSFORMERS_MODEL})",
                    "no host interrogator; a local captioning model is on disk")
    except (ImportError, Exception):
        pass
    return (make_captioner("template", template="{trigger}, {words}", trigger=trigger), "template",
            "no host interrogator and no captioning model on disk (nothing is downloaded): the trigger word and "
            "the words of each file name")


def _decide(choices: List[Choice], key: str, value: Any, reason: str, user: bool = False) -> None:
    """Record a settings choice, replacing an earlier one of the same key."""
    for c in choices:
        if c.step == "settings" and c.key == key:
            c.value, c.reason, c.user = value, reason, user
            return
    choices.append(Choice("settings", key, value, reason, user))


def _common_caption(rows) -> str:
    from collections import Counter

    caps = [r.caption for r in rows if r.caption]
    return Counter(caps).most_common(1)[0][0] if caps else ""


# ----------------------------------------------------------------------------- the pipeline
def run_auto(host: Host, opts: AutoOptions, callback: Optional[Callable[[dict], None]] = None,
             stop_event: Optional[threading.Event] = None, log: Optional[Callable[[str], None]] = None) -> AutoResult:
    """Run every step (module docstring). `callback` gets the trainer's events; `log(text)` one line per step."""
    return _AutoRun(host, opts, callback, stop_event, log or (lambda s: None)).run()


class _AutoRun:
    """One auto run, a method per step; what a step decides goes into `choices` (the report's table)."""

    def __init__(self, host: Host, opts: AutoOptions, callback, stop_event, say: Callable[[str], None]):
        self.host, self.opts, self.callback, self.stop_event, self.say = host, opts, callback, stop_event, say
        self.choices: List[Choice] = []
        self.ov = dict(opts.overrides or {})
        self.written: List[str] = []
        self.warnings: List[str] = []

    def run(self) -> AutoResult:
        self.check()
        self.caption()
        cfg = self.settings()
        res = self.train(cfg)
        ec, by_epoch = self.choose(res)
        published = self.publish_chosen(ec, by_epoch)
        grid_path, strength = self.grid(cfg, ec, max(by_epoch))
        from .report import write_report

        result = AutoResult(name=self.name, run_dir=self.run_dir, lora_path=published[0], published=published,
                            chosen_epoch=ec.chosen, runner_up=ec.runner_up, last_epoch=max(by_epoch),
                            epoch_choice=ec, choices=self.choices, config=cfg, grid_path=grid_path, report_path="",
                            report="", tag=f"<lora:{self.name}:{strength:g}>", strength=strength,
                            captions_written=self.written, captions_kept=self.kept, findings=list(res.findings),
                            warnings=self.warnings + self.chk.warnings, train_result=res)
        result.report_path, result.report = write_report(result, self.folder)
        return result

    def check(self) -> None:
        """1. the options, the folder and the name (nothing is written before this passes)."""
        host, opts, choices = self.host, self.opts, self.choices
        unknown = [k for k in self.ov if k not in TrainConfig.keys()]
        if unknown:
            TrainConfig.from_dict({k: self.ov[k] for k in unknown})  # raises the ConfigError naming the nearest key
        if opts.task not in TASKS:
            raise AutoRefused(f"task '{opts.task}' is not known: use one of {', '.join(TASKS)}.")
        self.folder = folder = os.path.abspath(opts.folder)
        self.chk = chk = check_folder(folder)
        try:
            name = check_name(opts.name)
        except ValueError as exc:
            raise AutoRefused(str(exc)) from None
        if host.name_taken(name):
            if not opts.rename:
                raise AutoRefused(f"a LoRA or run named '{name}' exists already in {host.output_dir()} (or its run "
                                  f"folder): choose another --name (files are never overwritten).")
            name = host.free_name(name)
        USED_NAMES.add(name)
        self.name = name
        self.trigger = opts.trigger if opts.trigger is not None else name
        self.spec = spec = opts.base if opts.base else None
        loaded = host.loaded_checkpoint() if spec is None else None
        self.is_tiny = (spec or (loaded[1] if loaded else "")) in TINY_SPECS  # the demo models: 64 px, CFG 1
        self.fam, fam_why = (opts.family, "your choice") if opts.family else family_of(spec, host)
        choices.append(Choice("check", "images", chk.images, f"{chk.images} images, {chk.samples} samples per "
                                                             f"epoch with repeats; {len(chk.uncaptioned)} without a "
                                                             f"caption"))
        choices.append(Choice("check", "base family", self.fam, fam_why, user=bool(opts.family)))
        choices.append(Choice("check", "LoRA name", name, "your name" + (" (free)" if name == opts.name else
                                                                          " was taken: next free name")))
        self.say(f"[1/7] checked {folder}: {chk.images} images, {len(chk.uncaptioned)} without a caption")
        for w in chk.warnings:
            self.say(f"  warning: {w}")
        self.run_dir = os.path.join(host.runs_dir(), name)
        os.makedirs(self.run_dir, exist_ok=True)

    def caption(self) -> None:
        """2. captions for the images that have none (existing captions are never touched)."""
        opts, trigger = self.opts, self.trigger
        if self.chk.uncaptioned:
            cap, cap_name, cap_why = pick_captioner(self.host, opts.captioner, trigger, opts.caption_model, self.fam)
            rep = caption_folder(self.folder, cap, mode="skip", trigger=trigger if cap_name != "template" else None)
            self.written = list(rep.written)
            if rep.failed:
                raise AutoRefused("captioning failed: " + "; ".join(rep.failure_lines()))
            self.choices.append(Choice("caption", "captioner", cap_name, cap_why,
                                       user=opts.captioner not in ("auto", "")))
            self.chk = check_folder(self.folder)
        self.kept = [r.path for r in self.chk.rows if r.path not in set(self.written)]
        self.choices.append(Choice("caption", "captions", f"{len(self.written)} written, {len(self.kept)} kept",
                                   "only images without a caption are captioned; existing captions are never "
                                   "touched"))
        self.choices.append(Choice("caption", "trigger_word", trigger, "your choice" if opts.trigger else
                                   "the LoRA name: the word that calls it in a prompt", user=opts.trigger is not None))
        self.say(f"[2/7] captions: {len(self.written)} written, {len(self.kept)} kept")

    def settings(self) -> TrainConfig:
        """3. the advisor's settings, auto mode's own (validation split, run folder), the user's flags on top;
        the optional LR range test."""
        chk, choices, ov = self.chk, self.choices, self.ov
        val_n = max(1, int(round(chk.images * VAL_FRACTION)))
        split = min(0.49, (val_n + 0.5) / chk.images)  # the trainer rounds n * split: this gives val_n images
        train_images = chk.images - val_n
        per_epoch = max(1, round(chk.samples * train_images / chk.images))
        sugg = suggest(max(1, train_images), task=self.opts.task, base=self.fam, vram_gb=self.opts.vram,
                       samples_per_epoch=per_epoch)
        values: Dict[str, Any] = {}
        for key, value, reason in sugg.rows():
            if key in TrainConfig.keys():
                values[key] = value
                choices.append(Choice("settings", key, value, reason + (
                    "; an epoch file each time: the validation loss chooses among them"
                    if key == "save_every_n_epochs" else "")))
        for key, (value, reason) in self._auto_values(values, split, val_n).items():
            _decide(choices, key, value, reason if key not in values or values[key] == value
                    else f"{reason} (the advisor said {values[key]!r})")
            values[key] = value
        for key, value in ov.items():  # the user's flags win
            values[key] = value
            _decide(choices, key, value, "your choice", user=True)
        if values.get("max_train_steps"):
            fit_to_step_cap(values, choices, ov, per_epoch)
        cfg = self._lr_find(TrainConfig.from_dict(values))
        cap = f" (at most {cfg.max_train_steps} steps)" if cfg.max_train_steps else ""
        self.say(f"[3/7] settings: lr {cfg.learning_rate:g}, rank {cfg.lora_rank}, batch {cfg.batch_size}, "
                 f"{cfg.epochs} epochs{cap}, {val_n} validation image(s)")
        return cfg

    def _auto_values(self, values: Dict[str, Any], split: float, val_n: int) -> Dict[str, Tuple[Any, str]]:
        """Auto mode's own settings, {key: (value, reason)}."""
        out = {
            "validation_split": (split, f"{val_n} of {self.chk.images} images held out: their loss chooses the "
                                        f"epoch"),
            "trigger_word": (self.trigger, "as captioned"),
            "output_name": (self.name, "the LoRA name"),
            "output_dir": (self.run_dir, "the run folder (never the LoRA folder)"),
            "train_data_dir": (self.folder, "the checked folder"),
        }
        if self.spec is not None:
            out["base_model"] = (self.spec, "the base model given")
        if detect_vram_gb() is None:  # training runs on the CPU here: GPU memory savers only cost time
            if values.get("mixed_precision", "auto") not in ("no", "auto"):
                out["mixed_precision"] = ("no", "no CUDA GPU here: fp32 (mixed precision needs a GPU)")
            if values.get("gradient_checkpointing"):
                out["gradient_checkpointing"] = (False, "no CUDA GPU here: no GPU memory to save")
        if self.is_tiny:
            out["resolution"] = (64, "the tiny demo model's native resolution")
        return out

    def _lr_find(self, cfg: TrainConfig) -> TrainConfig:
        if not self.opts.lr_find or "learning_rate" in self.ov:
            return cfg
        from ..tuning.lr_finder import lr_range_test

        self.say("[3/7] LR range test ...")
        with self.host.memory_freed():
            res = lr_range_test(cfg, model=self.host.base_model(self.spec), steps=100, stop_event=self.stop_event)
        res.save_plot(os.path.join(self.run_dir, f"{self.name}_lr_find.png"), overwrite=True)
        cfg = cfg.replace(learning_rate=float(f"{res.suggested_lr:.3g}"))
        for c in self.choices:
            if c.key == "learning_rate":
                c.value, c.reason = cfg.learning_rate, f"LR range test: {res.summary()}"
        return cfg

    def train(self, cfg: TrainConfig):
        """4. train (the one path, run.train_for_host); the files stay in the run folder until one is chosen."""
        run = train_for_host(self.host, cfg, self.spec, callback=self.callback, stop_event=self.stop_event,
                             rename=False, publish_files=False)
        res = run.result
        if res.lora_path is None:
            raise RuntimeError(f"training ended without a LoRA: {res.message or 'no step was finished'}")
        self.warnings += run.warnings
        self.say(f"[4/7] trained {res.steps} steps, {res.epochs_done} epochs in {res.seconds:.0f}s")
        return res

    def choose(self, res):
        """5. the epoch with the best validation loss (the last state when none can be compared)."""
        losses = choose_mod.read_val_losses(res.loss_csv)
        by_epoch = choose_mod.files_by_epoch(res.epoch_files, res.lora_path, self.name, res.epochs_done)
        try:
            ec = choose_mod.choose_epoch(losses, list(by_epoch), self.opts.tolerance)
        except choose_mod.NoCandidate:
            ec = choose_mod.last_state(losses, max(by_epoch), f"no epoch file has a validation loss to compare (the "
                                                              f"run ended after {res.steps} step(s), in epoch "
                                                              f"{res.epochs_done}): the last state is published")
        self.choices.append(Choice("choose", "epoch", ec.chosen, ec.why + ". Rule: " + choose_mod.RULE,
                                   user=self.opts.tolerance is not None))
        self.say(f"[5/7] chose epoch {ec.chosen}: {ec.why}")
        return ec, by_epoch

    def publish_chosen(self, ec, by_epoch: Dict[int, str]) -> List[str]:
        """6. the chosen epoch as NAME, every epoch file as NAME-00000E (run.publish_to_host)."""
        name = self.name
        published, warnings = publish_to_host(self.host, [(by_epoch[ec.chosen], f"{name}{EXT}")] +
                                              [(path, epoch_file(name, e)) for e, path in sorted(by_epoch.items())])
        if not published or os.path.basename(published[0]) != f"{name}{EXT}":
            raise RuntimeError("; ".join(warnings) or f"the chosen epoch could not be published as {name}{EXT}")
        self.warnings += warnings
        self.say(f"[6/7] published {published[0]} (+ {len(published) - 1} epoch files)")
        return published

    def grid(self, cfg: TrainConfig, ec, last: int) -> Tuple[Optional[str], float]:
        """7. the A/B grid: base / chosen / last at several strengths, and the strength it suggests."""
        opts, name, trigger = self.opts, self.name, self.trigger
        common = _common_caption(self.chk.rows)
        prompt = opts.prompt or (common if trigger in common else f"{trigger}, {common}".strip(", "))
        cfg_scale = opts.cfg_scale if opts.cfg_scale is not None else (1.0 if self.is_tiny else 7.0)
        base = GenParams(prompt=f"{prompt} <lora:{name}:1>", steps=opts.sample_steps or 20, cfg_scale=cfg_scale,
                         width=cfg.resolution, height=cfg.resolution)
        rows = [(f"chosen (epoch {ec.chosen})", name)]
        if last != ec.chosen:
            rows.append((f"last (epoch {last})", epoch_file(name, last)[: -len(EXT)]))
        grid_path, strength, strength_why = None, 1.0, "no grid"
        try:
            grid = build_grid(self.host.generate, base, name, list(opts.strengths), list(opts.seeds), epochs=rows,
                              cell_size=max(128, min(cfg.resolution, 256)))
            grid_path = grid.save(os.path.join(self.run_dir, "grids"), f"{name}_auto")[0]
            strength, strength_why = suggest_strength(self.chk.rows, grid, len(opts.seeds))
        except NotImplementedError:
            self.warnings.append("this host cannot generate images here: no grid")
        self.choices.append(Choice("grid", "strength", strength, strength_why))
        self.say(f"[7/7] grid: {grid_path}")
        return grid_path, strength


def suggest_strength(rows, grid, n_seeds: int) -> Tuple[float, str]:
    """The strength whose chosen-epoch images are closest in colour to the training images
    (metrics.colour_distance); a tie goes to the lower strength."""
    train = []
    for r in rows[:32]:
        with Image.open(r.path) as im:
            train.append(im.convert("RGB").resize((64, 64)))
    dists = []
    for c in range(1, grid.cols):
        imgs = [cell.image for cell in grid.cells if cell.col == c and cell.row < n_seeds]
        dists.append((colour_distance(imgs, train), c))
    base_d = colour_distance([cell.image for cell in grid.cells if cell.col == 0 and cell.row < n_seeds], train)
    d, c = min(dists, key=lambda t: (round(t[0], 3), t[1]))
    s = float(grid.col_labels[c])
    return s, (f"of the strengths tried, {s:g} brings the chosen epoch's pictures closest in colour to the training "
               f"images (colour distance {d:.3f}; base {base_d:.3f})")
