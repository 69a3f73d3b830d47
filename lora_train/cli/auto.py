"""`python -m lora_train auto DIR --name NAME [--task ...] [--base ...] [--vram N] [--key value ...]`: the whole
auto pipeline (lora_train/auto/pipeline.py) from the command line. Any TrainConfig key after the options
(`--learning_rate 1e-3`, `--epochs 12`) overrides that automatic choice."""
from __future__ import annotations

import argparse
import sys
import threading
from typing import List

from ..config import parse_overrides
from ..family import FAMILIES

def _floats(text: str) -> List[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]


def cmd_auto(args, extra: List[str]) -> int:
    from ..auto.pipeline import AutoOptions, AutoRefused, run_auto
    from ..hosts.standalone import StandaloneHost
    from .main import TqdmRenderer, stop_on_interrupt

    overrides = parse_overrides(extra)
    base = args.base or overrides.pop("base_model", None) or "tiny"
    host = StandaloneHost(base, args.lora_dir)
    opts = AutoOptions(folder=args.dir, name=args.name, task=args.task, base=base, family=args.family,
                       vram=args.vram, trigger=args.trigger, captioner=args.captioner,
                       caption_model=args.caption_model, lr_find=args.lr_find,
                       tolerance=args.tolerance, strengths=_floats(args.strengths),
                       seeds=[int(s) for s in _floats(args.seeds)], prompt=args.prompt,
                       sample_steps=args.sample_steps, cfg_scale=args.cfg, overrides=overrides, rename=False)
    stop = threading.Event()
    try:
        with stop_on_interrupt(stop):
            res = run_auto(host, opts, callback=TqdmRenderer(), stop_event=stop, log=print)
    except AutoRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nLoRA: {res.lora_path} (epoch {res.chosen_epoch}; runner-up: "
          f"{'epoch ' + str(res.runner_up) if res.runner_up is not None else 'none'})")
    print(f"grid: {res.grid_path}")
    print(f"report: {res.report_path}")
    print(f"use it with {res.tag}")
    return 0


def add_commands(sub) -> dict:
    a = sub.add_parser("auto", help="folder -> checked, captioned, trained, best epoch published, A/B grid, report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("dir", help="the image folder (captions are written only for images without one)")
    a.add_argument("--name", required=True, help="the LoRA's name (also the trigger word unless --trigger)")
    a.add_argument("--task", default="style", choices=["style", "character", "face", "object", "concept", "other"])
    a.add_argument("--base", default=None, help="base model: 'tiny' (demo), a diffusers folder or a checkpoint file")
    a.add_argument("--family", default=None, choices=list(FAMILIES), help="default: read from the base")
    a.add_argument("--vram", type=float, default=None, help="GPU memory in GB (default: detected)")
    a.add_argument("--trigger", default=None, help="trigger word (default: the name)")
    a.add_argument("--captioner", default="auto", help="auto | template | host | transformers | vlm | wd14")
    a.add_argument("--caption-model", default="", help="a local captioning model folder (a vision-language model "
                   "folder with --captioner auto or vlm: captions in the family's style)")
    a.add_argument("--lr-find", action="store_true", help="run an LR range test first (about 100 extra steps)")
    a.add_argument("--tolerance", type=float, default=None,
                   help="epoch choice: loss difference counted as a tie (default: the curve's noise; 0: plain argmin)")
    a.add_argument("--strengths", default="0.5,0.75,1", help="grid strengths (a base column is always added)")
    a.add_argument("--seeds", default="1,2", help="grid seeds")
    a.add_argument("--prompt", default=None, help="grid prompt (default: the trigger and the commonest caption)")
    a.add_argument("--sample-steps", type=int, default=None)
    a.add_argument("--cfg", type=float, default=None, help="grid CFG scale (default 7; 1 on the tiny model)")
    a.add_argument("--lora-dir", default="loras", help="where the LoRA is published (run folder beside it)")
    return {"auto": cmd_auto}

