"""The advisor knows Flux.1 and SD3.5 (issue #16): lr, rank, resolution, timestep sampling, VRAM tiers, with reasons."""
import pytest

from lora_train.config import TrainConfig
from lora_train.tuning.advisor import suggest


@pytest.mark.parametrize("vram,fp8,swap,res", [(80, False, 0, 1024), (24, True, 0, 1024), (16, True, 36, 1024),
                                               (12, True, 36, 512), (8, True, 50, 512)])
def test_flux_tiers(vram, fp8, swap, res):
    s = suggest(30, task="character", base="flux", vram_gb=vram)
    assert (s.fp8_base, s.blocks_to_swap, s.resolution) == (fp8, swap, res)
    assert s.gradient_checkpointing and s.batch_size == 1 and s.mixed_precision == "bf16"
    assert s.lora_rank == 16 and 1e-4 <= s.learning_rate <= 4e-4
    assert s.timestep_sampling == "shift" and s.discrete_flow_shift == pytest.approx(3.1582)
    assert "GB" in s.reason("fp8_base") and "sd-scripts" in s.reason("timestep_sampling")
    TrainConfig.from_dict(dict(s.to_config_dict(), base_model="tiny-flux"))  # a valid config


def test_sd3_advice():
    s = suggest(80, task="style", base="sd3", vram_gb=12)
    assert s.learning_rate == pytest.approx(1e-4) and s.resolution == 1024 and not s.fp8_base
    assert s.timestep_sampling == "sigma" and s.weighting_scheme == "logit_normal"
    assert any("Large" in n for n in s.notes)
    assert suggest(80, base="sd3", vram_gb=8).fp8_base
    assert s.total_steps == s.steps_per_epoch * s.epochs and s.steps_per_epoch == 80  # batch 1


def test_flow_training_says_when_training_utils_cannot_import(monkeypatch):
    """AUTOMATIC1111's transformers 4.30.2 breaks `diffusers.training_utils`: a Flux / SD3 run says where to train."""
    import sys

    import pytest
    from lora_train.training import flow

    monkeypatch.setitem(sys.modules, "diffusers.training_utils", None)  # import -> ImportError
    with pytest.raises(RuntimeError, match="Train Flux / SD3 in Forge, ComfyUI"):
        flow._training_utils()


@pytest.mark.parametrize("vram,fp8,swap,res", [(96, False, 0, 1024), (40, True, 0, 1024), (24, True, 16, 1024),
                                               (16, True, 30, 768), (12, True, 45, 512)])
def test_qwen_image_tiers(vram, fp8, swap, res):
    """Qwen-Image (20 B): the family's tiers and musubi-tuner's settings, with the reasons."""
    s = suggest(30, task="character", base="qwen_image", vram_gb=vram)
    assert (s.fp8_base, s.blocks_to_swap, s.resolution) == (fp8, swap, res)
    assert s.learning_rate == pytest.approx(5e-5) and s.lora_rank == 16 and s.batch_size == 1
    assert suggest(80, base="qwen_image", vram_gb=vram).learning_rate == pytest.approx(1e-4)
    assert s.timestep_sampling == "shift" and s.discrete_flow_shift == pytest.approx(2.2)
    assert not s.train_text_encoder and "Qwen2.5-VL" in s.reason("train_text_encoder")
    assert "text_encoder_lr" not in s.to_config_dict()  # no text encoder trains: no text-encoder lr is advised
    assert "musubi-tuner" in s.reason("discrete_flow_shift") and "GB" in s.reason("blocks_to_swap")
    TrainConfig.from_dict(dict(s.to_config_dict(), base_model="tiny-qwen-image"))  # a valid config


def test_z_image_advice_warns_about_turbo():
    s = suggest(40, task="style", base="z_image", vram_gb=24)
    assert (s.fp8_base, s.blocks_to_swap, s.resolution) == (True, 0, 1024)
    assert s.learning_rate == pytest.approx(1e-4) and s.discrete_flow_shift == pytest.approx(2.0)
    assert any("Turbo" in n and "adapter" in n for n in s.notes)
    TrainConfig.from_dict(dict(s.to_config_dict(), base_model="tiny-z-image"))


def test_chroma_advice():
    s = suggest(40, task="character", base="chroma", vram_gb=24)
    assert (s.fp8_base, s.blocks_to_swap, s.resolution) == (True, 0, 1024)
    assert s.timestep_sampling == "sigmoid" and not s.train_text_encoder and "T5" in s.reason("train_text_encoder")
    TrainConfig.from_dict(dict(s.to_config_dict(), base_model="tiny-chroma"))


def test_wan_advice_says_images_only():
    s = suggest(60, task="style", base="wan", vram_gb=16)
    assert (s.fp8_base, s.blocks_to_swap) == (True, 20) and s.learning_rate == pytest.approx(2e-4)
    assert s.discrete_flow_shift == pytest.approx(3.0) and any("one frame" in n for n in s.notes)
    TrainConfig.from_dict(dict(s.to_config_dict(), base_model="tiny-wan"))


def test_flux2_klein_advice():
    s = suggest(40, task="character", base="flux2", vram_gb=12)
    assert (s.fp8_base, s.blocks_to_swap, s.resolution) == (True, 0, 1024) and s.timestep_sampling == "flux_shift"
    TrainConfig.from_dict(dict(s.to_config_dict(), base_model="tiny-flux2-klein"))
