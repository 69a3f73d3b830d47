"""The kohya training options on the tiny model: loss types and Huber schedule, masked loss, noise options, reg images
at kohya's ratio with prior_loss_weight, network_weights, block-wise lr and dims, EMA (saved, resumed), TensorBoard."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import run_trainer, small_cfg
from lora_train.data import masks as masks_mod
from lora_train.data.dataset import Item, load_dataset
from lora_train.data.reg_images import balance
from lora_train.models.tiny import build_tiny
from lora_train.networks import blocks
from lora_train.networks import lora as L
from lora_train.training import loss as loss_mod
from lora_train.training import noise as noise_mod
from lora_train.training.loss import fixed_noise_loss
from lora_train.training.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("kt") / "data"), n=8, size=64)


def _run(cfg, stop_at=None, resume_from=None):
    return run_trainer(cfg, build_tiny, stop_at, resume_from)


# ---------------------------------------------------------------------------------------------- loss types
def test_huber_is_mse_for_small_residuals_and_l1_like_for_large():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    target = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)  # float64: no cancellation in sqrt(.) - c
    small = target + 1e-3 * (pred - target)
    c = torch.tensor([0.5, 0.5], dtype=torch.float64)
    hub = noise_mod.elementwise_loss(small, target, "huber", c)
    mse = F.mse_loss(small, target, reduction="none")
    assert torch.allclose(hub, mse, rtol=1e-3, atol=1e-12)
    big = target + 100.0
    big_loss = noise_mod.elementwise_loss(big, target, "huber", c)
    assert torch.allclose(big_loss, torch.full_like(big_loss, 2 * 0.5 * (100.0 - 0.5)), rtol=1e-4)
    sl1 = noise_mod.elementwise_loss(small, target, "smooth_l1", c)
    assert torch.allclose(sl1, mse / 0.5, rtol=1e-3, atol=1e-12)  # smooth_l1 = huber / c
    assert torch.equal(noise_mod.elementwise_loss(pred, target, "l1"), (pred - target).abs())


def test_huber_schedules_match_sd_scripts():
    sched = build_tiny().noise_scheduler
    T = sched.config.num_train_timesteps
    t = torch.tensor([0, T // 2, T - 1])
    c, scale = 0.1, 2.0
    const = noise_mod.huber_c_for("huber", "constant", c, scale, t, sched)
    assert torch.allclose(const, torch.full((3,), 0.2))
    exp = noise_mod.huber_c_for("huber", "exponential", c, scale, t, sched)
    alpha = -math.log(c) / T
    assert torch.allclose(exp, torch.tensor([math.exp(-alpha * float(x)) * scale for x in t]), rtol=1e-6)
    assert abs(float(exp[0]) - scale) < 1e-6  # 1 * scale at t = 0, -> c * scale at t = T
    snr = noise_mod.huber_c_for("huber", "snr", c, scale, t, sched)
    ac = sched.alphas_cumprod[t].double()
    sig = ((1 - ac) / ac).sqrt()
    assert torch.allclose(snr.double(), (1 - c) / (1 + sig) ** 2 + c, rtol=1e-5)
    assert noise_mod.huber_c_for("l2", "snr", c, scale, t, sched) is None


# ---------------------------------------------------------------------------------------------- masked loss
def test_fully_masked_region_gets_no_gradient():
    m = build_tiny()
    L.inject(m.unet, L.unet_target_modules(m.unet), 4, 4.0)
    for p in L.lora_parameters(m.unet):
        p.requires_grad_(True)
        with torch.no_grad():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([100, 700])
    mask = torch.ones(2, 1, 8, 8)
    mask[..., :4] = 0.0  # the left half of every latent is fully masked
    seen = []

    def mse_capturing(pred, target):
        pred.retain_grad()
        seen.append(pred)
        return F.mse_loss(pred, target, reduction="none")

    def grads(target_noise):
        m.unet.zero_grad()
        loss = loss_mod.diffusion_loss(m, lat, cond, target_noise, t, input_noise=noise, mask=mask,
                                       elementwise=mse_capturing)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in L.lora_parameters(m.unet)]

    l1, g1 = grads(noise)
    pred_grad = seen[-1].grad
    assert torch.all(pred_grad[..., :4] == 0) and pred_grad[..., 4:].abs().sum() > 0
    other = noise.clone()
    other[..., :4] += 5.0  # a different target only where the mask is 0
    l2, g2 = grads(other)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_alpha_mask_and_mask_folder(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[..., :3] = 200
    arr[:, 32:, 3] = 255  # right half opaque
    Image.fromarray(arr, "RGBA").save(d / "a.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(d / "b.png")
    ds = load_dataset(str(d), 64)
    i_a = [i for i, it in enumerate(ds.items) if it.path.endswith("a.png")][0]
    mk = masks_mod.latent_mask(ds, i_a, (8, 8), True, "")
    assert mk.shape == (1, 8, 8) and torch.all(mk[..., :4] == 0) and torch.all(mk[..., 4:] == 1)
    assert masks_mod.latent_mask(ds, 1 - i_a, (8, 8), True, "") is None  # no alpha: trained everywhere
    md = tmp_path / "masks"
    md.mkdir()
    g = np.zeros((64, 64), np.uint8)
    g[:32] = 255  # top half white
    Image.fromarray(g, "L").save(md / "b.png")
    mb = masks_mod.latent_mask(ds, 1 - i_a, (8, 8), False, str(md))
    assert torch.all(mb[:, :4] == 1) and torch.all(mb[:, 4:] == 0)
    batch = masks_mod.batch_masks([mk if i == i_a else None for i in range(2)], [i_a, 1 - i_a], [True, False],
                                  (4, 8, 8))
    assert torch.all(batch[0, ..., 4:] == 0) and torch.all(batch[1] == 1)  # flipped sample: mirrored mask


# ---------------------------------------------------------------------------------------------- noise options
def test_multires_and_input_perturbation_noise():
    g = torch.Generator().manual_seed(2)
    n = torch.randn(4, 4, 16, 16, generator=g)
    p = noise_mod.pyramid_noise_like(n, 6, 0.3, torch.Generator().manual_seed(0))
    assert p.shape == n.shape and abs(float(p.std()) - 1) < 1e-5 and not torch.allclose(p, n)
    again = noise_mod.pyramid_noise_like(n, 6, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(p, again)
    inn = noise_mod.input_noise(n, 0.1, torch.Generator().manual_seed(0))
    assert 0.05 < float((inn - n).std()) < 0.15


@pytest.mark.slow
def test_training_with_loss_and_noise_options(data, tmp_path):
    cfg = small_cfg(data, tmp_path / "o", max_train_steps=2, loss_type="huber", huber_schedule="snr",
                    multires_noise_iterations=4, multires_noise_discount=0.3, ip_noise_gamma=0.1)
    tr, res = _run(cfg)
    assert res.steps == 2 and all(math.isfinite(x) for x in res.losses)
    meta = tr.metadata(1, 2)
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "snr", "0.1")
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"]) == ("4", "0.1")


@pytest.mark.slow
def test_training_with_alpha_masked_loss(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    for k in range(2):
        arr = np.zeros((64, 64, 4), dtype=np.uint8)
        arr[..., 0] = 50 + 100 * k
        arr[16:48, 16:48, 3] = 255
        Image.fromarray(arr, "RGBA").save(d / f"{k}.png")
        (d / f"{k}.txt").write_text("a square")
    cfg = small_cfg(str(d), tmp_path / "o", max_train_steps=2, masked_loss=True, alpha_mask=True, flip_aug=True)
    tr, res = _run(cfg)
    assert res.steps == 2 and tr.kohya.loss_masks[0] is not None and float(tr.kohya.loss_masks[0].mean()) == pytest.approx(0.25)
    assert tr.metadata(1, 2)["ss_masked_loss"] == "True"


# ---------------------------------------------------------------------------------------------- reg images
def _items(n, repeats=1):
    return [Item(path=f"r{i}.png", caption="c", repeats=repeats) for i in range(n)]


def test_reg_balance_is_kohyas():
    reg = _items(3)
    used = balance(8, reg)  # 8 training samples, 3 reg images: 3 + 5 more, round robin
    assert [it.repeats for it in used] == [3, 3, 2]
    used = balance(8, _items(20))  # more reg images than needed: only the first 8, once each
    assert len(used) == 8 and all(it.repeats == 1 for it in used)
    used = balance(40, _items(6))
    assert [it.repeats for it in used] == [7, 7, 7, 7, 6, 6] and sum(it.repeats for it in used) == 40
    used = balance(5, _items(2, repeats=2))  # reg folder repeats count in the first loop
    assert [it.repeats for it in used] == [3, 2]


@pytest.mark.slow
def test_reg_images_drawn_at_kohya_ratio_and_weighted(data, tmp_path):
    from lora_train.data.demo import write_demo_dataset

    reg = write_demo_dataset(str(tmp_path / "reg" / "1_shape"), n=3, size=64, seed=7, captions=False)
    cfg = small_cfg(data, tmp_path / "o", max_train_steps=1, reg_data_dir=os.path.dirname(reg),
                    prior_loss_weight=0.25, validation_split=0.25)
    tr, res = _run(cfg)
    ds = tr.dataset
    regs = [i for i, it in enumerate(ds.items) if it.is_reg]
    assert len(regs) == 3 and sum(ds.items[i].repeats for i in regs) == 8  # as many reg samples as training ones
    assert not set(regs) & set(tr.val_idx)  # reg images are never validation images
    assert all(ds.items[i].caption == "shape" for i in regs)  # no caption files: the class of 1_shape
    assert tr.batches_per_epoch == math.ceil((8 - len(tr.val_idx) + 8) / 2)  # training + reg samples

    t = torch.tensor([10, 10])
    w = tr.kohya.loss_kwargs(tr, [0, regs[0]], [False, False], t, None, (4, 8, 8))["weights"]
    assert w.tolist() == [1.0, 0.25]
    meta = tr.metadata(1, 1)
    assert meta["ss_num_reg_images"] == "3" and meta["ss_prior_loss_weight"] == "0.25"
    assert meta["ss_num_train_images"] == str(8 - len(tr.val_idx))  # validation images out; reg samples apart
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"shape": {"n_repeats": 3, "img_count": 3}}
    # the weight scales each sample's loss
    m = tr.model
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        plain = loss_mod.diffusion_loss(m, lat, cond, noise, t, reduction="none")
        weighted = loss_mod.diffusion_loss(m, lat, cond, noise, t, reduction="none", weights=w)
    assert torch.allclose(weighted, plain * torch.tensor([1.0, 0.25]))


# ---------------------------------------------------------------------------------------------- network_weights
@pytest.fixture(scope="module")
def start_file(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("start")
    cfg = small_cfg(data, out, max_train_steps=3, lora_rank=6, lora_alpha=3, learning_rate=5e-3, output_name="s")
    _, res = _run(cfg)
    return res.lora_path


def _step0_loss(tr):
    assert tr.prepare()  # the public surface: data, caches, network (before any step)
    lat = torch.stack([tr.latents[i] for i in range(4)])
    cond = tr.text_cache.stack([tr.dataset.items[i].caption for i in range(4)])
    return fixed_noise_loss(tr.model, lat, cond, seed=3), lat, cond


@pytest.mark.slow
def test_network_weights_start_from_the_file(data, start_file, tmp_path):
    cfg = small_cfg(data, tmp_path / "o", network_weights=start_file, dim_from_weights=True, lora_rank=4)
    tr = Trainer(cfg, model=build_tiny())
    loss0, lat, cond = _step0_loss(tr)
    ref = build_tiny()
    L.apply(ref, L.load_file(start_file, ref), "file")  # the file as a host applies it
    assert loss0 == pytest.approx(fixed_noise_loss(ref, lat, cond, seed=3), rel=1e-6)
    assert fixed_noise_loss(build_tiny(), lat, cond, seed=3) != pytest.approx(loss0, rel=1e-4)
    layer = next(l for _, l in L.lora_layers(tr.model.unet))
    assert layer.r[L.DEFAULT_ADAPTER] == 6 and layer.lora_alpha[L.DEFAULT_ADAPTER] == 3.0  # from the file
    with pytest.raises(ValueError, match="dim_from_weights"):
        bad = Trainer(small_cfg(data, tmp_path / "o2", network_weights=start_file, lora_rank=4), model=build_tiny())
        _step0_loss(bad)


# ---------------------------------------------------------------------------------------------- block weights
@pytest.mark.slow
def test_block_lr_weights_reach_optimizer_groups(data, tmp_path):
    down = "1,0,1,0.5,1,1,1,1,1,1,1,1"
    cfg = small_cfg(data, tmp_path / "o", max_train_steps=1, learning_rate=1e-3, down_lr_weight=down,
                    mid_lr_weight="2", up_lr_weight="zeros+0.25", block_lr_zero_threshold=0.1)
    tr, res = _run(cfg)
    lrw = blocks.lr_weights(False, down, "2", "zeros+0.25", 0.1)
    seen = {}
    for path, layer in L.lora_layers(tr.model.unet):
        b = blocks.block_index(L.kohya_name("unet", path, "sd1"), False)
        assert lrw[b] > 0, path  # zero-weight blocks get no LoRA module
        p = layer.lora_A[L.DEFAULT_ADAPTER].weight
        group = next(g for g in tr.optimizer.param_groups if any(q is p for q in g["params"]))
        assert group["initial_lr"] == pytest.approx(1e-3 * lrw[b])
        seen[b] = group["initial_lr"]
    assert 2 not in seen and seen[12] == pytest.approx(2e-3)
    assert any(b >= 13 and v == pytest.approx(2.5e-4) for b, v in seen.items())
    meta = tr.metadata(1, 1)
    assert '"down_lr_weight": "1,0,1,0.5' in meta["ss_network_args"]


@pytest.mark.slow
def test_block_dims_and_alphas(data, tmp_path):
    dims = ",".join(["2"] * 12 + ["4"] + ["6"] * 12)
    alphas = ",".join(["1"] * 12 + ["4"] + ["3"] * 12)
    cfg = small_cfg(data, tmp_path / "o", max_train_steps=2, learning_rate=1e-2, block_dims=dims,
                    block_alphas=alphas)
    tr, res = _run(cfg)
    sd = load_file(res.lora_path)
    for k, v in sd.items():
        if k.endswith(".lora_down.weight"):
            name = k.split(".")[0]
            b = blocks.block_index(name, False)
            want = 2 if b < 12 else 4 if b == 12 else 6
            assert v.shape[0] == want, k
            assert float(sd[f"{name}.alpha"]) == (1.0 if b < 12 else 4.0 if b == 12 else 3.0)
    with pytest.raises(ValueError, match="25 blocks"):
        _run(small_cfg(data, tmp_path / "o2", max_train_steps=1, block_dims="4,4"))


def test_sdxl_block_numbering():
    assert blocks.block_index("lora_unet_input_blocks_4_1_proj_in", True) == 5
    assert blocks.block_index("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q", True) == 11
    assert blocks.block_index("lora_unet_output_blocks_8_0_in_layers_2", True) == 21
    assert blocks.block_index("lora_unet_down_blocks_1_attentions_0_proj_in", False) == 4  # IN04
    assert blocks.block_index("lora_unet_down_blocks_2_downsamplers_0_conv", False) == 9
    assert blocks.block_index("lora_unet_up_blocks_3_attentions_2_proj_out", False) == 24
    assert len(blocks.lr_weights(True, "sine", "", "", 0)) == 23


# ---------------------------------------------------------------------------------------------- EMA
@pytest.mark.slow
def test_ema_saved_and_resumed(data, tmp_path):
    def cfg(out):
        return small_cfg(data, tmp_path / out, max_train_steps=5, learning_rate=5e-3, ema_decay=0.9)

    tr, straight = _run(cfg("a"))
    live = L.extract(tr.model)
    saved = load_file(straight.lora_path)
    name, (d_live, _, _) = next((L.kohya_name(c, p, "sd1"), v) for (c, p), v in live.modules.items())
    shadow = dict(zip(tr.kohya.ema.names, tr.kohya.ema.shadow))
    assert not torch.allclose(saved[f"{name}.lora_down.weight"], d_live)  # the file is not the live weights...
    key = next(k for k in shadow if ".lora_A." in k and L.kohya_name("unet", k[len("unet."):].split(".lora_A.")[0],
                                                                      "sd1") == name)
    assert torch.allclose(saved[f"{name}.lora_down.weight"], shadow[key])  # ...but the EMA copy
    assert tr.metadata(1, 5)["ss_ema_decay"] == "0.9"
    tr1, r1 = _run(cfg("b"), stop_at=2)
    assert r1.stopped and os.path.isfile(os.path.join(r1.output_dir, "state", "t-step-00000002", "ema.lrstate"))
    tr2, r2 = _run(cfg("b"), resume_from=r1.output_dir)
    assert r2.steps == 5 and tr2.kohya.ema.updates == 5
    a, b = load_file(straight.lora_path), load_file(r2.lora_path)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


# ---------------------------------------------------------------------------------------------- TensorBoard
@pytest.mark.slow
def test_tensorboard_events_readable_by_tensorboard(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_cfg(data, tmp_path / "o", epochs=2, train_text_encoder=True, validation_split=0.25,
                    log_with="tensorboard", logging_dir=str(tmp_path / "logs"), log_prefix="run_",
                    sample_every_n_epochs=2, sample_prompts=["lrtdemo"], sample_steps=2)
    tr, res = _run(cfg)
    runs = os.listdir(tmp_path / "logs")
    assert len(runs) == 1 and runs[0].startswith("run_")
    acc = EventAccumulator(str(tmp_path / "logs" / runs[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/current", "loss/average", "lr/unet", "lr/te", "grad_norm", "loss/validation",
            "loss/epoch"} <= set(tags["scalars"])
    assert "samples/image" in tags["images"]
    cur = acc.Scalars("loss/current")
    assert [e.step for e in cur] == list(range(1, res.steps + 1))
    assert [e.value for e in cur] == pytest.approx(res.losses, rel=1e-6)
    assert acc.Scalars("lr/te")[-1].value == pytest.approx(tr.last_lrs[1])


@pytest.mark.slow
def test_wandb_logging_through_its_api(data, tmp_path, monkeypatch):
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step=None):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"].append(kw)
        return Run()

    import importlib.machinery

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init, fake.Image = init, (lambda arr: ("image", arr.shape))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = small_cfg(data, tmp_path / "o", max_train_steps=2, log_with="wandb", log_prefix="proj")
    tr, res = _run(cfg)
    assert calls["init"][0]["project"] == "proj" and calls["init"][0]["config"]["log_with"] == "wandb"
    steps = [s for s, v in calls["log"] if "loss/current" in v]
    assert steps == [1, 2] and calls["finish"] == 1
    assert not os.path.isdir(tmp_path / "o" / "logs" / "events")  # no TensorBoard writer for log_with wandb


@pytest.mark.slow
def test_sdxl_block_weights_and_long_captions(data, tmp_path):
    from lora_train.models.tiny import build_tiny_sdxl

    cfg = small_cfg(data, tmp_path / "o", max_train_steps=1, learning_rate=1e-3, down_lr_weight="0,0,0,1,1,1,1,1,1",
                    up_lr_weight="sine", max_token_length=150)
    tr = Trainer(cfg, model=build_tiny_sdxl())
    tr.run()
    lrw = blocks.lr_weights(True, "0,0,0,1,1,1,1,1,1", "", "sine", 0.0)
    assert len(lrw) == 23
    found = set()
    for path, layer in L.lora_layers(tr.model.unet):
        b = blocks.block_index(L.kohya_name("unet", path, "sdxl"), True)
        assert b not in (1, 2, 3), path  # lr weight 0: no module (SGM input_blocks 0-2)
        p = layer.lora_A[L.DEFAULT_ADAPTER].weight
        group = next(g for g in tr.optimizer.param_groups if any(q is p for q in g["params"]))
        assert group["initial_lr"] == pytest.approx(1e-3 * lrw[b])
        found.add(b)
    assert any(13 <= b <= 21 for b in found) and any(10 <= b <= 12 for b in found)
