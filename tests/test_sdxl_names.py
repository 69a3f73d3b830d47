"""SDXL kohya names: diffusers UNet paths <-> SGM block paths, checked against kohya's own list."""
from types import SimpleNamespace

import pytest
import torch

from lora_train.networks import lora as L
from lora_train.networks.sdxl_names import diffusers_to_sgm_path, sgm_to_diffusers_path, unet_layout


@pytest.fixture(scope="module")
def sdxl_meta():
    from lora_train.models.single_file import meta_model

    return meta_model("sdxl_base")


def test_sdxl_names_equal_reference(reference_names, sdxl_meta):
    m = sdxl_meta
    names = L.name_map(SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                       kind="sdxl"))
    unet = sorted(n for n in names if n.startswith("lora_unet_"))
    te = sorted(n for n in names if n.startswith(("lora_te1_", "lora_te2_")))
    assert len(unet) == 722 and len(te) == 264 and len(names) == 722 + 264
    assert unet == sorted(reference_names["sdxl"]["unet"])
    assert te == sorted(reference_names["sdxl"]["te"])


@pytest.mark.parametrize("d,s", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
     "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj"),
    ("mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0",
     "middle_block.1.transformer_blocks.3.attn2.to_out.0"),
    ("up_blocks.0.attentions.0.proj_out", "output_blocks.0.1.proj_out"),
    ("up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k", "output_blocks.5.1.transformer_blocks.1.attn2.to_k"),
    ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight"),
    ("down_blocks.1.resnets.0.conv_shortcut.bias", "input_blocks.4.0.skip_connection.bias"),
    ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
    ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
    ("up_blocks.2.resnets.2.norm2.weight", "output_blocks.8.0.out_layers.0.weight"),
    ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("time_embedding.linear_1.weight", "time_embed.0.weight"),
    ("conv_norm_out.weight", "out.0.weight"),
])
def test_known_paths(d, s):
    assert diffusers_to_sgm_path(d) == s
    assert sgm_to_diffusers_path(s) == d


def test_kohya_name_examples():
    assert L.kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert L.kohya_name("unet", "mid_block.attentions.0.proj_in", "sdxl") == "lora_unet_middle_block_1_proj_in"
    assert L.kohya_name("unet", "up_blocks.0.attentions.0.proj_in", "sdxl") == "lora_unet_output_blocks_0_1_proj_in"


def _roundtrip_all(unet):
    layout = unet_layout(unet)
    keys = list(unet.state_dict())
    sgm = [diffusers_to_sgm_path(k, **layout) for k in keys]
    assert len(set(sgm)) == len(keys)  # one-to-one
    assert [sgm_to_diffusers_path(s, layout["layers_per_block"]) for s in sgm] == keys


def test_every_unet_parameter_round_trips(sdxl_meta):
    from diffusers import UNet2DConditionModel

    from lora_train.models.single_file import bundled_config_dir

    _roundtrip_all(sdxl_meta.unet)
    with torch.device("meta"):  # SD1.5: an UpBlock2D with upsampler first (output_blocks.2.1.conv)
        sd15 = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(bundled_config_dir("sd15") + "/unet"))
    _roundtrip_all(sd15)
    assert diffusers_to_sgm_path("up_blocks.0.upsamplers.0.conv.weight", **unet_layout(sd15)) == \
        "output_blocks.2.1.conv.weight"


def test_tiny_sdxl_names():
    from diffusers import UNet2DConditionModel

    from lora_train.models.tiny import TINY_SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    assert unet_layout(unet)["layers_per_block"] == 2  # same SGM numbering as SDXL: kohya_name needs no layout
    _roundtrip_all(unet)
    names = [L.kohya_name("unet", p, "sdxl") for p in L.unet_target_modules(unet)]
    assert len(set(names)) == len(names) > 0
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"))
               for n in names)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in names  # 2 transformer layers at level 1
    assert "lora_unet_output_blocks_2_1_proj_out" in names


def test_not_unet_paths_raise():
    for bad in ("text_model.encoder.layers.0.mlp.fc1", "foo.bar"):
        with pytest.raises(ValueError):
            diffusers_to_sgm_path(bad)
    with pytest.raises(ValueError):
        sgm_to_diffusers_path("model.diffusion_model.input_blocks.1.1.proj_in")  # prefix is the caller's business
