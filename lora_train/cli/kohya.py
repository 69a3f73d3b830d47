"""`export-config --kohya RUN.yaml`: the kohya sd-scripts TOML equivalent of a run's config."""
from __future__ import annotations

import sys
from typing import List


def cmd_export_config(args, extra: List[str]) -> int:
    from ..kohya.toml_config import export_config

    if not args.kohya:
        print("error: say which format: --kohya (the only one so far)", file=sys.stderr)
        return 2
    text = export_config(args.config, args.out)
    if args.out:
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def add_commands(sub):
    e = sub.add_parser("export-config", help="write the kohya sd-scripts TOML equivalent of a run's config "
                                             "(train_network.py --config_file)")
    e.add_argument("config", help="our YAML config (e.g. the <name>.yaml a run leaves beside its LoRA)")
    e.add_argument("--kohya", action="store_true", help="kohya sd-scripts TOML")
    e.add_argument("--out", default=None, help="file to write (default: print); never over an existing file")
    return {"export-config": cmd_export_config}
