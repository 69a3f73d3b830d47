"""The OpenMP thread policy CPU runs get before torch is imported (lora_train/cpu_threads.py)."""
import os
import subprocess
import sys

from lora_train.cpu_threads import configure, free_cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_free_cores_and_a_wait_policy_that_fits_unless_the_user_set_them():
    env = {}
    line = configure(env, cpu_count=8, load=2.6)  # several threads: a brief spin, not OpenMP's long one
    assert env == {"OMP_NUM_THREADS": "5", "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}
    assert "OMP_NUM_THREADS=5 (the cores free now)" in line and "GOMP_SPINCOUNT=10000" in line
    env = {}
    line = configure(env, cpu_count=2, load=1.7)  # one thread: nothing to spin for
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"} and "PASSIVE (one thread)" in line
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "16"}
    line = configure(env, cpu_count=8, load=7.9)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "16"} and line.count("(yours)") == 2
    assert free_cores(2, 9.0) == 1 and free_cores(4, 0.0) == 4


def test_the_cli_sets_them_before_torch_and_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    code = ("import runpy, sys; sys.argv = ['lora_train', '--help']\n"
            "try:\n    runpy.run_module('lora_train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import os; print('omp', os.environ.get('OMP_WAIT_POLICY') or os.environ['GOMP_SPINCOUNT'], "
            "os.environ['OMP_NUM_THREADS'], "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[0] == "omp" and last[1] in ("PASSIVE", "10000") and int(last[2]) >= 1 and last[3] == "False"


def test_busy_cores_sees_the_load_now_not_a_minute_ago():
    """/proc/stat over a short window: a process spinning now counts, one that ended does not (the 1-minute load
    average would still count it and halve an idle run's threads)."""
    import multiprocessing as mp

    import pytest

    from lora_train.cpu_threads import _cpu_times, busy_cores

    if _cpu_times() is None:
        pytest.skip("no /proc/stat here (not Linux): the load average is used")
    n = os.cpu_count() or 1
    quiet = busy_cores(n, 0.5)
    p = mp.Process(target=_spin, daemon=True)
    p.start()
    try:
        loaded = busy_cores(n, 0.5)
    finally:
        p.terminate()
        p.join()
    assert loaded >= quiet + 0.5 or loaded >= n - 0.2, (quiet, loaded)  # one more busy core (or all already busy)
    assert 0.0 <= quiet <= n + 0.01


def _spin():
    while True:
        pass
