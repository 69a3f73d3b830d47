"""ComfyUI nodes on Flux / SD3 graphs (issue #16), against tests/fake_comfy: a graph's Flux MODEL / CLIP / VAE (as
ComfyUI's UNETLoader + DualCLIPLoader + VAELoader hold them in memory) -> our BaseModel -> Train node -> a LoRA in
loras/ in sd-scripts' Flux layout -> ComfyUI's loader (the generic key map of comfy.lora) applies every key -> the
apply and sweep nodes. The memory plan (ComfyUI's copy unloaded before ours is built; fp8_base for large models)."""
import logging
import os
import sys

import pytest
import torch
from safetensors import safe_open

from flow_fakes import flux_to_bfl, hf_state, sd3_to_original
from test_nodes import check_returns, comfy, dataset_dir, result_of, run_node  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.frontend


def _ldm_vae(vae):
    from ldm_writers import vae_to_ldm

    return {k[len("first_stage_model."):]: v for k, v in vae_to_ldm(vae).items()}


def _graph(comfy, base, family, dtype=None):
    """MODEL / CLIP / VAE of `base` as ComfyUI holds them (loaded under inference_mode, as its loaders run)."""
    if family == "flux":
        unet = flux_to_bfl(base.unet)
        clip = {**hf_state(base.text_encoder, "clip_l.transformer."), **hf_state(base.text_encoder_2, "t5xxl.transformer.")}
    else:
        unet = sd3_to_original(base.unet, prefix="")
        clip = {**hf_state(base.text_encoder, "clip_l.transformer."), **hf_state(base.text_encoder_2, "clip_g.transformer."),
                **hf_state(base.text_encoder_3, "t5xxl.transformer.")}
    if dtype is not None:
        unet = {k: v.to(dtype) for k, v in unet.items()}
    with torch.inference_mode():
        parts = [{k: v.clone() for k, v in d.items()} for d in (unet, clip, _ldm_vae(base.vae))]
        model, clip_o, vae = comfy.sd.load_flow_parts(*parts, family=family)
    comfy.mm.current_loaded_models.append(model)
    comfy.mm.interrupt_current_processing(False)
    return model, clip_o, vae


@pytest.fixture(scope="module")
def tiny_flux():
    from lora_train.models.flux import build_tiny_flux

    return build_tiny_flux()


@pytest.fixture(scope="module")
def tiny_sd3():
    from lora_train.models.sd3 import build_tiny_sd3

    return build_tiny_sd3()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sb:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def test_flux_graph_is_our_model(comfy, tiny_flux):
    ch = sys.modules["lora_train.hosts.comfyui"]
    model, clip, vae = _graph(comfy, tiny_flux, "flux")
    csd = clip.get_sd()
    assert "clip_l.logit_scale" in csd and "t5xxl.transformer.shared.weight" in csd
    assert "t5xxl.transformer.encoder.embed_tokens.weight" not in csd  # as ComfyUI's T5 holds it
    base = ch.base_model_from_graph(model, clip, vae)
    assert base.kind == "flux" and base.extra["variant"] == "flux-dev" and base.name == "comfyui:Flux"
    for a, b in ((base.unet, tiny_flux.unet), (base.vae, tiny_flux.vae), (base.text_encoder, tiny_flux.text_encoder),
                 (base.text_encoder_2, tiny_flux.text_encoder_2)):
        _same(a, b)
        assert not any(p.is_inference() for p in a.parameters())
    assert type(base.text_encoder).__name__ == "CLIPTextModel"  # Flux: pooler_output; ComfyUI's text_projection dropped
    # ComfyUI holding the transformer in fp8 (weight_dtype fp8_e4m3fn): read as bf16, not a float32 copy
    m8, c8, v8 = _graph(comfy, tiny_flux, "flux", dtype=torch.float8_e4m3fn)
    b8 = ch.base_model_from_graph(m8, c8, v8)
    assert {p.dtype for p in b8.unet.parameters()} == {torch.bfloat16}


def test_memory_plan(comfy):
    cf = sys.modules["lora_train.hosts.comfyui_flow"]
    big = {"double_blocks.0.img_attn.qkv.weight": torch.empty(3 * 10 ** 9, device="meta"),
           "single_blocks.0.linear1.weight": torch.empty(2 * 10 ** 9, device="meta"), "guidance_in.in_layer.weight":
           torch.empty(1, device="meta")}
    model, _clip, _vae = comfy.sd.load_flow_parts(big, {}, {}, family="flux")
    plan = cf.memory_plan(model, "cuda")
    assert plan.family == "flux" and plan.params == 5 * 10 ** 9 + 1 and plan.fp8_base
    assert "unloaded from the GPU" in plan.text and "fp8 (fp8_base, auto" in plan.text and "5.00 B" in plan.text
    assert not cf.memory_plan(model, "cpu").fp8_base
    assert not cf.memory_plan(model, "cuda", "off").fp8_base and cf.memory_plan(model, "cpu", "on").fp8_base
    with pytest.raises(ValueError, match="fp8_base"):
        cf.memory_plan(model, "cuda", "maybe")
    small = {"joint_blocks.0.x_block.attn.qkv.weight": torch.empty(2 * 10 ** 9, device="meta")}
    m2, _c, _v = comfy.sd.load_flow_parts(small, {}, {}, family="sd3")
    assert not cf.memory_plan(m2, "cuda").fp8_base  # SD3.5 Medium size: 16 bits fit
    m_sd1 = comfy.sd.ModelPatcher(comfy.sd.BaseModel({"input_blocks.0.0.weight": torch.zeros(1)}))
    assert cf.memory_plan(m_sd1, "cuda") is None


KW = dict(learning_rate=1e-3, rank=4, alpha=4.0, batch_size=1, gradient_accumulation=1, epochs=1, max_steps=2,
          lr_scheduler="constant", warmup_steps=0, optimizer="AdamW", train_text_encoder=True, training_seed=3,
          save_every_n_epochs=0, mixed_precision="auto")


def _train(comfy, graph, dataset_dir, name, monkeypatch, **over):
    ch = sys.modules["lora_train.hosts.comfyui"]
    built = ch.flow_base_model_from_state_dict

    def recording(sd, name):  # the order the memory plan promises: ComfyUI unloaded, then our copy built
        comfy.mm.CALLS.append("build")
        return built(sd, name)

    monkeypatch.setattr(ch, "flow_base_model_from_state_dict", recording)
    comfy.mm.CALLS.clear()
    maps = comfy.pack.NODE_CLASS_MAPPINGS
    ref = result_of(maps["LoraTrainDatasetFromFolder"]().load(dataset_dir, "zq", 64, 1))[0]
    cls = maps["LoraTrainTrain"]
    out = run_node(cls().train, *graph, ref, name, unique_id="9", **dict(KW, **over))
    lora_name, path, _plot, report = check_returns(cls, out)
    assert comfy.mm.CALLS[:3] == ["unload_all_models", "soft_empty_cache", "build"]
    assert os.path.dirname(path) == comfy.fp.get_folder_paths("loras")[0] and os.path.isfile(path)
    with safe_open(path, framework="pt") as fh:
        return lora_name, path, report, fh.metadata(), {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def _loads_every_key(comfy, graph, path, caplog):
    caplog.clear()
    caplog.set_level(logging.WARNING)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    m2, c2 = comfy.sd.load_lora_for_models(graph[0], graph[1], lora, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    return m2, c2


@pytest.mark.slow
def test_flux_graph_train_apply_sweep(comfy, tiny_flux, dataset_dir, monkeypatch, caplog):
    graph = _graph(comfy, tiny_flux, "flux")
    name, path, report, meta, shapes = _train(comfy, graph, dataset_dir, "flux lora", monkeypatch)
    assert name == "flux_lora.safetensors"
    # sd-scripts' Flux layout: fused qkv / linear1 pairs, CLIP-L as te1; ComfyUI's generic key map takes them all
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in shapes
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in shapes
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in shapes)
    assert not any(k.startswith(("lora_unet_transformer_blocks", "lora_te3_", "transformer.")) for k in shapes)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_sd_model_name"] == "comfyui:Flux"
    assert meta["ss_steps"] == "2"
    assert "memory plan: Flux.1 transformer" in report and "no fp8_base, auto: on the CPU" in report
    m2, c2 = _loads_every_key(comfy, graph, path, caplog)
    assert len(m2.patches) > 0 and len(c2.patcher.patches) > 0

    acls = comfy.pack.NODE_CLASS_MAPPINGS["LoraTrainApplyLora"]
    m, c = check_returns(acls, run_node(acls().apply, graph[0], graph[1], name, 0.5, 0.25))
    assert {p[0] for pl in m.patches.values() for p in pl} == {0.5} and not graph[0].patches

    scls = comfy.pack.NODE_CLASS_MAPPINGS["LoraTrainStrengthSweep"]
    seen = []
    import nodes as comfy_nodes

    real = comfy_nodes.common_ksampler

    def spy(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kw):
        seen.append(tuple(latent["samples"].shape))
        return real(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kw)

    monkeypatch.setattr(comfy_nodes, "common_ksampler", spy)
    out = run_node(scls().sweep, *graph, name, "a zq picture", "", "1.0", "1", 2, 1.0, "euler", "simple", 64, 64, False)
    _grid, cells, info = check_returns(scls, out)
    assert cells.shape == (2, 64, 64, 3) and "base (0)" in info
    assert seen and all(s == (1, 16, 8, 8) for s in seen)  # ComfyUI's sampler, with Flux's 16 latent channels
    assert not torch.equal(cells[0], cells[1])  # the LoRA column differs from the base column


@pytest.mark.slow
def test_sd3_graph_train_with_fp8_base(comfy, tiny_sd3, dataset_dir, monkeypatch, caplog):
    ch = sys.modules["lora_train.hosts.comfyui"]
    graph = _graph(comfy, tiny_sd3, "sd3")
    base = ch.base_model_from_graph(*graph)
    assert base.kind == "sd3" and base.extra["variant"] == tiny_sd3.extra["variant"]
    for a, b in ((base.unet, tiny_sd3.unet), (base.text_encoder_2, tiny_sd3.text_encoder_2),
                 (base.text_encoder_3, tiny_sd3.text_encoder_3), (base.vae, tiny_sd3.vae)):
        _same(a, b)
    name, path, report, meta, shapes = _train(comfy, graph, dataset_dir, "sd3_lora", monkeypatch,
                                              train_text_encoder=False, fp8_base="on")
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv") for k in shapes)
    assert meta["modelspec.architecture"].startswith("stable-diffusion-3")
    assert "memory plan: SD3 / SD3.5 transformer" in report and "fp8 (fp8_base, set on the node)" in report
    m2, _c2 = _loads_every_key(comfy, graph, path, caplog)
    assert len(m2.patches) > 0
