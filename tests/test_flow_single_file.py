"""Flux / SD3 single files offline (network blocked by conftest): the BFL transformer file with ae / clip_l / t5xxl,
fp8-stored files, all-in-one checkpoints, SD3 with and without text encoders inside, clear errors."""
import pytest
import torch
from safetensors.torch import save_file

from flow_fakes import flux_to_bfl, hf_state, sd3_to_original
from lora_train.models import flow
from lora_train.models.base import ModelError
from lora_train.models.flux import build_tiny_flux
from lora_train.models.loading import load_base_model
from lora_train.models.sd3 import build_tiny_sd3
from ldm_writers import vae_to_ldm


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fluxfiles")
    m = build_tiny_flux()
    ae = {k[len("first_stage_model."):]: v for k, v in vae_to_ldm(m.vae).items()}  # BFL ae.safetensors: LDM keys
    return m, {"transformer": _save(flux_to_bfl(m.unet), d / "flux1-tiny.safetensors"),
               "prefixed": _save(flux_to_bfl(m.unet, "model.diffusion_model."), d / "flux1-prefixed.safetensors"),
               "fp8": _save({k: v.to(torch.float8_e4m3fn) for k, v in flux_to_bfl(m.unet).items()},
                            d / "flux1-fp8.safetensors"),
               "ae": _save(ae, d / "ae.safetensors"), "clip_l": _save(hf_state(m.text_encoder), d / "clip_l.safetensors"),
               "t5xxl": _save(hf_state(m.text_encoder_2), d / "t5xxl_fp16.safetensors"),
               "t5_fp8": _save({k: v.to(torch.float8_e4m3fn) for k, v in hf_state(m.text_encoder_2).items()},
                               d / "t5xxl_fp8_e4m3fn.safetensors"),
               "dir": d}


def _same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol), k


@pytest.mark.parametrize("which", ["transformer", "prefixed"])
def test_flux_split_files(flux_files, which):
    m, f = flux_files
    got = load_base_model(f[which], files={"ae": f["ae"], "clip_l": f["clip_l"], "t5xxl": f["t5xxl"]})
    assert got.kind == "flux" and got.extra["variant"] == "flux-dev" and flow.t5_max_length(got) == 32
    _same_weights(got.unet, m.unet)
    _same_weights(got.text_encoder, m.text_encoder)
    _same_weights(got.text_encoder_2, m.text_encoder_2)
    _same_weights(got.vae, m.vae)
    assert got.vae.config.shift_factor == pytest.approx(0.1159)  # Flux's ae factors
    cond = flow.encode(m, ["a red circle"])
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = flow.predict(m, m.unet, x, torch.tensor([500.0]), cond)
        b = flow.predict(got, got.unet, x, torch.tensor([500.0]), cond)
    assert torch.allclose(a, b, atol=1e-5)


def test_flux_fp8_files(flux_files):
    """A transformer and a T5 stored in float8_e4m3fn load as bf16, equal to the fp8-rounded weights."""
    m, f = flux_files
    got = load_base_model(f["fp8"], files={"ae": f["ae"], "clip_l": f["clip_l"], "t5xxl": f["t5_fp8"]})
    assert next(got.unet.parameters()).dtype == torch.bfloat16
    w = m.unet.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(got.unet.transformer_blocks[0].attn.to_q.weight, w.to(torch.float8_e4m3fn).to(torch.bfloat16))
    assert got.text_encoder_2.shared.weight.dtype == torch.bfloat16


def test_flux_all_in_one_and_schnell(tmp_path):
    m = build_tiny_flux(schnell=True)
    sd = flux_to_bfl(m.unet, "model.diffusion_model.")
    sd.update({"vae." + k[len("first_stage_model."):]: v for k, v in vae_to_ldm(m.vae).items()})
    sd.update(hf_state(m.text_encoder, "text_encoders.clip_l.transformer."))
    sd.update(hf_state(m.text_encoder_2, "text_encoders.t5xxl.transformer."))
    got = load_base_model(_save(sd, tmp_path / "flux1-schnell-aio.safetensors"))
    assert got.extra["variant"] == "flux-schnell" and not got.unet.config.guidance_embeds
    assert got.noise_scheduler.config.shift == 1.0
    _same_weights(got.unet, m.unet)
    _same_weights(got.text_encoder_2, m.text_encoder_2)


def test_flux_missing_files_message(flux_files):
    m, f = flux_files
    with pytest.raises(ModelError) as e:
        load_base_model(f["transformer"], files={"ae": f["ae"]})
    msg = str(e.value)
    assert "Flux.1 dev transformer" in msg and "2 double + 2 single blocks" in msg
    assert "clip_l: <path>" in msg and "t5xxl: <path>" in msg and "ae:" not in msg
    with pytest.raises(ModelError) as e:  # the wrong file given as T5
        load_base_model(f["transformer"], files={"ae": f["ae"], "clip_l": f["clip_l"], "t5xxl": f["clip_l"]})
    assert "t5xxl" in str(e.value)


def test_scaled_fp8_dequantised(flux_files, tmp_path):
    """t5xxl_fp8_e4m3fn_scaled (ComfyUI's scaled fp8: float8 weights over per-layer scale_weight): each weight
    times its scale, as bf16 (tests/test_webui_neo.py covers ComfyUI's newer weight_scale / comfy_quant layout)."""
    from single_file_layouts import scaled_fp8

    m, f = flux_files
    ref = hf_state(m.text_encoder_2)
    scaled = _save(scaled_fp8(ref), tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    base = load_base_model(f["transformer"], files={"ae": f["ae"], "clip_l": f["clip_l"], "t5xxl": scaled})
    got = base.text_encoder_2.state_dict()
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert got[q].dtype == torch.bfloat16
    for k, v in ref.items():
        assert (got[k].float() - v.float()).abs().max() <= 0.07 * v.float().abs().max() + 1e-6, k
    assert not torch.equal(got[q].float(), ref[q].float().to(torch.float8_e4m3fn).float())  # the scale was applied


@pytest.fixture(scope="module")
def sd3_model():
    return build_tiny_sd3()


def _sd3_checkpoint(m, with_te):
    sd = sd3_to_original(m.unet)
    sd.update(vae_to_ldm(m.vae))
    if with_te:
        sd.update(hf_state(m.text_encoder, "text_encoders.clip_l.transformer."))
        sd.update(hf_state(m.text_encoder_2, "text_encoders.clip_g.transformer."))
        sd.update(hf_state(m.text_encoder_3, "text_encoders.t5xxl.transformer."))
    return sd


def test_sd3_with_text_encoders_inside(sd3_model, tmp_path):
    m = sd3_model
    got = load_base_model(_save(_sd3_checkpoint(m, True), tmp_path / "sd3.5_medium.safetensors"))
    assert got.kind == "sd3" and got.extra["variant"] == "sd35-medium"
    for a, b in ((got.unet, m.unet), (got.vae, m.vae), (got.text_encoder, m.text_encoder),
                 (got.text_encoder_2, m.text_encoder_2), (got.text_encoder_3, m.text_encoder_3)):
        _same_weights(a, b)
    c1, c2 = flow.encode(m, ["a red circle"]), flow.encode(got, ["a red circle"])
    assert torch.allclose(c1["hidden"], c2["hidden"], atol=1e-6)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(flow.predict(m, m.unet, x, torch.tensor([500.0]), c1),
                              flow.predict(got, got.unet, x, torch.tensor([500.0]), c2), atol=1e-5)


def test_sd3_separate_text_encoders(sd3_model, tmp_path):
    m = sd3_model
    path = _save(_sd3_checkpoint(m, False), tmp_path / "sd3.5_medium_noclip.safetensors")
    with pytest.raises(ModelError) as e:
        load_base_model(path)
    assert "sd35-medium transformer" in str(e.value) and "clip_l: <path>" in str(e.value)
    files = {"clip_l": _save(hf_state(m.text_encoder), tmp_path / "clip_l.safetensors"),
             "clip_g": _save(hf_state(m.text_encoder_2), tmp_path / "clip_g.safetensors")}
    got = load_base_model(path, files=files)  # no T5: SD3 runs on zeros for it, as diffusers does
    assert got.text_encoder_3 is None
    _same_weights(got.text_encoder_2, m.text_encoder_2)
    assert flow.encode(got, ["x"])["hidden"].shape == (1, 77 + 32, 64)
    got = load_base_model(path, files=dict(files, t5xxl=_save(hf_state(m.text_encoder_3), tmp_path / "t5.safetensors")))
    _same_weights(got.text_encoder_3, m.text_encoder_3)


def test_not_a_flow_file(tmp_path):
    from lora_train.models.flow_single_file import load_flow_single_file

    p = _save({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ModelError, match="holds none of the transformers read from single files here"):
        load_flow_single_file(p, {})


# full-size layouts on the meta device: the configs read from the shapes are the released models' configs
FULL = {
    "flux-dev": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                     joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, in_channels=64,
                     axes_dims_rope=(16, 56, 56), patch_size=1),
    "sd3-medium": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
                       joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm=None,
                       dual_attention_layers=(), in_channels=16, out_channels=16, patch_size=2, sample_size=128),
    "sd35-medium": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
                        joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=384,
                        qk_norm="rms_norm", dual_attention_layers=tuple(range(13)), in_channels=16, out_channels=16,
                        patch_size=2, sample_size=128),
    "sd35-large": dict(num_layers=38, attention_head_dim=64, num_attention_heads=38, caption_projection_dim=2432,
                       joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192,
                       qk_norm="rms_norm", dual_attention_layers=(), in_channels=16, out_channels=16, patch_size=2,
                       sample_size=128),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(FULL))
def test_full_size_layouts_on_meta(variant):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from lora_train.models.flow_single_file import convert_flux, convert_sd3
    from lora_train.models.sd3 import variant_of

    cfg = FULL[variant]
    with init_empty_weights():
        if variant.startswith("flux"):
            model = FluxTransformer2DModel(**cfg)
            sd = flux_to_bfl(model, "model.diffusion_model.")
            got, conv = convert_flux(sd)
        else:
            model = SD3Transformer2DModel(**cfg)
            sd = sd3_to_original(model)
            got, conv = convert_sd3(sd)
    assert {k: got[k] for k in cfg} == cfg
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in conv.items()} == expected
    if not variant.startswith("flux"):
        assert variant_of(model) == variant


@pytest.mark.slow
def test_cli_trains_split_flux_files(flux_files, tmp_path):
    """`python -m lora_train train` with base_model = the BFL transformer file and ae / clip_l / t5xxl keys."""
    from conftest import small_cfg
    from lora_train.cli.main import main
    from lora_train.data.demo import write_demo_dataset

    m, f = flux_files
    data = write_demo_dataset(str(tmp_path / "data"), n=4, size=64)
    cfg = small_cfg(data, tmp_path / "out", base_model=f["fp8"], ae=f["ae"], clip_l=f["clip_l"],
                    t5xxl=f["t5_fp8"], max_train_steps=1, fp8_base=True)
    cfg.save(str(tmp_path / "c.yaml"))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "out" / "t.safetensors").is_file()
