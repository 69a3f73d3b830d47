"""ComfyUI in place (#28): the trainer on a graph's own MODEL / CLIP / VAE (hosts/comfyui_inplace.py, families/
comfyui.py), against the fakes in tests/fake_comfy and the tiny graphs of tests/inplace_fakes.py: the adapters are
weight wrappers of a clone (no copy of the base weights, the graph's MODEL unchanged), the objective is the model's
own (eps / v / flow) recovered from apply_model, the file is named for ComfyUI's key map, and the trainer's features
(caches, resume, NaN guard, validation, network types) run on it. The real ComfyUI run is
tests/test_comfyui_inplace_real.py."""
import math
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_comfy")
pytestmark = pytest.mark.frontend


@pytest.fixture(scope="module", autouse=True)
def fakes():
    for m in list(sys.modules):
        if m in ("folder_paths", "nodes", "comfy") or m.startswith("comfy."):
            del sys.modules[m]
    sys.path.insert(0, FAKE)
    yield
    sys.path.remove(FAKE)
    for m in list(sys.modules):
        if m in ("folder_paths", "nodes", "comfy", "inplace_fakes") or m.startswith("comfy."):
            del sys.modules[m]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("inplace") / "data"), n=4, size=32)


def _graph(layout="wan", objective="flow"):
    import inplace_fakes

    return inplace_fakes.graph(layout, objective)


def _model(mp, clip, vae, **kw):
    from lora_train.hosts import comfyui_inplace

    return comfyui_inplace.base_model(mp, clip, vae, **kw)


def _cfg(data, out, **kw):
    from conftest import small_cfg

    base = dict(resolution=32, batch_size=2, max_train_steps=3, learning_rate=1e-3, lora_rank=4)
    base.update(kw)
    return small_cfg(data, out, **base)


def _weights(mp):
    return {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}


@pytest.mark.parametrize("layout, objective", [("wan", "flow"), ("other", "flow"), ("other", "eps"), ("wan", "v")])
def test_trains_the_graphs_model_in_place(data, tmp_path, layout, objective):
    from conftest import run_trainer

    mp, clip, vae = _graph(layout, objective)
    before = _weights(mp)
    ptrs = {k: v.data_ptr() for k, v in mp.model.diffusion_model.state_dict().items()}
    model = _model(mp, clip, vae)
    g = model.extra["graph"]
    tr, res = run_trainer(_cfg(data, tmp_path, gradient_checkpointing=True), lambda: model)
    assert res.steps == 3 and all(math.isfinite(x) for x in res.losses)
    # the base weights: the same tensors, unchanged; only our adapters train
    after = mp.model.diffusion_model.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == ptrs
    assert all(torch.equal(after[k], before[k]) for k in before)
    n_adapter = sum(p.numel() for p in model.unet.parameters())
    assert n_adapter == sum(p.numel() for g_ in tr.param_groups for p in g_["params"])
    # the graph's MODEL has no wrapper, its clone's are off the modules after release
    assert mp.weight_wrapper_patches == {}
    g.release()
    assert all(not getattr(m, "weight_function", []) for m in mp.model.diffusion_model.modules())
    sd = load_file(res.lora_path)
    names = {k.split(".")[0] for k in sd}
    if layout == "wan":  # our Wan family's defaults: 10 modules a block, ComfyUI's (= musubi-tuner's) names
        assert g.family == "wan" and len(names) == 20
        assert "lora_unet_blocks_0_self_attn_q" in names and "lora_unet_blocks_1_ffn_2" in names
    else:  # no family we know: every Linear of the blocks (5 a block)
        assert g.family is None and len(names) == 10 and "lora_unet_blocks_0_attn_qkv" in names
    from lora_train.hosts import comfyui_inplace

    done, total, missing = comfyui_inplace.applies(mp, sd)
    assert (done, total, missing) == (len(names), len(names), [])
    with safe_open(res.lora_path, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_trained_in_place"] == "comfyui"
    assert meta["ss_prediction_type"] == {"flow": "flow", "eps": "epsilon", "v": "v_prediction"}[objective]
    assert meta["ss_comfyui_model"] == ("WAN21_T2V" if layout == "wan" else "UnknownDiT")
    if layout == "wan":
        assert meta["ss_base_model_version"] == "wan"


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
def test_the_objective_is_the_models_own(objective):
    """From apply_model's x0 prediction, `native` gives back the raw output and the objective's target: noise for
    EPS, v for V_PREDICTION, noise - x0 for flow models."""
    mp, clip, vae = _graph("other", objective)
    g = _model(mp, clip, vae).extra["graph"]
    ms = g.sampling
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    out = torch.randn(3, 4, 8, 8, generator=gen)
    sigma = g.sigmas_of(torch.tensor([10.0, 400.0, 900.0]))
    xt = ms.noise_scaling(sigma, noise, x0)
    x0_pred = ms.calculate_denoised(sigma, out, xt)
    got_out, target = g.native(x0_pred, x0, xt, sigma)
    assert torch.allclose(got_out, out, atol=1e-4, rtol=1e-4)
    s = sigma.view(-1, 1, 1, 1)
    if objective == "flow":
        want = noise - x0
    elif objective == "eps":
        want = noise
    else:  # v in k-diffusion's sigma space (sigma_data 1): (sigma x0 - noise ...) as ComfyUI's V_PREDICTION defines it
        want = (xt * 1.0 / (s ** 2 + 1) - x0) * (s ** 2 + 1) ** 0.5 / s
    assert torch.allclose(target, want, atol=1e-4, rtol=1e-3)


def test_timesteps_follow_the_models_schedule():
    mp, clip, vae = _graph("other", "flow")
    g = _model(mp, clip, vae).extra["graph"]
    from lora_train.config import TrainConfig

    cfg = TrainConfig().validate()
    t = g.sample_timesteps(cfg, 4000, (8, 8), torch.Generator().manual_seed(0))
    # the model's shift (3.0) applied to sigmoid(N(0, 1)): the median moves from 0.5 to 0.75
    assert 0.72 < float(t.median()) / 1000 < 0.78 and float(t.min()) > 0 and float(t.max()) <= 1000
    mp, clip, vae = _graph("other", "eps")
    g = _model(mp, clip, vae).extra["graph"]
    t = g.sample_timesteps(cfg, 4000, (8, 8), torch.Generator().manual_seed(0))
    assert torch.equal(t, t.round()) and float(t.min()) >= 0 and float(t.max()) <= 999


def test_loss_falls_on_a_repeated_batch(data, tmp_path):
    from conftest import run_trainer

    mp, clip, vae = _graph("wan", "flow")
    model = _model(mp, clip, vae)
    cfg = _cfg(data, tmp_path, max_train_steps=40, learning_rate=5e-3, lr_scheduler="constant", batch_size=4,
               lora_rank=8)
    from lora_train.training.trainer import Trainer

    tr = Trainer(cfg, model=model)
    assert tr.prepare()
    noise = torch.randn((4,) + tuple(tr.latents[0].shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([200.0, 400.0, 600.0, 800.0])
    probe = {"start": tr.probe_loss([0, 1, 2, 3], noise, t)}
    for _ in range(40):
        tr.step()
    probe["end"] = tr.probe_loss([0, 1, 2, 3], noise, t)
    assert probe["end"] < 0.9 * probe["start"], probe


def test_text_conditioning_of_different_lengths_is_kept_exact(data, tmp_path):
    """Captions of different lengths are cached padded with their length and handed to the model exact; samples
    with conditionings of one shape run as one batch, the others one by one (never padded by repetition)."""
    mp, clip, vae = _graph("other", "flow")
    model = _model(mp, clip, vae)
    g = model.extra["graph"]
    enc = g.encode_text(["a b", "a b c d e", "c d"])
    assert enc["cross_attn"].shape == (3, 6, 16) and enc["cross_attn_len"].tolist() == [3, 6, 3]
    rows = [{k: v[i] for k, v in enc.items()} for i in range(3)]
    cross, extra = g.unpack(rows[0])
    want = clip.encode_from_tokens_scheduled(clip.tokenize("a b"))[0][0]
    assert torch.equal(cross, want) and "pooled_output" in extra
    x = torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.3, 0.6, 0.8])
    calls = []
    real = g.inner.apply_model
    g.inner.apply_model = lambda xs, *a, **kw: calls.append(xs.shape[0]) or real(xs, *a, **kw)
    batched = g.denoise(x, sigma, rows)
    assert sorted(calls) == [1, 2]  # "a b" and "c d" together, the longer caption alone
    one = torch.cat([g.denoise(x[i:i + 1], sigma[i:i + 1], rows[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, one, atol=1e-5)


@pytest.mark.parametrize("network", ["loha", "lokr", "dora"])
def test_network_types_in_place(data, tmp_path, network):
    from conftest import run_trainer

    mp, clip, vae = _graph("wan", "flow")
    model = _model(mp, clip, vae)
    _, res = run_trainer(_cfg(data, tmp_path, network_type=network, learning_rate=5e-3), lambda: model)
    sd = load_file(res.lora_path)
    key = {"loha": "hada_w1_a", "lokr": "lokr_w1", "dora": "dora_scale"}[network]
    assert any(k.endswith(key) for k in sd)
    from lora_train.hosts import comfyui_inplace

    done, total, _ = comfyui_inplace.applies(mp, sd)
    assert done == total == 20


def test_loraplus_groups_and_resume_bitwise(data, tmp_path):
    from conftest import run_trainer

    def build():
        mp, clip, vae = _graph("wan", "flow")
        return _model(mp, clip, vae)
    kw = dict(max_train_steps=4, loraplus_lr_ratio=16.0, save_state_every_n_steps=2)
    tr, ref = run_trainer(_cfg(data, tmp_path / "a", **kw), build)
    assert len(tr.param_groups) == 2 and tr.param_groups[1]["lr"] == 16 * tr.param_groups[0]["lr"]
    cfg = _cfg(data, tmp_path / "b", **kw)
    _, r1 = run_trainer(cfg, build, stop_at=2)
    assert r1.stopped
    _, r2 = run_trainer(cfg, build, resume_from=str(tmp_path / "b"))
    a, b = load_file(ref.lora_path), load_file(r2.lora_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_host_chooses_in_place_and_checks_the_file(tmp_path):
    from lora_train.hosts.base import HostError
    from lora_train.hosts.comfyui import ComfyUIHost

    mp, clip, vae = _graph("wan", "flow")
    assert ComfyUIHost(mp, clip, vae).trains_in_place()  # a family the converter does not read
    assert ComfyUIHost(mp, clip, vae, in_place="off").trains_in_place() is False
    with pytest.raises(HostError, match="in_place"):
        ComfyUIHost(mp, clip, vae, in_place="maybe").trains_in_place()
    from lora_train.hosts import comfyui_inplace

    with pytest.raises(HostError, match="CLIP input is missing"):
        comfyui_inplace.base_model(mp, None, vae)
    with pytest.raises(HostError, match="not a ComfyUI model"):
        comfyui_inplace.base_model(object(), clip, vae)


def test_validation_disk_caches_and_nan_guard_in_place(data, tmp_path):
    """The trainer's validation loss, disk caches (a second run encodes nothing) and NaN recovery on a graph."""
    from lora_train.training.trainer import Trainer

    def hook(step, loss):
        return loss * float("nan") if step == 3 and not fired else loss
    fired = []

    def nan_once(step, loss):
        out = hook(step, loss)
        if step == 3:
            fired.append(step)
        return out
    mp, clip, vae = _graph("wan", "flow")
    cache = str(tmp_path / "cache")
    kw = dict(max_train_steps=5, validation_split=0.25, latent_cache="disk", text_cache="disk", cache_dir=cache,
              batch_size=1, nan_policy="recover")
    tr = Trainer(_cfg(data, tmp_path / "a", **kw), model=_model(mp, clip, vae), loss_hook=nan_once)
    res = tr.run()
    assert res.steps == 5 and fired and tr.recoveries >= 1
    assert tr.val_history and all(math.isfinite(v["val_loss"]) for v in tr.val_history)
    calls = (clip.calls, vae.calls)
    mp2, clip2, vae2 = _graph("wan", "flow")
    tr2 = Trainer(_cfg(data, tmp_path / "b", **kw), model=_model(mp2, clip2, vae2))
    tr2.run()
    assert calls[0] > 0 and calls[1] > 0 and (clip2.calls, vae2.calls) == (0, 0)  # all read from the disk caches


# ----------------------------------------------------------------------------- what a real ComfyUI 0.8.0 showed
# (tests/test_comfyui_inplace_real.py): inference tensors, in-place residual adds, video VAEs, None conditioning
# entries, constant conditionings, comfy_kitchen's RoPE ops without a backward
def _lora_graph(layout="other", objective="flow", seed=0, **kw):
    """A graph with our adapters in and their up matrices random (so every adapter gets a gradient)."""
    from types import SimpleNamespace

    import inplace_fakes

    mp, clip, vae = inplace_fakes.graph(layout, objective, **kw)
    g = _model(mp, clip, vae).extra["graph"]
    spec = SimpleNamespace(type="lora", rank=4, alpha=4.0, conv_rank=0, conv_alpha=0.0, rank_dropout=0.0,
                           module_dropout=0.0, loraplus_lr_ratio=None)
    params = [p for group in g.inject(spec, 1e-3, "default") for p in group["params"]]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for p in params:
        p.requires_grad_(True)
    return mp, clip, g, params


def _batch(g, clip, captions=("a b c", "d e f")):
    enc = g.encode_text(list(captions))
    rows = [{k: v[i] for k, v in enc.items()} for i in range(len(captions))]
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(len(captions), 4, 8, 8, generator=gen), torch.randn(len(captions), 4, 8, 8, generator=gen)
    return x0, rows, noise, torch.tensor([300.0, 700.0][:len(captions)])


def test_inference_tensors_of_the_graph_train_and_come_back():
    """ComfyUI's loaders run under inference_mode: its weights are inference tensors, which autograd will not save
    for a backward. load() swaps each for a normal tensor on the same storage; release() puts ComfyUI's back."""
    mp, clip, g, params = _lora_graph()
    inner = mp.model
    before = {n: t for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
    assert all(t.is_inference() for t in before.values())
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):  # ComfyUI's own model, as loaded
        inner.apply_model(x, torch.tensor([0.5]), c_crossattn=torch.randn(1, 3, 16)).sum().backward()
    x0, rows, noise, t = _batch(g, clip)
    g.loss(x0, rows, noise, t).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    now = {n: t for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
    assert {n: t.data_ptr() for n, t in now.items()} == {n: t.data_ptr() for n, t in before.items()}  # no copy
    assert not any(t.is_inference() for t in now.values())
    g.release()
    after = {n: t for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
    assert all(after[n] is before[n] for n in before)  # ComfyUI's own tensor objects again


def _grads(g, clip, params, checkpointing):
    for p in params:
        p.grad = None
    if checkpointing:
        g.gradient_checkpointing(True)
    x0, rows, noise, t = _batch(g, clip)
    loss = g.loss(x0, rows, noise, t)
    loss.backward()
    out = torch.cat([p.grad.flatten() for p in params]).clone(), float(loss.detach())
    for block in g._ckpt:  # checkpointing off again (release() does this too)
        block.forward = block._lora_train_forward
        del block._lora_train_forward
    g._ckpt = []
    return out


def test_in_place_residual_adds_train_exact_with_and_without_checkpointing():
    """ComfyUI's Flux-style blocks add to their residual stream (and their own input) in place after a pre-norm
    kept it for the backward: plain autograd refuses that; our forward keeps copies of the saved activations, and
    our checkpointing (reentrant, on copies of each block's inputs) gives the very same gradients. (torch's
    non-reentrant checkpoint, as ComfyUI's TrainLoraNode uses it, recomputes from the changed input.)"""
    mp, clip, g, params = _lora_graph("other")
    g.load()
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace operation"):  # the fake's blocks behave as ComfyUI's
        mp.model.apply_model(x, torch.tensor([0.5]), c_crossattn=torch.randn(1, 3, 16),
                             pooled_output=None).sum().backward()
    plain, l0 = _grads(g, clip, params, False)
    ckpt, l1 = _grads(g, clip, params, True)
    assert l0 == l1 and plain.abs().sum() > 0
    assert torch.equal(plain, ckpt)
    g.release()


def test_a_video_vae_encodes_each_image_as_one_frame():
    """ComfyUI's Wan / Qwen-Image VAE (latent_dim 3) reads a batch of images as the frames of one video."""
    mp, clip, g, _ = _lora_graph("wan")

    class VideoVAE:
        latent_dim = 3
        calls = []

        def encode(self, pixels):
            self.calls.append(pixels.shape[0])
            return torch.ones(1, 4, (pixels.shape[0] + 3) // 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    g.vae = VideoVAE()
    lat = g.encode_latents(torch.zeros(3, 3, 16, 16))
    assert VideoVAE.calls == [1, 1, 1] and lat.shape == (3, 4, 1, 2, 2)


def test_conditioning_entries_that_are_none_reach_extra_conds(data, tmp_path):
    """A T5-only / LLM text encoder gives pooled_output None; extra_conds of Flux-like models read the key."""
    from conftest import run_trainer

    import inplace_fakes

    mp, clip, vae = inplace_fakes.graph("other", "flow", pooled=False)
    model = _model(mp, clip, vae)
    g = model.extra["graph"]
    enc = g.encode_text(["a b"])
    _, extra = g.unpack({k: v[0] for k, v in enc.items()})
    assert "pooled_output" in extra and extra["pooled_output"] is None
    _, res = run_trainer(_cfg(data, tmp_path), lambda: model)
    assert res.steps == 3 and all(math.isfinite(x) for x in res.losses)


def test_the_plain_lora_weight_is_one_addmm_equal_to_the_delta_formula():
    from lora_train.hosts.comfyui_inplace import _plain_lora

    mp, clip, g, params = _lora_graph("wan")
    w = torch.randn(32, 32)
    for wrapped in list(g.wrapped.values())[:3]:
        box = wrapped.parametrizations["weight"]
        assert _plain_lora(box) is not None
        assert torch.allclose(wrapped(w), box(w), atol=1e-6)
        box.strength["default"] = 0.5
        assert torch.allclose(wrapped(w), box(w), atol=1e-6)


_ROPE_OPS = []


def _fake_kitchen(monkeypatch):
    """comfy_kitchen's RoPE ops as torch custom ops with no autograd formula (as comfy_kitchen 0.2.40 has them)."""
    import types

    monkeypatch.setitem(sys.modules, "comfy_kitchen", types.ModuleType("comfy_kitchen"))

    def ref(x, f):  # comfy/ldm/flux/math.py's own formula
        x_ = x.to(dtype=f.dtype).reshape(*x.shape[:-1], -1, 1, 2)
        return (f[..., 0] * x_[..., 0] + f[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)

    if not _ROPE_OPS:
        @torch.library.custom_op("comfy_kitchen::apply_rope1", mutates_args=())
        def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
            return ref(x, freqs_cis)

        @torch.library.custom_op("comfy_kitchen::apply_rope", mutates_args=())
        def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return ref(xq, freqs_cis), ref(xk, freqs_cis)
        _ROPE_OPS.extend([apply_rope1, apply_rope])
    return ref


def test_comfy_kitchen_rope_gets_its_backward(monkeypatch):
    from lora_train.hosts.comfyui_inplace import rope_autograd

    ref = _fake_kitchen(monkeypatch)
    ops = torch.ops.comfy_kitchen
    gen = torch.Generator().manual_seed(0)
    x, k = torch.randn(2, 3, 5, 8, generator=gen, requires_grad=True), torch.randn(2, 3, 5, 8, generator=gen)
    f = torch.randn(1, 1, 5, 4, 2, 2, generator=gen)
    first = rope_autograd()
    assert sorted(first) == ["apply_rope", "apply_rope1"]
    assert rope_autograd() == []  # once: an op with a backward is left alone
    gy = torch.randn(2, 3, 5, 8, generator=gen)
    (ops.apply_rope1(x, f) * gy).sum().backward()
    got, x.grad = x.grad.clone(), None
    (ref(x, f) * gy).sum().backward()
    assert torch.allclose(got, x.grad, atol=1e-6)
    k.requires_grad_(True)
    x.grad = None
    q2, k2 = ops.apply_rope(x, k, f)
    (q2 * gy + 2 * k2 * gy).sum().backward()
    gq, gk = x.grad.clone(), k.grad.clone()
    x.grad = k.grad = None
    (ref(x, f) * gy + 2 * ref(k, f) * gy).sum().backward()
    assert torch.allclose(gq, x.grad, atol=1e-6) and torch.allclose(gk, k.grad, atol=1e-6)
