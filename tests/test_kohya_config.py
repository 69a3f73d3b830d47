"""kohya configs (sd-scripts TOML, SD-Trainer sections, kohya_ss GUI JSON, dataset_config) -> TrainConfig; one warning
listing the keys not used; errors where ignoring a key would change what is trained; export-config round trip."""
import os
import subprocess
import sys

import pytest
import yaml

from lora_train.config import TrainConfig
from lora_train.kohya.common import KohyaConfigError, read_file
from lora_train.kohya.export import to_kohya_dict, to_kohya_toml
from lora_train.kohya.networks import MODULE_FAMILY
from lora_train.kohya.toml_config import from_kohya, load_kohya

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "data", "kohya")
ROOT = os.path.dirname(HERE)


def corpus(name):
    return os.path.join(CORPUS, name)


def test_sd_trainer_sections():
    imp = load_kohya(corpus("sd_trainer_lora.toml"))
    c = imp.config
    assert c.base_model == "./sd-models/animefull-final-pruned.safetensors"
    assert c.prediction_type == "epsilon"  # v_parameterization = false
    assert (c.train_data_dir, c.reg_data_dir) == ("./train/aki", "")
    assert c.resolution == 624  # 512x768 -> the same area, a multiple of 8 (and a note says so)
    assert (c.enable_bucket, c.min_bucket_reso, c.max_bucket_reso, c.bucket_no_upscale) == (True, 256, 1024, True)
    assert (c.lora_rank, c.lora_alpha, c.train_text_encoder) == (32, 16.0, True)
    assert (c.optimizer, c.learning_rate, c.text_encoder_lr) == ("AdamW8bit", 1e-4, 1e-5)
    assert (c.weight_decay, c.adam_beta1, c.adam_beta2) == (0.05, 0.9, 0.99)
    assert (c.lr_scheduler, c.lr_warmup_steps, c.lr_scheduler_num_cycles) == ("cosine_with_restarts", 0, 1)
    assert (c.batch_size, c.epochs, c.seed, c.mixed_precision) == (2, 10, 1337, "fp16")
    assert (c.clip_skip, c.max_token_length, c.shuffle_caption, c.keep_tokens) == (2, 225, True, 1)
    assert (c.min_snr_gamma, c.multires_noise_iterations, c.multires_noise_discount) == (5.0, 6, 0.3)
    assert (c.output_name, c.output_dir, c.save_every_n_epochs) == ("aki", "./output", 2)
    assert (c.log_with, c.logging_dir, c.log_prefix) == ("tensorboard", "./logs", "aki")
    # one warning lists the keys not used (only those not at kohya's default): random_crop, save_precision
    not_used = imp.warnings[0]
    assert "not used" in not_used and "random_crop=True" in not_used and "save_precision='fp16'" in not_used
    for quiet in ("xformers", "lowram", "color_aug", "sample_sampler", "lowvram", "model_train_type"):
        assert quiet not in not_used
    assert any("512x768 is not square" in w for w in imp.warnings)


def test_kohya_ss_gui_json():
    imp = load_kohya(corpus("kohya_ss_gui.json"))
    c = imp.config
    assert c.base_model == "/models/sd-v1-5.safetensors" and c.prediction_type == "epsilon"
    assert (c.train_data_dir, c.reg_data_dir, c.prior_loss_weight) == ("/data/img", "/data/reg", 1.0)
    assert c.resolution == 768 and c.caption_extension == ".caption"
    assert (c.lora_rank, c.lora_alpha) == (16, 8.0)
    assert (c.learning_rate, c.text_encoder_lr, c.train_text_encoder) == (1e-4, 5e-5, True)
    assert c.optimizer == "Prodigy" and c.optimizer_args == {"decouple": True, "d_coef": 2}
    assert (c.max_train_steps, c.lr_warmup_steps) == (1600, 160)  # lr_warmup 10 (%) of 1600 steps
    assert (c.epochs, c.batch_size, c.gradient_accumulation_steps) == (8, 1, 2)
    assert (c.latent_cache, c.flip_aug, c.caption_dropout_rate, c.noise_offset) == ("disk", True, 0.05, 0.05)
    assert c.clip_skip is None and c.max_token_length == 75 and c.seed == 1234 and c.mixed_precision == "bf16"
    assert (c.log_with, c.logging_dir) == ("tensorboard", "/data/logs")  # a logging_dir alone: TensorBoard
    assert c.gradient_checkpointing is True
    not_used = imp.warnings[0]
    assert "scale_weight_norms=1" in not_used and "save_precision='fp16'" in not_used
    for quiet in ("wandb_api_key", "xformers", "max_timestep", "factor", "conv_alpha", "use_cp", "model_list"):
        assert quiet not in not_used


def test_dataset_config_with_reg_subset():
    imp = load_kohya(corpus("dataset_config.toml"))
    c = imp.config
    assert c.train_data_dir == "img/mychar" and c.num_repeats == 10
    assert c.reg_data_dir == "reg/girl"
    assert (c.resolution, c.batch_size, c.enable_bucket, c.min_bucket_reso, c.max_bucket_reso) == (512, 4, True,
                                                                                                   320, 960)
    assert (c.shuffle_caption, c.keep_tokens, c.keep_tokens_separator, c.caption_tag_dropout_rate) == (True, 1, "|||",
                                                                                                       0.1)
    assert c.flip_aug is True and c.trigger_word == "mychar girl"
    assert any("class_tokens 'mychar girl'" in w for w in imp.warnings)
    assert not any("not used" in w for w in imp.warnings)


def test_training_args_with_dataset_config_file():
    imp = load_kohya(corpus("train_with_dataset.toml"))
    c = imp.config
    assert len(imp.sources) == 2 and imp.sources[1].endswith("dataset_config.toml")
    assert c.train_data_dir == "img/mychar" and c.reg_data_dir == "reg/girl" and c.batch_size == 4
    assert (c.lora_rank, c.lora_alpha, c.train_text_encoder) == (8, 4.0, False)
    assert (c.network_weights, c.dim_from_weights) == ("/loras/start.safetensors", True)
    assert (c.down_lr_weight, c.mid_lr_weight, c.up_lr_weight) == ("sine+.5", "2", "0,0,0,0,0,0,1,1,1,1,1,1")
    assert c.block_lr_zero_threshold == 0.1
    assert (c.max_train_steps, c.lr_warmup_steps) == (2000, 200)  # 0.1 = 10% of the steps (sd-scripts)
    assert (c.loss_type, c.huber_schedule, c.huber_c) == ("huber", "exponential", 0.2)
    assert (c.masked_loss, c.alpha_mask, c.ip_noise_gamma, c.clip_skip) == (True, True, 0.1, 2)
    assert (c.log_with, c.logging_dir) == ("tensorboard", "logs")
    assert "min_timestep=100" in imp.warnings[0]


@pytest.mark.parametrize("name, key, words", [
    ("lycoris_ia3.toml", "network_args", "algo=ia3"),
    ("dadapt.toml", "optimizer_type", "DAdaptAdam"),
])
def test_keys_that_would_change_the_result_are_errors(name, key, words):
    with pytest.raises(KohyaConfigError) as ei:
        load_kohya(corpus(name))
    assert ei.value.key == key and words in str(ei.value)


def test_more_errors():
    with pytest.raises(KohyaConfigError, match="fine-tuning"):
        from_kohya({"datasets": [{"subsets": [{"image_dir": "a", "metadata_file": "m.json"}]}]})
    with pytest.raises(KohyaConfigError, match="N_name"):
        from_kohya({"datasets": [{"subsets": [{"image_dir": "a/x", "num_repeats": 2}, {"image_dir": "b/y"}]}]})
    with pytest.raises(KohyaConfigError, match="several"):
        from_kohya({"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a"}]},
                                 {"resolution": 768, "subsets": [{"image_dir": "b"}]}]})
    with pytest.raises(KohyaConfigError, match="lr_scheduler"):
        from_kohya({"lr_scheduler": "warmup_stable_decay"})
    with pytest.raises(KohyaConfigError, match="max_token_length"):  # our validation, named as from kohya
        from_kohya({"max_token_length": 300})
    # kohya N_name folders under one parent are one train_data_dir
    imp = from_kohya({"datasets": [{"subsets": [{"image_dir": "p/10_a", "num_repeats": 10},
                                                {"image_dir": "p/3_b", "num_repeats": 3}]}]})
    assert imp.config.train_data_dir == "p" and imp.config.num_repeats == 1
    # v_parameterization -> v prediction
    assert from_kohya({"v2": True, "v_parameterization": True}).config.prediction_type == "v_prediction"


def test_export_round_trip(tmp_path):
    cfg = TrainConfig(train_data_dir="/d", base_model="/m.safetensors", lora_rank=12, lora_alpha=6, learning_rate=3e-4,
                      text_encoder_lr=1e-4, train_text_encoder=True, optimizer="Lion", weight_decay=0.02,
                      lr_scheduler="polynomial", lr_warmup_steps=50, lr_scheduler_power=2.0, batch_size=3, epochs=7,
                      seed=9, clip_skip=2, max_token_length=150, shuffle_caption=True, keep_tokens=2,
                      caption_tag_dropout_rate=0.1, reg_data_dir="/r", prior_loss_weight=0.5, loss_type="smooth_l1",
                      huber_schedule="constant", huber_c=0.3, multires_noise_iterations=8,
                      multires_noise_discount=0.2, ip_noise_gamma=0.05, down_lr_weight="1,1,1,1,1,1,1,1,1,1,1,0.5",
                      block_dims="4," * 24 + "4", ema_decay=0.99, log_with="tensorboard", logging_dir="/l",
                      log_prefix="x", output_name="rt", output_dir="/o", prediction_type="v_prediction",
                      optimizer_args={"decouple": True})
    text = to_kohya_toml(cfg)
    path = tmp_path / "rt.toml"
    path.write_text(text)
    data = read_file(str(path))
    assert data["additional_network_arguments"]["network_module"] == "networks.lora"
    back = load_kohya(str(path))
    assert back.warnings == []
    # kohya has no mixed_precision "auto": the file says what ours does on a GPU with bf16
    assert data["training_arguments"]["mixed_precision"] == "bf16" and back.config.mixed_precision == "bf16"
    assert back.config.to_dict() == cfg.validate().replace(mixed_precision="bf16").to_dict()


@pytest.mark.slow
def test_cli_dry_run_and_export(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "lora_train", "train", corpus("sd_trainer_lora.toml"), "--dry-run",
                        "--seed", "7"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["clip_skip"] == 2 and printed["lora_rank"] == 32 and printed["seed"] == 7
    assert "random_crop=True" in r.stderr
    run_yaml = tmp_path / "run.yaml"
    TrainConfig.from_dict(printed).save(str(run_yaml))
    out = tmp_path / "run.toml"
    r = subprocess.run([sys.executable, "-m", "lora_train", "export-config", "--kohya", str(run_yaml), "--out",
                        str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_kohya(str(out)).config.to_dict() == TrainConfig.from_dict(printed).to_dict()
    r = subprocess.run([sys.executable, "-m", "lora_train", "train", corpus("lycoris_ia3.toml"), "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "algo=ia3" in r.stderr


def test_kohya_ss_gui_toml_maps_like_its_json():
    a, b = load_kohya(corpus("kohya_ss_gui.toml")), load_kohya(corpus("kohya_ss_gui.json"))
    assert a.config.to_dict() == b.config.to_dict() and a.warnings == b.warnings


# ------------------------------------------------------------------------------------------------ network types
NET_KEYS = ("network_type", "lora_rank", "lora_alpha", "conv_rank", "conv_alpha", "factor", "full_matrix", "dropout",
            "rank_dropout", "module_dropout")


def _export_import(cfg, tmp_path):
    path = tmp_path / "net.toml"
    path.write_text(to_kohya_toml(cfg))
    return read_file(str(path))["additional_network_arguments"], load_kohya(str(path)).config


@pytest.mark.parametrize("base, kind, fields, module, args", [
    ("tiny", None, dict(network_type="lora", dropout=0.1), "networks.lora", []),
    ("tiny", None, dict(network_type="locon", conv_rank=4, conv_alpha=2), "networks.lora",
     ["conv_dim=4", "conv_alpha=2"]),
    ("tiny", None, dict(network_type="loha", rank_dropout=0.1), "lycoris.kohya",
     ["algo=loha", "preset=attn-mlp", "rank_dropout=0.1"]),
    ("tiny", None, dict(network_type="lokr", factor=4, full_matrix=True, conv_rank=2, module_dropout=0.2),
     "lycoris.kohya", ["algo=lokr", "conv_dim=2", "conv_alpha=2", "factor=4", "full_matrix=True",
                       "module_dropout=0.2"]),
    ("tiny", None, dict(network_type="dora", conv_rank=3, conv_alpha=1.5, rank_dropout=0.05), "lycoris.kohya",
     ["algo=lora", "dora_wd=True", "conv_dim=3", "conv_alpha=1.5", "rank_dropout=0.05"]),
    ("tiny-flux", "flux", dict(network_type="lora", dropout=0.1), "networks.lora_flux", []),
    ("tiny-sd3", "sd3", dict(network_type="lora"), "networks.lora_sd3", []),
    ("tiny-qwen-image", "qwen_image", dict(network_type="lora"), "networks.lora_qwen_image", []),  # musubi-tuner's
    ("tiny-z-image", "z_image", dict(network_type="lora"), "networks.lora_zimage", []),
    ("tiny-chroma", "chroma", dict(network_type="lora"), "networks.lora_flux", []),  # sd-scripts' model_type chroma
    ("tiny-wan", "wan", dict(network_type="lora"), "networks.lora_wan", []),
    ("tiny-flux2-klein", "flux2", dict(network_type="lora"), "networks.lora_flux_2", []),
])
def test_network_types_round_trip(tmp_path, base, kind, fields, module, args):
    """TrainConfig -> kohya TOML -> TrainConfig keeps the network: the module and network_args kohya needs, the same
    type and fields, and the same network the trainer builds (NetworkSpec)."""
    from lora_train.networks.network import NetworkSpec

    cfg = TrainConfig(base_model=base, train_data_dir="/d", lora_rank=8, lora_alpha=4, **fields)
    written, back = _export_import(cfg, tmp_path)
    assert written["network_module"] == module
    assert written.get("network_args", []) == args
    assert written.get("network_dropout") == (cfg.dropout or None)
    for k in NET_KEYS:
        if k != "conv_alpha":  # exported explicitly (kohya's default is 1, ours = conv_rank)
            assert getattr(back, k) == getattr(cfg, k), k
    assert NetworkSpec.from_config(back, kind) == NetworkSpec.from_config(cfg, kind)


def test_locon_without_conv_rank_exports_the_rank():
    """locon with conv_rank 0 trains the convolutions at lora_rank: kohya must be told so."""
    net = to_kohya_dict(TrainConfig(network_type="locon", lora_rank=6))["additional_network_arguments"]
    assert net["network_module"] == "networks.lora" and net["network_args"] == ["conv_dim=6", "conv_alpha=6"]


def test_family_modules_match_the_files_metadata():
    from lora_train.networks.network import NetworkSpec, metadata
    assert MODULE_FAMILY["networks.lora_flux"] == "flux" and MODULE_FAMILY["networks.lora_sd3"] == "sd3"
    for module, kind in MODULE_FAMILY.items():  # what a file says is what the kohya door reads back
        assert metadata(NetworkSpec(), kind)["ss_network_module"] == module


def test_flux_lora_flux_config():
    imp = load_kohya(corpus("flux_lora.toml"))
    c = imp.config
    assert (c.network_type, c.lora_rank, c.lora_alpha, c.dropout, c.conv_rank) == ("lora", 16, 8.0, 0.1, 0)
    assert (c.loraplus_lr_ratio, c.train_text_encoder, c.resolution) == (4.0, False, 1024)
    assert (c.ae, c.clip_l, c.t5xxl) == ("/models/ae.safetensors", "/models/clip_l.safetensors",
                                         "/models/t5xxl_fp16.safetensors")
    assert (c.timestep_sampling, c.discrete_flow_shift) == ("shift", 3.1582)
    assert imp.warnings == []  # the base model file is not here: the family comes from it when it is loaded


def test_lycoris_lokr_config():
    imp = load_kohya(corpus("lycoris_lokr.toml"))
    c = imp.config
    assert (c.network_type, c.lora_rank, c.lora_alpha, c.factor, c.full_matrix) == ("lokr", 16, 8.0, 8, False)
    assert (c.conv_rank, c.conv_alpha, c.rank_dropout, c.module_dropout) == (8, 4.0, 0.05, 0.1)
    assert any("preset full" in w and "conv_in" in w for w in imp.warnings)


def test_kohya_locon_config():
    c = load_kohya(corpus("lora_conv.toml")).config
    assert (c.network_type, c.lora_rank, c.lora_alpha, c.conv_rank, c.conv_alpha, c.dropout) == (
        "locon", 32, 16.0, 8, 4.0, 0.1)
    # kohya's networks.lora: conv_alpha defaults to 1
    c = from_kohya({"network_module": "networks.lora", "network_args": {"conv_dim": 4}}).config
    assert (c.network_type, c.conv_rank, c.conv_alpha) == ("locon", 4, 1.0)


def test_lycoris_conv_defaults():
    """LyCORIS trains the 3x3 convolutions at network_dim / network_alpha unless conv_dim or the preset says
    otherwise; its lora / locon are our locon, with dora_wd our dora."""
    c = from_kohya({"network_module": "lycoris.kohya", "network_dim": 12, "network_alpha": 6,
                    "network_args": ["algo=lora"]}).config
    assert (c.network_type, c.conv_rank, c.conv_alpha) == ("locon", 12, 6.0)
    c = from_kohya({"network_module": "lycoris.kohya", "network_dim": 12,
                    "network_args": ["algo=locon", "preset=attn-mlp", "dropout=0.1"]}).config
    assert (c.network_type, c.conv_rank, c.dropout) == ("lora", 0, 0.1)
    c = from_kohya({"network_module": "lycoris.kohya", "network_dim": 8,
                    "network_args": ["algo=loha", "conv_dim=4", "conv_alpha=2", "module_dropout=0.1"]}).config
    assert (c.network_type, c.conv_rank, c.conv_alpha, c.module_dropout) == ("loha", 4, 2.0, 0.1)
    c = from_kohya({"network_module": "lycoris.kohya", "network_args": ["algo=lora", "dora_wd=True",
                                                                        "preset=attn-mlp"]}).config
    assert (c.network_type, c.conv_rank) == ("dora", 0)


def test_kohya_ss_gui_lora_types():
    base = {"pretrained_model_name_or_path": "/m.safetensors", "train_data_dir": "img", "network_dim": 8,
            "network_alpha": 4, "conv_dim": 0, "conv_alpha": 1, "factor": -1, "rank_dropout": 0, "module_dropout": 0,
            "dora_wd": False, "use_tucker": False, "use_cp": False, "LyCORIS_preset": "full"}
    c = from_kohya({**base, "LoRA_type": "LyCORIS/LoKr", "factor": 4, "conv_dim": 2}).config
    assert (c.network_type, c.factor, c.conv_rank, c.conv_alpha) == ("lokr", 4, 2, 1.0)
    c = from_kohya({**base, "LoRA_type": "LyCORIS/LoCon", "dora_wd": True, "rank_dropout": 0.1}).config
    assert (c.network_type, c.conv_rank, c.conv_alpha, c.rank_dropout) == ("dora", 8, 1.0, 0.1)
    c = from_kohya({**base, "LoRA_type": "LyCORIS/LoHa", "LyCORIS_preset": "attn-mlp"}).config
    assert (c.network_type, c.conv_rank) == ("loha", 0)
    c = from_kohya({**base, "LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": 4}).config
    assert (c.network_type, c.conv_rank, c.conv_alpha) == ("locon", 8, 4.0)
    imp = from_kohya({**base, "LoRA_type": "Standard", "conv_dim": 8})
    assert (imp.config.network_type, imp.config.conv_rank) == ("lora", 0)  # kohya_ss passes no conv_dim for it
    assert any("conv_dim 8 is not used" in w for w in imp.warnings)
    assert from_kohya({**base, "LoRA_type": "Flux1"}).config.network_type == "lora"
    imp = load_kohya(corpus("locon_gui.json"))  # LoRA_type Standard with conv_dim 8
    assert imp.config.network_type == "lora" and any("Kohya LoCon" in w for w in imp.warnings)


def test_sd_scripts_ignores_gui_fields():
    """In an sd-scripts file (no LoRA_type) a top-level conv_dim is no argument: listed as not used."""
    imp = from_kohya({"network_module": "networks.lora", "conv_dim": 8, "factor": 4})
    assert imp.config.network_type == "lora" and "conv_dim=8" in imp.warnings[0] and "factor=4" in imp.warnings[0]


@pytest.mark.parametrize("data, key, words", [
    ({"network_module": "networks.oft"}, "network_module", "networks.oft"),
    ({"network_module": "networks.control_net_lllite"}, "network_module", "networks.control_net_lllite"),
    ({"network_module": "networks.dylora"}, "network_module", "networks.dylora"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=glora"]}, "network_args", "algo=glora"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=full"]}, "network_args", "algo=full"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "dora_wd=True"]}, "network_args",
     "algo=loha with dora_wd=True"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "use_tucker=True"]}, "network_args",
     "use_tucker=True"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "decompose_both=True"]}, "network_args",
     "decompose_both=True"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lora", "preset=unet-transformer-only"]},
     "network_args", "preset=unet-transformer-only"),
    ({"network_module": "networks.lora", "network_args": ["conv_dim=4", "conv_block_dims=2,2,2"]}, "network_args",
     "conv_block_dims"),
    ({"network_module": "networks.lora_flux", "network_args": ["train_blocks=single"]}, "network_args",
     "train_blocks=single"),
    ({"network_module": "networks.lora_flux", "network_args": ["split_qkv=True"]}, "network_args", "split_qkv"),
    ({"LoRA_type": "LyCORIS/iA3"}, "network_args", "algo=ia3"),
    ({"LoRA_type": "LyCORIS/GLoRA"}, "network_args", "algo=glora"),
    ({"LoRA_type": "Kohya DyLoRA"}, "network_module", "LoRA_type 'Kohya DyLoRA'"),
    ({"LoRA_type": "Flux1", "split_mode": True}, "network_args", "train_blocks=single"),
    ({"LoRA_type": "Something New"}, "LoRA_type", "Something New"),
    ({"network_module": "networks.lora", "network_args": ["rank_dropout=0.1"]}, "rank_dropout", "network_type lora"),
])
def test_networks_we_do_not_train_are_errors(data, key, words):
    with pytest.raises(KohyaConfigError) as ei:
        from_kohya(data)
    assert ei.value.key == key and words in str(ei.value), str(ei.value)


def test_family_module_against_the_base_model(tmp_path):
    from safetensors.torch import save_file
    import torch

    with pytest.raises(KohyaConfigError) as ei:
        from_kohya({"network_module": "networks.lora_flux", "pretrained_model_name_or_path": "tiny-sd3"})
    assert "Flux.1" in str(ei.value) and 'network_module = "networks.lora_sd3"' in str(ei.value)
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd15))
    with pytest.raises(KohyaConfigError, match='network_module = "networks.lora"'):
        from_kohya({"network_module": "networks.lora_sd3", "pretrained_model_name_or_path": str(sd15)})
    # a base model that cannot be checked here (missing, or not a model we can read cheaply): accepted
    for base in ("/nowhere/flux1-dev.safetensors", "tiny-flux", "tiny-chroma"):  # sd-scripts' Flux network: Chroma too
        c = from_kohya({"network_module": "networks.lora_flux", "pretrained_model_name_or_path": base}).config
        assert c.network_type == "lora" and c.base_model == base
    with pytest.raises(KohyaConfigError) as ei:  # musubi-tuner's module for another family's base
        from_kohya({"network_module": "networks.lora_qwen_image", "pretrained_model_name_or_path": "tiny-z-image"})
    assert 'network_module = "networks.lora_zimage"' in str(ei.value) and "Qwen-Image" in str(ei.value)
