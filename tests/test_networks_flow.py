"""Network types on the flow families (issue 17 on Flux.1 / SD3): LoHa, LoKr, DoRA on tiny-flux and tiny-sd3.

sd-scripts + LyCORIS train these types on the ORIGINAL model's modules, where q/k/v (and Flux's proj_mlp) are one
fused Linear; the hosts (ComfyUI, Forge) apply the file's delta to that fused weight. We train on diffusers' split
modules with one adapter per fused module (networks/delta.GroupPart), so the file holds exactly that adapter.
Checks: the file's module names are sd-scripts' (the plain-LoRA set), its tensors the LyCORIS layout of the fused
shapes; ComfyUI's rules (tests/host_rules.py) on the fused base weight give our parts' deltas at strength 1 and 0.5;
importing the file reproduces the model (deltas and output); a LyCORIS file with DoRA on the input axis is read;
training lowers the fixed-noise loss for every type and family.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_trainer, small_cfg, strength_losses
from host_rules import comfy_delta
from lora_train.models.loading import load_base_model
from lora_train.networks import delta as D
from lora_train.networks import flow_names as F
from lora_train.networks import lora as L
from lora_train.networks import network as N

ADAPTER = L.DEFAULT_ADAPTER
KINDS = {"flux": "tiny-flux", "sd3": "tiny-sd3"}
TYPES = {
    "loha": dict(type="loha", rank=4, alpha=2.0),
    "lokr": dict(type="lokr", rank=2, alpha=1.0, factor=4),
    "lokr_full": dict(type="lokr", rank=8, alpha=8.0, factor=-1, full_matrix=True),
    "dora": dict(type="dora", rank=4, alpha=4.0),
}
LAYOUT = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr_full": {"lokr_w1", "lokr_w2", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}


def _randomize(unet, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, dm in D.modules(unet, ADAPTER):
            for n, p in dm.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if n == "dora_scale" else 0.3 * noise)


def randomized_network(unet, typ, seed=4, scale=0.2):
    """Inject network type `typ` (TYPES) into a transformer and give it random, training-sized weights (the real-host
    tests: small deltas relative to the weights, dora_scale near the weight norms)."""
    N.inject(unet, "unet", N.NetworkSpec(**TYPES[typ]))
    _randomize(unet, seed)
    with torch.no_grad():
        for _, dm in D.modules(unet, ADAPTER):
            for n, p in dm.named_parameters():
                if n != "dora_scale":
                    p.mul_(scale)


def _part_deltas(unet):
    """path -> the weight change our model applies now (from the model itself)."""
    out = {}
    for path, layer, _ in D.layers(unet, ADAPTER):
        out[path] = (layer.weight - D.base_weight(layer)).detach().double()
    return out


def _fused_delta(group, parts):
    rows = F.part_rows(group)
    d0 = parts[group.paths[0]]
    out = torch.zeros((sum(group.out_dims), d0.shape[1]), dtype=torch.float64)
    for p, r in zip(group.paths, rows):
        out[r] = parts[p]
    return out


def _groups_by_name(sd):
    groups = {}
    for k, v in sd.items():
        mod, _, t = k.partition(".")
        groups.setdefault(mod, {})[t] = v.float()
    return groups


def _trained(kind, typ, seed=3):
    model = load_base_model(KINDS[kind])
    spec = N.NetworkSpec(**TYPES[typ])
    N.inject(model.unet, "unet", spec)
    _randomize(model.unet, seed)
    return model, spec


@pytest.mark.parametrize("typ", list(TYPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_file_layout_host_rules_and_import(kind, typ):
    model, spec = _trained(kind, typ)
    sd = L.to_kohya_state_dict(L.extract(model), kind)
    groups = _groups_by_name(sd)
    # sd-scripts' module names (the plain-LoRA set), the type's LyCORIS tensors, fused shapes
    assert set(groups) == {F.kohya_name("unet", t, kind) for t in F.target_modules(kind, model.unet)}
    for name, w in groups.items():
        assert set(w) == LAYOUT[typ], (name, set(w))
    fgroups = F.import_groups(model)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv" if kind == "flux" else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    out_rows = sum(fgroups[qkv].out_dims)
    first = {"loha": "hada_w1_a", "dora": "lora_up.weight", "lokr": None, "lokr_full": None}[typ]
    if first:
        assert groups[qkv][first].shape[0] == out_rows == 3 * fgroups[qkv].out_dims[0]
    else:
        w1, w2 = groups[qkv]["lokr_w1"], groups[qkv].get("lokr_w2", groups[qkv].get("lokr_w2_a"))
        assert w1.shape[0] * w2.shape[0] == out_rows
    if typ == "dora":  # per input channel (A1111 / ComfyUI / Forge agree on it): the norm spans q, k and v
        assert groups[qkv]["dora_scale"].shape == (1, groups[qkv]["lora_down.weight"].shape[1])
    meta = N.metadata(spec, kind)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == ("lora" if typ == "dora" else "lokr"
                                                                              if typ.startswith("lokr") else typ)
    base = load_base_model(KINDS[kind])
    for strength in (1.0, 0.5):
        L.set_strength(model.unet, strength)
        parts = _part_deltas(model.unet)
        assert all(float(d.abs().max()) > 0 for d in parts.values())
        worst = 0.0
        for name, w in groups.items():  # ComfyUI's rules on the fused base weight: 0 unmatched, our delta
            g = fgroups[name]
            host = comfy_delta(w, F.fused_weight(g, base.unet), strength).double()
            ours = _fused_delta(g, parts)
            rel = float((host - ours).norm() / ours.norm())
            worst = max(worst, rel)
        assert worst <= 1e-4, (strength, worst)
        # our importer: the same deltas and the same output
        fresh = load_base_model(KINDS[kind])
        lw = L.from_state_dict(sd, fresh)
        assert not lw.modules and len(lw.extra) == len(groups)
        assert L.apply(fresh, lw, "imp", strength) == []
        theirs = {p: (lay.weight - D.base_weight(lay)).detach().double() for p, lay, _ in D.layers(fresh.unet, "imp")}
        assert set(theirs) == set(parts)
        assert max(float((theirs[p] - parts[p]).abs().max()) for p in parts) <= 1e-5
    L.set_strength(model.unet, 1.0)


def test_output_axis_dora_files_are_read():
    """A LyCORIS DoRA file with dora_scale per output channel (wd_on_output=True) on a fused module is read and
    applied as LyCORIS trains it (the norm of the merged weight per output row; ComfyUI's branch for this
    orientation takes the base weight's norm instead, so we compare with LyCORIS' formula)."""
    model, _ = _trained("flux", "dora")
    sd = L.to_kohya_state_dict(L.extract(model), "flux")
    g = torch.Generator().manual_seed(9)
    for k in [k for k in sd if k.endswith(".dora_scale")]:
        n_out = sd[k.replace("dora_scale", "lora_up.weight")].shape[0]
        sd[k] = torch.rand((n_out, 1), generator=g) + 0.5
    base = load_base_model("tiny-flux")
    lw = L.from_state_dict(sd, base)
    L.apply(base, lw, "imp", 1.0)
    parts = {p: (lay.weight - D.base_weight(lay)).detach().double() for p, lay, _ in D.layers(base.unet, "imp")}
    clean = load_base_model("tiny-flux")
    fgroups = F.import_groups(clean)
    for name, w in _groups_by_name(sd).items():
        W = F.fused_weight(fgroups[name], clean.unet).double()
        up, down = w["lora_up.weight"].double(), w["lora_down.weight"].double()
        merged = W + (up @ down) * (float(w["alpha"]) / down.shape[0])
        lycoris = merged * (w["dora_scale"].double() / (merged.norm(dim=1, keepdim=True) + 1.1920928955078125e-07)) - W
        ours = _fused_delta(fgroups[name], parts)
        assert float((lycoris - ours).norm() / ours.norm()) <= 1e-4, name


def test_locon_and_conv_rank_do_not_apply_to_transformers():
    from types import SimpleNamespace

    cfg = SimpleNamespace(network_type="locon", conv_rank=4, conv_alpha=2.0, lora_rank=8, alpha=8.0)
    assert N.NetworkSpec.from_config(cfg, "flux").type == "lora"
    assert N.NetworkSpec.from_config(cfg, "flux").conv_rank == 0
    assert N.NetworkSpec.from_config(cfg, "sd1").conv_rank == 4
    assert N.metadata(N.NetworkSpec.from_config(cfg, "sd3"), "sd3")["ss_network_module"] == "networks.lora_sd3"


def test_a_file_for_another_model_says_so():
    model, _ = _trained("flux", "loha")
    sd = L.to_kohya_state_dict(L.extract(model), "flux")
    for t in ("hada_w1_a", "hada_w2_a"):  # fewer output rows than this model's fused q/k/v
        key = f"lora_unet_double_blocks_0_img_attn_qkv.{t}"
        sd[key] = sd[key][:-8]
    with pytest.raises(L.LoraFormatError, match="trained for another base model"):
        L.apply(load_base_model("tiny-flux"), L.from_state_dict(sd, load_base_model("tiny-flux")), "x")
    sd[key] = sd[key][:-8]  # w1 and w2 no longer fit each other: a broken file
    with pytest.raises(L.LoraFormatError, match="lora_unet_double_blocks_0_img_attn_qkv"):
        L.from_state_dict(sd, load_base_model("tiny-flux"))


# ----------------------------------------------------------------------------- training
RUNS = {
    "flux-loha": ("tiny-flux", dict(network_type="loha", lora_rank=4, lora_alpha=2.0, learning_rate=3e-3)),
    "flux-lokr": ("tiny-flux", dict(network_type="lokr", lora_rank=4, factor=4, learning_rate=3e-3)),
    "flux-dora": ("tiny-flux", dict(network_type="dora", lora_rank=4, lora_alpha=4.0, learning_rate=3e-3)),
    "sd3-lokr": ("tiny-sd3", dict(network_type="lokr", lora_rank=4, factor=4, learning_rate=3e-3)),
    "sd3-loha": ("tiny-sd3", dict(network_type="loha", lora_rank=4, lora_alpha=2.0, learning_rate=3e-3)),
    "sd3-dora": ("tiny-sd3", dict(network_type="dora", lora_rank=4, lora_alpha=4.0, learning_rate=3e-3)),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("flowtypes") / "data"), n=4, size=64)


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_training_lowers_the_fixed_noise_loss(run, data, tmp_path):
    from lora_train.training.trainer import Trainer

    base, kw = RUNS[run]
    cfg = small_cfg(data, tmp_path, base_model=base, output_name="t", epochs=6, lr_scheduler="constant", **kw)
    tr = Trainer(cfg)
    res = tr.run()
    assert res.lora_path and not res.nan_stopped
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == ("lora" if kw["network_type"] == "dora" else kw["network_type"])
    m = tr.model
    losses = strength_losses(tr, (0.0, 1.0))
    print(run, "fixed-noise loss at strength 0 / 1:", losses)
    assert losses[1] < losses[0]
    # the saved file, imported into a fresh model, gives the trained model's output
    fresh = load_base_model(base)
    L.apply(fresh, L.load_file(res.lora_path, fresh), "imp", 1.0)
    ours = _part_deltas(m.unet)
    theirs = {p: (lay.weight - D.base_weight(lay)).detach().double() for p, lay, _ in D.layers(fresh.unet, "imp")}
    assert set(ours) == set(theirs)
    assert max(float((theirs[p] - ours[p]).abs().max()) for p in ours) <= 1e-5
    assert set(load_file(res.lora_path)) == set(L.to_kohya_state_dict(L.extract(m), m.kind))


def test_advisor_on_the_flow_families():
    from lora_train.tuning.advisor import suggest

    s = suggest(30, base="flux", network_type="locon", task="style")
    assert s.value("network_type") == "lora" and "conv_rank" not in s.settings
    s = suggest(30, base="sd3", network_type="lokr", task="style")
    assert s.value("network_type") == "lokr" and s.value("factor") == 8 and "conv_rank" not in s.settings
    flux_lora = suggest(30, base="flux", task="style").value("learning_rate")
    assert suggest(30, base="flux", network_type="dora", task="style").value("learning_rate") == flux_lora * 0.5
    assert suggest(30, base="sd1", network_type="locon", task="style").value("conv_rank") > 0


@pytest.mark.slow
def test_ab_grid_and_prompt_tags_with_a_flow_lokr(data, tmp_path):
    """The standalone A/B grid (FluxPipeline) and `<lora:name:w>` prompts with a Flux LoKr file."""
    import numpy as np

    from lora_train.models.flux import build_tiny_flux
    from lora_train.sampler import Generator, GenParams, build_grid
    from lora_train.training.trainer import Trainer

    cfg = small_cfg(data, tmp_path, base_model="tiny-flux", output_name="fxk", epochs=2, network_type="lokr",
                    lora_rank=4, factor=4, learning_rate=5e-2)
    res = Trainer(cfg).run()
    gen = Generator(build_tiny_flux(), lora_dirs=[res.output_dir])
    base = GenParams(prompt="a red circle", seed=3, steps=3, cfg_scale=1.0, width=64, height=64)
    grid = build_grid(gen, base, "fxk", strengths=[0.0, 1.0], seeds=[3])
    imgs = [np.asarray(c.image, dtype=np.float32) for c in grid.cells]
    assert len(imgs) == 2 and np.abs(imgs[0] - imgs[1]).mean() > 0.1
    tagged = np.asarray(gen.generate(GenParams(prompt="a red circle <lora:fxk:1>", seed=3, steps=3, cfg_scale=1.0,
                                               width=64, height=64)), dtype=np.float32)
    assert np.abs(tagged - imgs[1]).max() <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("typ", ["lokr", "dora"])
def test_resume_of_a_flow_delta_type_is_bitwise_identical(typ, data, tmp_path):
    """Stopped at step 2 and resumed: the same file and losses as the run that was never stopped."""
    from lora_train.models.flux import build_tiny_flux
    from lora_train.training.state import list_states

    def run(cfg, stop_at=None, resume_from=None):
        return run_trainer(cfg, build_tiny_flux, stop_at, resume_from)[1]

    kw = dict(base_model="tiny-flux", max_train_steps=5, lr_warmup_steps=1, network_type=typ, lora_rank=4, factor=4,
              learning_rate=3e-3)
    ref = run(small_cfg(data, tmp_path / "a", **kw))
    cfg = small_cfg(data, tmp_path / "b", **kw)
    assert run(cfg, stop_at=2).stopped and list_states(str(tmp_path / "b"))
    res = run(cfg, resume_from=str(tmp_path / "b"))
    a, b = load_file(ref.lora_path), load_file(res.lora_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert res.losses == ref.losses
