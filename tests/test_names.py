"""Exported module names at full size (meta device, no weights) equal kohya's canonical lists."""
from types import SimpleNamespace

import torch

from lora_train.networks import lora as L

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")


def sd15_on_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    return SimpleNamespace(unet=unet, text_encoder=te, text_encoder_2=None, kind="sd1")


def test_sd15_names_equal_reference(reference_names):
    model = sd15_on_meta()
    names = L.name_map(model)
    unet = sorted(n for n in names if n.startswith("lora_unet_"))
    te = sorted(n for n in names if n.startswith("lora_te_"))
    assert len(unet) == 192 and len(te) == 72
    assert unet == sorted(reference_names["sd15"]["unet"])
    assert te == sorted(reference_names["sd15"]["te"])


def test_te_names_keep_text_model_level():
    assert L.kohya_name("te", "encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert L.kohya_name("te", "text_model.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
