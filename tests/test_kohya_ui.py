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
    values, _, md = advanced.load_for_tab(os.path.join(CORPUS, "lycoris_lokr.toml"), keys)  # LyCORIS LoKr
    assert (values["network_type"], values["conv_rank"], values["conv_alpha"], values["factor"]) == ("lokr", 8, 4.0, 8)
    with pytest.raises(Exception, match="algo=ia3"):
        advanced.load_for_tab(os.path.join(CORPUS, "lycoris_ia3.toml"), keys)


@pytest.mark.slow
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
    up = _fn(blocks, "do_upload_kohya")(os.path.join(CORPUS, "kohya_ss_gui.json"))  # a dropped file: its path
    assert len(up) == len(logic.SETTING_KEYS) + 3
    last = up[-1]
    assert (last.get("value") if isinstance(last, dict) else getattr(last, "value", last)).endswith(".json")
    assert "lora_train_kohya_file" in ids


def test_node_config_merges_file_dataset_and_widgets():
    from lora_train.config import TrainConfig
    from lora_train.kohya.toml_config import node_config

    node_kw = dict(train_data_dir="/d", output_name="n", lora_rank=4, learning_rate=1e-3)
    ds_base = {"shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.1}
    opts = dict(kohya_config=os.path.join(CORPUS, "sd_trainer_lora.toml"), clip_skip=0, max_token_length="75",
                shuffle_caption=False, keep_tokens=0, loss_type="huber", ema_decay=0.0, network_weights="")
    cfg = TrainConfig.from_dict(node_config(node_kw, ds_base, opts))
    assert (cfg.train_data_dir, cfg.output_name, cfg.lora_rank, cfg.learning_rate) == ("/d", "n", 4, 1e-3)  # widgets
    assert cfg.clip_skip == 2 and cfg.max_token_length == 225 and cfg.min_snr_gamma == 5.0  # from the file
    assert cfg.shuffle_caption is True and cfg.keep_tokens == 1  # file / dataset; widgets at default do not reset
    assert cfg.caption_tag_dropout_rate == 0.1 and cfg.loss_type == "huber"  # a widget off its default wins
    cfg = TrainConfig.from_dict(node_config(node_kw, {}, dict(clip_skip=2, max_token_length="150")))
    assert (cfg.clip_skip, cfg.max_token_length) == (2, 150)
