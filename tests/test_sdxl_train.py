"""SDXL and SD2 training on the tiny models: conditioning, export names, metadata, round trips, loaders."""
import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_cfg
from lora_train.models import conditioning as Cd
from lora_train.networks import lora as L
from lora_train.data.buckets import SampleTransform
from lora_train.models.base import ModelError
from lora_train.models.loading import load_base_model
from lora_train.models.tiny import build_tiny_sd2, build_tiny_sdxl
from lora_train import families
from lora_train.training.trainer import Trainer

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes

CAPS = ["a photo of a red circle", "blue stripes on white", ""]
SDXL_KEY_RE = re.compile(r"^(lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_[a-z0-9_]+"
                         r"|lora_te[12]_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj|"
                         r"mlp_fc[12]))\.(lora_down\.weight|lora_up\.weight|alpha)$")
SD2_KEY_RE = re.compile(r"^(lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+|lora_te_text_model_[a-z0-9_]+)"
                        r"\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory):
    """Tiny SDXL, both text encoders trained (te lr), a validation image and a sample grid during training."""
    from lora_train.data.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("xl")
    data = write_demo_dataset(str(root / "data"), n=4, size=64)
    cfg = small_cfg(data, root / "out", output_name="xl", max_train_steps=4, learning_rate=5e-3,
                    train_text_encoder=True, text_encoder_lr=4e-3, validation_split=0.25,
                    sample_every_n_epochs=1, sample_prompts=["a red circle"], sample_steps=2, sample_cfg=2.0,
                    save_state=True)
    events = []
    tr = Trainer(cfg, model=build_tiny_sdxl(), callback=events.append)
    res = tr.run()
    return tr, res, events


# ----------------------------------------------------------------------------- SDXL: training and files
def test_sdxl_trains_samples_and_validates(xl_run):
    tr, res, events = xl_run
    assert res.steps == 4 and len(res.losses) == 4 and all(0 < x < 10 for x in res.losses)
    assert len(res.val_losses) >= 1 and all(0 < x < 10 for x in res.val_losses)
    samples = [e["path"] for e in events if e["kind"] == "sample"]
    assert samples and os.path.isfile(samples[0])
    assert Image.open(samples[0]).size[0] >= 2 * 64  # base column and LoRA column
    # both text encoders got an adapter, in their own param groups at the te lr
    groups = tr.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [5e-3, 4e-3, 4e-3]
    named = tr.trainable_named()
    assert any(k.startswith("te.") for k in named) and any(k.startswith("te2.") for k in named)
    assert sum(p.numel() for g in groups[1:] for p in g["params"]) == \
        sum(v.numel() for k, v in named.items() if k.startswith(("te.", "te2.")))


def test_sdxl_export_names_key_by_key(xl_run, reference_names):
    _, res, _ = xl_run
    sd = load_file(res.lora_path)
    bad = [k for k in sd if not SDXL_KEY_RE.match(k)]
    assert not bad, bad[:5]
    assert not any(s in k for k in sd for s in ("down_blocks", "up_blocks", "mid_block", "lora_te_text"))
    modules = {k.split(".")[0] for k in sd}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(sd)
        assert sd[f"{m}.alpha"].item() == 4.0 and sd[f"{m}.lora_down.weight"].shape[0] == 4
    ref_unet, ref_te = set(reference_names["sdxl"]["unet"]), set(reference_names["sdxl"]["te"])
    # every exported name is one that kohya's SDXL network has
    assert {m for m in modules if m.startswith("lora_unet_")} <= ref_unet
    assert {m for m in modules if m.startswith("lora_te")} <= ref_te
    # and exactly kohya's names for the blocks the tiny model has (see tiny_variants.TINY_SDXL_UNET): attention at
    # down level 1 (input_blocks 4, 5), the middle block and up level 0 (output_blocks 0-2), 2 transformer layers
    # each; 2 layers in each text encoder
    blocks = ("input_blocks_4_1_", "input_blocks_5_1_", "middle_block_1_", "output_blocks_0_1_",
              "output_blocks_1_1_", "output_blocks_2_1_")

    def in_tiny_unet(n):
        rest = next((n[len("lora_unet_" + b):] for b in blocks if n.startswith("lora_unet_" + b)), None)
        if rest is None:
            return False
        mt = re.match(r"transformer_blocks_(\d+)_", rest)
        return mt is None or int(mt.group(1)) < 2

    expected_unet = {n for n in ref_unet if in_tiny_unet(n)}
    expected_te = {n for n in ref_te if int(re.search(r"_layers_(\d+)_", n).group(1)) < 2}
    assert len(expected_unet) == 6 * (2 + 2 * 10) and len(expected_te) == 2 * 2 * 6
    assert {m for m in modules if m.startswith("lora_unet_")} == expected_unet
    assert {m for m in modules if m.startswith("lora_te")} == expected_te
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in modules


def test_sdxl_metadata(xl_run):
    _, res, _ = xl_run
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_network_train_unet_only"] == "False" and float(meta["ss_text_encoder_lr"]) == 4e-3
    assert meta["ss_sd_model_name"] == "tiny-sdxl"


def _cond_and_out(model, caps=CAPS):
    """(te conditioning, UNet output) of a model with fixed noise, timesteps and time ids."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(len(caps), 4, 16, 16, generator=g)
    t = torch.tensor([50, 400, 900])[: len(caps)]
    tids = torch.tensor([[64.0, 96, 0, 16, 64, 64], [80, 64, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]])[: len(caps)]
    with torch.no_grad():
        cond = Cd.encode(model, caps)
        out = Cd.Conditioner(model).predict(model.unet, x, t, cond, tids)
    return cond, out


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sdxl_round_trip(xl_run, strength, tmp_path):
    """The exported file, read by our importer into a fresh model (loaded from an SGM single-file checkpoint of
    the tiny model), reproduces the trained model: te1 and te2 LoRA and the UNet; diffusers' own kohya loader too."""
    from diffusers import StableDiffusionXLPipeline

    from lora_train.models import single_file as C

    import ldm_writers as W

    tr, res, _ = xl_run
    for mod in tr.model.text_encoders + [tr.model.unet]:
        L.set_strength(mod, strength)
    try:
        ref_cond, ref_out = _cond_and_out(tr.model)
    finally:
        for mod in tr.model.text_encoders + [tr.model.unet]:
            L.set_strength(mod, 1.0)
    base_cond, base_out = _cond_and_out(build_tiny_sdxl())
    # the adapters do something, in all three components
    assert (ref_out - base_out).abs().max() > 1e-3
    assert (ref_cond["hidden"][..., :32] - base_cond["hidden"][..., :32]).abs().max() > 1e-4  # te1
    assert (ref_cond["hidden"][..., 32:] - base_cond["hidden"][..., 32:]).abs().max() > 1e-4  # te2
    assert (ref_cond["pooled"] - base_cond["pooled"]).abs().max() > 1e-4

    ckpt = W.write_original_checkpoint(build_tiny_sdxl(), str(tmp_path / "tiny_xl.safetensors"))
    fresh = C.load_single_file(ckpt, config=build_tiny_sdxl())
    assert L.apply(fresh, L.load_file(res.lora_path, fresh), "x", strength) == []
    cond, out = _cond_and_out(fresh)
    assert (cond["hidden"] - ref_cond["hidden"]).abs().max() <= 1e-5
    assert (cond["pooled"] - ref_cond["pooled"]).abs().max() <= 1e-5
    assert (out - ref_out).abs().max() <= 1e-5

    from diffusers.utils.constants import USE_PEFT_BACKEND
    if not USE_PEFT_BACKEND:  # diffusers' LoRA loader needs transformers >= 4.34 (the WebUI's 4.30.2 is older)
        pytest.skip("our importer checked; diffusers' load_lora_weights needs its PEFT backend (transformers >= 4.34)")
    m = build_tiny_sdxl()
    pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                     tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                                     scheduler=m.noise_scheduler)
    # folder + weight_name: diffusers 0.31 refuses a bare file path when offline ("you must specify a weight_name")
    pipe.load_lora_weights(os.path.dirname(res.lora_path), weight_name=os.path.basename(res.lora_path),
                           adapter_name="ours")
    pipe.set_adapters(["ours"], adapter_weights=[strength])
    cond, out = _cond_and_out(m)
    assert (cond["hidden"] - ref_cond["hidden"]).abs().max() <= 1e-5
    assert (out - ref_out).abs().max() <= 1e-4


def test_sdxl_resume_state_holds_both_text_encoders(xl_run):
    tr, res, _ = xl_run
    states = os.path.join(res.output_dir, "state")
    step = sorted(os.listdir(states))[-1]
    keys = load_file(os.path.join(states, step, "adapter.lrstate")).keys()
    assert any(k.startswith("te2.") for k in keys) and any(k.startswith("te.") for k in keys)


# ----------------------------------------------------------------------------- SDXL: size / crop time ids
def _sized_dataset(root):
    os.makedirs(root, exist_ok=True)
    for name, size, cap in (("wide", (96, 64), "red"), ("tall", (64, 80), "blue")):
        Image.new("RGB", size, (200, 30, 30) if cap == "red" else (30, 30, 200)).save(os.path.join(root, name + ".png"))
        with open(os.path.join(root, name + ".txt"), "w") as fh:
            fh.write(cap)
    return root


def test_time_ids_reach_the_unet_per_sample(tmp_path):
    """Each sample's original size and crop (from the dataset's resize + crop plan) go into the UNet's time ids."""
    data = _sized_dataset(str(tmp_path / "data"))
    model = build_tiny_sdxl()
    seen = []

    def hook(_mod, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        seen.append((added["time_ids"].clone(), added["text_embeds"].clone(), args[2].shape))

    h = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cfg = small_cfg(data, tmp_path / "out", max_train_steps=1, batch_size=2)  # text encoders frozen: cache path
        Trainer(cfg, model=model).run()
    finally:
        h.remove()
    assert seen, "the UNet was not called with added_cond_kwargs"
    tids, pooled, ehs_shape = seen[0]
    # wide 96x64 -> covers 64x64 at 96x64, crop left 16; tall 64x80 -> 64x80, crop top 8; rows as (h, w)
    assert sorted(map(tuple, tids.tolist())) == sorted([(64.0, 96.0, 0.0, 16.0, 64.0, 64.0),
                                                         (80.0, 64.0, 8.0, 0.0, 64.0, 64.0)])
    assert tuple(ehs_shape) == (2, 77, 80) and tuple(pooled.shape) == (2, 40)


def test_time_ids_helpers():
    t = SampleTransform(original_size=(300, 200), resized_size=(120, 80), crop=(10, 0), target_size=(96, 80))
    assert Cd.time_ids_from_transform(t) == [200, 300, 0, 10, 80, 96]
    assert Cd.time_ids_from_transform(t, flip=True) == [200, 300, 0, 14, 80, 96]  # crop measured from the mirror

    class NoPlan:
        pass

    assert Cd.time_ids_for_items(NoPlan(), [0, 1], 64).tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    one = torch.randn(2, 77, 8)
    assert Cd.unet_inputs(None, one)[1] is None  # SD1/SD2: no added conditioning
    xl = {"hidden": torch.randn(2, 77, 8), "pooled": torch.randn(2, 4)}
    ehs, added = Cd.unet_inputs(None, xl, resolution=48)
    assert added["time_ids"].tolist() == [[48, 48, 0, 0, 48, 48]] * 2 and torch.equal(ehs, xl["hidden"])
    assert all(torch.equal(a["pooled"], b) for a, b in zip(Cd.rows(xl), xl["pooled"]))
    back = Cd.stack(Cd.rows(xl))
    assert torch.equal(back["hidden"], xl["hidden"]) and torch.equal(back["pooled"], xl["pooled"])


def test_sdxl_encode_matches_pipeline():
    """Our SDXL text conditioning equals diffusers' StableDiffusionXLPipeline.encode_prompt."""
    from diffusers import StableDiffusionXLPipeline

    m = build_tiny_sdxl()
    pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                     tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                                     scheduler=m.noise_scheduler)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(CAPS[:2], device="cpu", do_classifier_free_guidance=False)
        ours = Cd.encode(m, CAPS[:2])
    assert torch.equal(ours["hidden"], pe) and torch.equal(ours["pooled"], pooled)


# ----------------------------------------------------------------------------- SD2 (v-prediction)
def test_sd2_v_training_export_and_round_trip(tmp_path, demo_data):
    model = build_tiny_sd2(v_prediction=True)
    sched = model.noise_scheduler
    calls = []
    real = sched.get_velocity

    def spy(sample, noise, timesteps):
        calls.append(tuple(sample.shape))
        return real(sample, noise, timesteps)

    sched.get_velocity = spy
    cfg = small_cfg(demo_data, tmp_path / "o", max_train_steps=3, learning_rate=5e-3)
    tr = Trainer(cfg, model=model)
    res = tr.run()
    assert len(calls) == 3 and calls[0][0] == 2  # the v target, once per batch
    sd = load_file(res.lora_path)
    assert sd and all(SD2_KEY_RE.match(k) for k in sd)
    assert {k.split(".")[0] for k in sd} == {n for n in L.name_map(build_tiny_sd2()) if n.startswith("lora_unet_")}
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_prediction_type"] == "v_prediction"

    def unet_out(m):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 4, 16, 16, generator=g)
        with torch.no_grad():
            return m.unet(x, torch.tensor([30, 700]), Cd.encode(m, CAPS[:2])).sample

    ref = unet_out(tr.model)
    assert (ref - unet_out(build_tiny_sd2())).abs().max() > 1e-3
    fresh = build_tiny_sd2()
    assert L.apply(fresh, L.load_file(res.lora_path, fresh), "x") == []
    assert (unet_out(fresh) - ref).abs().max() <= 1e-5


def test_architecture_per_kind():
    def architecture(kind, prediction):
        return families.get(kind).architecture_for(prediction)

    assert architecture("sd1", "epsilon") == "stable-diffusion-v1/lora"
    assert architecture("sd2", "v_prediction") == "stable-diffusion-v2-768-v/lora"
    assert architecture("sd2", "epsilon") == "stable-diffusion-v2-512/lora"
    assert architecture("sdxl", "epsilon") == "stable-diffusion-xl-v1-base/lora"


# ----------------------------------------------------------------------------- loading
def test_load_base_model_allow_pickle(tmp_path, monkeypatch):
    from lora_train.models import single_file as C
    import ldm_writers as W

    path = str(tmp_path / "m.ckpt")
    torch.save({"state_dict": W.to_original_state_dict(build_tiny_sd2())}, path)
    with pytest.raises(ModelError, match="pickle"):
        load_base_model(path)
    # opted in: read (weights only) and detected as SD2; the bundled full-size config does not fit the tiny one
    with pytest.raises(ModelError, match="do not fit"):
        load_base_model(path, allow_pickle=True)
    seen = {}

    def fake(spec, prediction_type="auto", allow_pickle=False, files=None):
        seen.update(spec=spec, allow_pickle=allow_pickle)
        raise ModelError("stop here")

    import lora_train.training.trainer as T

    monkeypatch.setattr(T, "load_base_model", fake)
    for flag in (False, True):
        cfg = small_cfg(str(tmp_path), tmp_path / "o", base_model=path, allow_pickle=flag)
        with pytest.raises(ModelError, match="stop here"):
            T.Trainer(cfg, dataset=_EmptyDataset()).run()
        assert seen == {"spec": path, "allow_pickle": flag}


class _EmptyDataset:
    warnings = []


def test_tiny_specs():
    assert load_base_model("tiny-sdxl").kind == "sdxl"
    sd2 = load_base_model("tiny-sd2")
    assert sd2.kind == "sd2" and sd2.prediction_type == "v_prediction"
    assert load_base_model("tiny-sd2-eps").prediction_type == "epsilon"
    assert load_base_model("tiny", "v_prediction").prediction_type == "v_prediction"


def test_sdxl_and_sd2_diffusers_folders(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lora_train.models.diffusers_folder import save_diffusers_folder

    m = build_tiny_sdxl()
    folder = str(tmp_path / "xl")
    StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                              tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                              scheduler=m.noise_scheduler).save_pretrained(folder)
    got = load_base_model(folder)
    assert got.kind == "sdxl" and type(got.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert got.tokenizer_2.pad_token == "!" and got.native_resolution == 64
    c1, o1 = _cond_and_out(m)
    c2, o2 = _cond_and_out(got)
    assert torch.equal(c1["hidden"], c2["hidden"]) and torch.equal(c1["pooled"], c2["pooled"])
    assert (o1 - o2).abs().max() == 0
    sd2 = load_base_model(save_diffusers_folder(build_tiny_sd2(), str(tmp_path / "sd2")))
    assert sd2.kind == "sd2" and sd2.prediction_type == "v_prediction"
    # a refiner folder (no first text encoder) and a transformer model are refused with a message
    for name, index, match in (
            ("refiner", {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                         "unet": ["diffusers", "UNet2DConditionModel"]}, "refiner"),
            ("sd3", {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
             "transformer")):
        d = tmp_path / name
        d.mkdir()
        (d / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelError, match=match):
            load_base_model(str(d))


def test_lr_range_test_on_sdxl(tmp_path, demo_data):
    """The LR range test conditions an SDXL UNet as the trainer does, and leaves the model as it found it."""
    from lora_train.tuning.lr_finder import lr_range_test

    model = build_tiny_sdxl()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = small_cfg(demo_data, tmp_path / "o", lora_rank=2, batch_size=2)
    res = lr_range_test(cfg, model=model, steps=3, probe_samples=2, lr_max=1e-2)
    assert len(res.losses) == 3 and all(0 < x < 10 for x in res.losses)
    after = model.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_unmatched_sdxl_modules_are_named_as_kohya_does():
    m = build_tiny_sdxl()
    lw = L.LoraWeights()
    lw.modules[("unet", "down_blocks.1.attentions.0.transformer_blocks.5.attn1.to_q")] = (
        torch.zeros(2, 64), torch.zeros(64, 2), 2.0)  # a 6th transformer layer: the real SDXL has it, tiny has not
    with pytest.raises(L.LoraFormatError, match="lora_unet_input_blocks_4_1_transformer_blocks_5_attn1_to_q"):
        L.apply(m, lw, "x")
    assert L.apply(m, lw, "y", strict=False) == ["lora_unet_input_blocks_4_1_transformer_blocks_5_attn1_to_q"]


def test_sdxl_generator_grid_path(xl_run):
    """The A/B Generator loads our SDXL file by `<lora:name:w>` into an SDXL pipeline; strength 0 is the base."""
    import numpy as np

    from lora_train.sampler import GenParams, Generator

    _, res, _ = xl_run
    gen = Generator(build_tiny_sdxl(), lora_dirs=[res.output_dir])

    def img(prompt):
        return np.asarray(gen(GenParams(prompt=prompt, seed=3, steps=2, cfg_scale=2.0, width=64, height=64)),
                          dtype=np.int16)

    base, zero, one = img("a red circle"), img("a red circle <lora:xl:0>"), img("a red circle <lora:xl:1>")
    assert np.array_equal(base, zero) and np.abs(one - base).max() > 0


def test_sdxl_conditioning_goes_through_the_text_cache(tmp_path):
    """conditioning.encode's SDXL dict is stored by cache.TextEmbeddingCache (on disk) and comes back batched."""
    from lora_train.data.cache import TextEmbeddingCache

    m = build_tiny_sdxl()
    store = TextEmbeddingCache(str(tmp_path / "cache"), "tiny-sdxl").get_or_encode(CAPS, lambda c: Cd.encode(m, c))
    batch = store.stack([CAPS[1], CAPS[0]])
    with torch.no_grad():
        direct = Cd.encode(m, [CAPS[1], CAPS[0]])
    assert set(batch) == {"hidden", "pooled"}
    # encoded one caption at a time (cache) vs as one batch: equal up to CPU kernels' last bits, not bitwise
    torch.testing.assert_close(batch["hidden"], direct["hidden"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch["pooled"], direct["pooled"], rtol=1e-5, atol=1e-6)
    ehs, added = Cd.unet_inputs(m, batch, resolution=64)
    with torch.no_grad():
        out = m.unet(torch.zeros(2, 4, 16, 16), torch.tensor([1, 2]), ehs, added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 16, 16)
