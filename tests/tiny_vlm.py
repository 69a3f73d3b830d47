"""A tiny random LLaVA-style chat VLM (CLIP vision 2 layers, Llama 2 layers, the byte-level BPE tokenizer of
lora_train.models.qwen_image made offline) written as a model folder, as a downloaded JoyCaption / LLaVA folder is
laid out: for the VLM captioner's tests."""
import torch

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
            "'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_llava(folder: str) -> str:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the PIL one is the only one
        from transformers import CLIPImageProcessor as ImageProcessor

    from lora_train.models.qwen_image import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    proc = LlavaProcessor(image_processor=ImageProcessor(size={"shortest_edge": 28},
                                                         crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=28, patch_size=14),
                      text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                                              eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    proc.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
