"""The 2026 families (#27), each on its tiny model: Qwen-Image, Z-Image, Chroma, Wan (on images), FLUX.2 [klein]. Layout and conditioning, the names ComfyUI
0.8.0 maps (at full size, from its own key map), training end to end with every network type, learning, resume,
memory savers, grids, the LR finder, folders, single files and the message where the installed diffusers /
transformers are too old."""
import builtins
import gzip
import json
import math
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_loss_falls_with_strength, flow_file_error, run_trainer, small_cfg
from single_file_layouts import original_layout
from lora_train import families
from lora_train.models import conditioning, flow
from lora_train.models.base import ModelError
from lora_train.networks import flow_names
from lora_train.networks import lora as L

HERE = os.path.dirname(os.path.abspath(__file__))


class Fam:
    """What a test needs of a family: its tiny spec and builder module, the reference entry, its module counts."""

    def __init__(self, kind, spec, module, builder, ref, n_tiny, n_full, n_full_default, network_module, sampling,
                 shift, arch, latent=(16, 16, 16), width=32, train_lr=2e-3, ident=None):
        self.kind, self.spec, self.module, self.builder, self.ref = kind, spec, module, builder, ref
        self.n_tiny, self.n_full, self.n_full_default = n_tiny, n_full, n_full_default
        self.network_module, self.sampling, self.shift, self.arch = network_module, sampling, shift, arch
        self.latent, self.width = latent, width  # the tiny model's latents (C, h, w) at 64 px, its text width
        self.train_lr = train_lr  # the lr at which its tiny model learns in 60 steps
        self.ident = ident or kind  # the test id (two variants of one family differ)

    def mod(self):
        import importlib

        return importlib.import_module(f"lora_train.models.{self.module}")

    def available(self):
        try:
            self.mod().require()
            return True
        except ModelError:
            return False

    def build(self):
        return getattr(self.mod(), self.builder)()

    def __repr__(self):
        return self.ident


QWEN = Fam("qwen_image", "tiny-qwen-image", "qwen_image", "build_tiny_qwen_image", "qwen_image", 28, 846, 840,
           "networks.lora_qwen_image", "shift", "2.2", "Qwen-Image/lora")
ZIMAGE = Fam("z_image", "tiny-z-image", "z_image", "build_tiny_z_image", "z_image", 23, 208, 202,
             "networks.lora_zimage", "shift", "2", "Z-Image/lora")
CHROMA = Fam("chroma", "tiny-chroma", "chroma", "build_tiny_chroma", "chroma", 20, 243, 228, "networks.lora_flux",
             "sigmoid", "1", "chroma/lora")
# the names at full size: diffusers' class defaults are Wan 2.1 T2V 14B's (the layout of each Wan 2.2 A14B expert)
WAN = Fam("wan", "tiny-wan", "wan", "build_tiny_wan", "wan_t2v_14b", 20, 406, 400, "networks.lora_wan", "shift", "3",
          "wan2.1/lora")
# the names at full size: diffusers' class defaults are FLUX.2 dev's (klein's layout is the same with fewer blocks,
# checked in test_flux2_klein_names_at_full_size)
FLUX2 = Fam("flux2", "tiny-flux2-klein", "flux2", "build_tiny_flux2_klein", "flux2_dev", 20, 171, 160,
            "networks.lora_flux_2", "flux_shift", "3", "Flux.2-klein-4b/lora", latent=(32, 8, 8), width=48,
            train_lr=1e-2)  # the tiny FLUX.2 (no biases, global modulation) learns slowly at 2e-3: 0.4% in 60 steps
FLUX2DEV = Fam("flux2", "tiny-flux2-dev", "flux2", "build_tiny_flux2_dev", "flux2_dev", 20, 171, 160,
               "networks.lora_flux_2", "flux_shift", "3", "Flux.2-dev/lora", latent=(32, 8, 8), width=48, train_lr=1e-2,
               ident="flux2_dev")
# Wan 2.2 A14B: the low-noise expert of a pair (the other held for grids; tests/test_wan_experts.py: the experts)
WAN_A14B = Fam("wan", "tiny-wan-a14b", "wan", "build_tiny_wan_a14b", "wan_t2v_14b", 20, 406, 400, "networks.lora_wan",
               "shift", "3", "wan2.1/lora", ident="wan_a14b")
FAMS = [QWEN, ZIMAGE, CHROMA, WAN, WAN_A14B, FLUX2, FLUX2DEV]
#: the families whose text encoder is a T5 (their files record its length)
T5_FAMILIES = ("chroma", "wan")


def _skip_unless(f):
    return pytest.param(f, id=f.ident, marks=pytest.mark.skipif(not f.available(),
                                                              reason=f"this diffusers / transformers has no {f.kind}"))


each = pytest.mark.parametrize("fam", [_skip_unless(f) for f in FAMS])
#: the families whose ComfyUI single files hold the transformer only (read with a components folder)
each_single_file = pytest.mark.parametrize("fam", [_skip_unless(f) for f in (QWEN, ZIMAGE, CHROMA, WAN, FLUX2, FLUX2DEV)])


def reference(variant="qwen_image"):
    """ComfyUI 0.8.0's own map for the full-size model (tests/data/reference_README.md)."""
    with gzip.open(os.path.join(HERE, "data", "families_2026_lora_names.json.gz"), "rt", encoding="utf-8") as fh:
        return json.load(fh)[variant]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("fam2026") / "data"), n=8, size=64)


_TRAINED = {}


@pytest.fixture
def trained(data, tmp_path_factory, fam):
    """(trainer, result) of one 60-step run per family, made once per session."""
    from lora_train.training.trainer import Trainer

    if fam.ident not in _TRAINED:
        cfg = small_cfg(data, tmp_path_factory.mktemp(f"{fam.ident}_run"), base_model=fam.spec, output_name="fx",
                        lora_rank=8, learning_rate=fam.train_lr, epochs=15, lr_scheduler="cosine", lr_warmup_steps=5,
                        trigger_word="lrtdemo")
        tr = Trainer(cfg)
        _TRAINED[fam.ident] = (tr, tr.run())
    return _TRAINED[fam.ident]


@pytest.mark.parametrize("fam, package, cls, need", [
    (QWEN, "transformers", "Qwen2_5_VLForConditionalGeneration", "transformers >= 4.49"),
    (ZIMAGE, "transformers", "Qwen3Model", "transformers >= 4.51"),
    (CHROMA, "diffusers", "ChromaPipeline", "diffusers >= 0.35"),
    (WAN, "diffusers", "WanPipeline", "diffusers >= 0.33"),
    (FLUX2, "transformers", "Qwen3ForCausalLM", "transformers >= 4.51"),
    (FLUX2DEV, "transformers", "Mistral3ForConditionalGeneration", "transformers >= 4.50")],
    ids=["qwen", "z", "chroma", "wan", "flux2", "flux2_dev"])
def test_old_versions_get_a_message(monkeypatch, fam, package, cls, need):
    """Where diffusers / transformers lack the family's classes (AUTOMATIC1111's pins), loading names what to
    install."""
    real = builtins.__import__
    title = families.get(fam.kind).title + (" [dev]" if fam is FLUX2DEV else "")

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if name == package and fromlist and cls in fromlist:
            raise ImportError(f"cannot import name '{cls}'")
        return real(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake)
    from lora_train.models.loading import load_base_model

    with pytest.raises(ModelError) as e:
        load_base_model(fam.spec)
    assert f"{title} needs" in str(e.value) and need in str(e.value)


@pytest.mark.parametrize("fam", FAMS, ids=repr)
def test_family_states_what_differs(fam):
    f = families.get(fam.kind)
    assert f.flow and families.by_transformer_class(f.transformer_class) == fam.kind
    assert f.network_module == fam.network_module and fam.spec in f.tiny_specs
    meta = flow_names.metadata_for(fam.kind, "flux2-dev" if fam is FLUX2DEV else f.variants[0])
    assert meta["ss_base_model_version"] == fam.kind and meta["modelspec.architecture"] == fam.arch
    with pytest.raises(flow_names.FlowNameError):
        flow_names.metadata_for(fam.kind, "flux-dev")
    assert f.vram_tiers[-1][0] == 0.0 and f.advice_name


@each
def test_tiny_layout_and_conditioning(fam):
    """Masked text of each caption's own length, batched again across chunks; latents as the pipeline scales them;
    the default targets are every block Linear."""
    m = fam.build()
    f = families.of(m)
    assert m.kind == fam.kind and m.prediction_type == "flow" and m.extra["variant"] in f.variants
    assert not conditioning.is_sdxl(m) and type(m.unet).__name__ == f.transformer_class
    cond = conditioning.encode(m, ["a red circle", "lrtdemo a red circle on a blue background"])
    assert set(cond) == {"hidden", "mask"} and cond["hidden"].shape[0] == 2 and cond["hidden"].shape[-1] == fam.width
    n_short = int(cond["mask"][0].sum())
    assert 0 < n_short < int(cond["mask"][1].sum()) <= cond["hidden"].shape[1]
    if fam is FLUX2:  # Qwen3 padded to its max length (64 for the tiny model), as Flux2KleinPipeline
        assert cond["hidden"].shape[1] == 64
    elif fam is FLUX2DEV:  # Mistral over Flux2Pipeline's system message and the caption, padded to 128 here
        assert cond["hidden"].shape[1] == 128 and n_short > 92
    elif fam.kind not in T5_FAMILIES:  # Qwen-Image, Z-Image: padded to the longest caption, padding carries nothing
        assert int(cond["mask"][1].sum()) == cond["hidden"].shape[1] and not cond["hidden"][0, n_short:].any()
    elif fam.kind == "chroma":  # T5 padded to its max length, the first pad token kept (ChromaPipeline's mask)
        assert cond["hidden"].shape[1] == 32 and cond["mask"][0, n_short - 1] == 1 and cond["mask"][0, n_short] == 0
    else:  # Wan: UMT5 padded to its max length with zeros after each caption (WanPipeline)
        assert cond["hidden"].shape[1] == 32 and not cond["hidden"][0, n_short:].any()
    # entries of different lengths (other chunks of the text cache) batch again, padded and masked
    a, b = conditioning.rows(conditioning.encode(m, ["a red circle"]))[0], conditioning.rows(cond)[1]
    batch = conditioning.stack([a, b])
    assert batch["hidden"].shape[1] == b["hidden"].shape[0] and batch["mask"][0].sum() == a["mask"].sum()
    # latents: one frame of the 3-D VAE, normalised by the VAE's latents_mean / latents_std
    px = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        lat = families.of(m).encode_latents(m, m.vae, px)
    assert lat.shape == (2,) + fam.latent
    groups = flow_names.unet_groups(fam.kind, m.unet, extras=False)
    assert len(groups) == fam.n_tiny and set(groups) <= set(reference(fam.ref)["layouts"]["lora_unet"])


def test_qwen_template_is_dropped():
    """Qwen-Image: the system-prompt template's tokens are counted with the model's tokenizer and dropped."""
    if not QWEN.available():
        pytest.skip("this diffusers / transformers has no Qwen-Image")
    from lora_train.families.qwen_image import TEMPLATE, template_length

    m = QWEN.build()
    n = template_length(m.tokenizer)
    ids = m.tokenizer(TEMPLATE.format("a red circle")).input_ids
    assert 10 < n < len(ids) and ids[:n] == m.tokenizer(TEMPLATE.split("{}")[0]).input_ids


@each
def test_names_are_the_ones_comfyui_maps_at_full_size(fam):
    """Our module names for the released transformer, made on the meta device from diffusers' class defaults (the
    released configs), are exactly ComfyUI 0.8.0's `lora_unet` names for every Linear of the blocks (Qwen-Image
    840, Z-Image 202; fused q/k/v as one) and the 6 outside, with the same (fused) weight shapes; the 1-D norms
    ComfyUI also lists get no module (nor Wan's Conv3d patch embedding)."""
    import diffusers
    from accelerate import init_empty_weights

    ref = reference(fam.ref)["layouts"]["lora_unet"]
    with init_empty_weights():
        tr = getattr(diffusers, families.get(fam.kind).transformer_class)()
    groups = flow_names.unet_groups(fam.kind, tr)
    two_d = {n: t for n, t in ref.items() if len(t[1]) == 2}
    assert set(groups) == set(two_d) and len(groups) == fam.n_full
    assert sum(g.default for g in groups.values()) == fam.n_full_default
    for name, g in groups.items():
        lin = tr.get_submodule(g.paths[0])
        assert [sum(g.out_dims), lin.in_features] == two_d[name][1], name
    # what is left: norm scales (1-D) and Wan's Conv3d patch embedding (5-D)
    assert all(len(t[1]) in (1, 5) for n, t in ref.items() if n not in groups)


@each
@pytest.mark.slow
def test_training_files_metadata_and_names(trained, fam):
    tr, res = trained
    assert res.steps == 60 and not res.nan_stopped and all(math.isfinite(x) for x in res.losses)
    sd = load_file(res.lora_path)
    names = {k.split(".")[0] for k in sd}
    assert names == {flow_names.kohya_name("unet", t, fam.kind)
                     for t in flow_names.target_modules(fam.kind, tr.model.unet)} and len(names) == fam.n_tiny
    assert names <= set(reference(fam.ref)["layouts"]["lora_unet"])  # every name is one ComfyUI maps
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == fam.network_module and meta["ss_base_model_version"] == fam.kind
    assert meta["ss_timestep_sampling"] == fam.sampling and meta["ss_discrete_flow_shift"] == fam.shift
    assert meta["ss_prediction_type"] == "flow"
    assert ("ss_t5xxl_max_token_length" in meta) == (fam.kind in T5_FAMILIES)


@each
@pytest.mark.slow
def test_learning(trained, fam):
    """Fixed-noise flow loss of the training images falls with the LoRA's strength, monotone."""
    assert_loss_falls_with_strength(trained[0], fam.spec)


@each
@pytest.mark.slow
def test_file_round_trip_and_grid(trained, fam):
    """The file read back into a fresh model gives the trained output; the A/B grid runs through the family's
    diffusers pipeline and the LoRA changes the picture."""
    import numpy as np

    from lora_train.sampler import Generator, GenParams, build_grid

    tr, res = trained
    assert flow_file_error(tr.model, res.lora_path, fam.build, shape=fam.latent) <= 1e-5
    gen = Generator(fam.build(), lora_dirs=[res.output_dir])
    base = GenParams(prompt="lrtdemo a red circle", seed=3, steps=3, cfg_scale=1.0, width=64, height=64)
    grid = build_grid(gen, base, "fx", strengths=[0.0, 1.0], seeds=[3])
    imgs = [np.asarray(c.image, dtype=np.float32) for c in grid.cells]
    assert len(imgs) == 2 and imgs[0].shape == (64, 64, 3)
    again = np.asarray(build_grid(gen, base, "fx", strengths=[0.0], seeds=[3]).cells[0].image, dtype=np.float32)
    # the same cell twice is the same picture; the LoRA at 1 changes it (the tiny VAE's decoder damps the change:
    # about 0.5 of 255 on average here)
    assert np.array_equal(imgs[0], again) and np.abs(imgs[0] - imgs[1]).mean() > 0.2


@each
@pytest.mark.slow
def test_resume_bitwise(data, tmp_path, fam):
    from lora_train.training.state import list_states

    kw = dict(base_model=fam.spec, max_train_steps=5, lr_warmup_steps=1, flip_aug=True,
              caption_dropout_rate=0.2, timestep_sampling="flux_shift")
    _, ref = run_trainer(small_cfg(data, tmp_path / "a", **kw), fam.build)
    cfg = small_cfg(data, tmp_path / "b", **kw)
    _, r1 = run_trainer(cfg, fam.build, stop_at=2)
    assert r1.stopped and list_states(str(tmp_path / "b"))
    _, r2 = run_trainer(cfg, fam.build, resume_from=str(tmp_path / "b"))
    a, b = load_file(ref.lora_path), load_file(r2.lora_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert r2.losses == ref.losses


@each
@pytest.mark.slow
@pytest.mark.parametrize("network", ["loha", "lokr", "dora"])
def test_network_types_train_and_read_back(data, tmp_path, network, fam):
    cfg = small_cfg(data, tmp_path, base_model=fam.spec, max_train_steps=3, network_type=network,
                    learning_rate=5e-3)
    tr, res = run_trainer(cfg, fam.build)
    assert res.steps == 3 and not res.nan_stopped
    names = {k.split(".")[0] for k in load_file(res.lora_path)}
    assert names <= set(reference(fam.ref)["layouts"]["lora_unet"]) and len(names) == fam.n_tiny
    assert flow_file_error(tr.model, res.lora_path, fam.build, shape=fam.latent) <= 1e-4


@each
@pytest.mark.slow
def test_cli_with_memory_savers_samples_and_lr_finder(data, tmp_path, fam):
    """fp8 base, block swap and gradient checkpointing through the CLI, a sample grid during training; the LR range
    test on the same objective."""
    from lora_train.cli.main import main
    from lora_train.tuning.lr_finder import lr_range_test

    cfg = small_cfg(data, tmp_path, base_model=fam.spec, max_train_steps=2, fp8_base=True,
                    blocks_to_swap=1, gradient_checkpointing=True, sample_every_n_steps=2,
                    sample_prompts=["a red circle"], sample_steps=2)
    cfg.save(str(tmp_path / "c.yaml"))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_fp8_base"] == "True"
    assert os.listdir(tmp_path / "samples")
    res = lr_range_test(small_cfg(data, tmp_path / "lr", base_model=fam.spec), steps=4, lr_min=1e-5,
                        lr_max=1e-2)
    assert len(res.losses) == 4 and all(math.isfinite(x) for x in res.losses)


@each
def test_folder_round_trip_and_wrong_folder(tmp_path, fam):
    from lora_train.cli.main import main
    from lora_train.models.loading import load_base_model

    assert main(["tiny-model", str(tmp_path / "qi"), "--family", fam.spec]) == 0
    m = fam.build()
    m2 = load_base_model(str(tmp_path / "qi"))
    assert m2.kind == fam.kind and m2.extra["variant"] in families.get(fam.kind).variants
    c1, c2 = flow.encode(m, ["a red circle"]), flow.encode(m2, ["a red circle"])
    assert all(torch.allclose(c1[k], c2[k], atol=1e-6) for k in c1)
    x = torch.randn((1,) + fam.latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(flow.predict(m, m.unet, x, torch.tensor([400.0]), c1),
                              flow.predict(m2, m2.unet, x, torch.tensor([400.0]), c2), atol=1e-5)
    (tmp_path / "edit").mkdir()
    other = {"qwen_image": ("QwenImageEditPipeline", "QwenImagePipeline"),
             "z_image": ("ZImageControlNetPipeline", "ZImagePipeline"),
             "chroma": ("ChromaInpaintPipeline", "ChromaPipeline"),
             "wan": ("WanImageToVideoPipeline", "WanPipeline"),
             "flux2": ("Flux2KleinInpaintPipeline", "Flux2KleinPipeline")}[fam.kind]
    (tmp_path / "edit" / "model_index.json").write_text(json.dumps({"_class_name": other[0]}))
    with pytest.raises(ModelError) as e:
        load_base_model(str(tmp_path / "edit"))
    assert other[0] in str(e.value) and other[1] in str(e.value)


@each_single_file
def test_single_file_transformer_with_a_components_folder(tmp_path, fam):
    """A ComfyUI-style diffusion model file (model.diffusion_model.*, original layout, bf16) loads with the VAE, text
    encoder and tokenizer of a diffusers folder of the family; without the folder the message says what to set."""
    from safetensors.torch import save_file

    from lora_train.cli.main import main
    from lora_train.models.loading import load_base_model

    m = fam.build()
    assert main(["tiny-model", str(tmp_path / "parts"), "--family", fam.spec]) == 0
    f = tmp_path / f"{fam.kind}_tiny_bf16.safetensors"
    save_file(original_layout(fam.kind, m.unet.state_dict()), str(f))
    with pytest.raises(ModelError) as e:
        load_base_model(str(f))
    assert "components_folder" in str(e.value) and f"{families.get(fam.kind).title} transformer" in str(e.value)
    m2 = load_base_model(str(f), files={"components_folder": str(tmp_path / "parts")})
    assert m2.kind == fam.kind and m2.name == f"{fam.kind}_tiny_bf16"
    assert next(m2.unet.parameters()).dtype == torch.bfloat16
    assert set(m2.unet.state_dict()) == set(m.unet.state_dict())
    x = torch.randn((1,) + fam.latent, generator=torch.Generator().manual_seed(0))
    c = flow.encode(m, ["a red circle"])
    m2.unet.float()
    with torch.no_grad():
        a = flow.predict(m, m.unet, x, torch.tensor([400.0]), c)
        b = flow.predict(m2, m2.unet, x, torch.tensor([400.0]), c)
    assert (a - b).abs().max() < 0.05  # the bf16 copy of the same weights


#: what a transformer's shapes cannot tell, from the components folder's transformer/config.json (Wan's head size)
NOT_IN_SHAPES = {"wan": ("attention_head_dim",)}


@each_single_file
def test_single_file_layout_round_trip(fam):
    """The test helper's original layout (tests/single_file_layouts.py) read back by the loader's conversion (diffusers'
    own converters) is the tiny transformer's state dict exactly, and its config (from the shapes) the tiny one's."""
    from lora_train.models import flow_single_file

    m = fam.build()
    sd = m.unet.state_dict()
    folder_config = json.loads(json.dumps(dict(m.unet.config)))
    base = folder_config if fam.kind in ("qwen_image", "z_image") else {
        k: folder_config[k] for k in NOT_IN_SHAPES.get(fam.kind, ())}
    config, conv = getattr(flow_single_file, f"convert_{fam.kind}")(original_layout(fam.kind, sd, dtype=None), base)
    assert set(conv) == set(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)
    plain = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in dict(c).items() if not k.startswith("_")}
    assert plain(type(m.unet)(**config).config) == plain(m.unet.config)


@pytest.mark.skipif(not WAN.available(), reason="this diffusers / transformers has no Wan")
def test_wan_single_file_other_than_text_to_video_is_refused():
    """Wan's image-to-video files (Wan 2.1 I2V's img_emb, Wan 2.2 I2V's 36 input channels) get a message, not a
    wrong model."""
    from lora_train.models.flow_single_file import convert_wan

    sd = original_layout("wan", WAN.build().unet.state_dict())
    i2v = dict(sd, **{"model.diffusion_model.img_emb.proj.0.weight": torch.zeros(4)})
    pe = sd["model.diffusion_model.patch_embedding.weight"]
    wide = dict(sd, **{"model.diffusion_model.patch_embedding.weight": torch.zeros((pe.shape[0], 36) + pe.shape[2:])})
    for bad in (i2v, wide):
        with pytest.raises(ModelError, match="image-to-video.*Wan 2.1 T2V"):
            convert_wan(bad, {"attention_head_dim": 16})


@each_single_file
def test_single_file_fp8_unprefixed_and_partial(tmp_path, fam):
    """A float8_e4m3fn file under `diffusion_model.` (ComfyUI's fp8 copies) loads as bf16 with the fp8 values; a
    partial file (a block's weight left out) gets a message naming the file and what to use."""
    from safetensors.torch import save_file

    from lora_train.cli.main import main
    from lora_train.models.loading import load_base_model

    m = fam.build()
    assert main(["tiny-model", str(tmp_path / "parts"), "--family", fam.spec]) == 0
    parts = {"components_folder": str(tmp_path / "parts")}
    sd = original_layout(fam.kind, m.unet.state_dict(), prefix="diffusion_model.", dtype=torch.float8_e4m3fn)
    f = tmp_path / f"{fam.kind}_tiny_fp8_e4m3fn.safetensors"
    save_file(sd, str(f))
    m2 = load_base_model(str(f), files=parts)
    assert m2.kind == fam.kind and {p.dtype for p in m2.unet.parameters()} == {torch.bfloat16}
    want = {k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in m.unet.state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in m2.unet.state_dict().items())
    block = next(k for k in sorted(sd) if re.search(r"blocks\.1\.|layers\.1\.", k) and k.endswith(".weight"))
    g = tmp_path / f"{fam.kind}_partial.safetensors"
    save_file({k: v for k, v in sd.items() if k != block}, str(g))
    with pytest.raises(ModelError) as e:
        load_base_model(str(g), files=parts)
    assert str(g) in str(e.value) and f"the original {families.get(fam.kind).title}" in str(e.value).replace("Use", "use")


@each
@pytest.mark.slow
def test_diffusers_load_lora_weights_and_their_layout_back(trained, fam, tmp_path):
    """The same LoRA in diffusers' peft layout (`transformer.<diffusers path>.lora_A/B`, what diffusers' training
    scripts and ai-toolkit's diffusers exports hold): the family's own diffusers pipeline loads it with
    `load_lora_weights` and gives our trained output (<= 1e-5); our reader takes that layout back to the same."""
    import copy

    from safetensors.torch import save_file

    from lora_train.sampler import flow_pipeline

    tr, res = trained
    fresh = fam.build()
    lw = L.load_file(res.lora_path, fresh)
    diff = flow_names.to_diffusers_state_dict(lw.modules, fam.kind)
    assert diff and all(k.startswith("transformer.") for k in diff)
    pipe_model = fam.build()
    pipe = flow_pipeline(pipe_model)
    # Wan 2.2 A14B: a low-noise expert's LoRA goes to the pipeline's transformer_2 (WanLoraLoaderMixin)
    low = getattr(pipe_model.extra.get("wan_pair"), "expert", None) == "low"
    pipe.load_lora_weights(copy.deepcopy(diff), adapter_name="ours", **({"load_into_transformer_2": True} if low else {}))
    assert (pipe.transformer_2 if low else pipe.transformer) is pipe_model.unet
    x = torch.randn((2,) + fam.latent, generator=torch.Generator().manual_seed(1))
    cond = flow.encode(fresh, ["a red circle", "lrtdemo"])
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        ours = flow.predict(tr.model, tr.model.unet, x, t, cond)
        theirs = flow.predict(pipe_model, pipe_model.unet, x, t, cond)
        plain = flow.predict(fresh, fresh.unet, x, t, cond)
    assert float((ours - theirs).abs().max()) <= 1e-5 and float((ours - plain).abs().max()) > 1e-4
    path = tmp_path / "diffusers_layout.safetensors"
    save_file({k: v.contiguous() for k, v in diff.items()}, str(path))
    assert flow_file_error(tr.model, str(path), fam.build, shape=fam.latent) <= 1e-5


@each
@pytest.mark.slow
def test_other_trainers_layouts_read_back(trained, fam, tmp_path):
    """The layouts ComfyUI and the other trainers write for these families read back to our trained model: ComfyUI's
    `diffusion_model.<original name>` (lora_A / lora_B), and `diffusion_model.<diffusers path>` (ai-toolkit)."""
    from safetensors.torch import save_file

    tr, res = trained
    # ComfyUI's key map spells each module as its dotted path (the reference's `diffusion_model` layout)
    ref = reference(fam.ref)["layouts"]["diffusion_model"]
    dotted = {n[len("diffusion_model."):].replace(".", "_"): n for n in ref}
    tags = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    comfy, modules = {}, set()
    for k, v in load_file(res.lora_path).items():
        name, _, tag = k.partition(".")
        modules.add(dotted[name[len("lora_unet_"):]])
        comfy[f"{dotted[name[len('lora_unet_'):]]}.{tags[tag]}"] = v
    assert modules <= set(ref) and len(modules) == fam.n_tiny  # every name is one ComfyUI maps
    p1 = tmp_path / "comfy_layout.safetensors"
    save_file({k: v.contiguous() for k, v in comfy.items()}, str(p1))
    assert flow_file_error(tr.model, str(p1), fam.build, shape=fam.latent) <= 1e-5
    diff = flow_names.to_diffusers_state_dict(L.load_file(res.lora_path, fam.build()).modules, fam.kind)
    p2 = tmp_path / "aitoolkit_layout.safetensors"
    save_file({"diffusion_model." + k[len("transformer."):]: v.contiguous() for k, v in diff.items()}, str(p2))
    assert flow_file_error(tr.model, str(p2), fam.build, shape=fam.latent) <= 1e-5


@each
def test_fp8_and_block_swap_reach_every_block(fam):
    """fp8_base stores every default-target Linear of the family's blocks in float8 (the rest keeps its dtype) and
    block swap finds the family's blocks in execution order."""
    from lora_train.training.memory import BlockSwap, apply_fp8_base, cast_except_fp8, transformer_blocks

    m = fam.build()
    blocks = transformer_blocks(m.unet)
    n_blocks = sum(len(getattr(m.unet, b)) for b in families.get(fam.kind).block_lists)
    assert len(blocks) == n_blocks > 0
    n8 = apply_fp8_base(m.unet, torch.float32)
    assert n8 >= len(flow_names.target_modules(fam.kind, m.unet))
    cast_except_fp8(m.unet, torch.bfloat16)
    dtypes = {p.dtype for p in m.unet.parameters()}
    assert dtypes == {torch.float8_e4m3fn, torch.bfloat16}
    swap = BlockSwap(m.unet, 1, "cpu")
    assert swap.blocks == [blocks[-1]]
    swap.remove()


@pytest.mark.skipif(not FLUX2.available(), reason="this diffusers / transformers has no FLUX.2 [klein]")
@pytest.mark.parametrize("ref, heads, double, single, text", [("flux2_klein_4b", 24, 5, 20, 7680),
                                                              ("flux2_klein_9b", 32, 8, 24, 12288)])
def test_flux2_klein_names_at_full_size(ref, heads, double, single, text):
    """klein 4B / 9B at their released sizes (ComfyUI 0.8.0 cannot load klein; its map's klein layout is the
    reference): every 2-D name and shape."""
    import diffusers
    from accelerate import init_empty_weights

    names = reference(ref)["layouts"]["lora_unet"]
    with init_empty_weights():
        tr = diffusers.Flux2Transformer2DModel(num_layers=double, num_single_layers=single, num_attention_heads=heads,
                                               joint_attention_dim=text, guidance_embeds=False)
    groups = flow_names.unet_groups("flux2", tr)
    two_d = {n: t for n, t in names.items() if len(t[1]) == 2}
    assert set(groups) == set(two_d)
    for name, g in groups.items():
        assert [sum(g.out_dims), tr.get_submodule(g.paths[0]).in_features] == two_d[name][1], name


@each
def test_standalone_app_trains_publishes_and_tests(data, tmp_path, fam):
    """The standalone app's path (the tab's logic over StandaloneHost): settings -> config -> the training job ->
    the published file -> an A/B grid over strengths through the family's pipeline."""
    from lora_train.hosts.standalone import StandaloneHost
    from lora_train.ui import jobs, logic

    host = StandaloneHost(fam.spec, str(tmp_path / "loras"))
    values = logic.default_settings(host)
    values.update(output_name="app", max_train_steps=3, resolution=64, lora_rank=4, lora_alpha=4, batch_size=2,
                  lr_warmup_steps=0, save_every_n_epochs=0, mixed_precision="no")
    cfg, spec = logic.build_config(host, values, data, "lrtdemo")
    job = logic.start_training(host, cfg, spec)
    assert jobs.wait(job, 300)
    snap = job.snapshot()
    assert snap["status"] == "done", snap["message"]
    assert os.path.isfile(snap["lora_path"]) and snap["result"].steps == 3
    with safe_open(snap["lora_path"], "pt") as fh:
        assert fh.metadata()["ss_base_model_version"] == fam.kind
    img, msg = logic.run_grid(host, "lrtdemo a picture", "", "app", "0,1", "3", False, 2, 1.0, 64)
    assert img is not None and img.size[0] >= 2 * 64, msg
