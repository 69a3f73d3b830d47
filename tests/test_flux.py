"""Flux.1 (issue #16) on the tiny models: loading offline, training end to end, learning, resume, memory savers."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_loss_falls_with_strength, flow_file_error, run_trainer, small_cfg
from lora_train.models import conditioning, flow
from lora_train.models.base import ModelError
from lora_train.models.flux import build_tiny_flux, save_flux_folder
from lora_train.models.loading import load_base_model
from lora_train.networks import flow_names
from lora_train.networks import lora as L
from lora_train.training import flow as ft
from lora_train.training.loss import diffusion_loss as L_loss
from lora_train.training.memory import BlockSwap, apply_fp8_base
from lora_train.training.device import encode_prompts
from lora_train.training.state import list_states
from lora_train.training.trainer import Trainer

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("flux") / "data"), n=8, size=64)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    cfg = small_cfg(data, tmp_path_factory.mktemp("flux_run"), base_model="tiny-flux", output_name="fx", lora_rank=8,
                    learning_rate=2e-3, epochs=15, lr_scheduler="cosine", lr_warmup_steps=5, trigger_word="lrtdemo")
    tr = Trainer(cfg)
    return tr, tr.run()


def test_tiny_flux_layout():
    m = load_base_model("tiny-flux")
    assert m.kind == "flux" and m.extra["variant"] == "flux-dev" and m.prediction_type == "flow"
    assert type(m.unet).__name__ == "FluxTransformer2DModel" and m.unet.config.guidance_embeds
    assert type(m.text_encoder_2).__name__ == "T5EncoderModel" and m.text_encoder_3 is None
    assert m.vae.config.latent_channels == 16 and m.vae_shift != 0
    assert type(m.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not conditioning.is_sdxl(m)  # a second text encoder, but not SDXL
    s = load_base_model("tiny-flux-schnell")
    assert s.extra["variant"] == "flux-schnell" and not s.unet.config.guidance_embeds
    cond = encode_prompts(m, ["a red circle", "lrtdemo"], torch.device("cpu"))
    assert set(cond) == {"hidden", "pooled", "mask"} and cond["hidden"].shape == (2, 32, 32)
    assert [c for c, _ in conditioning.Conditioner(m).text_encoders] == ["te1"]  # T5 is never trained
    targets = flow_names.target_modules("flux", m.unet)
    assert "transformer_blocks.0.attn.add_q_proj" in targets and "single_transformer_blocks.1.proj_mlp" in targets
    assert "transformer_blocks.0.norm1.linear" in targets and not any(t.startswith(("x_embedder", "proj_out"))
                                                                     for t in targets)


def test_folder_round_trip_offline(tmp_path):
    """A diffusers FluxPipeline folder loads offline (conftest blocks the network) to the same model."""
    m = build_tiny_flux()
    save_flux_folder(m, str(tmp_path / "flux"))
    m2 = load_base_model(str(tmp_path / "flux"))
    assert m2.kind == "flux" and m2.extra["variant"] == "flux-dev" and flow.t5_max_length(m2) == 32
    cond = flow.encode(m, ["a red circle"])
    cond2 = flow.encode(m2, ["a red circle"])
    for k in cond:
        assert torch.allclose(cond[k], cond2[k], atol=1e-6), k
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400.0])
    with torch.no_grad():
        assert torch.allclose(flow.predict(m, m.unet, x, t, cond), flow.predict(m2, m2.unet, x, t, cond2), atol=1e-5)


def test_wrong_folder_message(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model_index.json").write_text('{"_class_name": "FluxControlPipeline"}')
    with pytest.raises(ModelError) as e:
        load_base_model(str(tmp_path / "x"))
    assert "FluxControlPipeline" in str(e.value) and "FluxPipeline" in str(e.value)


def test_training_files_and_metadata(trained):
    tr, res = trained
    assert res.steps == 60 and not res.nan_stopped
    sd = load_file(res.lora_path)
    modules = {k.split(".")[0] for k in sd}
    assert modules == {flow_names.kohya_name("unet", t, "flux") for t in flow_names.target_modules("flux", tr.model.unet)}
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_discrete_flow_shift"] == "3.1582"
    assert meta["ss_guidance_scale"] == "1" and meta["ss_t5xxl_max_token_length"] == "32"
    assert meta["ss_prediction_type"] == "flow"


def test_learning(trained):
    """Fixed-noise flow loss of the training images falls with the LoRA's strength, monotone."""
    assert_loss_falls_with_strength(trained[0], "tiny-flux")


def test_round_trip_kohya_file(trained):
    """The written file read back into a fresh tiny-flux gives the trained model's output (<= 1e-5)."""
    tr, res = trained
    assert flow_file_error(tr.model, res.lora_path, build_tiny_flux) <= 1e-5


def _run(cfg, stop_at=None, resume_from=None):
    return run_trainer(cfg, build_tiny_flux, stop_at, resume_from)


def test_resume_bitwise(data, tmp_path):
    kw = dict(base_model="tiny-flux", max_train_steps=5, lr_warmup_steps=1, flip_aug=True, caption_dropout_rate=0.2,
              timestep_sampling="flux_shift")
    _, ref = _run(small_cfg(data, tmp_path / "a", **kw))
    cfg = small_cfg(data, tmp_path / "b", **kw)
    _, r1 = _run(cfg, stop_at=2)
    assert r1.stopped and list_states(str(tmp_path / "b"))
    _, r2 = _run(cfg, resume_from=str(tmp_path / "b"))
    a, b = load_file(ref.lora_path), load_file(r2.lora_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert r2.losses == ref.losses


def _lora_model(seed=0):
    m = build_tiny_flux()
    torch.manual_seed(seed)
    L.inject(m.unet, L.denoiser_target_modules(m), 4, 4)
    with torch.no_grad():
        for p in L.lora_parameters(m.unet):
            p.normal_(0, 0.05)
            p.requires_grad_(True)
    return m


def _loss_and_grads(m, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g)
    cond = flow.encode(m, ["a red circle", "blue square"])
    loss = ft.flow_matching_loss(m, lat, cond, noise, torch.tensor([300.0, 700.0]), in_dtype=dtype)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in L.lora_parameters(m.unet)])


def test_fp8_base_close_to_bf16():
    """fp8_base (block Linear weights stored float8_e4m3fn, computed in bf16; LoRA fp32): the loss is within 1% of the
    bf16 loss on tiny-flux and the LoRA gradients point the same way (cosine >= 0.99)."""
    ref = _lora_model()
    ref.unet.to(torch.bfloat16)
    for p in L.lora_parameters(ref.unet):
        p.data = p.data.float()
    m = _lora_model()
    m.unet.to(torch.bfloat16)
    for p in L.lora_parameters(m.unet):
        p.data = p.data.float()
    n = apply_fp8_base(m.unet, torch.bfloat16)
    assert n == 40 and m.unet.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert all(p.dtype == torch.float32 for p in L.lora_parameters(m.unet))
    assert m.unet.x_embedder.weight.dtype == torch.bfloat16  # outside the blocks: untouched
    l_ref, g_ref = _loss_and_grads(ref, torch.bfloat16)
    l8, g8 = _loss_and_grads(m, torch.bfloat16)
    print("bf16 / fp8 loss:", l_ref, l8)
    assert abs(l8 - l_ref) / l_ref < 0.01
    assert torch.nn.functional.cosine_similarity(g_ref, g8, dim=0) >= 0.99


def test_block_swap_same_loss_and_grads():
    l0, g0 = _loss_and_grads(_lora_model())
    m = _lora_model()
    swap = BlockSwap(m.unet, 3, "cpu")
    assert len(swap.blocks) == 3 and swap.blocks[-1] is m.unet.single_transformer_blocks[-1]
    l1, g1 = _loss_and_grads(m)
    assert l1 == l0 and torch.equal(g1, g0)
    assert swap.moves == 3 + 2 * 3  # the first offload, then in and out around each swapped block's forward
    assert all(p.device.type == "cpu" for b in swap.blocks for p in b.parameters())


def test_gradient_checkpointing_same_grads():
    l0, g0 = _loss_and_grads(_lora_model())
    m = _lora_model()
    m.unet.enable_gradient_checkpointing()
    m.unet.train()
    l1, g1 = _loss_and_grads(m)
    assert abs(l1 - l0) < 1e-6 and torch.allclose(g1, g0, atol=1e-6)


def test_cli_train_tiny_flux(data, tmp_path):
    from lora_train.cli.main import main

    cfg = small_cfg(data, tmp_path, base_model="tiny-flux-schnell", max_train_steps=2, fp8_base=True,
                    blocks_to_swap=2, gradient_checkpointing=True, apply_t5_attn_mask=True,
                    sample_every_n_steps=2, sample_prompts=["a red circle"], sample_steps=2)
    cfg.save(str(tmp_path / "c.yaml"))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and "ss_guidance_scale" not in meta
    assert meta["ss_fp8_base"] == "True" and meta["ss_apply_t5_attn_mask"] == "True"
    assert os.listdir(tmp_path / "samples")  # a sample grid through diffusers' FluxPipeline during training


def test_standalone_ab_grid(trained):
    """The standalone app's strength grid runs through diffusers' FluxPipeline with the trained file."""
    import numpy as np

    from lora_train.sampler import Generator, GenParams, build_grid

    tr, res = trained
    gen = Generator(build_tiny_flux(), lora_dirs=[res.output_dir])
    base = GenParams(prompt="lrtdemo a red circle", seed=3, steps=3, cfg_scale=1.0, width=64, height=64)
    grid = build_grid(gen, base, "fx", strengths=[0.0, 1.0], seeds=[3])
    imgs = [np.asarray(c.image, dtype=np.float32) for c in grid.cells]
    assert len(imgs) == 2 and imgs[0].shape == (64, 64, 3)
    assert np.abs(imgs[0] - imgs[1]).mean() > 0.5  # the LoRA changes the picture


def test_lr_finder_on_tiny_flux(data, tmp_path):
    """The LR range test runs the same flow loss and timestep sampling as the run."""
    import math

    from lora_train.tuning.lr_finder import lr_range_test

    cfg = small_cfg(data, tmp_path, base_model="tiny-flux")
    res = lr_range_test(cfg, steps=6, lr_min=1e-5, lr_max=1e-2)
    assert len(res.losses) == 6 and all(math.isfinite(x) for x in res.losses)


def test_cli_tiny_model_folder(tmp_path):
    from lora_train.cli.main import main

    assert main(["tiny-model", str(tmp_path / "f"), "--family", "tiny-flux-schnell"]) == 0
    m = load_base_model(str(tmp_path / "f"))
    assert m.kind == "flux" and m.extra["variant"] == "flux-schnell"


def test_kohya_loss_options_on_flux(tmp_path, demo_data):
    """loss_type huber (snr schedule: noise / signal = s / (1 - s) for flow matching), prior weights and input noise
    reach the flow-matching loss; block-wise options are refused for Flux with a message."""
    from lora_train.training import noise as noise_mod

    m = load_base_model("tiny-flux")
    c = noise_mod.huber_c_for("huber", "snr", 0.1, 1.0, torch.tensor([0.0, 500.0, 990.0]), m.noise_scheduler)
    assert c[0] == pytest.approx(1.0) and c[0] > c[1] > c[2] >= 0.1
    lat = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = encode_prompts(m, ["a", "b"], torch.device("cpu"))
    ft.configure(m, small_cfg(demo_data, tmp_path, base_model="tiny-flux"))
    t = torch.tensor([300.0, 700.0])
    plain = L_loss(m, lat, cond, noise, t, reduction="none")
    weighted = L_loss(m, lat, cond, noise, t, reduction="none", weights=torch.tensor([1.0, 0.5]))
    assert torch.allclose(weighted, plain * torch.tensor([1.0, 0.5]))
    big = lambda p, q: noise_mod.elementwise_loss(p, q, "huber", torch.full((2,), 100.0))  # noqa: E731  (~ MSE)
    assert torch.allclose(L_loss(m, lat, cond, noise, t, reduction="none", elementwise=big), plain, rtol=2e-2)
    assert not torch.allclose(L_loss(m, lat, cond, noise, t, reduction="none", input_noise=noise * 1.1), plain)
    cfg = small_cfg(demo_data, tmp_path / "b", base_model="tiny-flux", down_lr_weight="1,1,1,1,1,1,1,1,1,1,1,0")
    with pytest.raises(ValueError, match="plain LoRA on SD1"):
        Trainer(cfg).run()
