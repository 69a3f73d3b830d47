"""`python -m lora_train train a.yaml b.yaml c.yaml`: several runs in order, one at a time, going on past a failed
one, then a summary table; the exit status is non-zero when any run failed. Each file goes through the same
config loader and the same `train` command as a single run (overrides after the files apply to every run)."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional


@dataclass
class QueueRow:
    config: str
    status: str          # done | failed | stopped
    seconds: float
    detail: str          # the LoRA file, or the error


def run_queue(configs: List[str], extra: List[str], train_one: Callable[[argparse.Namespace, List[str]], int],
              out=None) -> int:
    """Run `train_one` (the CLI's `train`) for each config in order; print the summary; 0 only if all succeeded."""
    out = out or sys.stdout
    rows: List[QueueRow] = []
    for i, path in enumerate(configs, 1):
        print(f"\n=== [{i}/{len(configs)}] {path} ===", file=out, flush=True)
        t0 = time.time()
        try:
            rc = train_one(argparse.Namespace(config=path, resume=None), list(extra))
            status = "done" if rc == 0 else "failed"
            detail = _lora_of(path, extra) if rc == 0 else f"exit status {rc} (see the messages above)"
        except KeyboardInterrupt:
            rows.append(QueueRow(path, "stopped", time.time() - t0, "interrupted: the runs after it were not started"))
            break
        except Exception as exc:  # one bad run must not stop the queue
            status, detail = "failed", f"{type(exc).__name__}: {exc}"
            print(f"error: {detail}", file=sys.stderr)
            if os.environ.get("LORA_TRAIN_DEBUG"):
                traceback.print_exc()
        rows.append(QueueRow(path, status, time.time() - t0, detail))
    print("\n" + summary_table(rows, len(configs)), file=out)
    return 0 if rows and all(r.status == "done" for r in rows) and len(rows) == len(configs) else 1


def _lora_of(path: str, extra: List[str]) -> str:
    from ..config import TrainConfig, parse_overrides

    try:
        cfg = TrainConfig.load(path, parse_overrides(extra))
        return os.path.join(cfg.output_dir, cfg.output_name + ".safetensors")
    except Exception:
        return ""


def summary_table(rows: List[QueueRow], total: Optional[int] = None) -> str:
    head = ("#", "config", "status", "time", "LoRA / error")
    body = [(str(i), r.config, r.status, f"{r.seconds:.0f}s", r.detail) for i, r in enumerate(rows, 1)]
    widths = [max(len(x[c]) for x in [head] + body) for c in range(4)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(x[:4], widths)) + "  " + x[4] for x in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 12)
    failed = sum(r.status != "done" for r in rows)
    not_run = (total or len(rows)) - len(rows)
    lines.append(f"\n{len(rows) - failed} of {total or len(rows)} runs succeeded"
                 + (f", {failed} failed or stopped" if failed else "") + (f", {not_run} not run" if not_run else ""))
    return "\n".join(lines)
