"""Flux.1 / SD3 / SD3.5 LoRA names (lora_train/networks/flow_names.py): the names and shapes sd-scripts writes
(tests/data/flux_sd3_lora_names.json) on full-size models built on the meta device, fused export / import round
trips on small random transformers, sd-scripts' own fused layouts, diffusers' loaders and ComfyUI's key map."""
import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from comfy_lora_keys import comfy_key_map, comfy_unet_weights
from conftest import REFERENCE_FLUX_SD3
from lora_train.networks import flow_names as F
from lora_train.networks import lora as L

# full-size configs (the released models' config.json values)
TRANSFORMERS = {
    "flux_dev": ("flux", "flux-dev", dict(guidance_embeds=True)),  # diffusers' defaults are Flux.1's sizes
    "flux_schnell": ("flux", "flux-schnell", dict(guidance_embeds=False)),
    "sd3_medium": ("sd3", "sd3-medium", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                             attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                             caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                             pos_embed_max_size=192)),
    "sd35_medium": ("sd3", "sd35-medium", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                               caption_projection_dim=1536, pooled_projection_dim=2048,
                                               out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                                               dual_attention_layers=tuple(range(13)))),
    "sd35_large": ("sd3", "sd35-large", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                             attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                             caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                             pos_embed_max_size=192, qk_norm="rms_norm")),
}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
             vocab_size=32128, is_encoder_decoder=False)

_CACHE = {}


def reference():
    if "ref" not in _CACHE:
        with open(REFERENCE_FLUX_SD3, encoding="utf-8") as fh:
            _CACHE["ref"] = json.load(fh)
    return _CACHE["ref"]


def meta_model(key):
    """A full-size BaseModel-like bundle on the meta device (kind, unet, text encoders, extra['variant'])."""
    if key not in _CACHE:
        kind, variant, cfg = TRANSFORMERS[key]
        with torch.device("meta"):
            unet = (FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel)(**cfg)
            te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            t5 = T5EncoderModel(T5Config(**T5XXL))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)) if kind == "sd3" else None
        _CACHE[key] = SimpleNamespace(kind=kind, unet=unet, text_encoder=te1, text_encoder_2=t5 if kind == "flux" else te2,
                                      text_encoder_3=t5 if kind == "sd3" else None, extra={"variant": variant})
    return _CACHE[key]


def full_lora(model, rank=4, alpha=1.0, device="meta", seed=0):
    """A LoRA on every default target (transformer, CLIPs and T5) with the right shapes, trained split."""
    g = torch.Generator().manual_seed(seed)
    lw = L.LoraWeights()
    for comp, mod in L._components(model):
        targets = (L.unet_target_modules(mod) if comp == "unet" else F.t5_target_modules(mod) if comp == "te3"
                   else L.te_target_modules(mod))
        named = dict(mod.named_modules())
        for p in targets:
            lin = named[p]
            if device == "meta":
                d, u = torch.empty(rank, lin.in_features, device="meta"), torch.empty(lin.out_features, rank, device="meta")
            else:
                d = torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5
                u = torch.randn(lin.out_features, rank, generator=g)
            lw.modules[(comp, p)] = (d, u, alpha)
    return lw


def names_by_component(sd):
    out = {}
    for k in sd:
        name = k.split(".")[0]
        comp = re.match(r"lora_(unet|te\d)_", name).group(1)
        out.setdefault(comp, set()).add(name)
    return out


# ----------------------------------------------------------------------------- names and shapes vs sd-scripts
@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k.startswith("s") else k
                                 for k in TRANSFORMERS])  # the SD3 sizes are the slow ones
def test_export_names_and_shapes_are_sd_scripts(key):
    ref, model = reference()[key], meta_model(key)
    kind, variant, _ = TRANSFORMERS[key]
    sd = L.to_kohya_state_dict(full_lora(model), kind)
    got = names_by_component(sd)
    for comp in ("unet", "te1", "te2", "te3"):
        assert sorted(got.get(comp, ())) == sorted(ref.get(comp, [])), comp
    assert len(ref["unet"]) == {"flux_dev": 304, "flux_schnell": 304, "sd3_medium": 237, "sd35_medium": 263,
                                "sd35_large": 377}[key]
    # default training targets: the transformer set, fused, is sd-scripts' set
    assert {F.locate(kind, p)[0] for p in L.unet_target_modules(model.unet)} == set(ref["unet"])
    # every file name maps back to this model (importer side)
    assert set(L.name_map(model)) == set().union(*(ref.get(c, []) for c in ("unet", "te1", "te2", "te3")))
    # shapes: non-fused as sd-scripts saves them; fused (trained split) = sd-scripts' split_qkv saved_shapes
    notes = ref_notes = reference()["source"]["notes"][key]
    split_saved = (notes.get("split_qkv_true_with_pr2396_fix") or notes["split_qkv_true"])["saved_shapes"]
    fused_names = {n for n in ref["unet"] if n.endswith(("attn_qkv", "attn2_qkv", "linear1"))}
    def saved(name):
        return [list(sd[f"{name}.lora_down.weight"].shape), list(sd[f"{name}.lora_up.weight"].shape)]

    for name, shapes in ref["shapes"].items():
        if name in fused_names:  # trained split: rank x parts, block-diagonal up
            k = 4 if name.endswith("linear1") else 3
            (r, i), (o, _) = shapes
            shapes = [[r * k, i], [o, r * k]]
        assert saved(name) == shapes, name
    for name, shapes in split_saved.items():
        assert saved(name) == shapes, name
    assert ref_notes["rank"] == 4
    # alpha: block-diagonal fused modules carry alpha * number of parts (same scale alpha / rank as trained)
    for name in fused_names:
        k = 4 if name.endswith("linear1") else 3
        assert sd[f"{name}.alpha"].item() == pytest.approx(1.0 * k)
        assert sd[f"{name}.lora_down.weight"].shape[0] == 4 * k
    assert sd[f"{ref['unet'][0]}.alpha"].item() == 1.0


@pytest.mark.parametrize("key", ["flux_dev", "sd35_medium", "sd35_large"])
def test_parts_sharing_one_down_are_written_as_sd_scripts_default(key):
    """A LoRA read from sd-scripts' default layout (one down per fused module) is written back in that layout:
    shapes = the reference's default shapes (down [4, in], up [sum of out dims, 4])."""
    ref, model = reference()[key], meta_model(key)
    lw = full_lora(model)
    by_name = {}
    for (comp, p), v in list(lw.modules.items()):
        if comp == "unet":
            by_name.setdefault(F.locate(model.kind, p)[0], []).append((comp, p))
    for name, entries in by_name.items():
        d0 = lw.modules[entries[0]][0]
        for e in entries:
            lw.modules[e] = (d0, lw.modules[e][1], 1.0)
    sd = L.to_kohya_state_dict(lw, model.kind)
    for name, shapes in ref["shapes"].items():
        assert [list(sd[f"{name}.lora_down.weight"].shape), list(sd[f"{name}.lora_up.weight"].shape)] == shapes, name
        assert sd[f"{name}.alpha"].item() == 1.0


@pytest.mark.parametrize("key", list(TRANSFORMERS))
def test_sd_scripts_extra_modules_are_read(key):
    """Files trained with sd-scripts' in_dims (Flux) / emb_dims (SD3) also adapt embedders: we read those names."""
    notes = reference()["source"]["notes"][key]
    extra = notes.get("in_dims_extra_unet_names") or notes["emb_dims_extra_unet_names"]
    groups = F.import_groups(meta_model(key))
    assert set(extra) <= set(groups), set(extra) - set(groups)
    present = dict(meta_model(key).unet.named_modules())
    assert all(p in present for n in extra for p in groups[n].paths)
    assert not any(groups[n].default for n in extra)


def test_kohya_name_examples_and_errors():
    assert L.kohya_name("unet", "transformer_blocks.3.attn.add_k_proj", "flux") == "lora_unet_double_blocks_3_txt_attn_qkv"
    assert L.kohya_name("unet", "single_transformer_blocks.7.proj_mlp", "flux") == "lora_unet_single_blocks_7_linear1"
    assert F.locate("flux", "single_transformer_blocks.7.proj_mlp") == ("lora_unet_single_blocks_7_linear1", 3, 4)
    assert L.kohya_name("unet", "transformer_blocks.2.attn2.to_v", "sd3") == "lora_unet_joint_blocks_2_x_block_attn2_qkv"
    assert L.kohya_name("unet", "transformer_blocks.0.norm1_context.linear", "sd3") == \
        "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"
    assert L.kohya_name("te3", "encoder.block.0.layer.1.DenseReluDense.wi_0", "flux") == \
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"
    assert L.kohya_name("te1", "encoder.layers.0.mlp.fc1", "flux") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    with pytest.raises(ValueError, match="not a module of the flux LoRA layout"):
        L.kohya_name("unet", "transformer_blocks.0.attn.norm_q", "flux")


def test_metadata_for_is_what_sd_scripts_writes():
    m = F.metadata_for("flux", "flux-dev", {"timestep_sampling": "shift", "discrete_flow_shift": 3.1582,
                                            "guidance_scale": 1.0, "not_a_key": 1})
    assert m["ss_base_model_version"] == "flux1" and m["modelspec.architecture"] == "flux-1-dev/lora"
    assert m["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert m["ss_timestep_sampling"] == "shift" and m["ss_discrete_flow_shift"] == "3.1582"
    assert m["ss_guidance_scale"] == "1" and "ss_not_a_key" not in m
    assert m["ss_network_module"] == "networks.lora_flux"
    assert F.metadata_for("sd3", "sd35-large")["ss_network_module"] == "networks.lora_sd3"
    assert F.metadata_for("flux", "flux-schnell")["modelspec.architecture"] == "flux-1-schnell/lora"
    assert F.metadata_for("flux", None)["modelspec.architecture"] == "flux-1/lora"
    expect = {"sd3-medium": ("medium", "stable-diffusion-3-medium/lora"),
              "sd35-medium": ("5-medium", "stable-diffusion-3-5-medium/lora"),
              "sd35-large": ("5-large", "stable-diffusion-3-5-large/lora")}
    for v, (ver, arch) in expect.items():
        m = F.metadata_for("sd3", v, {"weighting_scheme": "logit_normal", "guidance_scale": 3.0})
        assert (m["ss_base_model_version"], m["modelspec.architecture"]) == (ver, arch)
        assert m["modelspec.implementation"] == "diffusers" and m["ss_weighting_scheme"] == "logit_normal"
        assert "ss_guidance_scale" not in m  # sd-scripts records no guidance for SD3
    assert F.metadata_for("sd3", None)["modelspec.architecture"] == "stable-diffusion-3/lora"
    with pytest.raises(ValueError, match="sd35-large"):
        F.metadata_for("sd3", "flux-dev")
    with pytest.raises(ValueError, match="flux-schnell"):
        F.metadata_for("flux", "sd35-large")


# ----------------------------------------------------------------------------- small random models
def tiny_flux(single=2, seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=single,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def tiny_sd3(seed=0):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
                                 dual_attention_layers=(0,)).eval()


def bundle(kind, unet):
    return SimpleNamespace(kind=kind, unet=unet, text_encoder=None, text_encoder_2=None, text_encoder_3=None,
                           extra={"variant": "flux-dev" if kind == "flux" else "sd35-medium"})


def trained_split_lora(model, rank=4, seed=1, mixed=True):
    """peft LoRA on the split diffusers modules with random (trained-like) weights; one part of a fused group with
    another rank and alpha when `mixed`."""
    unet = model.unet
    targets = L.unet_target_modules(unet)
    pattern = {"transformer_blocks.0.attn.to_k": 2} if mixed else {}
    L.inject(unet, targets, rank, float(rank) / 2, rank_pattern=pattern)
    g = torch.Generator().manual_seed(seed)
    for path, m in L.lora_layers(unet):
        with torch.no_grad():
            m.lora_A[L.DEFAULT_ADAPTER].weight.copy_(torch.randn(m.lora_A[L.DEFAULT_ADAPTER].weight.shape, generator=g))
            m.lora_B[L.DEFAULT_ADAPTER].weight.copy_(torch.randn(m.lora_B[L.DEFAULT_ADAPTER].weight.shape, generator=g))
        if mixed and path == "transformer_blocks.0.attn.to_k":
            m.lora_alpha[L.DEFAULT_ADAPTER] = 3.0
    lw = L.extract(model)
    L.remove_adapter(unet)
    return lw


def deltas(lw):
    return {k: (float(a) / d.shape[0]) * (u.double() @ d.double()) for k, (d, u, a) in lw.modules.items()}


def max_delta_diff(a, b):
    assert set(a.modules) == set(b.modules), set(a.modules) ^ set(b.modules)
    da, db = deltas(a), deltas(b)
    return max(float((da[k] - db[k]).abs().max()) for k in da)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_split_to_fused_export_and_back_is_exact(kind, tmp_path):
    model = bundle(kind, tiny_flux() if kind == "flux" else tiny_sd3())
    lw = trained_split_lora(model)
    path = L.save_kohya(lw, str(tmp_path / "x.safetensors"), kind)
    sd = L.to_kohya_state_dict(lw, kind)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv" if kind == "flux" else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert sd[f"{qkv}.lora_down.weight"].shape == (4 + 2 + 4, 16)  # the to_k part has rank 2
    assert sd[f"{qkv}.lora_up.weight"].shape == (48, 10)
    back = L.load_file(path, model)
    assert max_delta_diff(lw, back) <= 1e-6
    # parts of equal rank come back as they were trained (the block-diagonal layout is recognised)
    same = [k for k in lw.modules if k[1] != "transformer_blocks.0.attn.to_k"
            and k[1] not in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v")]
    for k in same:
        d, u, a = lw.modules[k]
        d2, u2, a2 = back.modules[k]
        assert torch.equal(d, d2) and torch.equal(u, u2) and a == a2, k
    # the file as every host applies it (scale = alpha / rank of the fused pair) is the trained delta
    for name, parts in ((qkv, ("attn.to_q", "attn.to_k", "attn.to_v")),):
        d, u, a = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"])
        host = (a / d.shape[0]) * (u.double() @ d.double())
        ours = torch.cat([deltas(lw)[("unet", f"transformer_blocks.0.{p}")] for p in parts])
        assert float((host - ours).abs().max()) <= 1e-6
    if kind == "sd3":  # the pre-only context block's adaLN: MMDiT's (shift, scale) order in the file
        name = "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1"
        d, u = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        d0, u0, _ = lw.modules[("unet", "transformer_blocks.2.norm1_context.linear")]
        assert torch.equal(d, d0) and torch.equal(u[:16], u0[16:]) and torch.equal(u[16:], u0[:16])
    # applying the imported LoRA gives the model the trained weights' output
    ref, got = copy.deepcopy(model.unet), copy.deepcopy(model.unet)
    L.apply(bundle(kind, got), back, "imported")
    L.apply(bundle(kind, ref), lw, "trained")
    x = forward_inputs(kind)
    assert float((ref(**x).sample - got(**x).sample).abs().max()) <= 1e-5


def forward_inputs(kind, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "flux":
        return dict(hidden_states=torch.randn(1, 16, 8, generator=g), encoder_hidden_states=torch.randn(1, 4, 16, generator=g),
                    pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                    img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(4, 3), guidance=torch.tensor([1.0]),
                    return_dict=True)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 4, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]), return_dict=True)


def sd_scripts_file(model, layout, rank=4, alpha=2.0, seed=5):
    """A kohya file as sd-scripts writes it for this model: `default` = one LoRA on each fused Linear (down r x in,
    up sum(out) x r); `split_qkv` = its split_qkv save (down = cat of 3/4 downs, up block-diagonal, alpha kept)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, grp in F.import_groups(model).items():
        if not grp.default:
            continue
        in_dim = dict(model.unet.named_modules())[grp.paths[0]].in_features
        k = len(grp.paths)
        if layout == "split_qkv" and k > 1:
            downs = [torch.randn(rank, in_dim, generator=g) for _ in range(k)]
            up = torch.zeros(sum(grp.out_dims), rank * k)
            row = 0
            for j, od in enumerate(grp.out_dims):
                up[row:row + od, j * rank:(j + 1) * rank] = torch.randn(od, rank, generator=g)
                row += od
            down = torch.cat(downs)
        else:
            down, up = torch.randn(rank, in_dim, generator=g), torch.randn(sum(grp.out_dims), rank, generator=g)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("kind,layout", [("flux", "default"), ("flux", "split_qkv"), ("sd3", "default"),
                                         ("sd3", "split_qkv")])
def test_sd_scripts_fused_files_import_exactly(kind, layout):
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    model = bundle(kind, tiny_flux() if kind == "flux" else tiny_sd3())
    sd = sd_scripts_file(model, layout)
    lw = L.from_state_dict(sd, model)
    ours = deltas(lw)
    groups = F.import_groups(model)
    n_checked = 0
    for name, grp in groups.items():
        if f"{name}.lora_down.weight" not in sd:
            continue
        d, u, a = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"])
        host = (a / d.shape[0]) * (u.double() @ d.double())  # the fused module's delta as every host applies it
        if grp.swap_halves:
            host = swap_scale_shift(host)  # diffusers' own (shift, scale) -> (scale, shift) for this module
        mine = torch.cat([ours[("unet", p)] for p in grp.paths])
        assert float((host - mine).abs().max()) <= 1e-9, name
        n_checked += 1
    assert n_checked == len([g for g in groups.values() if g.default])
    if kind == "sd3":
        assert any(g.swap_halves and g.default for g in groups.values())
    if layout == "default":
        # read, then written again: the same file (parts sharing one down are written compact)
        again = L.to_kohya_state_dict(lw, kind)
        assert set(again) == set(sd) and all(torch.equal(again[k], sd[k].float()) for k in sd)
    else:
        name = "lora_unet_double_blocks_0_img_attn_qkv" if kind == "flux" else "lora_unet_joint_blocks_0_x_block_attn_qkv"
        first = ("unet", "transformer_blocks.0.attn.to_q")
        assert lw.modules[first][0].shape[0] == 4 and lw.modules[first][2] == pytest.approx(2.0 / 3)
        assert torch.equal(lw.modules[first][0], sd[f"{name}.lora_down.weight"][:4])


def test_wrong_model_shapes_are_a_clear_error():
    model = bundle("flux", tiny_flux())
    sd = sd_scripts_file(model, "default")
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(40, 4)
    with pytest.raises(L.LoraFormatError, match="img_attn_qkv .*another model"):
        L.from_state_dict(sd, model)


def test_bfl_and_diffusers_keys_are_read():
    model = bundle("flux", tiny_flux())
    lw = trained_split_lora(model, mixed=False)
    kohya = L.to_kohya_state_dict(lw, "flux")
    bfl = {}
    for k, v in kohya.items():
        name, _, rest = k.partition(".")
        path = F.import_groups(model)[name]
        bfl_name = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
                    "txt_attn_proj": "txt_attn.proj", "img_mlp_0": "img_mlp.0", "img_mlp_2": "img_mlp.2",
                    "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2", "img_mod_lin": "img_mod.lin",
                    "txt_mod_lin": "txt_mod.lin", "linear1": "linear1", "linear2": "linear2",
                    "modulation_lin": "modulation.lin"}
        m = re.match(r"lora_unet_(double|single)_blocks_(\d+)_(.+)$", name)
        assert path is not None
        role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}[rest]
        bfl[f"diffusion_model.{m.group(1)}_blocks.{m.group(2)}.{bfl_name[m.group(3)]}.{role}"] = v
    assert max_delta_diff(lw, L.from_state_dict(bfl, model)) <= 1e-6
    diff = F.to_diffusers_state_dict(lw.modules, "flux")
    assert all(k.startswith("transformer.") for k in diff)
    assert max_delta_diff(lw, L.from_state_dict(diff, model)) <= 1e-6


# ----------------------------------------------------------------------------- diffusers' loaders
@pytest.mark.slow
def test_diffusers_kohya_flux_converter_reads_our_full_size_file():
    """diffusers' own kohya -> diffusers converter (used by FluxPipeline.load_lora_weights) on our full-size Flux.1
    dev export: every module's delta equals the trained one (checked on random probes, max abs diff <= 1e-5)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    model = meta_model("flux_dev")
    real = SimpleNamespace(kind="flux", unet=model.unet, text_encoder=None, text_encoder_2=None)
    lw = full_lora(real, device="cpu")
    sd = L.to_kohya_state_dict(lw, "flux")
    conv = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    g = torch.Generator().manual_seed(0)
    worst, n = 0.0, 0
    for (comp, path), (d, u, a) in lw.modules.items():
        A, B = conv[f"transformer.{path}.lora_A.weight"], conv[f"transformer.{path}.lora_B.weight"]
        x = torch.randn(d.shape[1], 2, generator=g, dtype=torch.float64)
        theirs = B.double() @ (A.double() @ x)
        ours = (a / d.shape[0]) * (u.double() @ (d.double() @ x))
        worst = max(worst, float((theirs - ours).abs().max()))
        n += 1
    assert n == len(lw.modules) == 19 * 14 + 38 * 6 and len(conv) == 2 * n
    assert worst <= 1e-5, worst


def _flux_pipe(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1)).eval()


def test_flux_pipeline_load_lora_weights_applies_our_file_as_we_do():
    """FluxPipeline.load_lora_weights(our kohya file: transformer + CLIP-L) on a small random Flux (double blocks:
    diffusers' converter hard-codes Flux.1's 3072/12288 split of linear1, checked at full size above) and CLIP ==
    our peft models (max abs diff <= 1e-5; 0.0 seen)."""
    base, clip = tiny_flux(single=0), tiny_clip()
    model = bundle("flux", copy.deepcopy(base))
    lw = trained_split_lora(model)
    model.text_encoder = copy.deepcopy(clip)
    L.inject(model.text_encoder, L.te_target_modules(model.text_encoder), 4, 2.0)
    for _, m in L.lora_layers(model.text_encoder):
        torch.nn.init.normal_(m.lora_B[L.DEFAULT_ADAPTER].weight)
    lw.modules.update({k: v for k, v in L.extract(model).modules.items() if k[0] == "te1"})
    sd = L.to_kohya_state_dict(lw, "flux")
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in sd)
    pipe = _flux_pipe(copy.deepcopy(base))
    pipe.text_encoder = copy.deepcopy(clip)
    pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="ours")  # diffusers scales in place
    ours = bundle("flux", copy.deepcopy(base))
    ours.text_encoder = copy.deepcopy(clip)
    L.apply(ours, L.from_state_dict(sd, ours), "ours")
    x = forward_inputs("flux")
    ids = torch.randint(2, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, plain = pipe.transformer(**x).sample, ours.unet(**x).sample, base(**x).sample
        ta, tb, tplain = (te(ids).last_hidden_state for te in (pipe.text_encoder, ours.text_encoder, clip))
    assert float((a - b).abs().max()) <= 1e-5 and float((ta - tb).abs().max()) <= 1e-5
    assert float((a - plain).abs().max()) > 1e-2 and float((ta - tplain).abs().max()) > 1e-2  # the LoRA acts


def test_sd3_pipeline_load_lora_weights_applies_our_weights_as_we_do():
    """diffusers 0.42.1 has no kohya -> diffusers converter for SD3 (StableDiffusion3Pipeline only reads diffusers
    keys): flow_names.to_diffusers_state_dict gives it our LoRA; its output == our peft model's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    base = tiny_sd3()
    model = bundle("sd3", copy.deepcopy(base))
    lw = trained_split_lora(model)
    back = L.from_state_dict(L.to_kohya_state_dict(lw, "sd3"), bundle("sd3", base))
    pipe = StableDiffusion3Pipeline(transformer=copy.deepcopy(base), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(F.to_diffusers_state_dict(back.modules, "sd3"), adapter_name="ours")
    ours = copy.deepcopy(base)
    L.apply(bundle("sd3", ours), back, "ours")
    x = forward_inputs("sd3")
    with torch.no_grad():
        a, b, plain = pipe.transformer(**x).sample, ours(**x).sample, base(**x).sample
    assert float((a - b).abs().max()) <= 1e-5
    assert float((a - plain).abs().max()) > 1e-2


# ----------------------------------------------------------------------------- ComfyUI's key map (fake)
@pytest.mark.parametrize("key", ["flux_dev", "flux_schnell", "sd3_medium", "sd35_medium", "sd35_large"])
def test_comfyui_key_map_matches_every_name_we_write(key):
    model = meta_model(key)
    kind = model.kind
    t5 = F.t5_encoder(model)
    keymap = comfy_key_map(kind, model.unet, clip_l=model.text_encoder,
                           clip_g=model.text_encoder_2 if kind == "sd3" else None, t5=t5)
    sd = L.to_kohya_state_dict(full_lora(model), kind)
    names = {k.split(".")[0] for k in sd}
    missing = sorted(n for n in names if n not in keymap)
    assert missing == [] and len(names) == sum(len(reference()[key].get(c, [])) for c in ("unet", "te1", "te2", "te3"))
    # every transformer module lands on a ComfyUI weight of the shape up @ down makes
    weights = comfy_unet_weights(kind, model.unet)
    for n in names:
        if n.startswith("lora_unet_"):
            shape = weights[keymap[n]]
            assert (sd[f"{n}.lora_up.weight"].shape[0], sd[f"{n}.lora_down.weight"].shape[1]) == shape[:2], n


def test_sd3_text_encoders_round_trip_through_kohya_and_diffusers_keys():
    """CLIP-L (te1), CLIP-G (te2) and T5 (te3, sd-scripts' train_t5xxl) LoRAs of an SD3 model: written with
    lora_te1_/lora_te2_/lora_te3_ names, read back from the kohya file and from diffusers' text_encoder{,_2,_3} keys."""
    torch.manual_seed(0)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, vocab_size=100, projection_dim=32,
                                                        max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                        pad_token_id=1))
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=100,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    model = bundle("sd3", tiny_sd3())
    model.text_encoder, model.text_encoder_2, model.text_encoder_3 = tiny_clip(), clip_g, t5
    g = torch.Generator().manual_seed(2)
    for te, targets in ((model.text_encoder, L.te_target_modules(model.text_encoder)),
                        (clip_g, L.te_target_modules(clip_g)), (t5, F.t5_target_modules(t5))):
        L.inject(te, targets, 4, 4.0)
        for _, m in L.lora_layers(te):
            with torch.no_grad():
                m.lora_B[L.DEFAULT_ADAPTER].weight.copy_(torch.randn(m.lora_B[L.DEFAULT_ADAPTER].weight.shape, generator=g))
    assert len(F.t5_target_modules(t5)) == 2 * 7
    lw = L.extract(model)
    assert {c for c, _ in lw.modules} == {"te1", "te2", "te3"}
    sd = L.to_kohya_state_dict(lw, "sd3")
    names = names_by_component(sd)
    assert len(names["te1"]) == len(names["te2"]) == 12 and len(names["te3"]) == 14
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1" in names["te3"]
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in names["te2"]
    assert max_delta_diff(lw, L.from_state_dict(sd, model)) <= 1e-6
    diff = F.to_diffusers_state_dict(lw.modules, "sd3")
    assert {k.split(".")[0] for k in diff} == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    assert max_delta_diff(lw, L.from_state_dict(diff, model)) <= 1e-6
