"""Issue 9 on the trainer: resume equivalence, NaN guard (stop / recover), optimizers, caches and buckets wired
into training, crash safety of writes (a real subprocess killed mid-write)."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_cfg
from lora_train.models.tiny import build_tiny
from lora_train.training.state import list_states
from lora_train.training.trainer import Trainer
from lora_train.tuning.advisor import Diagnoser

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes


def _stop_at(k, box):
    def cb(ev):
        if ev["kind"] == "step" and ev["step"] == k:
            box["trainer"].stop()
    return cb


def _run(cfg, model, stop_at=None, resume_from=None, loss_hook=None):
    box = {}
    tr = Trainer(cfg, model=model, callback=_stop_at(stop_at, box) if stop_at else None, resume_from=resume_from,
                 loss_hook=loss_hook)
    box["trainer"] = tr
    return tr, tr.run()


def _opt_tensors(tr):
    sd = tr.optimizer.state_dict()
    out = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{pid}.{k}"] = v.clone()
    return out


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("rel") / "data"), n=8, size=64)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """6 optimizer steps straight through (4 per epoch: the run crosses an epoch boundary)."""
    out = tmp_path_factory.mktemp("straight")
    cfg = small_cfg(data, out, max_train_steps=6, lr_warmup_steps=2, flip_aug=True, caption_dropout_rate=0.2,
                    noise_offset=0.05)
    tr, res = _run(cfg, build_tiny())
    return load_file(res.lora_path), _opt_tensors(tr), res


@pytest.mark.parametrize("stop_at", [2, 4, 5])  # inside epoch 1, exactly at its end, inside epoch 2
def test_resume_is_bitwise_identical(data, straight, tmp_path, stop_at):
    ref_lora, ref_opt, ref_res = straight
    cfg = small_cfg(data, tmp_path, max_train_steps=6, lr_warmup_steps=2, flip_aug=True, caption_dropout_rate=0.2,
                    noise_offset=0.05)
    tr1, res1 = _run(cfg, build_tiny(), stop_at=stop_at)
    assert res1.stopped and res1.steps == stop_at
    assert list_states(str(tmp_path))[-1].endswith(f"step-{stop_at:08d}")
    tr2, res2 = _run(cfg, build_tiny(), resume_from=str(tmp_path))
    assert res2.steps == 6 and not res2.stopped
    _assert_same(load_file(res2.lora_path), ref_lora)
    _assert_same(_opt_tensors(tr2), ref_opt)
    assert res2.losses == ref_res.losses  # the restored history plus the new steps


def test_resume_cli_to_a_longer_end(data, tmp_path):
    from lora_train.cli.main import main

    cfg = small_cfg(data, tmp_path, max_train_steps=2, save_state=True)  # a finished run keeps a state when asked
    cfg.save(str(tmp_path / "c.yaml"))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert main(["train", str(tmp_path / "c.yaml"), "--resume", str(tmp_path), "--max_train_steps", "3"]) == 0
    with open(tmp_path / "t_loss.csv") as fh:
        rows = fh.read().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    assert main(["train", str(tmp_path / "c.yaml"), "--resume", str(tmp_path / "nothing_here")]) == 2


def _nan_at(step, once=True):
    fired = []

    def hook(k, loss):
        if k == step and not (once and fired):
            fired.append(k)
            return loss * float("nan")
        return loss
    return hook


def _all_finite_files(folder):
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith(".safetensors"):
                for k, v in load_file(os.path.join(root, n)).items():
                    assert torch.isfinite(v).all(), (n, k)


def test_nan_stop_keeps_last_good_files(data, tmp_path):
    events = []
    cfg = small_cfg(data, tmp_path, epochs=3, save_every_n_epochs=1)
    tr = Trainer(cfg, model=build_tiny(), callback=events.append, loss_hook=_nan_at(6, once=False),
                 diagnoser=Diagnoser(cfg))  # the front doors attach it (run.train_for_host)
    res = tr.run()
    assert res.nan_stopped and res.stopped and res.steps == 5 and res.lora_path is None
    assert "halve learning_rate" in res.message and "--resume" in res.message
    nan = [e for e in events if e["kind"] == "nan"]
    assert len(nan) == 1 and nan[0]["step"] == 6 and nan[0]["action"] == "stop"
    assert os.path.exists(tmp_path / "t-000001.safetensors")  # the epoch file before the fault is kept
    assert not os.path.exists(tmp_path / "t.safetensors")
    _all_finite_files(str(tmp_path))
    assert any(e["kind"] == "diagnosis" and e["finding"]["kind"] == "non_finite" for e in events)
    assert any(f["kind"] == "non_finite" for f in res.findings)
    # a resumable state that holds only finite numbers
    st = list_states(str(tmp_path))[-1]
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(st, "adapter.lrstate")).values())


def test_nan_recover_halves_lr_and_finishes(data, tmp_path):
    events = []
    cfg = small_cfg(data, tmp_path, max_train_steps=8, nan_policy="recover", lr_scheduler="constant")
    tr = Trainer(cfg, model=build_tiny(), callback=events.append, loss_hook=_nan_at(3))
    res = tr.run()
    assert not res.nan_stopped and res.steps == 8 and res.recoveries == 1
    nan = [e for e in events if e["kind"] == "nan"]
    assert len(nan) == 1 and nan[0]["action"] == "recover"
    assert nan[0]["lr_base_after"] == pytest.approx(cfg.learning_rate / 2)
    assert "halved the learning rate" in nan[0]["message"]
    assert res.lora_path and all(torch.isfinite(v).all() for v in load_file(res.lora_path).values())
    assert tr.lr_scheduler.base_lrs[0] == pytest.approx(cfg.learning_rate / 2)
    # still inside the added warm-up (>= 10 steps from the rollback at step 2): 6/10 of the halved lr
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate / 2 * 0.6)


def test_optimizers(data, tmp_path):
    from lora_train.training.optim import OptimizerError

    cfg = small_cfg(data, tmp_path / "a", max_train_steps=2, optimizer="AdamW", optimizer_args={"amsgrad": True})
    tr, res = _run(cfg, build_tiny())
    assert res.steps == 2 and tr.optimizer.defaults["amsgrad"] is True
    cfg = small_cfg(data, tmp_path / "b", max_train_steps=2, optimizer="Adafactor")
    tr, res = _run(cfg, build_tiny())
    assert res.steps == 2 and all(math.isfinite(x) for x in res.losses)
    with pytest.raises(OptimizerError, match="AdamW"):
        _run(small_cfg(data, tmp_path / "c", max_train_steps=2, optimizer="AdamW8bit"), build_tiny())
    for name, module in (("Lion", "lion_pytorch"), ("Prodigy", "prodigyopt")):
        cfg = small_cfg(data, tmp_path / name, max_train_steps=2, optimizer=name,
                        learning_rate=1.0 if name == "Prodigy" else 1e-4)
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(OptimizerError, match="pip install"):
                _run(cfg, build_tiny())
            continue
        tr, res = _run(cfg, build_tiny())
        assert res.steps == 2 and all(math.isfinite(x) for x in res.losses), name


def test_disk_caches_skip_the_encoders_on_the_second_run(data, tmp_path):
    import shutil

    from PIL import Image

    work = tmp_path / "data"
    shutil.copytree(data, work)
    cache = str(tmp_path / "cache")
    calls = {"vae": 0}

    def counting(model):
        enc = model.vae.encode

        def wrapped(x, *a, **k):
            calls["vae"] += x.shape[0]
            return enc(x, *a, **k)
        model.vae.encode = wrapped
        return model

    def run(name):
        cfg = small_cfg(str(work), tmp_path / name, max_train_steps=1, latent_cache="disk", text_cache="disk",
                        cache_dir=cache)
        tr, res = _run(cfg, counting(build_tiny()))
        return tr

    tr = run("one")
    assert calls["vae"] == 8 and tr.cache_stats["latents"].encoded == 8
    calls["vae"] = 0
    tr = run("two")
    assert calls["vae"] == 0 and tr.cache_stats["latents"].hits == 8 and tr.cache_stats["text"].encoded == 0
    first = sorted(p for p in os.listdir(work) if p.endswith(".png"))[0]
    im = Image.open(work / first).convert("RGB")
    im.putpixel((0, 0), (255, 0, 255))
    im.save(work / first)
    tr = run("three")
    assert calls["vae"] == 1 and tr.cache_stats["latents"].encoded == 1
    assert not any(n.endswith(".safetensors") for n in os.listdir(work))  # nothing written among the images


def test_buckets_in_training(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(96, 48), (100, 50), (48, 96), (50, 100), (64, 64), (70, 64)]):
        Image.new("RGB", (w, h), (40 * i, 90, 200 - 30 * i)).save(data / f"im{i}.png")
        (data / f"im{i}.txt").write_text(f"a test image {i}")
    events = []
    cfg = small_cfg(str(data), tmp_path / "out", enable_bucket=True, bucket_reso_steps=32, batch_size=2, epochs=1)
    tr = Trainer(cfg, model=build_tiny(), callback=events.append)
    seen = []
    res = tr.run()
    assert res.steps == 3  # 3 buckets of 2 images each -> 3 batches
    info = [e["message"] for e in events if e["kind"] == "info"]
    assert info and "3 aspect bucket(s)" in info[0]
    plan = tr.dataset.bucket_plan
    for batch in tr.pos["order"]:
        sizes = {plan.bucket_of(i) for i in batch}
        seen.append(sizes)
        assert len(sizes) == 1
        (w, h), = sizes
        assert w % 32 == 0 and h % 32 == 0
    assert len(seen) == 3


CRASH_WRITER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from lora_train.io_utils import save_safetensors
big = {f"t{i}": torch.full((1024, 1024), float(i)) for i in range(48)}  # ~200 MB, written slowly on purpose
print("ready", flush=True)
while True:
    save_safetensors(big, sys.argv[1], metadata={"v": "2"})
"""


def test_killed_during_save_leaves_the_previous_file_whole(tmp_path):
    from lora_train.io_utils import save_safetensors

    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.arange(10.0)}, str(path), metadata={"v": "1"})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(path), repo], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"ready"
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until a temp file is being written, then kill the writer
            tmps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
            if tmps and os.path.getsize(tmp_path / tmps[0]) > 0:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the writer never started a temp file")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    sd = load_file(str(path))  # whole: either the old file or a complete new one, never a torn one
    assert set(sd) == {"a"} or len(sd) == 48
    if set(sd) == {"a"}:
        assert torch.equal(sd["a"], torch.arange(10.0))


def test_states_of_two_runs_in_one_folder_stay_apart(tmp_path):
    for n in ("a-step-00000002", "a-step-00000010", "b-step-00000003"):
        (tmp_path / "state" / n).mkdir(parents=True)
        (tmp_path / "state" / n / "trainer.json").write_text("{}")
    assert [os.path.basename(p) for p in list_states(str(tmp_path), "a")] == ["a-step-00000002", "a-step-00000010"]
    assert [os.path.basename(p) for p in list_states(str(tmp_path), "b")] == ["b-step-00000003"]
    with pytest.raises(ValueError, match="several runs"):
        list_states(str(tmp_path))


def test_torch_compile_wraps_only_the_training_forward(data, tmp_path, monkeypatch):
    """`torch_compile: true` compiles the UNet used by the step (a stand-in here: compiling takes minutes on a
    CPU); the saved file comes from the plain module. min-SNR weighting runs from the CPU timesteps."""
    calls = []

    def fake_compile(module, *a, **k):
        calls.append(type(module).__name__)
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = small_cfg(data, tmp_path, max_train_steps=2, torch_compile=True, min_snr_gamma=5.0)
    tr, res = _run(cfg, build_tiny())
    assert calls == ["UNet2DConditionModel"] and res.steps == 2 and all(math.isfinite(x) for x in res.losses)
    assert load_file(res.lora_path)


def test_compute_snr_fallback_matches_diffusers(monkeypatch):
    """min-SNR must work where diffusers.training_utils cannot be imported (WebUI: transformers 4.30.2)."""
    from diffusers import DDPMScheduler

    from lora_train.training.loss import compute_snr

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    expected = compute_snr(sched, t)
    monkeypatch.setitem(sys.modules, "diffusers.training_utils", None)  # the import now raises ImportError
    got = compute_snr(sched, t)
    assert torch.allclose(got, expected, rtol=1e-5) and got[0] > got[-1] > 0
