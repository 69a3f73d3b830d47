"""Data-parallel training through accelerate: two CPU processes (gloo) against one process.

Contract (issue 10): `accelerate launch -m lora_train train CONFIG.yaml` runs data-parallel; `batch_size` is per
process, so 2 processes x batch 2 train on the same global batches as 1 process x batch 4: every process draws
the same shuffle / noise / timesteps for the global batch and takes its own slice, gradients are averaged, and
only the main process writes files and logs (the logged loss is the global batch's).

Tolerance: the learned weight deltas (up @ down * alpha / rank, all modules together) may differ by 1e-3 in
relative Frobenius norm: the two runs differ only in the order of float32 reductions (~1e-6 relative per step);
a run that trains on other batches, or on fewer samples per step, differs by far more (order 1e-1).

`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher needs mpirun for
several CPU processes), so the test uses `--multi_gpu`, which goes through torchrun; the config's `device: cpu`
makes the Trainer's Accelerator(cpu=True) pick MULTI_CPU with gloo, with or without a GPU on the machine.
"""
import csv
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420
REL_TOL = 1e-3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="process-group cleanup uses POSIX sessions"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid):
    """All processes below `pid` (Linux /proc; empty elsewhere)."""
    children = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _run(cmd, cwd, env, timeout=TIMEOUT_S):
    """Run in its own process group; on timeout kill the whole group (launcher and workers) and fail."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stray = _descendants(proc.pid)  # torchrun starts its workers in sessions of their own
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"timed out after {timeout}s (a deadlock?): {' '.join(cmd)}\n{out[-3000:]}")
    finally:
        if proc.poll() is None:  # pragma: no cover - interrupted
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _files(folder):
    """Relative paths of every file, state folders' step numbers replaced by N (the step counts are compared
    by the match test, not here)."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            out.append(re.sub(r"step-\d+", "step-N", os.path.relpath(os.path.join(dirpath, n), folder)))
    return sorted(out)


def _deltas(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    out = {}
    for k in keys:
        if not k.endswith(".lora_down.weight"):
            continue
        mod = k[: -len(".lora_down.weight")]
        down, up = tensors[k].flatten(1).double(), tensors[mod + ".lora_up.weight"].flatten(1).double()
        out[mod] = up @ down * (float(tensors[mod + ".alpha"]) / down.shape[0])
    return out, meta


def _losses(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]


def _env(tmp):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HOME=str(tmp / "hf_home"))  # no user accelerate config can change the launch
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _launch(nproc, *args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import yaml

    from lora_train.data.demo import write_demo_dataset

    tmp = tmp_path_factory.mktemp("mp")
    data = write_demo_dataset(str(tmp / "data"), n=8, size=64)
    common = dict(train_data_dir=data, base_model="tiny", resolution=64, lora_rank=4, learning_rate=1e-3,
                  epochs=2, lr_scheduler="constant", lr_warmup_steps=0, seed=5, device="cpu", output_name="mp",
                  save_every_n_epochs=1, max_grad_norm=1.0)
    env = _env(tmp)
    res = {}
    for name, batch, nproc in (("single", 4, 1), ("two", 2, 2)):
        cfg = dict(common, batch_size=batch, output_dir=str(tmp / name))
        cfg_path = tmp / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        if nproc == 1:
            cmd = [sys.executable, "-m", "lora_train", "train", str(cfg_path)]
        else:
            cmd = _launch(nproc, "-m", "lora_train", "train", str(cfg_path))
        res[name] = dict(log=_run(cmd, str(tmp), env), out=str(tmp / name))
    return res


def test_two_processes_write_exactly_one_set_of_files(runs):
    single, two = _files(runs["single"]["out"]), _files(runs["two"]["out"])
    assert "mp.safetensors" in two and "mp.yaml" in two and "mp_loss.csv" in two
    assert not [f for f in two if ".tmp" in f or f.startswith(".")], two
    assert two == single  # no per-rank copies, nothing missing


def test_two_processes_match_one_process_with_the_same_effective_batch(runs):
    d1, meta1 = _deltas(os.path.join(runs["single"]["out"], "mp.safetensors"))
    d2, meta2 = _deltas(os.path.join(runs["two"]["out"], "mp.safetensors"))
    assert sorted(d1) == sorted(d2) and d1
    assert meta2["ss_total_batch_size"] == meta1["ss_total_batch_size"] == "4"
    assert meta2["ss_steps"] == meta1["ss_steps"], (meta1["ss_steps"], meta2["ss_steps"])
    norm = sum(float((d1[k] ** 2).sum()) for k in d1) ** 0.5
    diff = sum(float(((d1[k] - d2[k]) ** 2).sum()) for k in d1) ** 0.5
    assert norm > 0, "the single-process run learned nothing: the comparison would be empty"
    assert diff / norm < REL_TOL, f"relative difference of the learned deltas {diff / norm:.3g} >= {REL_TOL}"


def test_two_processes_log_the_global_batch_loss(runs):
    l1 = _losses(os.path.join(runs["single"]["out"], "mp_loss.csv"))
    l2 = _losses(os.path.join(runs["two"]["out"], "mp_loss.csv"))
    assert [s for s, _ in l2] == [s for s, _ in l1] and l1
    for (s, a), (_, b) in zip(l1, l2):
        assert abs(a - b) <= REL_TOL * abs(a), (s, a, b)


NAN_SCRIPT = """
import datetime, os, sys
import torch.distributed as dist
from lora_train.config import TrainConfig
from lora_train.training.trainer import Trainer

# a collective that waits for a process that never joins fails after 30 s instead of hanging (accelerate reuses
# an initialised process group)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
fired = []


def hook(step, loss):  # one non-finite loss, on rank 1 only, at step 2
    if step == 2 and rank == 1 and not fired:
        fired.append(step)
        return loss * float("nan")
    return loss


cfg = TrainConfig(train_data_dir=sys.argv[1], output_dir=sys.argv[2], output_name="nan", base_model="tiny",
                  resolution=64, lora_rank=4, batch_size=2, epochs=2, lr_warmup_steps=0, device="cpu",
                  nan_policy="recover", save_every_n_epochs=0, seed=5)
res = Trainer(cfg, loss_hook=hook).run()
print(f"RESULT rank={rank} steps={res.steps} recoveries={res.recoveries} nan_stopped={res.nan_stopped}", flush=True)
"""


def test_nonfinite_loss_on_one_process_is_a_decision_of_all_processes(tmp_path):
    from lora_train.data.demo import write_demo_dataset

    data = write_demo_dataset(str(tmp_path / "data"), n=8, size=64)
    script = tmp_path / "nan_one_rank.py"
    script.write_text(NAN_SCRIPT, encoding="utf-8")
    out = _run(_launch(2, str(script), data, str(tmp_path / "out")), str(tmp_path), _env(tmp_path), timeout=240)
    # anywhere in a line: the other process may have left a progress bar's partial line just before
    results = sorted(re.findall(r"RESULT (rank=\d+ steps=\d+ recoveries=\d+ nan_stopped=(?:True|False))", out))
    assert len(results) == 2, out[-3000:]
    assert results[0].replace("rank=0", "rank=1") == results[1], results  # same steps and recoveries on both
    assert "recoveries=1" in results[0] and "nan_stopped=False" in results[0], results
    assert os.path.isfile(tmp_path / "out" / "nan.safetensors")
