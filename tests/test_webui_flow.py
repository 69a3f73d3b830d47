"""The tab in Forge with Flux loaded (issue #16), against tests/fake_webui: Forge's checkpoint is the BFL transformer
alone and the VAE / text encoders are the "VAE / Text Encoder" files of its top bar
(model_data.forge_loading_parameters['additional_modules'] / shared.opts.forge_additional_modules). The tab's one
training path trains that model and publishes into Forge's LoRA folder in sd-scripts' Flux layout; the Test
section's generation goes through Forge's processing with the new LoRA; Suggest uses the loaded model's family."""
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from flow_fakes import flux_to_bfl, hf_state
from test_webui_host import FAKE, _purge, _tab_train

pytestmark = pytest.mark.frontend


@pytest.fixture(autouse=True)
def _fresh_job_slot(fresh_job_slot):
    yield


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture
def forge_flux(tmp_path, monkeypatch):
    from lora_train.models.flux import build_tiny_flux
    from ldm_writers import vae_to_ldm

    tiny = build_tiny_flux()
    root = tmp_path / "forge"
    for d in ("Stable-diffusion", "VAE", "text_encoder"):
        (root / "models" / d).mkdir(parents=True)
    monkeypatch.setenv("FAKE_WEBUI_ROOT", str(root))
    monkeypatch.setenv("FAKE_WEBUI_DATA", str(root))
    _purge()
    paths = [os.path.join(FAKE, "common"), os.path.join(FAKE, "forge")]
    for p in reversed(paths):
        sys.path.insert(0, p)
    import forge_sd_models
    import modules

    sys.modules["modules.sd_models"] = forge_sd_models
    modules.sd_models = forge_sd_models
    import fake_model
    from modules import sd_models, shared

    bfl = flux_to_bfl(tiny.unet)
    ckpt = _save(bfl, root / "models" / "Stable-diffusion" / "flux1-tiny.safetensors")
    mods = [_save(hf_state(tiny.text_encoder_2), root / "models" / "text_encoder" / "t5xxl_fp16.safetensors"),
            _save({k[len("first_stage_model."):]: v for k, v in vae_to_ldm(tiny.vae).items()},
                  root / "models" / "VAE" / "ae.safetensors"),
            _save(hf_state(tiny.text_encoder), root / "models" / "text_encoder" / "clip_l.safetensors")]
    info = fake_model.CheckpointInfo(ckpt)
    info.register(sd_models.checkpoints_list)
    sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info, additional_modules=list(mods),
                                                         unet_storage_dtype=None)
    shared.opts.forge_additional_modules = list(mods)
    model = fake_model.FakeForgeFluxEngine(bfl, info, is_sd1=False)
    sd_models.model_data.set_sd_model(model)
    import networks  # noqa: F401
    from lora_train.hosts import webui as host_webui

    host = host_webui.make_host()
    yield dict(host=host, tiny=tiny, ckpt=ckpt, mods=mods, model=model, shared=shared, sd_models=sd_models,
               hw=host_webui, root=root)
    for p in paths:
        sys.path.remove(p)
    _purge()


def test_forge_flux_components_from_the_top_bar(forge_flux):
    from lora_train.models.flow_single_file import component_files

    f = forge_flux
    assert type(f["host"]).__name__ == "ForgeHost"
    t5, ae, clip_l = f["mods"]
    assert component_files(f["mods"], "flux") == {"ae": ae, "clip_l": clip_l, "t5xxl": t5}
    base = f["host"].base_model(None)  # Flux is not read from Forge's memory: its file + the picked modules
    assert base.kind == "flux" and base.path == f["ckpt"]
    for a, b in ((base.unet, f["tiny"].unet), (base.vae, f["tiny"].vae), (base.text_encoder, f["tiny"].text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)
    # without the text encoders picked: what is missing and where Forge picks it
    f["sd_models"].model_data.forge_loading_parameters["additional_modules"] = [ae]
    with pytest.raises(f["hw"].HostError, match="clip_l: <path>.*VAE / Text Encoder"):
        f["host"].base_model(None)


def test_forge_flux_suggest_uses_the_loaded_family(forge_flux, demo_data):
    from lora_train.ui import logic

    _values, md = logic.suggest_settings(forge_flux["host"], demo_data, "style", "auto", "", 24, 1, 64)
    assert ", flux, task style" in md
    _values, md = logic.suggest_settings(forge_flux["host"], demo_data, "style", "auto",
                                         os.path.basename(forge_flux["ckpt"]), 24, 1, 64)
    assert ", flux, task style" in md


@pytest.mark.slow
def test_forge_flux_tab_trains_and_publishes(forge_flux, demo_data):
    from safetensors import safe_open

    from lora_train.sampler import GenParams

    h = forge_flux["host"]
    job = _tab_train(h, demo_data, "fluxstyle", 2, batch_size=1, train_text_encoder=True)
    assert job.status == "done", job.error
    lora_dir = h.lora_dirs()[0]
    assert job.lora_path == os.path.join(lora_dir, "fluxstyle.safetensors") and os.path.isfile(job.lora_path)
    with safe_open(job.lora_path, framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert "fluxstyle" in sys.modules["networks"].available_networks
    assert forge_flux["sd_models"].calls[-1] == "forge_model_reload"
    # the Test section: Forge's own processing with the new LoRA
    h.generate(GenParams(prompt="a photo <lora:fluxstyle:0.8>", seed=3, steps=2, width=64, height=64))
    from modules import processing

    assert processing.last["loras"] == [("fluxstyle", 0.8)]
    assert processing.last["unet"] != 0.0


def test_component_files_tell_sd3_clips_apart(tmp_path):
    """SD3.5 in Forge: clip_l, clip_g and t5xxl picked in any order; the wider CLIP is CLIP-G; other files are left out."""
    from lora_train.models.flow_single_file import component_files, component_kind
    from lora_train.models.sd3 import build_tiny_sd3

    m = build_tiny_sd3()
    g = _save(hf_state(m.text_encoder_2), tmp_path / "clip_g.safetensors")
    l_ = _save(hf_state(m.text_encoder), tmp_path / "clip_l.safetensors")
    t5 = _save(hf_state(m.text_encoder_3), tmp_path / "t5xxl.safetensors")
    other = _save({"lora_unet_x.lora_up.weight": torch.zeros(1, 1)}, tmp_path / "lora.safetensors")
    assert component_files([g, t5, other, l_], "sd3") == {"clip_l": l_, "clip_g": g, "t5xxl": t5}
    assert component_files([l_], "sd3") == {"clip_l": l_} and component_kind(other) is None
    assert component_kind(str(tmp_path / "missing.safetensors")) is None
