"""Command line: train | demo | tiny-model here; caption, sample, suggest / lr-find and ui in their own modules.

Each subcommand imports the core it needs when it runs (inside its function), so `--help` and the light
commands start without loading torch and diffusers.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import List, Optional

from .. import families
from ..config import ConfigError, TrainConfig, parse_overrides


class TqdmRenderer:
    """Renders trainer events with tqdm."""

    def __init__(self, stream=None):
        self.bar = None
        self.stream = stream or sys.stderr

    def __call__(self, ev):
        from tqdm.auto import tqdm

        event = ev["kind"]
        if event == "start":
            self.bar = tqdm(total=ev["total_steps"], desc="training", unit="step", file=self.stream, mininterval=0.5)
        elif event == "step" and self.bar is not None:
            self.bar.n = ev["step"]
            self.bar.set_postfix(epoch=ev["epoch"], loss=f"{ev['loss']:.4f}", lr=f"{ev['lr']:.2e}", refresh=False)
            self.bar.refresh()
        elif event in ("warning", "info", "nan", "diagnosis"):
            prefix = {"warning": "warning: ", "nan": "warning: ", "diagnosis": "diagnosis: "}.get(event, "")
            (self.bar.write if self.bar else print)(f"{prefix}{ev['message']}")
        elif event == "resumed":
            print(f"resumed from {ev['path']} at step {ev['step']} (epoch {ev['epoch']})")
        elif event == "checkpoint":
            msg = f"saved {ev['path']}"
            (self.bar.write if self.bar else print)(msg)
        elif event == "done" and self.bar is not None:
            self.bar.close()


def say_cpu_threads() -> None:
    """The OpenMP settings `python -m lora_train` chose before torch was imported (lora_train/cpu_threads.py)."""
    line = os.environ.get("LORA_TRAIN_CPU_THREADS")
    if line:
        print(line, file=sys.stderr)


def cmd_train(args, extra: List[str]) -> int:
    if isinstance(args.config, list):  # `train a.yaml b.yaml ...`: a queue, one run after another (cli/queue.py)
        if len(args.config) > 1:
            from .queue import run_queue

            if args.resume:
                raise ValueError("--resume takes one config: resume that run alone, then queue the others.")
            return run_queue(args.config, extra, cmd_train)
        args.config = args.config[0]
    from ..tuning.advisor import Finding, format_findings
    from ..hosts.standalone import StandaloneHost
    from ..run import train_for_host

    from ..kohya.toml_config import load_any

    overrides = parse_overrides(extra)
    cfg, notes = load_any(args.config, overrides)  # our YAML, or a kohya .toml / kohya_ss .json
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if getattr(args, "dry_run", False):
        print(cfg.to_yaml(), end="")
        return 0
    offer = rescale_offer(load_any(args.config)[0], cfg, overrides)
    if offer:
        print(offer)
    # the one train-and-publish path; the CLI keeps the name and folder the config chose (never overwritten);
    say_cpu_threads()
    # the first Ctrl-C stops after the current step and saves what was trained
    host = StandaloneHost.for_config(cfg)
    stop = threading.Event()
    with stop_on_interrupt(stop):
        res = train_for_host(host, cfg, cfg.base_model, callback=TqdmRenderer(), resume_from=args.resume,
                             rename=False, stop_event=stop).result
    if res.nan_stopped:
        print(f"error: {res.message}", file=sys.stderr)
    state = "stopped early" if res.stopped else "finished"
    print(f"{state}: {res.steps} steps in {res.seconds:.1f}s; LoRA: {res.lora_path}; loss log: {res.loss_csv}")
    print(format_findings([Finding(**f) for f in res.findings]))
    return 3 if res.nan_stopped else 0


@contextlib.contextmanager
def stop_on_interrupt(stop: threading.Event):
    """The first Ctrl-C asks the run to stop after the current step (it saves the LoRA and a resumable state);
    a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step (the LoRA and a resumable state are saved); Ctrl-C again to abort",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def rescale_offer(before: TrainConfig, after: TrainConfig, overrides) -> str:
    """When an override changes the batch or accumulation but not the lr, say which lr keeps the step size (an
    empty learning_rate follows the batch by itself: nothing to say)."""
    from ..tuning.advisor import batch_change_offer

    if "learning_rate" in overrides or after.learning_rate != before.learning_rate:
        return ""
    offer = batch_change_offer(before.learning_rate, (before.batch_size, before.gradient_accumulation_steps),
                               (after.batch_size, after.gradient_accumulation_steps), ("sqrt", "linear"))
    if not offer:
        return ""
    lines = [f"  {scaling}: --learning_rate {lr:.3g}   ({why})" for scaling, lr, why in offer]
    return ("note: the effective batch changed but learning_rate did not (training keeps "
            f"{after.learning_rate:.3g}). To rescale it, run again with one of:\n" + "\n".join(lines))


def cmd_tiny_model(args, extra: List[str]) -> int:
    from ..models.tiny import build_tiny
    from ..models.diffusers_folder import save_diffusers_folder

    if os.path.exists(os.path.join(args.dir, "model_index.json")) and not args.overwrite:
        print(f"error: '{args.dir}' already holds a model; pass --overwrite or choose another folder", file=sys.stderr)
        return 2
    from ..models.flow_loading import TINY_FLOW_SPECS, save_tiny_flow_folder

    if getattr(args, "family", "sd1") in TINY_FLOW_SPECS:  # a tiny flow model as its pipeline's folder
        save_tiny_flow_folder(args.family, args.dir)
    else:
        save_diffusers_folder(build_tiny("v_prediction" if args.v else "epsilon"), args.dir)
    print(f"wrote the tiny demo model to {args.dir}")
    return 0


def cmd_demo(args, extra: List[str]) -> int:
    from ..data.demo import DEMO_TRIGGER, write_demo_dataset
    from ..io_utils import next_free_name
    from ..metrics import composition, learning_figure, main_colours
    from ..models.tiny_pixel import DEMO_MODEL, build_tiny_pixel, cache_dir, is_cached
    from ..hosts.standalone import StandaloneHost
    from ..run import train_for_host
    from ..sampler import GenParams, Generator, build_grid

    t0 = time.time()
    out = os.path.abspath(args.out)
    data = os.path.join(out, "dataset")
    from ..captions import caption_folder, make_captioner

    if not is_cached():
        print(f"[0/4] first run: training the demo base model briefly (generic coloured shapes; about a minute or "
              f"two on 2 cores, then cached in {cache_dir()})")
        build_tiny_pixel(progress=_pretrain_progress())
    write_demo_dataset(data, n=8, size=64, captions=False, shapes=("circle",))
    rep = caption_folder(data, make_captioner("template", template="{trigger}, {words}", trigger=DEMO_TRIGGER),
                         mode="skip")
    example = next(iter(rep.captions.values()), "")
    say_cpu_threads()
    print(f"[1/4] dataset: {data} (8 procedural images: a red circle on blue, of varied size and place)")
    print(f"[2/4] captions (template backend, trigger word '{DEMO_TRIGGER}'): {rep.summary()}; e.g. '{example}'")
    name = next_free_name(out, "demo_lora")
    cfg = TrainConfig(train_data_dir=data, base_model=DEMO_MODEL, output_dir=out, output_name=name, resolution=64,
                      lora_rank=8, learning_rate=args.lr, batch_size=2, epochs=args.epochs, lr_scheduler="cosine",
                      lr_warmup_steps=5, trigger_word=DEMO_TRIGGER, seed=args.seed, save_every_n_epochs=25,
                      noise_offset=args.noise_offset)
    cfg.validate()
    res = train_for_host(StandaloneHost(DEMO_MODEL, out), cfg, DEMO_MODEL, callback=TqdmRenderer(),
                         rename=False).result
    print(f"[3/4] trained {res.steps} steps in {res.seconds:.1f}s -> {res.lora_path}")
    gen = Generator(build_tiny_pixel(), lora_dirs=[out])
    base = GenParams(prompt=f"{DEMO_TRIGGER}, a red circle on a blue background <lora:{name}:1>", steps=args.sample_steps,
                     cfg_scale=1.0, width=64, height=64)
    seeds = list(range(1, args.seeds + 1))
    grid = build_grid(gen, base, name, [0.5, 1.0], seeds, cell_size=128)
    grid_path = grid.save(os.path.join(out, "grids"), name)[0]
    print(f"[4/4] grid (strength 0 / 0.5 / 1.0; rows: seeds {', '.join(map(str, seeds))}): {grid_path}")
    from PIL import Image

    train_imgs = []
    for f in sorted(os.listdir(data)):
        if f.endswith(".png"):
            with Image.open(os.path.join(data, f)) as im:
                train_imgs.append(im.convert("RGB"))
    fig = learning_figure(train_imgs, grid.cells, grid.col_labels, seeds)
    bg, fg = main_colours(train_imgs)
    last = len(grid.col_labels) - 1
    comp = {seeds[c.row]: composition(c.image, fg, bg) for c in grid.cells if c.col == last}
    print(f"loss curve: {res.loss_png}; done in {time.time() - t0:.1f}s")
    print(f"learning figure: {fig.summary()}")
    print(f"composition at strength {grid.col_labels[last]} (a red disc on blue; shown = shape 0.08-0.6, background "
          f">= 0.4, roundness >= 0.6): {sum(x.shown for x in comp.values())}/{len(comp)} seeds show it; "
          + "; ".join(f"seed {s}: {x}{'' if x.shown else ' (not shown)'}" for s, x in comp.items()))
    return 0


def _pretrain_progress():
    from tqdm.auto import tqdm

    bar = {}

    def cb(step, total, loss):
        if "b" not in bar:
            bar["b"] = tqdm(total=total, desc="demo base model", unit="step", mininterval=0.5)
        bar["b"].n = step
        bar["b"].set_postfix(loss=f"{loss:.4f}", refresh=True)
        if step == total:
            bar["b"].close()

    return cb


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_train", description="LoRA trainer for Stable Diffusion")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a LoRA from a YAML config (or a kohya .toml / kohya_ss .json); any key "
                                     "can be overridden as --key value")
    t.add_argument("config", nargs="+", help="one config, or several to run in order (a queue)")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a run from its last saved state (the run's output_dir, or one state/step-N folder)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resulting config (e.g. of a kohya .toml) and exit without training")
    d = sub.add_parser("demo", help="procedural images -> caption -> train the tiny model on CPU -> strength grid")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--epochs", type=int, default=100, help="epochs of the 8 images at batch 2 (100: 400 steps)")
    d.add_argument("--lr", type=float, default=1e-2,
                   help="high for a LoRA because the tiny model learns in a few hundred steps (3e-2 diverged: the "
                        "loss rose 4x and the pictures turned to saturated noise); real models start at 1e-4..2e-4")
    d.add_argument("--noise-offset", type=float, default=0.0,
                   help="noise offset (the demo model's zero-terminal-SNR schedule already lets it choose the colours)")
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--sample-steps", type=int, default=20)
    d.add_argument("--seeds", type=int, default=3, help="grid rows (seeds 1..N) the learning figure is measured on")
    tm = sub.add_parser("tiny-model", help="write the tiny demo model as a diffusers folder")
    tm.add_argument("dir")
    tm.add_argument("--v", action="store_true", help="v-prediction variant")
    tm.add_argument("--family", default="sd1", choices=("sd1",) + families.TINY_FLOW_SPECS,
                    help="sd1 (default), or a flow-matching demo model (its diffusers pipeline's folder)")
    tm.add_argument("--overwrite", action="store_true")
    _load_extensions(sub)
    return p


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "tiny-model": cmd_tiny_model}

# Feature modules add their own subcommands: each exposes `add_commands(subparsers) -> {name: func}`,
# func(args, extra) -> exit code.
EXTENSIONS = ["lora_train.cli.sample", "lora_train.cli.tuning", "lora_train.cli.caption", "lora_train.cli.ui",
              "lora_train.cli.kohya", "lora_train.cli.auto"]


def _load_extensions(sub) -> None:
    import importlib

    for modname in EXTENSIONS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # feature not present in this build
            raise
        COMMANDS.update(mod.add_commands(sub))


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd not in ("train", "auto"):  # both take --key value config overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.cmd](args, extra)
    except (ConfigError, FileExistsError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
