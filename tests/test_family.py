"""lora_train/family.py: one place tells a base model's family (Flux and SD3 included), and every front door's family
list is its FAMILIES."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from lora_train.family import FAMILIES, family_of, told_by_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("spec, fam", [("tiny", "sd1"), ("tiny-v", "sd1"), ("tiny-sd2", "sd2"), ("tiny-sdxl", "sdxl"),
                                       ("tiny-flux", "flux"), ("tiny-flux-schnell", "flux"), ("tiny-sd3", "sd3"),
                                       ("tiny-qwen-image", "qwen_image")])
def test_tiny_specs(spec, fam):
    assert family_of(spec)[0] == fam


def test_folders_files_and_names(tmp_path):
    for cls, extra, fam in (("FluxPipeline", {}, "flux"), ("StableDiffusion3Pipeline", {}, "sd3"),
                            ("QwenImagePipeline", {}, "qwen_image"), ("Flux2KleinPipeline", {}, "flux2"),
                            ("StableDiffusionXLPipeline", {"text_encoder_2": ["x", "y"]}, "sdxl"),
                            ("StableDiffusionPipeline", {}, "sd1")):
        d = tmp_path / cls
        d.mkdir()
        (d / "model_index.json").write_text(json.dumps({"_class_name": cls, **extra}))
        assert family_of(str(d))[0] == fam, cls

    for keys, fam in ((["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "flux"),
                      (["joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
                      (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                        "double_stream_modulation_img.lin.weight"], "flux2"),  # Flux.2's global modulation
                      (["model.diffusion_model.txt_norm.weight",  # a ComfyUI-style Qwen-Image diffusion model
                        "model.diffusion_model.transformer_blocks.0.txt_mod.1.weight"], "qwen_image"),
                      (["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.out.0.weight"], "sdxl"),
                      (["cond_stage_model.model.ln_final.weight"], "sd2"),
                      (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "sd1")):
        p = tmp_path / f"{fam}_file.safetensors"  # the name says nothing: the header tells
        save_file({k: torch.zeros(1) for k in keys}, str(p))
        assert family_of(str(p))[0] == fam and told_by_spec(str(p))[0] == fam
    assert family_of("/nowhere/ponyDiffusionV6XL.safetensors")[0] == "sdxl"  # only the name is left
    assert family_of("/nowhere/qwen_image_fp8_e4m3fn.safetensors")[0] == "qwen_image"
    # the 2026 releases' ComfyUI file names (Qwen-Image-2512 is Qwen-Image's architecture with new weights)
    for name, fam in (("qwen_image_2512_bf16", "qwen_image"), ("z_image_base_bf16", "z_image"),
                      ("flux2-dev", "flux2"), ("flux-2-klein-9b", "flux2"), ("Chroma1-HD-fp8", "chroma"),
                      ("wan2.2_t2v_low_noise_14B_fp8_scaled", "wan"), ("wan2.2_ti2v_5B_fp16", "wan")):
        assert family_of(f"/nowhere/{name}.safetensors")[0] == fam, name
    assert told_by_spec("/nowhere/ponyDiffusionV6XL.safetensors") is None
    fam, why = family_of("/nowhere/model.safetensors")
    assert fam == "sd1" and "assumed" in why


def test_every_front_door_lists_the_families():
    from lora_train.cli.main import build_parser
    from lora_train.tuning.advisor import BASES
    from lora_train.ui import logic
    from lora_train.presets import BUILTIN_FAMILIES

    assert FAMILIES == ("sd1", "sd2", "sdxl", "flux", "sd3", "qwen_image", "z_image", "chroma", "wan", "flux2")
    assert tuple(BASES) == FAMILIES and tuple(BUILTIN_FAMILIES) == FAMILIES
    assert tuple(logic.MODEL_TYPES) == ("auto",) + FAMILIES
    auto = build_parser()._subparsers._group_actions[0].choices["auto"]
    family = next(a for a in auto._actions if a.dest == "family")
    assert tuple(family.choices) == FAMILIES
    sys.path.insert(0, os.path.dirname(ROOT))
    src = open(os.path.join(ROOT, "nodes", "auto_node.py"), encoding="utf-8").read()
    assert 'FAMILIES = ("auto",) + MODEL_FAMILIES' in src  # the node's list is the same tuple


def test_auto_tells_a_flux_base(tmp_path):
    from lora_train.auto.pipeline import family_of as auto_family

    assert auto_family("tiny-flux")[0] == "flux" and auto_family("tiny-sd3")[0] == "sd3"


def test_the_tiny_specs_are_the_ones_the_loader_builds():
    from lora_train.family import TINY_FAMILIES
    from lora_train.models.flow_loading import TINY_FLOW_SPECS
    from lora_train.models.loading import TINY_SPECS

    from lora_train import families

    assert set(TINY_SPECS) == set(TINY_FAMILIES) and set(TINY_FLOW_SPECS) <= set(TINY_SPECS)
    assert TINY_FLOW_SPECS == families.TINY_FLOW_SPECS
