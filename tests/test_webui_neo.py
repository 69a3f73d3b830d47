"""The tab in Forge Neo with Qwen-Image, Z-Image, Wan or Chroma loaded (issue #27), against tests/fake_webui: Neo's
checkpoint is the transformer alone, the VAE and text encoder are the "VAE / Text Encoder" files of its top bar
(model_data.forge_loading_parameters['additional_modules']), and every config, tokenizer and scheduler comes from
the folder Neo bundles for the model (backend/huggingface/<org>/<repo>/, the engine's model_config.huggingface_repo).
The tab's host trains from exactly those files and publishes into Neo's LoRA folder in the family's layout; a
missing pick says which file to pick; the split files give the same model as the release's diffusers folder."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from neo_files import NEO, neo_config_folder, same_weights, split_files, tiny_model, vae_file_state
from single_file_layouts import comfy_text_encoder, original_layout, scaled_fp8
from test_webui_host import FAKE, _purge, _tab_train

pytestmark = pytest.mark.frontend
FAMILIES = ("qwen_image", "z_image", "wan", "chroma")
#: a LoRA key of each family's layout (families/<family>.py lora_blocks) and its modelspec.architecture
LORA_KEY = {"qwen_image": ("lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight", "Qwen-Image/lora"),
            "z_image": ("lora_unet_layers_0_attention_qkv.lora_down.weight", "Z-Image/lora"),
            "wan": ("lora_unet_blocks_0_self_attn_q.lora_down.weight", "wan2.1/lora"),
            "chroma": ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "chroma/lora")}


@pytest.fixture(autouse=True)
def _fresh_job_slot(fresh_job_slot):
    yield


@pytest.fixture(scope="module")
def tiny_models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get


def _make_neo(tmp_path, monkeypatch, tiny, family, picks=("vae", "text_encoder")):
    root = tmp_path / "forge-neo"
    hf = root / "backend" / "huggingface"
    folder = neo_config_folder(tiny, family, hf)
    ckpt, vae, te = split_files(tiny, family, root / "models")
    monkeypatch.setenv("FAKE_WEBUI_ROOT", str(root))
    monkeypatch.setenv("FAKE_WEBUI_DATA", str(root))
    monkeypatch.setenv("FAKE_FORGE_HF", str(hf))
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

    mods = [f for key, f in (("vae", vae), ("text_encoder", te)) if key in picks]
    info = fake_model.CheckpointInfo(ckpt)
    info.register(sd_models.checkpoints_list)
    sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info, additional_modules=list(mods),
                                                         unet_storage_dtype=None)
    shared.opts.forge_additional_modules = list(mods)
    dit = original_layout(family, tiny.unet.state_dict(), prefix="")
    model = fake_model.neo_engine(family, dit, info, NEO[family][0])
    sd_models.model_data.set_sd_model(model)
    import networks  # noqa: F401
    from lora_train.hosts import webui as host_webui

    return dict(host=host_webui.make_host(), ckpt=ckpt, vae=vae, te=te, folder=folder, model=model, hw=host_webui,
                sd_models=sd_models, paths=paths, root=root)


@pytest.fixture(params=FAMILIES)
def neo(request, tmp_path, monkeypatch, tiny_models):
    family = request.param
    tiny = tiny_models(family)
    n = _make_neo(tmp_path, monkeypatch, tiny, family)
    n.update(family=family, tiny=tiny)
    yield n
    for p in n["paths"]:
        sys.path.remove(p)
    _purge()


def _set_picks(n, files):
    n["sd_models"].model_data.forge_loading_parameters["additional_modules"] = list(files)


def test_neo_trains_the_files_it_loaded(neo):
    """The loaded checkpoint + the picked VAE / text encoder over Neo's bundled folder: the tiny model's own weights
    (the transformer as its bf16 file holds it); missing picks name the file to pick in Neo's top bar."""
    from fake_model import NEO_ENGINES

    h, fam, tiny = neo["host"], neo["family"], neo["tiny"]
    assert type(h).__name__ == "ForgeHost" and type(neo["model"]).__name__ == NEO_ENGINES[fam]
    assert h.bundled_folder(fam) == neo["folder"]
    base = h.base_model(None)
    assert base.kind == fam and base.path == neo["ckpt"]
    same_weights(base.vae, tiny.vae)
    same_weights(base.text_encoder, tiny.text_encoder, skip=("lm_head.",))  # Qwen2.5-VL's lm_head is not in the file
    bf16 = type(tiny.unet)(**tiny.unet.config).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in tiny.unet.state_dict().items()})
    same_weights(base.unet, bf16)
    assert type(base.tokenizer).__name__ == type(tiny.tokenizer).__name__
    # what a missing pick says: the part, a released file, and where Neo picks it
    _set_picks(neo, [neo["vae"]])
    with pytest.raises(neo["hw"].HostError, match=r"but not the text encoder \(.*e\.g\. .*\.safetensors\).*"
                                                  r"'VAE / Text Encoder' list"):
        h.base_model(None)
    _set_picks(neo, [neo["te"]])
    with pytest.raises(neo["hw"].HostError, match=r"but not the VAE \(e\.g\. .*VAE / Text Encoder"):
        h.base_model(None)
    _set_picks(neo, [])
    with pytest.raises(neo["hw"].HostError) as e:
        h.base_model(None)
    assert "the VAE" in str(e.value) and "the text encoder" in str(e.value) and NEO[fam][2][1] in str(e.value)


def test_neo_tab_trains_and_publishes(neo, demo_data):  # tiny models: seconds
    from safetensors import safe_open

    h, fam = neo["host"], neo["family"]
    job = _tab_train(h, demo_data, f"neo{fam}", 2, batch_size=1)
    assert job.status == "done", job.error
    lora_dir = h.lora_dirs()[0]
    assert job.lora_path == os.path.join(lora_dir, f"neo{fam}.safetensors") and os.path.isfile(job.lora_path)
    assert lora_dir == str(neo["root"] / "models" / "Lora")
    with safe_open(job.lora_path, framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    key, arch = LORA_KEY[fam]
    assert key in keys, sorted(keys)[:5]
    assert meta["modelspec.architecture"] == arch
    assert f"neo{fam}" in sys.modules["networks"].available_networks
    assert neo["sd_models"].calls[-1] == "forge_model_reload"


def test_neo_without_its_config_folder(tmp_path, monkeypatch, tiny_models):
    """A Forge that bundles no config folder for the family (classic Forge): the message says so."""
    n = _make_neo(tmp_path, monkeypatch, tiny_models("z_image"), "z_image")
    try:
        import shutil

        shutil.rmtree(n["folder"])
        with pytest.raises(n["hw"].HostError, match="bundles no Z-Image config folder"):
            n["host"].base_model(None)
    finally:
        for p in n["paths"]:
            sys.path.remove(p)
        _purge()


def test_neo_bundled_folder_prefers_text_to_video(tmp_path, monkeypatch, tiny_models):
    """Neo bundles Wan2.1-T2V-14B and Wan2.1-I2V-14B-720P (with image_encoder): a Wan checkpoint trains over the
    loaded engine's folder, else the text-to-video one."""
    tiny = tiny_models("wan")
    n = _make_neo(tmp_path, monkeypatch, tiny, "wan")
    try:
        i2v = os.path.join(os.path.dirname(n["folder"]), "Wan2.1-I2V-14B-720P")
        os.makedirs(i2v)
        with open(os.path.join(n["folder"], "model_index.json"), encoding="utf-8") as fh:
            idx = json.load(fh)
        idx["image_encoder"] = ["transformers", "CLIPVisionModel"]
        with open(os.path.join(i2v, "model_index.json"), "w", encoding="utf-8") as fh:
            json.dump(idx, fh)
        assert n["host"].bundled_folder("wan") == n["folder"]
        n["model"].model_config.huggingface_repo = "Wan-AI/Wan2.1-I2V-14B-720P"
        assert n["host"].bundled_folder("wan") == i2v
        n["model"].model_config.huggingface_repo = None
        assert n["host"].bundled_folder("wan") == n["folder"]
        assert n["host"].bundled_folder("qwen_image") is None
    finally:
        for p in n["paths"]:
            sys.path.remove(p)
        _purge()


# ----------------------------------------------------------------------------- the files themselves (no host)
@pytest.mark.parametrize("family", FAMILIES)
def test_split_files_equal_the_diffusers_folder(family, tmp_path, tiny_models):
    """The split files over a config-only folder give the model the release's diffusers folder gives: VAE, text
    encoder (but Qwen2.5-VL's lm_head, which the files leave out), tokenizer and scheduler alike, the transformer as
    its bf16 file holds it; the Wan VAE file's round trip through diffusers' converter is exact."""
    from lora_train.models.flow_loading import TINY_FOLDER_WRITERS
    from lora_train.models.loading import load_base_model
    from lora_train.models.split_parts import diffusers_layout

    tiny = tiny_models(family)
    folder = TINY_FOLDER_WRITERS[family](tiny, str(tmp_path / "tiny-turbo"))  # (Z-Image: the variant by name)
    config_folder = neo_config_folder(tiny, family, tmp_path / "hf")
    ckpt, vae, te = split_files(tiny, family, tmp_path / "models")
    a = load_base_model(folder)
    b = load_base_model(ckpt, files={"components_folder": config_folder, "vae": vae, "text_encoder": te})
    assert a.kind == b.kind == family and a.extra.get("variant") == b.extra.get("variant")
    same_weights(b.vae, a.vae)
    same_weights(b.text_encoder, a.text_encoder, skip=("lm_head.",))
    ref = {k: v.to(torch.bfloat16) for k, v in a.unet.state_dict().items()}  # the transformer: its bf16 file
    got = b.unet.state_dict()
    assert set(got) == set(ref) and all(torch.equal(v, ref[k]) for k, v in got.items())
    assert type(b.tokenizer).__name__ == type(a.tokenizer).__name__
    assert b.tokenizer("a red fox").input_ids == a.tokenizer("a red fox").input_ids
    assert {k: v for k, v in b.noise_scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in a.noise_scheduler.config.items() if not k.startswith("_")}
    conv = diffusers_layout(type(tiny.vae).__name__, vae_file_state(tiny, family), dict(tiny.vae.config))
    assert set(conv) == set(tiny.vae.state_dict()) and all(torch.equal(conv[k], v) for k, v in
                                                           tiny.vae.state_dict().items())


def test_z_image_over_a_tokenizer_without_chat_template(tmp_path, tiny_models):
    """Forge Neo writes Qwen3's one-message template itself, so its bundled Z-Image tokenizer may have none: over
    such a folder the text encoder file gets the template that writes the same text."""
    from lora_train.models.loading import load_base_model
    from lora_train.models.z_image import CHAT_TEMPLATE

    tiny = tiny_models("z_image")
    folder = neo_config_folder(tiny, "z_image", tmp_path / "hf")
    conf = os.path.join(folder, "tokenizer", "tokenizer_config.json")
    with open(conf, encoding="utf-8") as fh:
        data = json.load(fh)
    data.pop("chat_template", None)
    with open(conf, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    for extra in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(folder, "tokenizer", extra)):
            os.remove(os.path.join(folder, "tokenizer", extra))
    ckpt, vae, te = split_files(tiny, "z_image", tmp_path / "models")
    m = load_base_model(ckpt, files={"components_folder": folder, "vae": vae, "text_encoder": te})
    assert m.tokenizer.chat_template == CHAT_TEMPLATE
    text = m.tokenizer.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=False,
                                           add_generation_prompt=True)
    assert text == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"  # Neo's z_image_engine template


def test_split_files_take_scaled_fp8_text_encoders(tmp_path, tiny_models):
    """qwen_2.5_vl_7b_fp8_scaled / umt5_xxl_fp8_e4m3fn_scaled: float8 weights times their scale_weight (ComfyUI's
    older layout) or weight_scale + comfy_quant (its newer one) read as bf16 weights; a format not read here
    (nvfp4) names the file and what to pick instead."""
    from lora_train.models.base import ModelError
    from lora_train.models.loading import load_base_model

    tiny = tiny_models("wan")
    folder = neo_config_folder(tiny, "wan", tmp_path / "hf")
    plain = comfy_text_encoder(tiny.text_encoder)
    old = scaled_fp8(plain)
    new = {}
    for k, v in old.items():
        if k.endswith(".scale_weight"):
            layer = k[:-len(".scale_weight")]
            new[layer + ".weight_scale"] = v
            new[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
        elif k != "scaled_fp8":
            new[k] = v
    ref = {k: v for k, v in tiny.text_encoder.state_dict().items()}
    for layout, sd in (("scaled", old), ("mixed", new)):
        ckpt, vae, te = split_files(tiny, "wan", tmp_path / layout, te_state=sd)
        m = load_base_model(ckpt, files={"components_folder": folder, "vae": vae, "text_encoder": te})
        got = m.text_encoder.state_dict()
        assert got["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.bfloat16
        for k, v in ref.items():
            err = (got[k].float() - v.float()).abs().max().item()
            assert err <= 0.07 * v.float().abs().max().item() + 1e-6, (layout, k, err)
    bad = dict(new)
    bad["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = torch.tensor(
        list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    ckpt, vae, te = split_files(tiny, "wan", tmp_path / "nvfp4", te_state=bad)
    with pytest.raises(ModelError, match=r"umt5_xxl_fp16\.safetensors' holds nvfp4-quantised weights.*bf16 / fp16"):
        load_base_model(ckpt, files={"components_folder": folder, "vae": vae, "text_encoder": te})


def test_split_files_of_another_kind_are_named(tmp_path, tiny_models):
    """A text encoder file of another model (Qwen3's for Qwen-Image) is not loaded as random weights: the error
    names it."""
    from lora_train.models.base import ModelError
    from lora_train.models.flow_single_file import component_files, component_kind
    from lora_train.models.loading import load_base_model

    tiny = tiny_models("qwen_image")
    folder = neo_config_folder(tiny, "qwen_image", tmp_path / "hf")
    ckpt, vae, te = split_files(tiny, "qwen_image", tmp_path / "models")
    z = tiny_models("z_image")
    qwen3 = str(tmp_path / "qwen_3_4b.safetensors")
    save_file({k: v.contiguous() for k, v in comfy_text_encoder(z.text_encoder).items()}, qwen3)
    assert [component_kind(p) for p in (vae, te, qwen3)] == ["wan_vae", "qwen2.5-vl", "qwen3"]
    assert component_files([qwen3, te, vae], "qwen_image") == {"text_encoder": te, "vae": vae}
    assert component_files([qwen3, vae], "qwen_image") == {"vae": vae}
    # UMT5 by its vocabulary as Neo tells it (a file whose blocks after the first have no bias of their own)
    umt5 = str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    save_file({"shared.weight": torch.zeros(256384, 2, dtype=torch.float16),
               "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, umt5)
    assert component_kind(umt5) == "umt5" and component_files([umt5], "wan") == {"text_encoder": umt5}
    with pytest.raises(ModelError, match=r"qwen_3_4b\.safetensors' does not fit Qwen2_5_VLForConditionalGeneration"):
        load_base_model(ckpt, files={"components_folder": folder, "vae": vae, "text_encoder": qwen3})
