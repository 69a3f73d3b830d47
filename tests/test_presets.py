"""Presets: save / load round trip, built-ins from the advisor per task and family, errors that say what to do."""
import os

import pytest

from lora_train import presets
from lora_train.config import TrainConfig
from lora_train.tuning.advisor import suggest


def test_preset_round_trip(tmp_path):
    folder = str(tmp_path / "presets")
    values = {"learning_rate": 3e-4, "lora_rank": 16, "lora_alpha": 8.0, "batch_size": 2, "epochs": 12,
              "lr_scheduler": "constant", "optimizer": "AdamW", "train_text_encoder": True, "resolution": 768,
              "model_type": "sd2", "output_name": "not kept", "train_data_dir": "/not/kept"}
    path = presets.save_preset(folder, "my style", values)
    assert os.path.isfile(path) and path.endswith("my style.yaml")
    back = presets.load_preset(folder, "my style")
    expected = {k: v for k, v in values.items() if k not in presets.NOT_IN_PRESETS}
    assert back == expected
    assert presets.list_presets(folder, builtins=False) == ["my style"]
    with pytest.raises(presets.PresetError, match="exists already"):
        presets.save_preset(folder, "my style", values)
    presets.save_preset(folder, "my style", dict(values, lora_rank=4), overwrite=True)
    assert presets.load_preset(folder, "my style")["lora_rank"] == 4
    # the values become a config as a run would use them
    cfg = TrainConfig.from_dict({k: v for k, v in back.items() if k != "model_type"})
    assert cfg.lora_rank == 16 and cfg.learning_rate == 3e-4


def test_builtin_presets_come_from_the_advisor():
    names = presets.builtin_names()
    assert "builtin: style / sd1" in names and "builtin: character / sdxl" in names
    for name in names:
        p = presets.load_preset("/nonexistent", name)
        TrainConfig.from_dict({k: v for k, v in p.items() if k != "model_type"})
    p = presets.load_preset("/nonexistent", "builtin: character / sdxl")
    s = suggest(presets.BUILTIN_IMAGES, task="character", base="sdxl", vram_gb=None)
    assert p["model_type"] == "sdxl" and p["lora_rank"] == s.lora_rank and p["learning_rate"] == s.learning_rate
    assert p["resolution"] == 1024


def test_preset_errors(tmp_path):
    folder = str(tmp_path)
    with pytest.raises(presets.PresetError, match="learning_rate"):
        presets.save_preset(folder, "x", {"lerning_rate": 1e-4})
    with pytest.raises(presets.PresetError, match="not usable"):
        presets.save_preset(folder, "../evil", {"lora_rank": 4})
    with pytest.raises(presets.PresetError, match="no preset"):
        presets.load_preset(folder, "missing")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(presets.PresetError, match="key: value"):
        presets.load_preset(folder, "bad")
