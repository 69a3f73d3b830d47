"""The issue-10 GPU targets in one command: each configuration runs bench/step_bench.py in its own process
(clean peak VRAM / RSS), writes its JSON into --out, and a summary says which targets hold.

    python bench/gpu_targets.py --out bench_out [--only sd15_bf16_b1 ...] [--timeout 900]

Targets (issue 10): SD1.5-size at 512 px, bf16, cached latents: our images/s within 5% of the reference loop
(ratio_images_per_s >= 0.95); peak VRAM at batch 1 with gradient checkpointing and fp16 base <= 3 GB; SDXL-size
at 1024 px batch 1 <= 8 GB with gradient checkpointing, cached text embeddings and 8-bit AdamW. The VRAM targets
are checked on our whole-run peak (caching included) as a user would see it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

# name, step_bench arguments, (field, op, limit) checks
RUNS: List[Tuple[str, List[str], List[Tuple[str, str, float]]]] = [
    ("sd15_bf16_b1", ["--model", "sd15", "--resolution", "512", "--precision", "bf16", "--batch", "1"],
     [("ratio_images_per_s", ">=", 0.95)]),
    ("sd15_bf16_b4", ["--model", "sd15", "--resolution", "512", "--precision", "bf16", "--batch", "4"],
     [("ratio_images_per_s", ">=", 0.95)]),
    ("sd15_bf16_b1_syncs", ["--model", "sd15", "--resolution", "512", "--precision", "bf16", "--batch", "1",
                            "--count-syncs"], []),  # host syncs per step (not timed for the targets)
    ("sd15_fp16_b1_gc", ["--model", "sd15", "--resolution", "512", "--precision", "fp16", "--batch", "1",
                         "--gradient-checkpointing"],
     [("ours.peak_vram_run_mb", "<=", 3072.0)]),
    ("sdxl_bf16_b1_gc_8bit", ["--model", "sdxl", "--resolution", "1024", "--precision", "bf16", "--batch", "1",
                              "--gradient-checkpointing", "--optimizer", "AdamW8bit"],
     [("ours.peak_vram_run_mb", "<=", 8192.0), ("reference.peak_vram_mb", "<=", 8192.0)]),
]


def field(res: Dict[str, Any], path: str) -> Optional[float]:
    cur: Any = res
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return None
        cur = cur[part]
    return cur


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--only", nargs="+", choices=[r[0] for r in RUNS])
    ap.add_argument("--steps", default="10")
    ap.add_argument("--warmup", default="3")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    lines, failed = [], 0
    for name, args, checks in RUNS:
        if a.only and name not in a.only:
            continue
        path = os.path.join(a.out, f"{name}.json")
        cmd = [sys.executable, os.path.join(HERE, "step_bench.py"), "--device", a.device, "--steps", a.steps,
               "--warmup", a.warmup, "--json", path] + args
        print("$ " + " ".join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, timeout=a.timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0 or not os.path.isfile(path):
            lines.append(f"{name}: bench failed ({rc})")
            failed += 1
            continue
        with open(path, encoding="utf-8") as fh:
            res = json.load(fh)
        for f, op, limit in checks:
            v = field(res, f)
            ok = v is not None and (v >= limit if op == ">=" else v <= limit)
            failed += not ok
            lines.append(f"{name}: {f} = {'-' if v is None else format(v, '.4g')} (target {op} {limit:g}) "
                         f"{'OK' if ok else 'MISSED'}" + (f"  [{res['ours_error']}]" if res.get("ours_error") else ""))
        o, r = res.get("ours") or {}, res.get("reference") or {}
        nan = float("nan")
        if o.get("syncs_per_step") is not None or r.get("syncs_per_step") is not None:
            lines.append(f"{name}: host syncs per step ours {o.get('syncs_per_step')} ref {r.get('syncs_per_step')}")
        lines.append(f"{name}: s/step ours {field(o, 's_per_step') or nan:.4g} "
                     f"ref {field(r, 's_per_step') or nan:.4g}; "
                     f"peak VRAM MB ours steady {field(o, 'peak_vram_mb') or nan:.0f} run "
                     f"{field(o, 'peak_vram_run_mb') or nan:.0f} ref {field(r, 'peak_vram_mb') or nan:.0f}")
    print("\n".join(["", "targets:"] + lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
