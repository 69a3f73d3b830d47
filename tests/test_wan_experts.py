"""Wan 2.2 A14B's expert pair (#27): a LoRA trains one expert (wan_expert low / high) on the timesteps that expert
denoises (below / above boundary_ratio x 1000), states the expert and the boundary in its file, and its grid runs
both experts through WanPipeline with the LoRA on the expert it was trained for. Pair folders load one expert and
read the other only for grids; expert single files are told by their ComfyUI names."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_trainer, small_cfg
from single_file_layouts import original_layout
from lora_train.config import ConfigError, TrainConfig
from lora_train.models import wan
from lora_train.models.base import ModelError
from lora_train.training import flow as flow_train


def _available():
    try:
        wan.require_pair()
        return True
    except ModelError:
        return False


pytestmark = pytest.mark.skipif(not _available(), reason="this diffusers has no Wan 2.2 A14B pipeline")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("wan_experts") / "data"), n=4, size=64)


def _opts(rng=None):
    return {"timestep_sampling": "shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0, "weighting_scheme": "none",
            "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "sigma_range": rng}


def test_sigma_range_keeps_the_distribution_shape():
    """Restricted draws are the plain draws that fall in the range (same mean there), reproducible by seed."""
    plain = flow_train.sample_sigmas(_opts(), 40000, (16, 16), torch.Generator().manual_seed(0))
    for lo, hi in ((0.875, 1.0), (0.0, 0.875)):
        a = flow_train.sample_sigmas(_opts((lo, hi)), 8000, (16, 16), torch.Generator().manual_seed(1))
        b = flow_train.sample_sigmas(_opts((lo, hi)), 8000, (16, 16), torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and len(a) == 8000
        assert float(a.min()) >= lo and float(a.max()) <= hi and (hi == 1.0 or float(a.max()) < hi)
        inside = plain[(plain >= lo) & (plain <= hi)]
        assert abs(float(a.mean()) - float(inside.mean())) < 0.01, (float(a.mean()), float(inside.mean()))


def _states(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("expert", ["low", "high"])
def test_a_lora_trains_one_expert_in_its_range(data, tmp_path, monkeypatch, expert):
    seen = []
    real = flow_train.sample_timesteps

    def spy(*a, **kw):
        t = real(*a, **kw)
        seen.append(t.clone())
        return t
    monkeypatch.setattr(flow_train, "sample_timesteps", spy)  # the trainer calls it as flow_train.sample_timesteps
    box = {}

    def build():
        m = wan.build_tiny_wan_a14b()
        box.update(low=m.unet, high=m.extra["wan_pair"].held["high"])
        box["before"] = {e: _states(box[e]) for e in ("low", "high")}
        return m
    cfg = small_cfg(data, tmp_path, base_model="tiny-wan-a14b", max_train_steps=4, wan_expert=expert,
                    learning_rate=1e-2)
    tr, res = run_trainer(cfg, build)
    other = "high" if expert == "low" else "low"
    assert tr.model.unet is box[expert] and tr.model.extra["wan_pair"].expert == expert
    ts = torch.cat(seen)
    assert len(ts) >= 4
    if expert == "high":
        assert float(ts.min()) >= 875.0
    else:
        assert float(ts.max()) < 875.0
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    lo, hi = ("875", "1000") if expert == "high" else ("0", "875")
    assert (meta["ss_wan_expert"], meta["ss_wan_boundary_ratio"]) == (f"{expert}_noise", "0.875")
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == (lo, hi)
    # the other expert is untouched and carries no adapter; the file has the plain Wan names
    after = _states(box[other])
    assert set(after) == set(box["before"][other])
    assert all(torch.equal(after[k], box["before"][other][k]) for k in after)
    assert not any("lora" in n for n, _ in box[other].named_modules())
    assert all(k.startswith("lora_unet_blocks_") for k in load_file(res.lora_path))


def test_grid_runs_both_experts_with_the_lora_on_its_expert(data, tmp_path):
    """A high-noise LoRA's grid on a freshly loaded pair (whose unet is the low expert): the file goes onto the
    high expert, WanPipeline switches at the boundary, and the LoRA changes the picture."""
    from lora_train.sampler import Generator, GenParams, build_grid, flow_pipeline

    cfg = small_cfg(data, tmp_path, base_model="tiny-wan-a14b", max_train_steps=6, wan_expert="high",
                    learning_rate=5e-2, output_name="hi")
    _, res = run_trainer(cfg)
    model = wan.build_tiny_wan_a14b()
    pipe = flow_pipeline(model)
    assert pipe.transformer is model.extra["wan_pair"].held["high"] and pipe.transformer_2 is model.unet
    assert pipe.config.boundary_ratio == 0.875
    gen = Generator(model, lora_dirs=[res.output_dir])
    base = GenParams(prompt="lrtdemo a red circle", seed=3, steps=4, cfg_scale=1.0, width=64, height=64)
    grid = build_grid(gen, base, "hi", strengths=[0.0, 1.0], seeds=[3])
    a, b = (np.asarray(c.image, dtype=np.float32) for c in grid.cells)
    assert np.abs(a - b).mean() > 0.05
    assert any("lora" in n for n, _ in model.extra["wan_pair"].held["high"].named_modules())
    assert not any("lora" in n for n, _ in model.unet.named_modules())


def test_pair_folder_loads_one_expert_and_reads_the_other_for_grids(tmp_path):
    model = wan.build_tiny_wan_a14b()
    high = _states(model.extra["wan_pair"].held["high"])
    folder = wan.save_wan_folder(model, str(tmp_path / "Wan2.2-T2V-A14B"))
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"][1] == "WanTransformer3DModel"
    m = wan.load_wan_folder(folder)
    pair = m.extra["wan_pair"]
    assert (pair.expert, m.extra["variant"], pair.folder, pair.boundary_ratio) == ("low", "wan2.2-t2v-a14b", folder,
                                                                                   0.875)
    assert not pair.held  # one transformer in memory until a grid asks for the other
    assert all(torch.equal(v, high[k]) for k, v in wan.other_expert(m).state_dict().items())
    pair.held.clear()
    wan.select_expert(m, "high")
    assert pair.expert == "high" and not pair.held  # the low expert is dropped: read again from the folder if needed
    assert all(torch.equal(v, high[k]) for k, v in m.unet.state_dict().items())
    with pytest.raises(ModelError, match="not valid"):
        wan.select_expert(m, "middle")


def test_expert_files_by_name_and_refusals(tmp_path):
    from lora_train.models.loading import load_base_model

    model = wan.build_tiny_wan_a14b()
    folder = wan.save_wan_folder(model, str(tmp_path / "pair"))
    high = model.extra["wan_pair"].held["high"]
    path = str(tmp_path / "wan2.2_t2v_high_noise_14B_fp16.safetensors")
    save_file(original_layout("wan", high.state_dict(), dtype=None), path)
    m = load_base_model(path, files={"components_folder": folder})
    assert (m.extra["wan_pair"].expert, m.extra["wan_pair"].boundary_ratio) == ("high", 0.875)
    assert all(torch.equal(v, high.state_dict()[k]) for k, v in m.unet.state_dict().items())
    with pytest.raises(ModelError, match="high-noise expert"):
        wan.select_expert(m, "low")  # the file is the high-noise expert: the folder's low one is not it
    assert wan.expert_of_name("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors") == "low"
    assert wan.expert_of_name("wan2.1_t2v_14B_bf16.safetensors") is None
    plain = wan.build_tiny_wan()
    with pytest.raises(ModelError, match="applies to Wan 2.2 A14B"):
        wan.select_expert(plain, "high")


def test_config_checks_the_expert_options():
    TrainConfig(wan_expert="high", timestep_boundary=875).validate()
    TrainConfig(timestep_boundary=0.9).validate()
    with pytest.raises(ConfigError, match="wan_expert"):
        TrainConfig(wan_expert="both").validate()
    with pytest.raises(ConfigError, match="timestep_boundary"):
        TrainConfig(timestep_boundary=1).validate()


def test_advisor_explains_the_experts():
    from lora_train import families
    from lora_train.tuning.advisor import Suggestion

    s = Suggestion()
    families.get("wan").advise(s, 30, "character", "detailed")
    text = " ".join(s.notes)
    assert "low-noise expert" in text and "high-noise expert" in text and "not trained yet" not in text


@pytest.mark.parametrize("lo, hi, boundary, expert", [(875, 1000, None, "high"), (0, 875, None, "low"),
                                                      (0, 900, 0.9, "low"), (100, 1000, None, None)])
def test_musubi_tuner_per_expert_configs_read_as_the_expert(tmp_path, lo, hi, boundary, expert):
    """musubi-tuner trains one A14B expert with --min_timestep / --max_timestep on one side of the boundary."""
    from lora_train.kohya.toml_config import load_kohya

    lines = ['task = "t2v-A14B"', 'network_module = "networks.lora_wan"', "network_dim = 16",
             f"min_timestep = {lo}", f"max_timestep = {hi}", 'timestep_sampling = "shift"', "discrete_flow_shift = 3.0"]
    if boundary is not None:
        lines.append(f"timestep_boundary = {boundary}")
    path = tmp_path / "wan22_high.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    imp = load_kohya(str(path))
    assert imp.config.wan_expert == (expert or "auto")
    if expert:
        assert "min_timestep" not in imp.not_used and any(f"{expert}-noise expert" in w for w in imp.warnings)
    else:
        assert imp.not_used.get("min_timestep") == 100
