"""Issue 14.6-14.8 on the trainer: warm-up clamped to the run, an all-zero LoRA is an error, the loss log's lr is
the lr the step used, no resumable state unless asked or stopped, and a stop at an epoch's end stays in it."""
import csv
import os

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_cfg
from lora_train.models.tiny import build_tiny
from lora_train.training.outputs import ZeroLoRAError
from lora_train.training.state import list_states
from lora_train.training.trainer import Trainer, effective_warmup

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("pol") / "data"), n=8, size=64)


def test_effective_warmup_is_at_most_a_tenth_of_the_run():
    assert effective_warmup(100, 1, "cosine")[0] == 0
    used, why = effective_warmup(100, 50, "cosine")
    assert used == 5 and "100" in why and "50" in why and "5 warm-up" in why
    assert effective_warmup(5, 160, "cosine") == (5, "")
    assert effective_warmup(100, 1000, "linear") == (100, "")
    assert effective_warmup(100, 10, "constant") == (100, "")  # constant has no warm-up to clamp
    assert effective_warmup(0, 10, "cosine") == (0, "")


def test_default_warmup_on_a_short_run_trains_and_logs_the_lr_used(data, tmp_path):
    events = []
    cfg = small_cfg(data, tmp_path, max_train_steps=3, lr_warmup_steps=100, lr_scheduler="cosine")
    res = Trainer(cfg, model=build_tiny(), callback=events.append).run()
    warn = [e for e in events if e["kind"] == "warning" and "lr_warmup_steps" in e["message"]]
    assert len(warn) == 1 and warn[0]["asked"] == 100 and warn[0]["used"] == 0 and warn[0]["total_steps"] == 3
    sd = load_file(res.lora_path)
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)  # the LoRA does something
    with safe_open(res.lora_path, "pt") as fh:
        assert fh.metadata()["ss_lr_warmup_steps"] == "0"
    with open(res.loss_csv) as fh:
        rows = list(csv.DictReader(fh))
    # the lr each step used (before the schedule moved): cosine without warm-up starts at the full lr
    assert float(rows[0]["lr"]) == pytest.approx(cfg.learning_rate)
    assert float(rows[0]["lr"]) > float(rows[1]["lr"]) > float(rows[2]["lr"]) > 0
    assert cfg.lr_warmup_steps == 100  # the config (and its YAML) keep what was asked


def test_all_zero_lora_is_an_error_not_a_file(data, tmp_path):
    cfg = small_cfg(data, tmp_path, max_train_steps=2)
    tr = Trainer(cfg, model=build_tiny(), loss_hook=lambda k, loss: loss * 0.0)  # zero gradients: lora_up stays 0
    with pytest.raises(ZeroLoRAError, match="more steps|max_train_steps") as exc:
        tr.run()
    assert "lr_warmup_steps" in str(exc.value) and "learning_rate" in str(exc.value)
    assert not os.path.exists(tmp_path / "t.safetensors")
    assert os.path.isfile(tmp_path / "t_loss.csv")  # the loss log says what happened


def test_finished_run_leaves_no_state_a_stopped_one_does_and_stays_in_its_epoch(data, tmp_path):
    res = Trainer(small_cfg(data, tmp_path / "a", max_train_steps=2), model=build_tiny()).run()
    assert res.lora_path and not os.path.exists(tmp_path / "a" / "state")
    # 4 steps per epoch (8 images, batch 2); stopped right after the last step of epoch 1
    box = {}

    def cb(ev):
        if ev["kind"] == "step" and ev["step"] == 4:
            box["tr"].stop()
    box["tr"] = tr = Trainer(small_cfg(data, tmp_path / "b", epochs=3), model=build_tiny(), callback=cb)
    res = tr.run()
    assert res.stopped and res.steps == 4 and res.epochs_done == 1
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_epoch"] == "1" and meta["ss_steps"] == "4"
    states = list_states(str(tmp_path / "b"))
    assert len(states) == 1 and states[0].endswith("t-step-00000004")
    # a stopped run's state is never listed by a host as a LoRA (A1111: .safetensors/.pt/.ckpt; ComfyUI also
    # .pth/.bin/.pkl/.sft/.pt2), and like every file we write it follows the umask (0644 / 0755 under 022)
    host_exts = (".safetensors", ".pt", ".ckpt", ".pth", ".bin", ".pkl", ".sft", ".pt2")
    files = sorted(os.listdir(states[0]))
    assert files == ["adapter.lrstate", "torch_state.lrstate", "trainer.json"]
    assert not [f for f in files if f.endswith(host_exts)]
    old = os.umask(0o022)
    os.umask(old)
    want = 0o666 & ~old
    assert all(os.stat(os.path.join(states[0], f)).st_mode & 0o777 == want for f in files)
    assert os.stat(states[0]).st_mode & 0o777 == (want | ((want & 0o444) >> 2))
