"""`python -m lora_train sample`: strength x seed (or x epoch) grids from the command line."""
from __future__ import annotations

import os
from typing import Dict, List


def _floats(s: str) -> List[float]:
    from ..prompt import parse_floats

    return parse_floats(s, "--strengths")


def _ints(s: str) -> List[int]:
    from ..prompt import parse_ints

    return parse_ints(s, "--seeds")


def cmd_sample(args, extra) -> int:
    from ..models.loading import load_base_model
    from ..prompt import PromptError, parse_prompt
    from ..sampler import GenParams, Generator, build_grid, epoch_axis

    text, tags = parse_prompt(args.prompt)
    if not tags and not args.lora:
        raise PromptError("the prompt has no <lora:NAME:w> tag and no --lora NAME was given: say which LoRA to test.")
    name = args.lora or tags[0].name
    lora_dirs = args.lora_dir or [os.getcwd()]
    if args.lora and os.path.isfile(args.lora):  # a path to the file: its folder, its name
        lora_dirs = [os.path.dirname(os.path.abspath(args.lora))] + (args.lora_dir or [])
        name = os.path.splitext(os.path.basename(args.lora))[0]
    model = load_base_model(args.base_model)
    gen = Generator(model, lora_dirs=lora_dirs)
    gen.library.resolve(name)  # fail early with close names
    size = args.size or model.native_resolution
    base = GenParams(prompt=args.prompt, negative_prompt=args.negative, seed=_ints(args.seeds)[0], steps=args.steps,
                     cfg_scale=args.cfg, width=size, height=size, sampler=args.sampler)
    epochs = epoch_axis(gen.library, name) if args.epochs == "all" else None
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc="sampling", unit="img")

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    res = build_grid(gen, base, name, _floats(args.strengths), _ints(args.seeds), epochs=epochs,
                     cell_size=args.cell_size, progress=progress)
    bar.close()
    paths = res.save(args.out, name)
    print(f"grid ({res.rows} rows x {res.cols} columns, base column first): {paths[0]}")
    print(f"{len(paths) - 1} cells with their generation parameters in {os.path.abspath(args.out)}")
    return 0


def add_commands(sub) -> Dict[str, object]:
    p = sub.add_parser("sample", help="A/B grid of a LoRA over strengths x seeds (or x epoch files)")
    p.add_argument("--base_model", "--base-model", required=True, help="'tiny', a diffusers folder or a checkpoint")
    p.add_argument("--prompt", required=True, help='e.g. "a cat <lora:my_style:0.8>"')
    p.add_argument("--negative", default="")
    p.add_argument("--lora", default=None, help="LoRA name (or path to its file) to sweep (default: the first tag "
                                                "of the prompt)")
    p.add_argument("--strengths", default="0,0.5,1")
    p.add_argument("--seeds", default="1")
    p.add_argument("--epochs", default=None, choices=["all"], help="rows = every epoch file of the LoRA + final")
    p.add_argument("--lora-dir", "--lora_dir", action="append", help="folder(s) holding LoRA files")
    p.add_argument("--out", default="grids")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--sampler", default="DDIM")
    p.add_argument("--cell-size", type=int, default=None)
    return {"sample": cmd_sample}
