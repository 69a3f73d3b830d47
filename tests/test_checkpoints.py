"""Single-file checkpoints (SD1 / SD2 / SDXL), host-loaded state dicts, detection, bundled configs, tokenizer."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ldm_writers as W
from lora_train.models import single_file as C
from lora_train.models.base import ModelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of a red circle", "blue stripes"]


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_sd1():
    from lora_train.models.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="module")
def tiny_sd2():
    from lora_train.models.tiny import build_tiny_sd2

    return build_tiny_sd2(v_prediction=True)


@pytest.fixture(scope="module")
def tiny_sdxl():
    from lora_train.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl()


def _cond(model):
    """(encoder_hidden_states, unet kwargs) the way the trainer conditions each kind."""
    if model.kind == "sdxl":
        from lora_train.models.tiny import sdxl_encode, sdxl_time_ids

        hidden, pooled = sdxl_encode(model, PROMPTS)
        ids = sdxl_time_ids((64, 64), (0, 0), (64, 64), batch=len(PROMPTS))
        return hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    ids = model.tokenizer(PROMPTS, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return model.text_encoder(ids)[0], {}


@torch.no_grad()
def _assert_same_outputs(a, b):
    ha, kwa = _cond(a)
    hb, kwb = _cond(b)
    assert torch.equal(ha, hb)  # text encoder(s): identical
    if a.kind == "sdxl":
        assert torch.equal(kwa["added_cond_kwargs"]["text_embeds"], kwb["added_cond_kwargs"]["text_embeds"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([7, 640])
    out_a = a.unet(x, t, ha, **kwa).sample
    out_b = b.unet(x, t, ha, **kwa).sample
    assert (out_a - out_b).abs().max().item() == 0.0
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    assert torch.equal(a.vae.encode(img).latent_dist.mean, b.vae.encode(img).latent_dist.mean)
    assert a.vae_scale == b.vae_scale


# ----------------------------------------------------------------------------- round trips (tiny)
@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_sd1", "tiny_sd2", "tiny_sdxl"])
def test_single_file_round_trip(which, request, tmp_path):
    model = request.getfixturevalue(which)
    path = W.write_original_checkpoint(model, str(tmp_path / f"{which}.safetensors"))
    keys, _ = C.read_safetensors_header(path)
    # the file has the original layout, text_model level included (transformers 5 dropped it in memory)
    assert any(k.startswith("model.diffusion_model.input_blocks.0.0.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.mid.attn_1.q.") for k in keys)
    if model.kind == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    elif model.kind == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        n = model.text_encoder.config.num_hidden_layers  # SD2 files hold one more block than the model uses
        assert f"cond_stage_model.model.transformer.resblocks.{n}.attn.in_proj_weight" in keys
        assert "v_pred" in keys
    else:
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
    loaded = C.load_single_file(path, config=model)
    assert loaded.kind == model.kind and loaded.prediction_type == model.prediction_type
    assert loaded.name == which and loaded.path == os.path.abspath(path)
    assert loaded.native_resolution == model.native_resolution
    if model.kind == "sd2":
        assert loaded.extra["checkpoint"]["prediction_source"] == "marker"
        assert loaded.tokenizer.pad_token == "!"
    if model.kind == "sdxl":
        assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    _assert_same_outputs(model, loaded)


@pytest.mark.slow
def test_host_state_dict_in_memory(tiny_sdxl):
    """The WebUI / ComfyUI path: original-layout tensors already in memory, no file."""
    sd = W.to_original_state_dict(tiny_sdxl)
    model = C.from_original_state_dict(sd, config=tiny_sdxl, name="host")
    assert model.kind == "sdxl" and model.name == "host"
    _assert_same_outputs(tiny_sdxl, model)
    # same dtype -> the host's tensors are used, not copied (frozen weights, no extra memory)
    k = "model.diffusion_model.out.2.weight"
    assert model.unet.conv_out.weight.data_ptr() == sd[k].data_ptr()
    half = C.from_original_state_dict({k2: v.half() if v.is_floating_point() else v for k2, v in sd.items()},
                                      config=tiny_sdxl, dtype=None)
    assert half.unet.conv_out.weight.dtype == torch.float16
    with pytest.raises(ModelError, match="not sd1"):
        C.from_original_state_dict(sd, kind="sd1", config=tiny_sdxl)
    # AUTOMATIC1111 holds its text encoders wrapped: conditioner.embedders.0.wrapped.transformer...
    # ...token_embedding.wrapped.weight
    wrapped = {}
    for k, v in sd.items():
        if k.startswith("conditioner.embedders."):
            k = k.replace("conditioner.embedders.0.", "conditioner.embedders.0.wrapped.").replace(
                "conditioner.embedders.1.", "conditioner.embedders.1.wrapped.")
            k = k.replace("token_embedding.weight", "token_embedding.wrapped.weight")
        wrapped[k] = v
    _assert_same_outputs(tiny_sdxl, C.from_original_state_dict(wrapped, config=tiny_sdxl))


@pytest.mark.slow
def test_config_folder_and_load_base_model(tiny_sd1, tmp_path):
    from lora_train.models.loading import load_base_model
    from lora_train.models.diffusers_folder import save_diffusers_folder

    path = W.write_original_checkpoint(tiny_sd1, str(tmp_path / "t.safetensors"))
    folder = save_diffusers_folder(tiny_sd1, str(tmp_path / "cfg"))
    loaded = C.load_single_file(path, config=folder)
    _assert_same_outputs(tiny_sd1, loaded)
    # load_base_model routes single files here; the bundled (full-size) SD1.5 config does not fit a tiny
    # model, which must be a clear error, not a crash
    with pytest.raises(ModelError, match="do not fit"):
        load_base_model(path)


@pytest.mark.slow
def test_diffusers_own_loader_reads_our_files(tiny_sd1, tiny_sdxl, tmp_path):
    """Independent check of the writer: diffusers' pipeline from_single_file reads it back exactly, offline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lora_train.models.diffusers_folder import save_diffusers_folder

    p1 = W.write_original_checkpoint(tiny_sd1, str(tmp_path / "sd1.safetensors"))
    f1 = save_diffusers_folder(tiny_sd1, str(tmp_path / "sd1"))
    pipe = StableDiffusionPipeline.from_single_file(p1, config=f1, local_files_only=True)
    pairs = [(tiny_sd1.unet, pipe.unet), (tiny_sd1.text_encoder, pipe.text_encoder), (tiny_sd1.vae, pipe.vae)]
    p2 = W.write_original_checkpoint(tiny_sdxl, str(tmp_path / "xl.safetensors"))
    m = tiny_sdxl
    StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                              tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                              scheduler=m.noise_scheduler).save_pretrained(str(tmp_path / "xl"))
    xl = StableDiffusionXLPipeline.from_single_file(p2, config=str(tmp_path / "xl"), local_files_only=True)
    pairs += [(m.unet, xl.unet), (m.text_encoder, xl.text_encoder), (m.text_encoder_2, xl.text_encoder_2)]
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_pickle_needs_opt_in(tiny_sd2, tmp_path):
    sd = W.to_original_state_dict(tiny_sd2)
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": sd, "global_step": 10}, path)
    with pytest.raises(ModelError, match="pickle"):
        C.load_single_file(path, config=tiny_sd2)
    loaded = C.load_single_file(path, allow_pickle=True, config=tiny_sd2)
    _assert_same_outputs(tiny_sd2, loaded)
    evil = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": sd, "obj": _NotATensor()}, evil)
    with pytest.raises(ModelError, match="weights-only"):
        C.load_single_file(evil, allow_pickle=True, config=tiny_sd2)


class _NotATensor:
    pass


def test_bad_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        C.load_single_file(str(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ModelError, match="not a valid .safetensors"):
        C.load_single_file(str(junk))
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="unknown extension"):
        C.load_single_file(str(other))


# ----------------------------------------------------------------------------- full size, meta device
KNOWN_PARAMS = {"sd15": (859520964, 123060480, None), "sd2_768v": (865910724, 340387840, None),
                "sdxl_base": (2567463684, 123060480, 694659840)}
REAL_KEYS = {  # key names of the released checkpoints (diffusers' single_file_utils uses them to detect)
    "sd15": ["model.diffusion_model.output_blocks.11.0.skip_connection.weight",
             "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
             "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight"],
    "sd2_768v": ["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                 "cond_stage_model.model.token_embedding.weight",
                 "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight",
                 "cond_stage_model.model.text_projection"],
    "sdxl_base": ["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
                  "conditioner.embedders.1.model.positional_embedding",
                  "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                  "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd15", "sd2_768v", "sdxl_base"])
def test_full_size_layout_on_meta(variant):
    """Bundled configs at full size: the original layout converts back to exactly the model's keys/shapes."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    model = C.meta_model(variant)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    unet_n, te_n, te2_n = KNOWN_PARAMS[variant]
    assert n(model.unet) == unet_n and n(model.text_encoder) == te_n and n(model.vae) == 83653863
    if te2_n:
        assert n(model.text_encoder_2) == te2_n
    sd = W.to_original_state_dict(model)
    assert set(REAL_KEYS[variant]) <= set(sd)
    info = C.detect_checkpoint(sd)
    assert (info.kind, info.variant) == (model.kind, variant)
    back = C.from_original_state_dict(sd)
    assert back.native_resolution == {"sd15": 512, "sd2_768v": 768, "sdxl_base": 1024}[variant]
    for a, b in ((model.unet, back.unet), (model.vae, back.vae), (model.text_encoder, back.text_encoder),
                 (model.text_encoder_2, back.text_encoder_2)):
        if a is None:
            assert b is None
            continue
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    # our OpenCLIP converter agrees with diffusers' own, key by key
    for te, prefix, drop in ((model.text_encoder, C.SD2_TE_PREFIX, 23), (model.text_encoder_2, C.XL_TE2_PREFIX, 99)):
        if prefix.split(".")[0] not in {k.split(".")[0] for k in sd}:
            continue
        theirs = convert_open_clip_checkpoint(te, sd, prefix=prefix)
        ours = {k: v for k, v in C.open_clip_te_from_ldm(sd, prefix).items()
                if (C._te_layer_index(k) or 0) < drop and not (drop == 23 and k.startswith("text_projection"))}
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}


@pytest.mark.slow
def test_bundled_path_offline_with_empty_cache(tmp_path):
    """A fresh interpreter, HF offline, an empty HF cache, no sockets: bundled configs + tokenizer suffice."""
    code = (
        "import socket\n"
        "def _no(*a, **k): raise RuntimeError('network')\n"
        "socket.socket.connect = _no\n"
        "from lora_train.models import single_file as C\n"
        "import ldm_writers as W\n"
        "m = C.meta_model('sdxl_base')\n"
        "b = C.from_original_state_dict(W.to_original_state_dict(m))\n"
        "print(b.kind, b.tokenizer('a photo of a cat').input_ids, b.tokenizer_2.pad_token)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"))
    env.pop("TRANSFORMERS_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "sdxl [49406, 320, 1125, 539, 320, 2368, 49407] !"
    cached = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "hf") for f in fs]
    assert not [f for f in cached if not f.endswith(".txt")], cached  # old libs write version markers, no repos


# ----------------------------------------------------------------------------- detection
def _minimal(kind, **extra):
    """The few keys (with real shapes) that tell the kinds apart."""
    u = "model.diffusion_model."
    sd = {u + "input_blocks.0.0.weight": (320, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
          "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}
    if kind == "sd1":
        sd[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 768)
        sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 768)
    elif kind == "sd2":
        sd[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 1024)
        sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = (3072, 1024)
    elif kind == "sdxl":
        sd[u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = (640, 2048)
        sd[u + "label_emb.0.0.weight"] = (1280, 2816)
        sd["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 768)
        sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = (3840, 1280)
    sd.update(extra)
    return sd


def test_detect_supported_kinds():
    i = C.detect_checkpoint(_minimal("sd1"))
    assert (i.kind, i.variant, i.prediction_type, i.native_resolution) == ("sd1", "sd15", "epsilon", 512)
    i = C.detect_checkpoint(_minimal("sdxl"))
    assert (i.kind, i.variant, i.prediction_type, i.native_resolution) == ("sdxl", "sdxl_base", "epsilon", 1024)
    # SD2 768-v: no marker in the keys; without values to look at, diffusers' default (768-v)
    i = C.detect_checkpoint(_minimal("sd2"))
    assert (i.kind, i.variant, i.prediction_type, i.prediction_source) == ("sd2", "sd2_768v", "v_prediction",
                                                                         "default")
    # ... with the weights: ComfyUI's heuristic on one norm bias
    g = torch.Generator().manual_seed(0)
    wide = _minimal("sd2", **{C.SD2_V_HEURISTIC_KEY: torch.randn(320, generator=g) * 0.3})
    narrow = _minimal("sd2", **{C.SD2_V_HEURISTIC_KEY: torch.randn(320, generator=g) * 0.01})
    assert C.detect_checkpoint(wide).prediction_type == "v_prediction"
    i = C.detect_checkpoint(narrow)
    assert (i.prediction_type, i.prediction_source, i.variant, i.native_resolution) == \
        ("epsilon", "heuristic", "sd2_512", 512)
    # explicit override, marker key, modelspec metadata
    i = C.detect_checkpoint(wide, prediction_type="epsilon")
    assert (i.prediction_type, i.prediction_source) == ("epsilon", "override")
    i = C.detect_checkpoint(_minimal("sdxl", v_pred=(0,), ztsnr=(0,)))
    assert (i.prediction_type, i.prediction_source, i.zero_terminal_snr) == ("v_prediction", "marker", True)
    i = C.detect_checkpoint(_minimal("sd2"), metadata={"modelspec.predict_key": "epsilon"})
    assert (i.prediction_type, i.prediction_source) == ("epsilon", "metadata")
    with pytest.raises(ModelError, match="prediction_type"):
        C.detect_checkpoint(_minimal("sd1"), prediction_type="sample")
    # meta tensors work as well as shapes
    meta = {k: torch.empty(v, device="meta") for k, v in _minimal("sd1").items()}
    assert C.detect_checkpoint(meta).kind == "sd1"


U = "model.diffusion_model."


@pytest.mark.parametrize("sd,match", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "LoRA"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}, "LoRA"),
    ({U + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), U + "pos_embed": (1, 36864, 1536)},
     "Stable Diffusion 3"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (21504, 3072)},
     "FLUX"),
    ({U + "double_blocks.0.img_attn.norm.key_norm.scale": (128,), U + "single_blocks.0.linear1.weight": (1, 1)},
     "FLUX"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "VAE alone"),
    ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
      "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}, "VAE alone"),
    ({"emb_params": (2, 768)}, "textual-inversion"),
    ({"control_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "ControlNet"),
    ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers-layout"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}, "text encoder alone"),
    ({"foo.bar": (1,)}, "no model.diffusion_model"),
])
def test_detect_unsupported(sd, match):
    with pytest.raises(ModelError, match=match) as err:
        C.detect_checkpoint(sd)
    assert "supported: Stable Diffusion 1.x, 2.x" in str(err.value)


def test_detect_unsupported_unets():
    inpaint = _minimal("sd1", **{U + "input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(ModelError, match="inpainting"):
        C.detect_checkpoint(inpaint)
    with pytest.raises(ModelError, match="inpainting model \\(SDXL"):
        C.detect_checkpoint(_minimal("sdxl", **{U + "input_blocks.0.0.weight": (320, 9, 3, 3)}))
    with pytest.raises(ModelError, match="InstructPix2Pix"):
        C.detect_checkpoint(_minimal("sd1", **{U + "input_blocks.0.0.weight": (320, 8, 3, 3)}))
    refiner = {U + "input_blocks.0.0.weight": (384, 4, 3, 3), U + "label_emb.0.0.weight": (1536, 2560),
               "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
               "conditioner.embedders.0.model.text_projection": (1280, 1280),
               "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    with pytest.raises(ModelError, match="SDXL refiner"):
        C.detect_checkpoint(refiner)
    no_vae = {k: v for k, v in _minimal("sd1").items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ModelError, match="no VAE"):
        C.detect_checkpoint(no_vae)
    no_te = {k: v for k, v in _minimal("sd2").items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ModelError, match="SD2 UNet"):
        C.detect_checkpoint(no_te)
    xl_one_te = {k: v for k, v in _minimal("sdxl").items() if not k.startswith("conditioner.embedders.1")}
    with pytest.raises(ModelError, match="both text encoders"):
        C.detect_checkpoint(xl_one_te)
    with pytest.raises(ModelError, match="no tensors"):
        C.detect_checkpoint({})


def test_lora_file_given_as_base_model(tmp_path):
    from safetensors.torch import save_file

    from lora_train.models.loading import load_base_model

    p = str(tmp_path / "style.safetensors")
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
               "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0)}, p)
    with pytest.raises(ModelError, match="LoRA"):
        load_base_model(p)


# ----------------------------------------------------------------------------- bundled configs / tokenizer
def test_bundled_tokenizer_reference_ids():
    tok = C.clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.pad_token_id == 49407 and tok.model_max_length == 77
    assert C.clip_tokenizer(pad_token="!").pad_token_id == 0
    with open(os.path.join(C.TOKENIZER_DIR, "merges.txt"), encoding="utf-8", newline="") as fh:
        lines = fh.read().split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == "" and len(lines) - 2 == 48894  # (some merges start with #)


def test_tokenizer_generator_reproduces_files(tmp_path):
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:  # only its data file is read, the package is not imported
        pytest.skip("open-clip-torch is not installed (pip install open-clip-torch --no-deps)")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_clip_tokenizer.py"), "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        with open(tmp_path / name, "rb") as a, open(os.path.join(C.TOKENIZER_DIR, name), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.parametrize("variant", list(C.VARIANTS))
def test_bundled_config_folders_load_offline(variant, tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = C.diffusers_config_folder(variant, str(tmp_path / variant))
    kind = C.VARIANTS[variant][0]
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    assert ("text_encoder_2" in index) == (kind == "sdxl")
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
    assert unet["cross_attention_dim"] == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[kind]
    vae = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
    assert vae["scaling_factor"] == (0.13025 if kind == "sdxl" else 0.18215)
    te = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    assert te.hidden_size == {"sd1": 768, "sd2": 1024, "sdxl": 768}[kind]
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert sched.config.prediction_type == ("v_prediction" if variant == "sd2_768v" else "epsilon")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token == ("!" if kind == "sd2" else "<|endoftext|>")
    if kind == "sdxl":
        te2 = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
        assert (te2.hidden_size, te2.projection_dim, te2.num_hidden_layers) == (1280, 1280, 32)
        tok2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True)
        assert tok2.pad_token == "!" and tok2.pad_token_id == 0
