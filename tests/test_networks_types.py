"""Network types (issue 17): lora, locon, loha, lokr, dora and LoRA+ on the tiny models.

Per type: training lowers the fixed-noise loss; the file's keys are the kohya / LyCORIS layout; importing it
reproduces the trained model's output; the hosts' delta rules (tests/host_rules.py, written from A1111 1.10.1's
and ComfyUI's source) give the trained model's weight delta at strength 1.0 and 0.5.
"""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import small_cfg, unet_out
from host_rules import a1111_delta, comfy_delta
from lora_train.config import ConfigError, TrainConfig
from lora_train.models.tiny import build_tiny
from lora_train.networks import delta as D
from lora_train.networks import lora as L
from lora_train.networks import network as N
from lora_train.networks.lokr import LoKr, factorization
from lora_train.training.device import encode_prompts
from lora_train.training.loss import fixed_noise_loss
from lora_train.training.trainer import Trainer

ADAPTER = L.DEFAULT_ADAPTER
TYPES = {  # type -> config: every type with the ResNet convolutions on one run at least
    "locon": dict(network_type="locon", conv_rank=2, conv_alpha=1.0),
    "loha": dict(network_type="loha", lora_rank=4, lora_alpha=2.0, conv_rank=2),
    "lokr": dict(network_type="lokr", lora_rank=4, factor=2, conv_rank=2, learning_rate=4e-3),
    "lokr_full": dict(network_type="lokr", full_matrix=True, factor=8),
    "dora": dict(network_type="dora", lora_rank=4, lora_alpha=4.0, conv_rank=2, learning_rate=2e-3),
}
LAYOUT = {
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr_full": {"lokr_w1", "lokr_w2", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}
NAME_RE = re.compile(r"^(lora_unet_[a-z0-9_]+|lora_te_text_model_[a-z0-9_]+)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("d") / "data"), n=4, size=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    out = {}
    for name, kw in TYPES.items():
        kw = dict(kw)
        cfg = small_cfg(data, tmp_path_factory.mktemp(name), output_name=name, max_train_steps=12, batch_size=4,
                        learning_rate=kw.pop("learning_rate", 3e-3), **kw)
        tr = Trainer(cfg)
        out[name] = (tr, tr.run())
    return out


def _eval(tr):
    lat = torch.stack(list(tr.latents))
    with torch.no_grad():
        te = encode_prompts(tr.model, [it.caption for it in tr.dataset.items], torch.device("cpu"))
    return lat, te


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TYPES))
def test_training_lowers_the_fixed_noise_loss(runs, name):
    tr, res = runs[name]
    lat, te = _eval(tr)
    losses = []
    for s in (0.0, 1.0):
        L.set_strength(tr.model.unet, s)
        losses.append(fixed_noise_loss(tr.model, lat, te, seed=11))
    L.set_strength(tr.model.unet, 1.0)
    print(name, "fixed-noise loss at 0 / 1:", losses)
    assert losses[1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TYPES))
def test_file_layout_and_metadata(runs, name):
    tr, res = runs[name]
    sd = load_file(res.lora_path)
    groups = {}
    for k in sd:
        mod, _, t = k.partition(".")
        assert NAME_RE.match(mod), k
        groups.setdefault(mod, set()).add(t)
    attn = {n for n in groups if "_attentions_" in n}
    conv = {n for n in groups if "_resnets_" in n or "samplers_" in n}
    assert attn == {n for n in L.name_map(build_tiny()) if n.startswith("lora_unet_")}
    conv3 = {n for n in conv if re.search(r"_(conv1|conv2|conv)$", n)}
    if "conv_rank" in TYPES[name]:
        assert conv3 and any(n.endswith("_time_emb_proj") for n in conv)
    else:
        assert not conv
    for mod, ts in groups.items():  # LoKr: a full w2 where rank >= max(w2) / 2, as LyCORIS
        assert ts == LAYOUT[name] or (name == "lokr" and ts == LAYOUT["lokr_full"]), (mod, ts)
    if name == "lokr":
        assert sum(ts == LAYOUT["lokr"] for ts in groups.values()) > len(groups) / 2
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    args = json.loads(meta["ss_network_args"])
    if name == "locon":
        assert meta["ss_network_module"] == "networks.lora" and args == {"conv_dim": "2", "conv_alpha": "1"}
        for mod in conv3:
            assert sd[f"{mod}.lora_down.weight"].shape[1:] [1:] == (3, 3) and sd[f"{mod}.alpha"].item() == 1.0
            assert sd[f"{mod}.lora_up.weight"].shape[2:] == (1, 1)
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == {"loha": "loha", "lokr": "lokr", "lokr_full": "lokr", "dora": "lora"}[name]
        assert args.get("conv_dim") == ("2" if "conv_rank" in TYPES[name] else None)
    if name == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
        for mod in groups:  # per input channel: (1, in) / (1, in, 1, 1), as A1111 reads it
            ds, down = sd[f"{mod}.dora_scale"], sd[f"{mod}.lora_down.weight"]
            assert ds.shape[0] == 1 and ds.shape[1] == down.shape[1] and ds.dim() == down.dim()
    if name == "lokr_full":
        assert args["full_matrix"] == "True"
        for mod in groups:  # LyCORIS writes alpha = dim with full matrices; the hosts then use scale 1
            assert sd[f"{mod}.alpha"].item() == 4.0
    if name == "lokr":
        assert args["factor"] == "2"
        assert all(min(sd[f"{m}.lokr_w1"].shape) <= 2 for m in groups)


@pytest.mark.slow
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("name", list(TYPES))
def test_import_reproduces_the_trained_model(runs, name, strength):
    tr, res = runs[name]
    lat, te = _eval(tr)
    L.set_strength(tr.model.unet, strength)
    ref = unet_out(tr.model, lat, te)
    L.set_strength(tr.model.unet, 1.0)
    assert (ref - unet_out(build_tiny(), lat, te)).abs().max() > 1e-4  # the adapter does something
    ours = build_tiny()
    lw = L.load_file(res.lora_path, ours)
    assert L.apply(ours, lw, "x", strength) == []
    assert (unet_out(ours, lat, te) - ref).abs().max() <= 1e-5
    # and it comes out again as it went in (the file round trip of every tensor)
    again = L.to_kohya_state_dict(L.extract(ours, "x"))
    sd = load_file(res.lora_path)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    L.remove_adapter(ours.unet, "x")
    assert (unet_out(ours, lat, te) - unet_out(build_tiny(), lat, te)).abs().max() == 0


def _our_delta(layer, adapter):
    """The weight change the model applies at its current strength, read from the model itself."""
    if hasattr(layer, "lora_A") and adapter in layer.lora_A:
        return layer.get_delta_weight(adapter).detach().float()
    base = getattr(layer, "base_layer", layer)
    return (base.weight - D.base_weight(base)).detach().float()


def _host_check(model, sd, base_model, strength, rules=("a1111", "comfy"), adapter=ADAPTER):
    named = {c: dict(m.named_modules()) for c, m in L._components(model)}
    base_named = {c: dict(m.named_modules()) for c, m in L._components(base_model)}
    rev = {**L.name_map(base_model), **L.conv_name_map(base_model)}
    groups = {}
    for k, v in sd.items():
        mod, _, t = k.partition(".")
        groups.setdefault(mod, {})[t] = v.float()
    worst = 0.0
    for mod, w in groups.items():
        comp, path = rev[mod]  # 0 unmatched
        ours = _our_delta(named[comp][path], adapter)
        W = base_named[comp][path].weight.detach().float()
        for rule in rules:
            host = a1111_delta(w, W, strength) if rule == "a1111" else comfy_delta(w, W, strength)
            rel = float((host - ours).norm() / ours.norm().clamp_min(1e-12))
            worst = max(worst, rel)
            assert rel <= 1e-4, (rule, mod, rel)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("name", list(TYPES))
def test_host_rules_apply_the_trained_delta(runs, name, strength):
    tr, res = runs[name]
    sd = load_file(res.lora_path)
    L.set_strength(tr.model.unet, strength)
    try:
        worst = _host_check(tr.model, sd, build_tiny(), strength)
    finally:
        L.set_strength(tr.model.unet, 1.0)
    print(name, strength, "worst relative error", worst)


# ----------------------------------------------------------------------------- LoRA+
@pytest.mark.slow
def test_loraplus_groups_and_ratio_one_is_plain_lora(tmp_path, data):
    cfg = small_cfg(data, tmp_path / "p", max_train_steps=3, loraplus_lr_ratio=16, learning_rate=1e-3,
                    train_text_encoder=True, text_encoder_lr=5e-4)
    tr = Trainer(cfg)
    tr.run()
    groups = tr.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 16e-3, 5e-4, 16 * 5e-4]
    ups = {id(m.lora_B[ADAPTER].weight) for _, m in L.lora_layers(tr.model.unet)}
    assert {id(p) for p in groups[1]["params"]} == ups
    assert not ({id(p) for p in groups[0]["params"]} & ups)
    assert [g["initial_lr"] for g in tr.optimizer.param_groups] == [1e-3, 16e-3, 5e-4, 16 * 5e-4]
    files = []
    for i, ratio in enumerate((None, 1.0)):
        files.append(Trainer(small_cfg(data, tmp_path / f"r{i}", max_train_steps=4, loraplus_lr_ratio=ratio)).run()
                     .lora_path)
    a, b = load_file(files[0]), load_file(files[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(files[1], "pt") as fh:
        assert json.loads(fh.metadata()["ss_network_args"]) == {}


def test_loraplus_on_delta_types(data, tmp_path):
    for typ, plus in (("loha", {"hada_w1_a", "hada_w2_a"}), ("lokr", {"lokr_w2_a", "lokr_w2"}), ("dora", {"lora_up"})):
        m = build_tiny()
        spec = N.NetworkSpec(type=typ, rank=4, alpha=4.0, loraplus_lr_ratio=8)
        g = N.build(m.unet, "unet", spec, 1e-4)
        assert [x["lr"] for x in g] == [1e-4, 8e-4]
        names = {id(p): n.rsplit(".", 1)[-1] for n, p in m.unet.named_parameters()}
        assert {names[id(p)] for p in g[1]["params"]} == plus


# ----------------------------------------------------------------------------- config and options
def test_config_keys_and_errors():
    c = TrainConfig.from_dict({"network_type": "lokr", "factor": 8, "full_matrix": True, "rank_dropout": 0.1,
                               "module_dropout": 0.05, "conv_rank": 4, "conv_alpha": 2, "loraplus_lr_ratio": 16})
    spec = N.NetworkSpec.from_config(c)
    assert (spec.type, spec.factor, spec.full_matrix, spec.conv_rank, spec.conv_alpha) == ("lokr", 8, True, 4, 2.0)
    assert N.NetworkSpec.from_config(TrainConfig(network_type="locon", lora_rank=6)).conv_rank == 6
    for bad, key in (({"network_type": "lycoris"}, "network_type"), ({"rank_dropout": 0.1}, "rank_dropout"),
                     ({"network_type": "loha", "dropout": 0.1}, "dropout"), ({"full_matrix": True}, "full_matrix"),
                     ({"factor": 0}, "factor"), ({"loraplus_lr_ratio": -1}, "loraplus_lr_ratio"),
                     ({"conv_rank": -1}, "conv_rank")):
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict(bad)
        assert e.value.key == key


def test_lokr_factorization_as_lycoris():
    # values of LyCORIS' factorization as A1111 1.10.1 ships it (extensions-builtin/Lora/lyco_helpers.py)
    table = {-1: {127: (1, 127), 128: (8, 16), 250: (10, 25), 320: (16, 20), 360: (18, 20), 1280: (32, 40)},
             4: {127: (1, 127), 250: (2, 125), 320: (4, 80), 1024: (4, 256)},
             8: {128: (8, 16), 250: (5, 50), 360: (8, 45), 1280: (8, 160)},
             16: {128: (8, 16), 360: (15, 24), 640: (16, 40)}}
    for f, rows in table.items():
        for dim, mn in rows.items():
            assert factorization(dim, f) == mn, (dim, f)
    w = torch.zeros(320, 320)
    assert hasattr(LoKr.create(w, 4, 4.0, factor=8), "lokr_w2_a")
    assert hasattr(LoKr.create(w, 32, 4.0, factor=8), "lokr_w2")  # rank >= max(w2)/2: full w2, as LyCORIS


def test_dropouts_train_only():
    m = build_tiny()
    N.inject(m.unet, "unet", N.NetworkSpec(type="loha", rank=4, alpha=4.0, module_dropout=0.999), ADAPTER)
    for _, dm in D.modules(m.unet, ADAPTER):
        with torch.no_grad():
            dm.hada_w2_a.fill_(0.1)
    path, layer, box = next(D.layers(m.unet, ADAPTER))
    m.unet.eval()
    assert not torch.equal(layer.weight, D.base_weight(layer))
    m.unet.train()
    torch.manual_seed(0)
    assert torch.equal(layer.weight, D.base_weight(layer))  # dropped (p = 0.999) while training


# ----------------------------------------------------------------------------- files made by kohya + LyCORIS
def _lycoris_file(tmp_path, model):
    """Modules in the exact layout LyCORIS' kohya network writes (custom_state_dict), random trained-like values:
    LoHa on a linear and a 3x3 conv (flattened w1_b), LoKr (full w1, low-rank w2; and both full with alpha = dim),
    DoRA with LyCORIS' default wd_on_output (dora_scale (out, 1)) and with the input axis, LoCon conv."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    unet = dict(model.unet.named_modules())
    sd = {}
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    v = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    o = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    c1 = "down_blocks.0.resnets.0.conv1"
    c2 = "up_blocks.0.resnets.0.conv2"
    name = lambda p: L.kohya_name("unet", p)  # noqa: E731
    out_q, in_q = unet[q].weight.shape
    sd.update({f"{name(q)}.hada_w1_a": r(out_q, 2), f"{name(q)}.hada_w1_b": r(2, in_q),
               f"{name(q)}.hada_w2_a": r(out_q, 2), f"{name(q)}.hada_w2_b": r(2, in_q), f"{name(q)}.alpha": torch.tensor(1.0)})
    co, ci, kh, kw = unet[c1].weight.shape
    sd.update({f"{name(c1)}.hada_w1_a": r(co, 2), f"{name(c1)}.hada_w1_b": r(2, ci * kh * kw),
               f"{name(c1)}.hada_w2_a": r(co, 2), f"{name(c1)}.hada_w2_b": r(2, ci * kh * kw),
               f"{name(c1)}.alpha": torch.tensor(2.0)})
    ok, ik = unet[k].weight.shape
    (ol, oh), (il, ih) = factorization(ok, 4), factorization(ik, 4)
    sd.update({f"{name(k)}.lokr_w1": r(ol, il), f"{name(k)}.lokr_w2_a": r(oh, 2), f"{name(k)}.lokr_w2_b": r(2, ih),
               f"{name(k)}.alpha": torch.tensor(1.0)})
    ov, iv = unet[v].weight.shape
    (ol, oh), (il, ih) = factorization(ov, -1), factorization(iv, -1)
    sd.update({f"{name(v)}.lokr_w1": r(ol, il), f"{name(v)}.lokr_w2": r(oh, ih), f"{name(v)}.alpha": torch.tensor(4.0)})
    oo, io = unet[o].weight.shape
    W = unet[o].weight.detach().float()
    sd.update({f"{name(o)}.lora_down.weight": r(2, io), f"{name(o)}.lora_up.weight": r(oo, 2),
               f"{name(o)}.alpha": torch.tensor(2.0),
               f"{name(o)}.dora_scale": W.norm(dim=1, keepdim=True) * 1.05})
    co, ci, kh, kw = unet[c2].weight.shape
    sd.update({f"{name(c2)}.lora_down.weight": r(2, ci, kh, kw), f"{name(c2)}.lora_up.weight": r(co, 2, 1, 1),
               f"{name(c2)}.alpha": torch.tensor(1.0)})
    path = str(tmp_path / "lycoris.safetensors")
    save_file(sd, path, metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"})})
    return path, sd, o


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_imports_lycoris_files(tmp_path, strength):
    model = build_tiny()
    path, sd, dora_out = _lycoris_file(tmp_path, model)
    lw = L.load_file(path, model)
    assert "_unmatched" not in lw.metadata and len(lw.extra) == 5 and len(lw.modules) == 1
    assert L.apply(model, lw, "x", strength) == []
    host_sd = {k: v for k, v in sd.items() if not k.startswith(L.kohya_name("unet", dora_out))}
    _host_check(model, host_sd, build_tiny(), strength, adapter="x")
    # DoRA on the output axis (LyCORIS' default): LyCORIS' apply_weight_decompose (merged norm per output row);
    # A1111 cannot apply this orientation and ComfyUI takes the base weight's norm, so LyCORIS' maths is the rule
    layer = dict(model.unet.named_modules())[dora_out]
    n = L.kohya_name("unet", dora_out)
    W = D.base_weight(layer).float()
    merged = W + sd[f"{n}.lora_up.weight"] @ sd[f"{n}.lora_down.weight"] * (2.0 / 2)
    scale = sd[f"{n}.dora_scale"] / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    # strength w as the hosts apply it: w * (W' - W) (LyCORIS' own multiplier leaves the LoRA part unscaled)
    lyco = strength * (merged * scale - W)
    ours = (layer.weight - W).float()
    assert float((ours - lyco).norm() / lyco.norm()) <= 1e-4


def test_unsupported_layouts_say_so(tmp_path):
    model = build_tiny()
    n = L.kohya_name("unet", "down_blocks.0.resnets.0.conv1")
    sd = {f"{n}.hada_w1_a": torch.zeros(4, 2), f"{n}.hada_w1_b": torch.zeros(2, 4), f"{n}.hada_w2_a": torch.zeros(4, 2),
          f"{n}.hada_w2_b": torch.zeros(2, 4), f"{n}.hada_t1": torch.zeros(2, 2, 3, 3),
          f"{n}.hada_t2": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(L.LoraFormatError, match="Tucker"):
        L.from_state_dict(sd, model)
    sd = {f"{n}.lokr_w1": torch.zeros(3, 3), f"{n}.lokr_w2": torch.zeros(5, 5), f"{n}.alpha": torch.tensor(1.0)}
    lw = L.from_state_dict(sd, model)
    with pytest.raises(L.LoraFormatError, match="another base model"):
        L.apply(model, lw, "x")


# ----------------------------------------------------------------------------- SDXL
@pytest.mark.slow
def test_sdxl_loha_with_conv_round_trip_and_host_rules(tmp_path):
    from lora_train.data.demo import write_demo_dataset
    from lora_train.models.loading import load_base_model

    data = write_demo_dataset(str(tmp_path / "data"), n=2, size=64)
    cfg = small_cfg(data, tmp_path / "x", base_model="tiny-sdxl", network_type="loha", conv_rank=2,
                    max_train_steps=3, learning_rate=5e-3)
    tr = Trainer(cfg)
    res = tr.run()
    sd = load_file(res.lora_path)
    mods = {k.split(".")[0] for k in sd}
    assert any(m.startswith("lora_unet_input_blocks_") and m.endswith("_in_layers_2") for m in mods)
    assert any(m.startswith("lora_unet_output_blocks_") and "_transformer_blocks_" in m for m in mods)
    base = load_base_model("tiny-sdxl")
    lw = L.load_file(res.lora_path, base)
    assert "_unmatched" not in lw.metadata and len(lw.extra) == len(mods)
    for s in (1.0, 0.5):
        L.set_strength(tr.model.unet, s)
        _host_check(tr.model, sd, load_base_model("tiny-sdxl"), s)
    L.set_strength(tr.model.unet, 1.0)


# ----------------------------------------------------------------------------- the A/B grid and generation
@pytest.mark.slow
def test_grid_and_prompt_tags_with_every_type(runs, tmp_path):
    """build_grid / `<lora:name:w>` (what the tab's Test section and the ComfyUI sweep call) with LyCORIS types:
    the base column is the plain model, each strength equals the file applied at that strength, and two types
    combine in one prompt."""
    import shutil

    import numpy as np

    from lora_train.sampler import GenParams, Generator, build_grid, run_pipeline

    d = tmp_path / "loras"
    d.mkdir()
    for name in ("loha", "dora", "lokr"):
        shutil.copy(runs[name][1].lora_path, d / f"{name}.safetensors")
    gen = Generator(build_tiny(), lora_dirs=[str(d)])
    kw = dict(steps=2, cfg_scale=3.0, width=64, height=64, seed=3)
    res = build_grid(gen, GenParams(prompt="lrtdemo, a red circle <lora:loha:1>", **kw), "loha", [0.5, 1.0], seeds=[3])
    plain = Generator(build_tiny())(GenParams(prompt="lrtdemo, a red circle", **kw))
    cells = {c.col: np.asarray(c.image) for c in res.cells}
    assert np.array_equal(cells[0], np.asarray(plain))
    for col, s in ((1, 0.5), (2, 1.0)):
        ref_model = build_tiny()
        L.apply(ref_model, L.load_file(str(d / "loha.safetensors"), ref_model), "r", s)
        from lora_train.sampler import make_pipeline
        ref = run_pipeline(make_pipeline(ref_model), GenParams(prompt="lrtdemo, a red circle", **kw))
        assert np.abs(cells[col].astype(int) - np.asarray(ref).astype(int)).max() <= 1, s
    both = gen(GenParams(prompt="lrtdemo, a red circle <lora:dora:0.7> <lora:lokr:0.6>", **kw))
    only = gen(GenParams(prompt="lrtdemo, a red circle <lora:dora:0.7>", **kw))
    assert not np.array_equal(np.asarray(both), np.asarray(only))
    assert np.array_equal(np.asarray(gen(GenParams(prompt="lrtdemo, a red circle", **kw))), np.asarray(plain))


def test_tab_fields_make_the_config():
    from lora_train.ui import logic

    at = logic.SETTING_KEYS.index(logic.NETWORK_KEYS[0])  # every network field is a tab setting, in one run
    assert logic.SETTING_KEYS[at:at + len(logic.NETWORK_KEYS)] == logic.NETWORK_KEYS
    cfg = TrainConfig(network_type="lokr", factor=8, full_matrix=True, conv_rank=4, conv_alpha=2.0,
                      loraplus_lr_ratio=16.0, rank_dropout=0.1)
    vals = logic.network_settings(cfg)
    assert TrainConfig(**logic.network_config(vals)).validate().to_dict() == cfg.validate().to_dict()
    assert logic.network_config({}) == logic.network_config(logic.network_settings(TrainConfig()))
    assert logic.network_config({"conv_alpha": 0, "loraplus_lr_ratio": 0})["loraplus_lr_ratio"] is None
    with pytest.raises(logic.UserError, match="rank dropout"):
        logic.network_config({"rank_dropout": "x"})


# ----------------------------------------------------------------------------- the advisor
def test_advisor_knows_the_types():
    from lora_train.tuning.advisor import check_config, suggest

    plain = suggest(20, task="style", base="sd1", vram_gb=12)
    assert plain.network_type == "lora" and "locon" in plain.reason("network_type")
    assert "conv_rank" not in plain.settings
    lokr = suggest(20, task="style", base="sd1", vram_gb=12, network_type="lokr")
    assert lokr.factor == 8 and 4e-4 <= lokr.learning_rate <= 1e-3 and "LyCORIS" in lokr.reason("learning_rate")
    assert lokr.conv_rank > 0 and "texture" in lokr.reason("conv_rank")
    dora = suggest(20, task="character", base="sd1", vram_gb=12, network_type="dora")
    assert dora.learning_rate == pytest.approx(suggest(20, task="character", vram_gb=12).learning_rate / 2)
    assert "conv_rank" not in dora.settings and "magnitude" in dora.reason("learning_rate")
    loha = suggest(20, task="face", base="sd1", vram_gb=12, detail="demanding", network_type="loha")
    assert loha.lora_rank <= 16 and "dim^2" in loha.reason("lora_rank")
    locon = suggest(20, task="style", vram_gb=12, network_type="locon")
    assert locon.conv_rank == 8 and locon.conv_alpha == 4.0
    for s in (lokr, dora, loha, locon):
        TrainConfig.from_dict(s.to_config_dict())  # every suggested value is a valid config
    warn = lambda **kw: " ".join(check_config(TrainConfig(base_model="tiny", **kw)))  # noqa: E731
    assert "dim^2" in warn(network_type="loha", lora_rank=64)
    assert "barely learn" in warn(network_type="lokr", learning_rate=5e-5)
    assert "half the LoRA lr" in warn(network_type="dora", learning_rate=1e-3)
    assert "LoRA+ uses 16" in warn(loraplus_lr_ratio=64)
    assert warn(network_type="lokr", learning_rate=5e-4) == ""


@pytest.mark.slow
def test_resume_of_a_delta_type_is_bitwise_identical(data, tmp_path):
    """Stop and resume a DoRA run with rank / module dropout (its RNG included): the same file as straight through."""
    kw = dict(network_type="dora", conv_rank=2, rank_dropout=0.2, module_dropout=0.1, max_train_steps=4,
              loraplus_lr_ratio=4.0)
    straight = Trainer(small_cfg(data, tmp_path / "a", **kw)).run()
    cfg = small_cfg(data, tmp_path / "b", **kw)
    box = {}

    def stop(ev):
        if ev["kind"] == "step" and ev["step"] == 2:
            box["t"].stop()
    box["t"] = Trainer(cfg, callback=stop)
    assert box["t"].run().steps == 2
    res = Trainer(cfg, resume_from=str(tmp_path / "b")).run()
    a, b = load_file(straight.lora_path), load_file(res.lora_path)
    assert res.steps == 4 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sd2_lokr_with_the_text_encoder_round_trip(data, tmp_path):
    from lora_train.models.loading import load_base_model

    cfg = small_cfg(data, tmp_path / "x", base_model="tiny-sd2", network_type="lokr", factor=4, conv_rank=2,
                    train_text_encoder=True, text_encoder_lr=2e-3, max_train_steps=3, learning_rate=4e-3)
    tr = Trainer(cfg)
    res = tr.run()
    sd = load_file(res.lora_path)
    mods = {k.split(".")[0] for k in sd}
    assert any(m.startswith("lora_te_text_model_encoder_layers_") for m in mods)
    assert {k.split(".", 1)[1] for k in sd} <= LAYOUT["lokr"] | LAYOUT["lokr_full"]
    caps = [it.caption for it in tr.dataset.items]
    lat = torch.stack(list(tr.latents))
    with torch.no_grad():
        ref = unet_out(tr.model, lat, encode_prompts(tr.model, caps, torch.device("cpu")))
        ours = load_base_model("tiny-sd2")
        assert L.apply(ours, L.load_file(res.lora_path, ours), "x", 1.0) == []
        got = unet_out(ours, lat, encode_prompts(ours, caps, torch.device("cpu")))
    assert (got - ref).abs().max() <= 1e-5
    with safe_open(res.lora_path, "pt") as fh:
        assert fh.metadata()["ss_v2"] == "True"


def test_tab_suggest_passes_the_network_type(tmp_path, demo_data):
    """The tab's Suggest advises for the network type chosen in the tab (LoKr: its own lr range and factor)."""
    from lora_train.hosts.standalone import StandaloneHost
    from lora_train.ui import logic

    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    plain, md_plain = logic.suggest_settings(host, demo_data, "style", "auto", "tiny", "", 1, 64)
    lokr, md_lokr = logic.suggest_settings(host, demo_data, "style", "auto", "tiny", "", 1, 64, "", "lokr")
    assert "lokr" in md_lokr and "Kronecker" in md_lokr and "Kronecker" not in md_plain
    assert lokr["learning_rate"] >= 4e-4 > plain["learning_rate"]
