"""SD3 / SD3.5 (issue #16) on the tiny model: loading offline, conditioning, training, learning, text-encoder LoRA."""
import pytest
import torch
from safetensors import safe_open

from conftest import assert_loss_falls_with_strength, small_cfg
from lora_train.models import conditioning, flow
from lora_train.models.loading import load_base_model
from lora_train.models.sd3 import TINY_SD3_TRANSFORMER, build_tiny_sd3, save_sd3_folder, variant_of
from lora_train.networks import lora as L
from lora_train.training.device import encode_prompts
from lora_train.training.trainer import Trainer

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("sd3") / "data"), n=8, size=64)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    cfg = small_cfg(data, tmp_path_factory.mktemp("sd3_run"), base_model="tiny-sd3", output_name="s3", lora_rank=8,
                    learning_rate=2e-3, epochs=15, lr_scheduler="cosine", lr_warmup_steps=5)
    tr = Trainer(cfg)
    return tr, tr.run()


def test_tiny_sd3_layout_and_conditioning():
    m = load_base_model("tiny-sd3")
    assert m.kind == "sd3" and m.extra["variant"] == "sd35-medium" and not conditioning.is_sdxl(m)
    assert m.unet.config.dual_attention_layers == (0,) and m.unet.config.qk_norm == "rms_norm"
    assert m.tokenizer_2.pad_token == "!" and type(m.text_encoder_3).__name__ == "T5EncoderModel"
    assert len(m.text_encoders) == 3
    cond = encode_prompts(m, ["a red circle"], torch.device("cpu"))
    # diffusers' StableDiffusion3Pipeline: CLIP-L/G penultimate side by side, zero-padded to T5's width, then T5
    with torch.no_grad():
        ids = lambda tok, n: tok(["a red circle"], padding="max_length", max_length=n, truncation=True,
                                 return_tensors="pt").input_ids
        o1 = m.text_encoder(ids(m.tokenizer, 77), output_hidden_states=True)
        o2 = m.text_encoder_2(ids(m.tokenizer_2, 77), output_hidden_states=True)
        t5 = m.text_encoder_3(ids(m.tokenizer_3, 32))[0]
    clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    assert cond["hidden"].shape == (1, 77 + 32, 64)
    assert torch.allclose(cond["hidden"][:, :77, :56], clip) and cond["hidden"][:, :77, 56:].abs().max() == 0
    assert torch.allclose(cond["hidden"][:, 77:], t5)
    assert torch.allclose(cond["pooled"], torch.cat([o1.text_embeds, o2.text_embeds], dim=-1))
    assert [c for c, _ in conditioning.Conditioner(m).text_encoders] == ["te1", "te2"]


def test_variant_detection():
    from diffusers import SD3Transformer2DModel

    def tr(**kw):
        return SD3Transformer2DModel(**dict(TINY_SD3_TRANSFORMER, **kw))

    assert variant_of(tr()) == "sd35-medium"
    assert variant_of(tr(dual_attention_layers=(), qk_norm=None)) == "sd3-medium"
    assert variant_of(tr(dual_attention_layers=(), qk_norm="rms_norm")) == "sd35-large"


def test_folder_round_trip_offline(tmp_path):
    m = build_tiny_sd3()
    save_sd3_folder(m, str(tmp_path / "sd3"))
    m2 = load_base_model(str(tmp_path / "sd3"))
    assert m2.kind == "sd3" and m2.extra["variant"] == "sd35-medium" and m2.text_encoder_3 is not None
    c1, c2 = flow.encode(m, ["a red circle"]), flow.encode(m2, ["a red circle"])
    assert torch.allclose(c1["hidden"], c2["hidden"], atol=1e-6)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = flow.predict(m, m.unet, x, torch.tensor([500.0]), c1)
        b = flow.predict(m2, m2.unet, x, torch.tensor([500.0]), c2)
    assert torch.allclose(a, b, atol=1e-5)


def test_training_and_metadata(trained):
    tr, res = trained
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "5-medium"  # as sd-scripts writes SD3.5 Medium
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_timestep_sampling"] == "sigma" and meta["ss_weighting_scheme"] == "logit_normal"
    assert "ss_guidance_scale" not in meta


def test_learning(trained):
    """Fixed-noise flow loss of the training images falls with the LoRA's strength, monotone."""
    assert_loss_falls_with_strength(trained[0], "tiny-sd3")


def test_train_text_encoders(data, tmp_path):
    """train_text_encoder trains CLIP-L and CLIP-G (te1, te2), never T5; the file holds both; validation loss."""
    cfg = small_cfg(data, tmp_path, base_model="tiny-sd3", epochs=1, train_text_encoder=True,
                    learning_rate=5e-3, validation_split=0.25, min_snr_gamma=5.0)
    events = []
    tr = Trainer(cfg, callback=events.append)
    res = tr.run()
    assert any("min_snr_gamma does not apply" in e.get("message", "") for e in events)
    assert len(res.val_losses) == 1 and 0 < res.val_losses[0] < 10  # the fixed-noise flow loss of 2 held-out images
    keys = set(safe_open(res.lora_path, "pt").keys())
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert not any(n for n, _ in L.lora_layers(tr.model.text_encoder_3))
