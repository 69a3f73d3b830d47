"""The tab's Advanced (kohya options) section and "Load kohya config"; the ComfyUI nodes' kohya inputs."""
import os

import pytest

from lora_train.hosts.standalone import StandaloneHost
from lora_train.ui import advanced, logic

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "data", "kohya")


def _fn(blocks, name):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    found = [f.fn for f in fns if getattr(f.fn, "__name__", "") == name]
    assert found, f"no event handler {name}"
    return found[0]


def test_build_config_takes_the_advanced_fields_and_the_kohya_file(tmp_path, demo_data):
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    values = dict(logic.default_settings(host), output_name="adv", clip_skip=2, max_token_length="225",
                  shuffle_caption=True, keep_tokens=1, loss_type="huber", ema_decay=0.99)
    cfg, _ = logic.build_config(host, values, demo_data, "")
    assert (cfg.clip_skip, cfg.max_token_length, cfg.shuffle_caption, cfg.keep_tokens) == (2, 225, True, 1)
    assert (cfg.loss_type, cfg.ema_decay) == ("huber", 0.99)
    values.update(kohya_config=os.path.join(CORPUS, "sd_trainer_lora.toml"), resolution=512)
    cfg, _ = logic.build_config(host, values, demo_data, "")
    # keys without a tab field come from the file; the tab's fields, folder and name win
    assert cfg.min_snr_gamma == 5.0 and cfg.multires_noise_iterations == 0 and cfg.weight_decay == 0.05
    assert cfg.output_name == "adv" and cfg.train_data_dir == os.path.realpath(demo_data)
    assert cfg.clip_skip == 2 and cfg.optimizer == "AdamW"


def test_load_for_tab_fills_fields():
    keys = logic.SETTING_KEYS
    values, folder, md = advanced.load_for_tab(os.path.join(CORPUS, "sd_trainer_lora.toml"), keys)
    assert folder == "./train/aki" and values["kohya_config"].endswith("sd_trainer_lora.toml")
    assert values["lora_rank"] == 32 and values["lora_alpha"] == 16.0 and values["clip_skip"] == 2
    assert values["max_token_length"] == "225" and values["optimizer"] == "AdamW8bit"
    assert "random_crop=True" in md
    with pytest.raises(Exception, match="lycoris"):
        advanced.load_for_tab(os.path.join(CORPUS, "lycoris.toml"), keys)


def test_tab_has_the_advanced_section(tmp_path):
    gr = pytest.importorskip("gradio")
    from lora_train.ui import build_tab

    blocks = build_tab(StandaloneHost("tiny", str(tmp_path / "loras")))
    cfg = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    ids = {c["props"].get("elem_id") for c in cfg["components"]}
    assert {"lora_train_kohya_path", "lora_train_kohya_load", "lora_train_adv_clip_skip",
            "lora_train_adv_block_dims", "lora_train_adv_log_with"} <= ids
    out = _fn(blocks, "do_load_kohya")(os.path.join(CORPUS, "kohya_ss_gui.json"))
    assert len(out) == len(logic.SETTING_KEYS) + 2
    by_key = dict(zip(logic.SETTING_KEYS, out))
    val = by_key["lora_rank"]
    assert (val.get("value") if isinstance(val, dict) else getattr(val, "value", val)) == 16
