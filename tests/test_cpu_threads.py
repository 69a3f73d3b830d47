"""The OpenMP thread policy CPU runs get before torch is imported (lora_train/cpu_threads.py)."""
import os
import subprocess
import sys

from lora_train.cpu_threads import configure, free_cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_passive_wait_and_the_free_cores_unless_the_user_set_them():
    env = {}
    line = configure(env, cpu_count=8, load=2.6)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "5"}
    assert "OMP_WAIT_POLICY=PASSIVE" in line and "OMP_NUM_THREADS=5 (the cores free now)" in line
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "16"}
    line = configure(env, cpu_count=8, load=7.9)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "16"} and line.count("(yours)") == 2
    assert free_cores(2, 9.0) == 1 and free_cores(4, 0.0) == 4


def test_the_cli_sets_them_before_torch_and_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    code = ("import runpy, sys; sys.argv = ['lora_train', '--help']\n"
            "try:\n    runpy.run_module('lora_train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import os; print('omp', os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["omp", "PASSIVE"] and int(last[2]) >= 1 and last[3] == "False"
