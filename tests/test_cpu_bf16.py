"""mixed_precision "bf16" on a CPU: frozen weights stored in bf16, computed in fp32 (training/cpu_bf16.py), and
single-file loads that build the UNet in bf16 (models.single_file.unet_dtype)."""
import torch
from torch import nn

from conftest import small_cfg
from lora_train.models.single_file import load_single_file, unet_dtype
from ldm_writers import write_original_checkpoint
from lora_train.models.tiny import build_tiny_sdxl
from lora_train.training import cpu_bf16
from lora_train.training.trainer import Trainer


def test_precision_choices():
    assert cpu_bf16.accelerate_precision("bf16", "cpu") == "no"
    assert cpu_bf16.accelerate_precision("bf16", "cuda") == "bf16"
    assert cpu_bf16.accelerate_precision("fp16", "cpu") == "fp16"
    assert cpu_bf16.unet_load_dtype("bf16", "cpu") == torch.bfloat16
    assert cpu_bf16.unet_load_dtype("no", "cpu") is None and cpu_bf16.unet_load_dtype("bf16", "cuda") is None


def test_unet_dtype_context_loads_the_unet_in_bf16(tmp_path):
    path = write_original_checkpoint(build_tiny_sdxl(), str(tmp_path / "xl.safetensors"))
    with unet_dtype(torch.bfloat16):
        m = load_single_file(path, config=build_tiny_sdxl())
    assert {p.dtype for p in m.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m.text_encoder_2.parameters()} == {torch.float32}
    assert {p.dtype for p in m.vae.parameters()} == {torch.float32}
    m2 = load_single_file(path, config=build_tiny_sdxl())  # outside: the load's dtype again
    assert {p.dtype for p in m2.unet.parameters()} == {torch.float32}
    for (k, a), b in zip(m.unet.state_dict().items(), m2.unet.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16)), k


def test_store_frozen_bf16_computes_in_fp32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 16, 4))
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        rounded = [p.detach().to(torch.bfloat16).float() if p.dim() > 1 else p.detach().clone()
                   for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    n = cpu_bf16.store_frozen_bf16(net)
    assert n == 2
    assert net[0].weight.dtype == net[3].weight.dtype == torch.bfloat16
    assert net[1].weight.dtype == net[0].bias.dtype == torch.float32
    y = net(x)
    assert y.dtype == torch.float32
    w_conv, b_conv, g_w, g_b, w_lin, b_lin = rounded
    h = nn.functional.conv2d(x, w_conv, b_conv, padding=1)
    h = nn.functional.group_norm(h, 2, g_w, g_b).flatten(1)
    torch.testing.assert_close(y, nn.functional.linear(h, w_lin, b_lin))


def test_tiny_sdxl_trains_with_bf16_on_cpu(tmp_path):
    from lora_train.data.demo import write_demo_dataset

    data = write_demo_dataset(str(tmp_path / "data"), n=2, size=64)
    runs = {}
    for mp in ("no", "bf16"):
        events = []
        cfg = small_cfg(data, tmp_path / mp, output_name="xl", max_train_steps=2, learning_rate=5e-3,
                        mixed_precision=mp, device="cpu")
        tr = Trainer(cfg, model=build_tiny_sdxl(), callback=events.append)
        runs[mp] = (tr, tr.run(), events)
    tr, res, events = runs["bf16"]
    assert res.steps == 2 and all(0 < x < 10 for x in res.losses)
    assert any("stored in bf16, computed in fp32" in (e.get("message") or "") for e in events)
    assert tr.accelerator.mixed_precision == "no"  # no bf16 autocast on the CPU
    unet = tr.model.unet
    frozen = [m for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and "lora_" not in n]
    assert frozen and all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert all(p.dtype == torch.float32 for p in tr.trainable)
    assert unet.is_gradient_checkpointing
    # the first step's loss is the fp32 run's up to the bf16 rounding of the weights
    assert abs(res.losses[0] - runs["no"][1].losses[0]) < 0.05 * runs["no"][1].losses[0]


def test_stored_linear_keeps_the_bf16_weight_for_backward():
    """A frozen Linear stored in bf16: the same output and input / bias gradients as upcasting it by hand, and
    autograd saves the bf16 weight, not an fp32 copy (what made a checkpointed block's backward hold every upcast
    weight at once)."""
    import torch
    from torch import nn

    from lora_train.training.cpu_bf16 import store_frozen_bf16

    torch.manual_seed(0)
    lin = nn.Linear(64, 256)
    lin.requires_grad_(False)
    lin.bias.requires_grad_(True)
    ref_w = lin.weight.detach().to(torch.bfloat16).float()
    store_frozen_bf16(nn.Sequential(lin))
    assert lin.weight.dtype == torch.bfloat16
    x = torch.randn(3, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    assert all(not (d == torch.float32 and n == 64 * 256) for d, n in saved), saved
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = lin.bias.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, ref_w, b2)
    y2.square().sum().backward()
    assert torch.equal(y, y2) and torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(lin.bias.grad, b2.grad, atol=1e-5)


def test_stored_linear_in_row_chunks_equals_one_piece(monkeypatch):
    """A weight upcast in row chunks gives the same output and input gradient as upcast whole."""
    import torch

    from lora_train.training import cpu_bf16

    torch.manual_seed(1)
    w = torch.randn(10, 6).to(torch.bfloat16)
    b = torch.randn(10)
    x = torch.randn(4, 6, requires_grad=True)
    y = cpu_bf16.stored_linear(x, w, b)
    y.sum().backward()
    g_whole = x.grad.clone()
    monkeypatch.setattr(cpu_bf16, "CHUNK_ROWS", 3)
    x.grad = None
    y3 = cpu_bf16.stored_linear(x, w, b)
    y3.sum().backward()
    assert torch.allclose(y, y3, atol=1e-6) and torch.allclose(x.grad, g_whole, atol=1e-6)
