"""OpenMP's thread policy for CPU runs, set before torch is imported (torch reads it once, at import).

With its defaults, torch runs one OpenMP thread per core and each spins while it waits: on a machine where
anything else runs, the threads fight over the cores and a CPU run gets several times slower. `configure()` sets
a thread count that fits the cores free now (measured over a quarter second, not the lagging load average) and a
wait policy that fits it, unless the user set them; the line it returns says which, for the run's log. No torch
import here.
"""
from __future__ import annotations

import os
import time
from typing import MutableMapping, Optional, Tuple

SAMPLE_S = 0.25  # how long busy_cores() watches the CPUs


def _cpu_times() -> Optional[Tuple[int, int]]:
    """(busy, total) jiffies of all CPUs from /proc/stat (Linux), None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            parts = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    return sum(parts) - idle, sum(parts)


def busy_cores(n: int, sample_s: float = SAMPLE_S) -> float:
    """How many of the n cores are busy now: /proc/stat over `sample_s` seconds (Linux), else the 1-minute load
    average (which lags: it still counts a job that ended a minute ago)."""
    a = _cpu_times()
    if a is not None:
        time.sleep(sample_s)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            return n * (b[0] - a[0]) / (b[1] - a[1])
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on this platform
        return 0.0


def free_cores(cpu_count: Optional[int] = None, load: Optional[float] = None) -> int:
    """The cores not busy now (at least 1): the CPU count minus the busy cores (`load`: given, else measured)."""
    n = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else os.cpu_count() or 1)
    if load is None:
        load = busy_cores(n)
    return max(1, min(n, int(round(n - load))))


#: how long an OpenMP thread spins for work before it sleeps, when several threads run: short (microseconds), so
#: that the steps' many small ops keep their speed on an idle machine but a busy one is not fought over
SPIN = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}  # GNU libgomp (spins), LLVM / Intel libomp (ms)


def configure(environ: MutableMapping[str, str] = os.environ, cpu_count: Optional[int] = None,
              load: Optional[float] = None) -> str:
    """OMP_NUM_THREADS = the cores free now, and a wait policy that fits: one thread waits passively (nothing to
    spin for), several spin only briefly (SPIN). What the user set stays. Returns a line for the log naming what
    is in effect and who chose it.

    Measured (tiny model, 100 steps, 2 cores; bench/cpu_threads_bench.py): idle, 2 threads spinning briefly
    18.7 s, OpenMP's active default 17.7 s, 2 passive threads 38.5 s; with 2 busy processes, 1 thread 31.7 s,
    2 threads 81-121 s whatever the wait policy. So the thread count is what keeps a loaded run from collapsing,
    and a passive policy only costs speed where several threads run."""
    said = []
    if "OMP_NUM_THREADS" in environ:
        said.append(f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']} (yours)")
        try:
            n = int(environ["OMP_NUM_THREADS"])
        except ValueError:
            n = 0
    else:
        n = free_cores(cpu_count, load)
        environ["OMP_NUM_THREADS"] = str(n)
        said.append(f"OMP_NUM_THREADS={n} (the cores free now)")
    if "OMP_WAIT_POLICY" in environ:
        said.append(f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']} (yours)")
    elif n == 1:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        said.append("OMP_WAIT_POLICY=PASSIVE (one thread)")
    else:
        for k, v in SPIN.items():
            environ.setdefault(k, v)
        said.append(f"GOMP_SPINCOUNT={environ['GOMP_SPINCOUNT']} (a brief spin)")
    return "CPU threads: " + ", ".join(said) + "; set them yourself to change this"
