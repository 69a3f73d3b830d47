"""CPU runs with and without a competing load, with OpenMP's defaults and with the policy `python -m lora_train`
sets (lora_train/cpu_threads.py): a tiny-model run of --steps steps through the CLI, and optionally the demo.

    python bench/cpu_threads_bench.py [--steps 100] [--load 2] [--demo] [--out bench_out/cpu_threads.json]

The load is --load busy Python processes (one core each) started before and stopped after each timed run.
"Defaults" runs the CLI with OMP_WAIT_POLICY / OMP_NUM_THREADS taken from torch's own defaults (ACTIVE and the
core count), so the policy under test is the only difference. Prints and writes the seconds per variant.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _spin() -> None:
    while True:
        pass


def _run(cmd, env, timeout: float):
    """Seconds the command took, or None when it ran past `timeout` (killed)."""
    t0 = time.time()
    try:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--load", type=int, default=2, help="busy processes for the loaded runs")
    ap.add_argument("--demo", action="store_true", help="also time the demo (minutes)")
    ap.add_argument("--out", default="")
    ap.add_argument("--variants", nargs="+", default=["ours", "defaults"], choices=["ours", "defaults"])
    ap.add_argument("--timeout", type=float, default=420, help="seconds a run may take before it is killed "
                                                                "(recorded as null: slower than that)")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="lora_train_threads_")
    from lora_train.config import TrainConfig
    from lora_train.data.demo import write_demo_dataset

    data = write_demo_dataset(os.path.join(work, "data"), n=8, size=64, captions=True)

    def tiny(out: str):
        path = out + ".yaml"
        TrainConfig(train_data_dir=data, base_model="tiny", resolution=64, batch_size=2, max_train_steps=a.steps,
                    save_every_n_epochs=0, output_dir=out, output_name="bench").validate().save(path)
        return [sys.executable, "-m", "lora_train", "train", path]

    jobs = {"tiny": tiny}
    if a.demo:
        jobs["demo"] = lambda out: [sys.executable, "-m", "lora_train", "demo", "--out", out]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    variants = {"ours": base, "defaults": dict(base, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS=str(os.cpu_count()))}
    variants = {k: v for k, v in variants.items() if k in a.variants}
    results = {}
    for job, cmd in jobs.items():
        for load in (0, a.load):
            for name, env in variants.items():
                procs = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
                for p in procs:
                    p.start()
                try:
                    secs = _run(cmd(os.path.join(work, f"{job}_{name}_{load}")), env, a.timeout)
                finally:
                    for p in procs:
                        p.terminate()
                key = f"{job} load={load} {name}"
                results[key] = None if secs is None else round(secs, 2)
                print(f"{key}: " + (f"{secs:.1f} s" if secs is not None else f"over {a.timeout:.0f} s (killed)"),
                      flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump({"steps": a.steps, "load": a.load, "cpus": os.cpu_count(), "timeout": a.timeout,
                       "seconds": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
