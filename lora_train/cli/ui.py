"""`python -m lora_train ui`: the LoRA Train tab as a standalone gradio app on our own diffusers host."""
from __future__ import annotations

import os
from typing import Dict


def make_app(base_model: str = "tiny", lora_dir: str = "loras", roots=None):
    """(host, blocks) of the standalone app, built and not launched."""
    from ..hosts.standalone import StandaloneHost
    from ..ui import build_tab

    host = StandaloneHost(base_model=base_model, lora_dir=lora_dir, roots=roots)
    os.makedirs(host.output_dir(), exist_ok=True)
    return host, build_tab(host)


def launch(blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Enable the queue (polling and long jobs need it on gradio 3) and launch; returns what launch returns."""
    from ..ui.compat import MAJOR, accepted

    q = blocks.queue
    # gradio 3: one worker pool for all events (the poll must not wait behind a grid); 4+: a limit per event
    blocks = q(**accepted(q, {"concurrency_count": 4} if MAJOR < 4 else {"default_concurrency_limit": 4})) or blocks
    kw = accepted(blocks.launch, {"server_name": host, "server_port": port, "share": False, "inbrowser": False,
                                  "prevent_thread_lock": not block, "show_api": False, "quiet": not block})
    return blocks.launch(**kw)


def cmd_ui(args, extra) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the ui command needs gradio: pip install gradio (any of 3.41, 4.x or the current "
                         "release)") from None
    if args.base_model not in ("tiny", "tiny-v") and not os.path.exists(os.path.expanduser(args.base_model)):
        raise FileNotFoundError(f"base model '{args.base_model}' does not exist: give 'tiny' (the demo model) or "
                                f"the path of a diffusers folder / single-file checkpoint.")
    roots = args.allow_root or None
    if args.listen != "127.0.0.1" and roots is None:
        roots = [os.getcwd(), os.path.abspath(args.lora_dir)]
        print(f"listening on {args.listen}: paths typed in the app must lie under {', '.join(roots)} "
              f"(add --allow-root DIR for more)")
    host, blocks = make_app(args.base_model, args.lora_dir, roots)
    print(f"LoRA Train on http://{args.listen}:{args.port} (base model {args.base_model}, LoRA files in "
          f"{host.output_dir()}); Ctrl+C ends it")
    launch(blocks, args.listen, args.port, block=True)
    return 0


def add_commands(sub) -> Dict[str, object]:
    p = sub.add_parser("ui", help="the LoRA Train tab as a standalone web app (gradio)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--base_model", "--base-model", default="tiny",
                   help="'tiny' (demo model), a diffusers folder or a single-file checkpoint")
    p.add_argument("--lora-dir", "--lora_dir", default="loras", help="where LoRA files are written and read")
    p.add_argument("--allow-root", action="append", default=None,
                   help="folder that typed paths may point into (repeatable); default: anywhere on 127.0.0.1")
    return {"ui": cmd_ui}
