"""End to end on the tiny model: training, export layout, learning, round trip, reproducibility, stop."""
import json
import os
import re
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_cfg, unet_out
from lora_train.networks import lora as L
from lora_train.models.tiny import build_tiny
from lora_train.training.device import encode_prompts
from lora_train.training.loss import fixed_noise_loss
from lora_train.training.trainer import Trainer

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes

KEY_RE = re.compile(r"^(lora_unet_[a-z0-9_]+|lora_te_text_model_[a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("run")
    data = write_demo_dataset(str(root / "data"), n=8, size=64)
    cfg = small_cfg(data, root / "out", output_name="e2e", lora_rank=8, learning_rate=2e-3, epochs=40,
                    lr_scheduler="cosine", lr_warmup_steps=5, save_every_n_epochs=20, trigger_word="lrtdemo")
    events = []
    tr = Trainer(cfg, callback=events.append)
    res = tr.run()
    return tr, res, events


def test_files_written(trained):
    tr, res, events = trained
    out = res.output_dir
    names = sorted(os.listdir(out))
    # no resumable state: none was asked and the run finished (issue 14.7)
    assert names == ["e2e-000020.safetensors", "e2e.safetensors", "e2e.yaml", "e2e_loss.csv", "e2e_loss.png"]
    assert not any(n.endswith(".tmp") for n in names)
    kinds = {e["kind"] for e in events}
    assert {"start", "step", "epoch", "checkpoint", "done"} <= kinds
    step = next(e for e in events if e["kind"] == "step")
    assert {"step", "epoch", "loss", "lr", "its", "eta", "total_steps"} <= set(step)
    with open(res.loss_csv) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "step,epoch,loss,lr,val_loss" and len(lines) == res.steps + 1 == 161


def test_kohya_layout_and_metadata(trained, demo_data):
    tr, res, _ = trained
    sd = load_file(res.lora_path)
    assert sd and all(KEY_RE.match(k) for k in sd), [k for k in sd if not KEY_RE.match(k)][:5]
    modules = {k.split(".")[0] for k in sd}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(sd)
        assert sd[f"{m}.alpha"].item() == 8.0 and sd[f"{m}.lora_down.weight"].shape[0] == 8
    # every default target of the tiny UNet is present, and nothing else
    assert modules == {n for n in L.name_map(build_tiny()) if n.startswith("lora_unet_")}
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8"
    assert float(meta["ss_network_alpha"]) == 8 and float(meta["ss_learning_rate"]) == 2e-3
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_lr_warmup_steps"] == "5"
    assert int(meta["ss_steps"]) == 160 and int(meta["ss_epoch"]) == 40 and int(meta["ss_num_epochs"]) == 40
    assert meta["ss_num_train_images"] == "8" and meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "e2e"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_seed"] == "5"
    assert "AdamW" in meta["ss_optimizer"]
    freq = json.loads(meta["ss_tag_frequency"])
    assert freq["data"]["lrtdemo"] == 8
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "lrtdemo" and meta["modelspec.title"] == "e2e"
    assert meta["modelspec.resolution"] == "64x64"
    with safe_open(os.path.join(res.output_dir, "e2e-000020.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_epoch"] == "20"


def _eval_set(tr):
    m = tr.model
    lat = torch.stack(list(tr.latents))
    with torch.no_grad():
        te = encode_prompts(m, [it.caption for it in tr.dataset.items], torch.device("cpu"))
    return lat, te


def test_learning(trained):
    tr, res, _ = trained
    lat, te = _eval_set(tr)
    mse = []
    for s in (0.0, 0.5, 1.0):
        L.set_strength(tr.model.unet, s)
        mse.append(fixed_noise_loss(tr.model, lat, te, seed=11))
    L.set_strength(tr.model.unet, 1.0)
    print("fixed-noise MSE at 0 / 0.5 / 1:", mse)
    assert mse[0] > mse[1] > mse[2]
    assert mse[2] <= 0.6 * mse[0]


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_round_trip_importer_and_diffusers(trained, strength):
    from diffusers import StableDiffusionPipeline

    tr, res, _ = trained
    lat, te = _eval_set(tr)
    L.set_strength(tr.model.unet, strength)
    ref = unet_out(tr.model, lat, te)
    L.set_strength(tr.model.unet, 1.0)
    base = unet_out(build_tiny(), lat, te)
    assert (ref - base).abs().max() > 1e-3  # the adapter does something

    ours = build_tiny()
    unmatched = L.apply(ours, L.load_file(res.lora_path, ours), "x", strength)
    assert unmatched == []
    assert (unet_out(ours, lat, te) - ref).abs().max() <= 1e-5

    from diffusers.utils.constants import USE_PEFT_BACKEND
    if not USE_PEFT_BACKEND:  # diffusers' LoRA loader needs transformers >= 4.34 (the WebUI's 4.30.2 is older)
        pytest.skip("our importer checked; diffusers' load_lora_weights needs its PEFT backend (transformers >= 4.34)")
    m = build_tiny()
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=m.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # folder + weight_name: diffusers 0.31 refuses a bare file path when offline ("you must specify a weight_name")
    pipe.load_lora_weights(os.path.dirname(res.lora_path), weight_name=os.path.basename(res.lora_path),
                           adapter_name="ours")
    pipe.set_adapters(["ours"], adapter_weights=[strength])
    assert (unet_out(m, lat, te) - ref).abs().max() <= 1e-5


def test_text_encoder_lora_round_trip(tmp_path, demo_data):
    cfg = small_cfg(demo_data, tmp_path / "o", train_text_encoder=True, text_encoder_lr=5e-3, learning_rate=5e-3,
                    max_train_steps=6)
    tr = Trainer(cfg)
    res = tr.run()
    sd = load_file(res.lora_path)
    te_keys = [k for k in sd if k.startswith("lora_te_text_model_encoder_layers_")]
    assert len({k.split(".")[0] for k in te_keys}) == 2 * 6  # 2 layers x (q,k,v,out,fc1,fc2)
    assert any(sd[k].abs().max() > 0 for k in te_keys if "lora_up" in k)
    with safe_open(res.lora_path, "pt") as fh:
        assert float(fh.metadata()["ss_text_encoder_lr"]) == 5e-3
    caps = [it.caption for it in tr.dataset.items]
    lat = torch.stack(list(tr.latents))
    with torch.no_grad():
        ref = unet_out(tr.model, lat, encode_prompts(tr.model, caps, torch.device("cpu")))
        ours = build_tiny()
        L.apply(ours, L.load_file(res.lora_path, ours), "x", 1.0)
        got = unet_out(ours, lat, encode_prompts(ours, caps, torch.device("cpu")))
    assert (got - ref).abs().max() <= 1e-5


def test_importer_reads_diffusers_and_peft_layouts(trained):
    tr, res, _ = trained
    model = build_tiny()
    lw = L.load_file(res.lora_path, model)
    diff_sd, peft_sd = {}, {}
    for (comp, path), (down, up, alpha) in lw.modules.items():
        diff_sd[f"unet.{path}.lora_A.weight"] = down
        diff_sd[f"unet.{path}.lora_B.weight"] = up
        peft_sd[f"base_model.model.{path}.lora_A.weight"] = down
        peft_sd[f"base_model.model.{path}.lora_B.weight"] = up
    for sd in (diff_sd, peft_sd):
        back = L.from_state_dict(sd, model)
        assert set(back.modules) == set(lw.modules)
        for k, (d, u, a) in back.modules.items():
            assert torch.equal(d, lw.modules[k][0]) and torch.equal(u, lw.modules[k][1]) and a == 8.0


def test_reproducible_bitwise(tmp_path, demo_data):
    files = []
    for i in range(2):
        cfg = small_cfg(demo_data, tmp_path / f"r{i}", max_train_steps=5, batch_size=2,
                        gradient_accumulation_steps=2)
        files.append(Trainer(cfg).run().lora_path)
    a, b = load_file(files[0]), load_file(files[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)


def test_never_overwrites(tmp_path, demo_data):
    cfg = small_cfg(demo_data, tmp_path / "o", max_train_steps=1)
    Trainer(cfg).run()
    before = open(os.path.join(cfg.output_dir, "t.safetensors"), "rb").read()
    with pytest.raises(FileExistsError, match="t_v2"):
        Trainer(cfg).run()
    assert open(os.path.join(cfg.output_dir, "t.safetensors"), "rb").read() == before
    Trainer(cfg.replace(overwrite=True, seed=9)).run()
    assert open(os.path.join(cfg.output_dir, "t.safetensors"), "rb").read() != before


def test_stop_flag_saves(tmp_path, demo_data):
    stop = threading.Event()

    def cb(ev):
        if ev["kind"] == "step" and ev["step"] == 3:
            stop.set()

    cfg = small_cfg(demo_data, tmp_path / "o", epochs=50)
    res = Trainer(cfg, callback=cb, stop_event=stop).run()
    assert res.stopped and res.steps == 3
    with safe_open(res.lora_path, "pt") as fh:
        assert fh.metadata()["ss_steps"] == "3"


def test_v_prediction_trains(tmp_path, demo_data):
    cfg = small_cfg(demo_data, tmp_path / "o", base_model="tiny-v", max_train_steps=3)
    tr = Trainer(cfg)
    res = tr.run()
    assert tr.model.prediction_type == "v_prediction"
    with safe_open(res.lora_path, "pt") as fh:
        assert fh.metadata()["ss_prediction_type"] == "v_prediction"
