"""The GPU paths users run, each checked against the fp32 reference on the same batches: fp16 with loss scaling,
bf16, 8-bit AdamW, gradient checkpointing, torch.compile, fp8 base weights and block swap (Flux), with the LoRA
weights kept in fp32. The device is $LORA_TRAIN_GPU_TEST_DEVICE, else CUDA when there is one; without either the
module is skipped. bench/gpu_check.sh runs it on the GPU machine; its `--dry-run` runs it on the CPU
(LORA_TRAIN_GPU_TEST_DEVICE=cpu: the cases a CPU can run, same code), so the file cannot rot between GPU runs.

    pytest -m gpu tests/test_gpu.py                                  # on a GPU machine
    LORA_TRAIN_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py   # the dry run
"""
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import _flow_training_importable, small_cfg
from lora_train.models.flux import build_tiny_flux
from lora_train.models.tiny import build_tiny
from lora_train.training.trainer import Trainer

DEVICE = os.environ.get("LORA_TRAIN_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(not DEVICE, reason="needs a CUDA GPU (or LORA_TRAIN_GPU_TEST_DEVICE=cpu)")]
STEPS = 4


def _bf16_ok() -> bool:
    return (torch.cuda.is_bf16_supported() if ON_CUDA else True)


#: name -> (the config's changes, builder, relative tolerance of the mean step loss against fp32, needs CUDA)
CASES = {
    "fp16_scaler": (dict(mixed_precision="fp16"), build_tiny, 0.05, True),
    "bf16": (dict(mixed_precision="bf16"), build_tiny, 0.05, False),
    "adamw8bit": (dict(optimizer="AdamW8bit"), build_tiny, 0.05, True),
    "checkpointing": (dict(gradient_checkpointing=True), build_tiny, 1e-3, False),
    "compile": (dict(torch_compile=True), build_tiny, 0.01, True),
    "flux_fp8_base": (dict(fp8_base=True), build_tiny_flux, 0.10, False),
    "flux_block_swap": (dict(blocks_to_swap=2, gradient_checkpointing=True), build_tiny_flux, 1e-3, False),
}


def _cfg(data, out, **kw):
    return small_cfg(data, out, max_train_steps=STEPS, learning_rate=1e-4, batch_size=2, device=DEVICE,
                     gradient_checkpointing=kw.pop("gradient_checkpointing", False), **kw)


def _run(cfg, build):
    tr = Trainer(cfg, model=build())
    return tr, tr.run()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("gpu_data")), n=8, size=64)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """fp32 runs (per model builder, made when a case first needs it) on the same seed and batches: the losses
    every case is held to."""
    out = {}

    def losses(build):
        if build not in out:
            _, res = _run(_cfg(data, tmp_path_factory.mktemp("ref")), build)
            assert res.steps == STEPS and all(math.isfinite(x) for x in res.losses)
            out[build] = res.losses
        return out[build]

    return losses


@pytest.mark.parametrize("case", list(CASES))
def test_case_matches_the_fp32_reference(case, data, reference, tmp_path):
    change, build, tol, cuda_only = CASES[case]
    if cuda_only and not ON_CUDA:
        pytest.skip(f"{case} needs CUDA")
    if change.get("mixed_precision") == "bf16" and not _bf16_ok():
        pytest.skip("this GPU has no bf16")
    if change.get("optimizer") == "AdamW8bit":
        pytest.importorskip("bitsandbytes")
    if build is build_tiny_flux and not _flow_training_importable():
        pytest.skip("Flux training needs diffusers.training_utils, which does not import at these versions "
                    "(AUTOMATIC1111's transformers 4.30.2)")
    if change.get("mixed_precision") == "fp16" or (build is build_tiny_flux and ON_CUDA):
        change = dict(change, mixed_precision=change.get("mixed_precision") or ("bf16" if _bf16_ok() else "fp16"))
    tr, res = _run(_cfg(data, tmp_path, **change), build)
    ref = reference(build)
    assert res.steps == STEPS and all(math.isfinite(x) for x in res.losses), res.losses
    mean, ref_mean = sum(res.losses) / STEPS, sum(ref) / STEPS
    print(f"[gpu-check] {case} on {DEVICE}: mean loss {mean:.6f} vs fp32 {ref_mean:.6f} "
          f"(rel {abs(mean - ref_mean) / ref_mean:.2e}, tol {tol})")
    assert abs(mean - ref_mean) <= tol * ref_mean, (case, res.losses, ref)
    # the LoRA weights train and are saved in fp32 whatever the base precision
    lora = [p for n, p in tr.model.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    sd = load_file(res.lora_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    if change.get("mixed_precision") == "fp16":
        assert tr.accelerator.scaler is not None  # fp16 trains with loss scaling
    if change.get("optimizer") == "AdamW8bit":
        assert "8bit" in tr.optimizer_desc
    if ON_CUDA and build is build_tiny and change.get("mixed_precision"):
        want = {"fp16": torch.float16, "bf16": torch.bfloat16}[change["mixed_precision"]]
        base = [p for n, p in tr.model.unet.named_parameters() if "lora_" not in n]
        assert base and all(p.dtype == want and p.is_cuda for p in base)
        # the frozen text encoder was cached and then left the GPU
        assert all(not p.is_cuda for p in tr.model.text_encoder.parameters())
