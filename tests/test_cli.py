import os
import pytest
import subprocess
import sys

import yaml
from safetensors import safe_open

from lora_train.cli.main import main

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_model_folder_then_train_from_yaml(tmp_path, demo_data, capsys):
    assert main(["tiny-model", str(tmp_path / "tiny")]) == 0
    assert os.path.isfile(tmp_path / "tiny" / "model_index.json")
    assert main(["tiny-model", str(tmp_path / "tiny")]) == 2  # never overwrites
    cfg = {"train_data_dir": demo_data, "base_model": str(tmp_path / "tiny"), "output_dir": str(tmp_path / "out"),
           "output_name": "cli", "resolution": 64, "lora_rank": 4, "batch_size": 2, "epochs": 1,
           "lr_warmup_steps": 0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--max_train_steps", "2", "--lora_rank", "2"]) == 0
    with safe_open(str(tmp_path / "out" / "cli.safetensors"), "pt") as fh:
        meta = fh.metadata()
        assert meta["ss_network_dim"] == "2" and meta["ss_steps"] == "2" and meta["ss_sd_model_name"] == "tiny"
    assert not os.path.exists(tmp_path / "out" / "state")  # no resumable state unless asked or stopped (14.7)
    saved = yaml.safe_load((tmp_path / "out" / "cli.yaml").read_text())
    assert saved["lora_rank"] == 2 and saved["max_train_steps"] == 2


def test_train_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train_data_dir: nowhere\nlerning_rate: 1e-4\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "Traceback" not in err
    (tmp_path / "c.yaml").write_text(f"train_data_dir: {tmp_path / 'nowhere'}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_offers_rescaled_lr_when_batch_changes():
    from lora_train.cli.main import rescale_offer
    from lora_train.config import TrainConfig

    before = TrainConfig(batch_size=4, learning_rate=2e-4)
    after = TrainConfig(batch_size=1, learning_rate=2e-4)
    text = rescale_offer(before, after, {"batch_size": 1})
    assert "--learning_rate 0.0001 " in text and "sqrt" in text  # sqrt(1/4) x 2e-4
    assert "--learning_rate 5e-05 " in text and "linear" in text
    assert rescale_offer(before, after.replace(learning_rate=1e-4), {"batch_size": 1, "learning_rate": 1e-4}) == ""
    assert rescale_offer(before, before, {}) == ""
    # an empty learning_rate follows the batch by itself: no offer
    auto = TrainConfig.from_dict({"batch_size": 4})
    assert rescale_offer(auto, auto.replace(batch_size=1), {"batch_size": 1}) == ""
    assert auto.replace(batch_size=1).learning_rate == 1e-4


def test_first_ctrl_c_stops_the_run_second_interrupts():
    """`train` under Ctrl-C: the first asks the trainer to stop (it saves the LoRA and a resumable state)."""
    import signal
    import threading

    import pytest

    from lora_train.cli.main import stop_on_interrupt

    before = signal.getsignal(signal.SIGINT)
    stop = threading.Event()
    with stop_on_interrupt(stop):
        signal.raise_signal(signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
