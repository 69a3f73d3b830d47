"""`python -m lora_train suggest` (settings advisor) and `python -m lora_train lr-find` (LR range test)."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Tuple

from ..config import DEFAULT_NAME, ConfigError, TrainConfig, parse_overrides
from ..names import clean_name

# lr-find's own options; everything else after the config file is a `--key value` config override
_LR_FIND_OPTS = {"--lr-min": "lr_min", "--lr_min": "lr_min", "--lr-max": "lr_max", "--lr_max": "lr_max",
                 "--steps": "steps", "--smoothing": "smoothing", "--probe": "probe",
                 "--probe-samples": "probe_samples", "--probe_samples": "probe_samples"}
_LR_FIND_TYPES = {"lr_min": float, "lr_max": float, "steps": int, "smoothing": float, "probe": str,
                  "probe_samples": int}


# ----------------------------------------------------------------------------- suggest
def _yaml_line(key: str, value, reason: str = "") -> str:
    import yaml

    text = yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False, width=10_000).strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    reason = " ".join(str(reason).split())
    return f"{text}  # {reason}" if reason else text


def suggestion_yaml(sugg, extra: Dict[str, object], command: str = "") -> str:
    """A config YAML (loadable by TrainConfig.load) with each suggested value's reason as a comment."""
    lines = ["# LoRA training config written by `python -m lora_train suggest`" + (f": {command}" if command else ""),
             "# Each value carries its reason; see docs/tuning.md for the rules.", ""]
    for key, value in extra.items():
        lines.append(_yaml_line(key, value, "" if key != "base_model" or value != "tiny" else
                                "CHANGE ME: the path of your base model (diffusers folder); tiny is the demo model"))
    lines.append("")
    valid = set(TrainConfig.keys())
    for key, value, reason in sugg.rows():
        if key in valid and key not in extra:
            lines.append(_yaml_line(key, value, reason))
    skipped = [(k, v, r) for k, v, r in sugg.rows() if k not in valid]
    if skipped:
        lines.append("")
        lines.append("# not config keys of this version (the trainer decides these itself):")
        for k, v, r in skipped:
            lines.append(f"#   {k}: {v}  ({r})")
    return "\n".join(lines) + "\n"


def cmd_suggest(args, extra: List[str]) -> int:
    from ..tuning.advisor import check_config, suggest

    images_dir: Optional[str] = None
    samples: Optional[int] = None
    if args.images is not None:
        from ..data.dataset import load_dataset

        images_dir = os.path.abspath(args.images)
        ds = load_dataset(images_dir, 512)
        count, samples = ds.image_count, len(ds)
    elif args.count is not None:
        count = args.count
    else:
        raise ValueError("say how many images: --images DIR (the dataset folder) or --count N.")
    s = suggest(count, task=args.task, base=args.base, vram_gb=args.vram, batch_size=args.batch,
                gradient_accumulation_steps=args.accumulation, accumulation_scaling=args.scaling,
                detail=args.detail, samples_per_epoch=samples, network_type=args.network_type)
    where = f" in {images_dir}" if images_dir else ""
    rep = f", {samples} samples per epoch with repeats" if samples and samples != count else ""
    print(f"{count} images{where}{rep}; task {args.task} ({args.detail} detail), base {args.base}")
    print(s.table())
    if args.write:
        path = args.write
        if os.path.exists(path):
            raise FileExistsError(f"'{path}' exists already and is never overwritten: choose another file name.")
        head: Dict[str, object] = {}
        if images_dir:
            head["train_data_dir"] = images_dir
        head["base_model"] = args.base_model or "tiny"
        head["output_dir"] = args.output_dir or "output"
        head["output_name"] = clean_name(os.path.basename(images_dir) if images_dir else DEFAULT_NAME)
        text = suggestion_yaml(s, head)
        import yaml

        cfg = TrainConfig.from_dict(yaml.safe_load(text))  # what we write must load
        from ..io_utils import atomic_write_text

        atomic_write_text(path, text)
        print(f"\nwrote {path}")
        if not args.base_model:
            print("  set base_model in it to your model folder (it says `tiny`, the demo model).")
        if not images_dir:
            print("  set train_data_dir in it to your image folder.")
        for w in check_config(cfg, samples_per_epoch=samples or count):
            print(f"  warning: {w}")
    return 0


# ----------------------------------------------------------------------------- lr-find
def _split_lr_find_args(tokens: List[str]) -> Tuple[Dict[str, object], List[str]]:
    """Pull lr-find's own options out of the tokens after the config; the rest are config overrides."""
    own: Dict[str, object] = {}
    rest: List[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name, eq, val = tok.partition("=")
        if name in _LR_FIND_OPTS:
            key = _LR_FIND_OPTS[name]
            if not eq:
                if i + 1 >= len(tokens):
                    raise ValueError(f"{name} needs a value.")
                val = tokens[i + 1]
                i += 1
            try:
                own[key] = _LR_FIND_TYPES[key](val)
            except ValueError:
                raise ValueError(f"{name} {val!r} is not valid: give a {_LR_FIND_TYPES[key].__name__}.") from None
            i += 1
            continue
        rest.append(tok)
        i += 1
    return own, rest


def free_path(path: str) -> str:
    """`path`, or `stem_2.ext`, `stem_3.ext`, ... whichever does not exist."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    n = 2
    while os.path.exists(f"{stem}_{n}{ext}"):
        n += 1
    return f"{stem}_{n}{ext}"


def cmd_lr_find(args, extra: List[str]) -> int:
    from tqdm.auto import tqdm

    from ..tuning.lr_finder import lr_range_test

    own, rest = _split_lr_find_args(list(args.rest or []) + list(extra or []))
    opts = {"lr_min": args.lr_min, "lr_max": args.lr_max, "steps": args.steps, "smoothing": args.smoothing,
            "probe": args.probe, "probe_samples": args.probe_samples}
    opts.update(own)
    overrides = parse_overrides(rest)
    cfg = TrainConfig.load(args.config, overrides)
    bar = tqdm(total=opts["steps"], desc="lr range test", unit="step")

    def progress(ev):
        bar.n = ev["step"]
        bar.set_postfix(lr=f"{ev['lr']:.2e}", loss=f"{ev['loss']:.4f}", refresh=False)
        bar.refresh()

    try:
        res = lr_range_test(cfg, lr_min=opts["lr_min"], lr_max=opts["lr_max"], steps=opts["steps"],
                            smoothing=opts["smoothing"], probe=opts["probe"], probe_samples=opts["probe_samples"],
                            callback=progress)
    finally:
        bar.close()
    os.makedirs(cfg.output_dir, exist_ok=True)
    png = free_path(os.path.join(cfg.output_dir, f"{cfg.output_name}_lr_find.png"))
    res.save_plot(png)
    print(res.summary())
    if res.stopped_early:
        print(f"stopped early: {res.stop_reason}")
    for note in res.notes:
        print(f"note: {note}")
    print(f"heuristic: {res.heuristic}")
    print(f"your config has learning_rate {cfg.learning_rate:.3g}; the range test suggests {res.suggested_lr:.3g} "
          f"(batch {cfg.batch_size} x accumulation {cfg.gradient_accumulation_steps}). Treat it as an upper "
          f"guide: LoRA practice starts at 1e-4..2.5e-4 on real models.")
    print(f"plot: {png}")
    return 0


# ----------------------------------------------------------------------------- registration
def add_commands(sub) -> Dict[str, object]:
    from ..config import NETWORK_TYPES
    from ..tuning.advisor import BASES, DETAILS, SCALINGS, TASKS

    p = sub.add_parser("suggest", help="settings advisor: lr, rank, batch, epochs... each with its reason")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", help="the dataset folder (images are counted, kohya repeats included)")
    src.add_argument("--count", type=int, help="number of images, when the folder is not at hand")
    p.add_argument("--task", choices=TASKS, default="other")
    p.add_argument("--detail", choices=DETAILS, default="normal",
                   help="simple (flat style), normal, demanding (faces, logos: rank 16)")
    p.add_argument("--base", choices=BASES, default="sd1", help="base model kind")
    p.add_argument("--network-type", "--network_type", dest="network_type", choices=NETWORK_TYPES, default="lora",
                   help="lora | locon | loha | lokr | dora: the advice for that type (rank, lr, factor, convs)")
    p.add_argument("--vram", type=float, default=None, help="GPU memory in GB (default: detected; CPU: unknown)")
    p.add_argument("--batch", type=int, default=None, help="a batch size you insist on")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--scaling", choices=SCALINGS, default="sqrt", help="lr rescaling for accumulation")
    p.add_argument("--write", metavar="CONFIG.yaml", help="also write the settings as a config (never overwrites)")
    p.add_argument("--base-model", "--base_model", dest="base_model", default=None,
                   help="base model path written into the config")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                   help="output_dir written into the config")

    f = sub.add_parser("lr-find", help="LR range test on your data and model; any config key can be "
                                       "overridden as --key value",
                       description="LR range test: an exponential lr sweep on the data and model of CONFIG. Any "
                                   "config key can be overridden after CONFIG as --key value. Writes "
                                   "<output_dir>/<output_name>_lr_find.png (never overwrites).")
    f.add_argument("config")
    f.add_argument("--lr-min", "--lr_min", dest="lr_min", type=float, default=1e-6)
    f.add_argument("--lr-max", "--lr_max", dest="lr_max", type=float, default=1e-1)
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--smoothing", type=float, default=0.98)
    f.add_argument("--probe", choices=("fixed", "train"), default="fixed",
                   help="fixed: loss of a fixed probe batch after each step (default); train: the training loss")
    f.add_argument("--probe-samples", "--probe_samples", dest="probe_samples", type=int, default=8)
    # config overrides (--key value) after the config file: the main parser only passes extras to `train`
    f.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return {"suggest": cmd_suggest, "lr-find": cmd_lr_find}


__all__ = ["add_commands", "cmd_suggest", "cmd_lr_find", "suggestion_yaml", "free_path", "ConfigError"]
