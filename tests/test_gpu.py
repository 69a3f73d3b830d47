"""CUDA paths users run (skipped without a GPU): mixed precision with fp32 LoRA weights, fp16 loss scaling,
frozen text encoders off the GPU after caching, gradient checkpointing, AdamW8bit. Run on a GPU machine with
`pytest -m gpu tests/test_gpu.py`."""
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_cfg
from lora_train.models.tiny import build_tiny
from lora_train.training.trainer import Trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(cfg):
    tr = Trainer(cfg, model=build_tiny())
    res = tr.run()
    return tr, res


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_keeps_lora_weights_fp32(demo_data, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = small_cfg(demo_data, tmp_path, max_train_steps=6, mixed_precision=precision, device="cuda",
                    gradient_checkpointing=True)
    tr, res = _run(cfg)
    assert res.steps == 6 and all(math.isfinite(x) for x in res.losses)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    base = [p for n, p in tr.model.unet.named_parameters() if "lora_" not in n]
    lora = [p for n, p in tr.model.unet.named_parameters() if "lora_" in n]
    assert base and all(p.dtype == want and p.is_cuda for p in base)
    assert lora and all(p.dtype == torch.float32 for p in lora)
    # the frozen text encoder was cached and then left the GPU
    assert all(not p.is_cuda for p in tr.model.text_encoder.parameters())
    sd = load_file(res.lora_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())


def test_fp16_uses_loss_scaling(demo_data, tmp_path):
    cfg = small_cfg(demo_data, tmp_path, max_train_steps=2, mixed_precision="fp16", device="cuda")
    tr, res = _run(cfg)
    assert tr.accelerator.scaler is not None and res.steps == 2


def test_adamw8bit_when_bitsandbytes_is_installed(demo_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = small_cfg(demo_data, tmp_path, max_train_steps=3, optimizer="AdamW8bit", device="cuda",
                    mixed_precision="bf16" if torch.cuda.is_bf16_supported() else "fp16")
    tr, res = _run(cfg)
    assert res.steps == 3 and all(math.isfinite(x) for x in res.losses)
    assert "8bit" in tr.optimizer_desc
