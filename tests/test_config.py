import pytest
import yaml

from lora_train.config import ConfigError, TrainConfig, parse_overrides


def test_defaults_and_alpha():
    cfg = TrainConfig().validate()
    assert cfg.learning_rate == 1e-4 and cfg.batch_size == 1  # the table's start for batch 1
    assert cfg.mixed_precision == "auto" and cfg.output_name == "my_lora"
    assert cfg.alpha == cfg.lora_rank
    assert TrainConfig(lora_rank=16, lora_alpha=8).alpha == 8


def test_the_default_learning_rate_follows_the_effective_batch(tmp_path):
    from lora_train.config import learning_rate_for

    assert [learning_rate_for(b) for b in (1, 2, 4)] == [1e-4, 1.5e-4, 2e-4]
    assert learning_rate_for(8) == 2.83e-4 and learning_rate_for(8, "linear") == 4e-4
    for batch, accum, lr in ((1, 1, 1e-4), (2, 1, 1.5e-4), (4, 1, 2e-4), (1, 4, 2e-4), (2, 2, 2e-4)):
        cfg = TrainConfig.from_dict({"batch_size": batch, "gradient_accumulation_steps": accum})
        assert cfg.learning_rate == lr, (batch, accum)
        assert cfg.te_lr == lr / 2
    # a config file without learning_rate: the batch it names decides, also after replace()
    p = tmp_path / "c.yaml"
    p.write_text("train_data_dir: x\nbatch_size: 4\n")
    cfg = TrainConfig.load(str(p))
    assert cfg.learning_rate == 2e-4
    assert cfg.replace(batch_size=2).learning_rate == 1.5e-4  # still the default: follows the batch
    assert cfg.replace(learning_rate=3e-4).replace(batch_size=2).learning_rate == 3e-4  # a chosen lr stays
    assert TrainConfig.from_dict({"batch_size": 2, "learning_rate": 5e-5}).learning_rate == 5e-5


def test_yaml_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train_data_dir": "x", "lora_rank": 16, "learning_rate": "1.5e-4",
                                 "batch_size": 2, "lr_scheduler": "cosine", "train_text_encoder": "true",
                                 "max_train_steps": 300}))
    cfg = TrainConfig.load(str(p))
    assert cfg.lora_rank == 16 and cfg.learning_rate == 1.5e-4 and cfg.train_text_encoder is True
    assert cfg.max_train_steps == 300
    out = tmp_path / "o.yaml"
    cfg.save(str(out))
    assert TrainConfig.load(str(out)) == cfg


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train_data_dir: x\nlora_rank: 4\n")
    ov = parse_overrides(["--lora_rank", "12", "--learning-rate=3e-4", "--train_text_encoder"])
    cfg = TrainConfig.load(str(p), ov)
    assert (cfg.lora_rank, cfg.learning_rate, cfg.train_text_encoder) == (12, 3e-4, True)


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"learning_rat": 1e-4})
    assert "learning_rat" in str(e.value) and "Did you mean 'learning_rate'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_overrides(["--lora_rnak", "4"])
    assert "lora_rank" in str(e.value)


@pytest.mark.parametrize("key,value,allowed", [
    ("learning_rate", -1, "(0, 1]"),
    ("learning_rate", 5, "(0, 1]"),
    ("learning_rate", "fast", "a number"),
    ("lora_rank", 0, "1..1024"),
    ("lora_rank", 4.5, "an integer"),
    ("batch_size", 0, "1..1024"),
    ("epochs", 0, "1..100000"),
    ("lr_scheduler", "cosnie", "cosine"),
    ("optimizer", "SGD", "AdamW"),
    ("resolution", 500, "multiple of 8"),
    ("mixed_precision", "fp8", "bf16"),
    ("gradient_accumulation_steps", 0, "1..1024"),
    ("max_train_steps", 0, ">= 1"),
    ("output_name", "a/b", "file name"),
    ("train_text_encoder", "maybe", "true or false"),
    ("lr_warmup_steps", -5, ">= 0"),
])
def test_bad_values_name_key_value_range(key, value, allowed):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({key: value})
    msg = str(e.value)
    assert e.value.key == key
    assert key in msg and str(value) in msg and allowed in msg


def test_bad_value_says_what_to_do():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"learning_rate": 0})
    assert "2e-4" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.load(str(bad))


def test_yaml_no_for_a_text_field_stays_no(tmp_path):
    """`mixed_precision: no` in a YAML file or `--mixed_precision no` on the command line (YAML 1.1 reads both as
    False) is the text "no"."""
    from lora_train.config import TrainConfig, parse_overrides

    p = tmp_path / "c.yaml"
    p.write_text("train_data_dir: /d\nmixed_precision: no\n")
    assert TrainConfig.from_dict({"train_data_dir": "/d", "mixed_precision": False}, validate=False).mixed_precision == "no"
    cfg = TrainConfig.from_dict(dict(__import__("yaml").safe_load(p.read_text())), validate=False)
    assert cfg.mixed_precision == "no"
    over = parse_overrides(["--mixed_precision", "no"])
    assert TrainConfig.from_dict(dict(train_data_dir="/d", **over), validate=False).mixed_precision == "no"
