"""`python -m lora_train caption DIR ...`: caption a dataset folder from the command line."""
from __future__ import annotations

import os
import sys
from typing import Dict, List


def add_commands(subparsers) -> Dict[str, object]:
    p = subparsers.add_parser(
        "caption", help="caption a dataset folder (.txt sidecars or metadata.csv)",
        description="Caption the images of DIR and of its kohya N_name subfolders. Existing captions are left "
                    "byte for byte unless --mode overwrite/append. Nothing is downloaded: models come from a "
                    "local folder or the local Hugging Face cache.")
    p.add_argument("dir", help="dataset folder")
    p.add_argument("--backend", default="template",
                   help="template | transformers (BLIP, GIT, Florence-2) | vlm (chat vision-language models: "
                        "Qwen2.5-VL, Qwen3-VL, JoyCaption / LLaVA) | wd14 (booru tagger, needs onnxruntime); "
                        "default: template")
    p.add_argument("--style", default=None,
                   help="vlm: caption style (tags | short | detailed | edit, or one of --styles); default: the "
                        "--family's (detailed for Flux / Qwen-Image / Z-Image / FLUX.2 / Chroma / Wan, short for SD)")
    p.add_argument("--styles", default=None, metavar="FILE", help="vlm: your caption styles (JSON; copy "
                   "lora_train/captions/styles.json and edit the prompts)")
    p.add_argument("--quantize", choices=("none", "8bit", "4bit"), default=None,
                   help="vlm: load the model in 8 / 4 bit (bitsandbytes, CUDA)")
    p.add_argument("--family", default=None, help="the base family you will train (sd1, sdxl, flux, qwen_image, "
                   "...): picks the style and checks the captions' length against its text encoder")
    p.add_argument("--concept", default="", help="what the LoRA should learn (e.g. 'red hair'): the checks list "
                   "captions that name it")
    p.add_argument("--check-only", action="store_true", help="only run the caption checks, caption nothing")
    p.add_argument("--model", default=None,
                   help="model folder, or a repo id already in the local Hugging Face cache "
                        "(transformers: config + weights + processor; wd14: model.onnx + selected_tags.csv)")
    p.add_argument("--template", default=None, help='template backend: default "{trigger}, {folder}, {words}"; '
                   "also {stem} {name} {ext} {parent} {width} {height}")
    p.add_argument("--trigger", default=None, help="trigger word put first in every caption (never duplicated)")
    p.add_argument("--mode", choices=("skip", "overwrite", "append"), default="skip",
                   help="skip: leave captioned images alone (default); overwrite: replace; append: add after")
    p.add_argument("--out", default="txt", help="txt (sidecars, default) or metadata.csv (in each image folder)")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--replace", nargs="+", action="extend", default=[], metavar="OLD=NEW",
                   help="find and replace in the caption text (repeatable; OLD= deletes)")
    p.add_argument("--replace-tag", nargs="+", action="extend", default=[], metavar="OLD=NEW",
                   help="replace whole comma-separated tags (case-insensitive; OLD= removes the tag)")
    p.add_argument("--remove-tag", nargs="+", action="extend", default=[], metavar="TAG")
    p.add_argument("--add-tag", nargs="+", action="extend", default=[], metavar="TAG")
    p.add_argument("--dedupe", action="store_true", help="drop repeated tags")
    p.add_argument("--keep-tokens", type=int, default=None,
                   help="the first N tags stay fixed (kohya keep_tokens; the trigger counts as one)")
    p.add_argument("--sort", choices=("alpha",), default=None, help="sort the tags after the fixed ones")
    p.add_argument("--threshold", type=float, default=None, help="wd14: general tag threshold (default 0.35)")
    p.add_argument("--character-threshold", type=float, default=None, help="wd14: character tags (default 0.85)")
    p.add_argument("--prompt", default=None, help="transformers: text prefix or task token (Florence-2)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="transformers: allow the model folder's own code (Florence-2 on old transformers)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="print the captions, write nothing")
    p.add_argument("--top", type=int, default=20, help="tags shown per folder in the frequency summary")
    return {"caption": cmd_caption}


def _captioner_opts(args) -> dict:
    from ..captions.registry import _ALIASES

    backend = _ALIASES.get(args.backend.lower(), args.backend.lower())
    if backend == "template":
        return dict(template=args.template, trigger=args.trigger)
    if backend == "transformers":
        return dict(model=args.model, device=args.device, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                    trust_remote_code=args.trust_remote_code or None)
    if backend == "vlm":
        from ..captions import styles

        return dict(model=args.model, device=args.device, style=args.style or styles.for_family(args.family),
                    styles_file=args.styles, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                    quantize=args.quantize, trust_remote_code=args.trust_remote_code or None)
    if backend == "wd14":
        return dict(model=args.model, threshold=args.threshold, character_threshold=args.character_threshold,
                    device=args.device)
    return {}


def cmd_caption(args, extra: List[str]) -> int:
    from tqdm.auto import tqdm

    from ..captions import CaptionerError, caption_folder, format_tag_frequency, make_captioner, parse_pairs

    if args.backend.lower() == "host":
        print("error: the host backend uses the WebUI's own interrogators and only exists inside the WebUI tab; "
              "use --backend transformers, wd14 or template here", file=sys.stderr)
        return 2
    if not os.path.isdir(args.dir):
        print(f"error: '{args.dir}' is not a folder: pass the folder that holds your images", file=sys.stderr)
        return 2
    if args.check_only:
        return 1 if _print_checks(args) else 0
    try:
        replace, replace_tags = parse_pairs(args.replace), parse_pairs(args.replace_tag)
        captioner = make_captioner(args.backend, **_captioner_opts(args))
    except (CaptionerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    bar = None

    def progress(i: int, n: int, path: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=n, desc=f"captioning ({captioner.name})", unit="img", file=sys.stderr, mininterval=0.5)
        bar.set_postfix_str(os.path.basename(path), refresh=False)
        bar.update(1)

    try:
        report = caption_folder(args.dir, captioner, mode=args.mode, trigger=args.trigger, replace=replace,
                                dedupe=args.dedupe, keep_tokens=args.keep_tokens, out=args.out,
                                caption_extension=args.caption_extension, progress=progress,
                                replace_tags=replace_tags, remove_tags=args.remove_tag, add_tags=args.add_tag,
                                sort=args.sort, batch_size=args.batch_size, dry_run=args.dry_run)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
        captioner.unload()
    if args.dry_run:
        for path in report.written:
            print(f"{os.path.relpath(path, args.dir)}: {report.captions[path]}")
    for w in report.warnings:
        print(f"warning: {w}")
    for path, reason in report.failed[:50]:
        print(f"failed: {os.path.relpath(path, args.dir)}: {reason}")
    if len(report.failed) > 50:
        print(f"failed: ... and {len(report.failed) - 50} more")
    print(report.summary())
    freq = report.tag_frequency()
    if freq:
        print("tag frequency:")
        print(format_tag_frequency(freq, top=args.top))
    if not args.dry_run:
        _print_checks(args)
    return 1 if report.failed else 0


def _print_checks(args) -> list:
    """The caption checks of the folder (captions/checks.py), printed; returns the warnings."""
    from ..captions.checks import check_captions
    from ..captions.table import list_images

    entries = [(e.path, (e.row.caption or "") if e.row else "") for e in list_images(args.dir, args.caption_extension)]
    found = check_captions(entries, args.trigger or "", args.family, args.concept)
    if not found:
        print(f"caption checks: {len(entries)} captions, no problem found.")
    for f in found:
        print(f"{f.severity}: {f}")
    return [f for f in found if f.severity == "warning"]
