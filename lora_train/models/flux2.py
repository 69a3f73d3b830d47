"""FLUX.2 [klein] 4B / 9B and FLUX.2 [dev]: the tiny test models, diffusers Flux2KleinPipeline / Flux2Pipeline folders.

BaseModel for kind "flux2": unet = Flux2Transformer2DModel, vae = AutoencoderKLFlux2 (32 latent channels, patchified
2x2 to 128 and normalised by its batch-norm running statistics), noise_scheduler = FlowMatchEulerDiscreteScheduler;
extra["variant"] "flux2-klein-4b" | "flux2-klein-9b" (told by the transformer's width) | "flux2-dev" (the transformer
has a guidance input: dev is guidance-distilled), extra["text_layers"]: the text encoder's hidden states the
pipeline stacks.
- klein: text_encoder = Qwen3ForCausalLM (4B: Qwen3 4B, 9B: Qwen3 8B), tokenizer = Qwen2Tokenizer with Qwen3's chat
  template, layers (9, 18, 27).
- dev: text_encoder = Mistral3ForConditionalGeneration (Mistral Small 3.1 24B; only its language model runs),
  tokenizer = the release's tokenizer/ folder read as a tokenizer (the PixtralProcessor there needs torchvision for
  its image half, which captions do not use; its chat template from chat_template.jinja / .json when the tokenizer
  config has none), layers (10, 20, 30), prompts in Flux2Pipeline's system + user messages.

Needs diffusers >= 0.37 (Flux2KleinPipeline) and transformers >= 4.51 (Qwen3), for dev transformers >= 4.50
(Mistral3); `require()` says so by name.

`tiny-flux2-klein` (random, seeded weights): transformer 2 double + 2 single blocks, 2 heads x 16, rope axes
(4, 4, 4, 4), text width 3 x 16; VAE 8 latent channels (32 after patchifying), 3 levels (factor 4 then the 2x2
patch: 64 px -> 8 x 8 tokens), batch-norm statistics measured on procedural images; Qwen3 16 wide, 3 layers (all
three stacked); the byte-level BPE tokenizer made here (models/qwen_image.py) with the tiny chat template.
`tiny-flux2-dev`: the same transformer with a guidance input, and a Mistral3 of 16 wide, 3 layers (all three
stacked) with a 1-layer Pixtral vision tower, over the same byte-level BPE with Mistral's special tokens and a chat
template of Mistral's form ([SYSTEM_PROMPT] .. [/SYSTEM_PROMPT][INST] .. [/INST]).
"""
from __future__ import annotations

import os

from .base import BaseModel, ModelError
from .base import require as base_require
from .tiny import seeded

TINY_SEED = 9191
TINY_RESOLUTION = 64
PIPELINES = ("Flux2KleinPipeline", "Flux2Pipeline")
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)
TINY_TEXT_LAYERS = (1, 2, 3)
TINY_TRANSFORMER = dict(patch_size=1, in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
TINY_VAE = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=8, norm_num_groups=8,
                sample_size=TINY_RESOLUTION)
TINY_MISTRAL = dict(model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)
TINY_PIXTRAL = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, head_dim=8, patch_size=8, image_size=64)
MISTRAL_SPECIAL = ("<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                   "[IMG_BREAK]", "[IMG_END]")
#: Mistral's chat form for system / user / assistant messages whose content is a string or a list of text parts
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['content'] is string %}"
    "{% set text = message['content'] %}{% else %}{% set text = message['content'] | selectattr('type', 'equalto', "
    "'text') | map(attribute='text') | join('') %}{% endif %}{% if message['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")
#: the text encoders' hidden states each variant's pipeline stacks (Flux2KleinPipeline / Flux2Pipeline defaults)
TEXT_LAYERS = {"klein": (9, 18, 27), "dev": (10, 20, 30)}
#: the tiny models' text length: dev's prompt starts with Flux2Pipeline's system message (92 tokens here)
TINY_TEXT_LENGTH = {"klein": 64, "dev": 128}
#: FLUX.2 [klein]'s scheduler (black-forest-labs/FLUX.2-klein-4B scheduler/scheduler_config.json)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def require(dev: bool = False) -> None:
    """A ModelError naming the versions when this environment's diffusers / transformers lack FLUX.2 [klein] (or,
    with `dev`, FLUX.2 [dev])."""
    if dev:
        base_require("FLUX.2 [dev]", [("transformers", ("Mistral3ForConditionalGeneration",), "transformers >= 4.50"),
                                      ("diffusers", ("AutoencoderKLFlux2", "Flux2Pipeline", "Flux2Transformer2DModel"),
                                       "diffusers >= 0.36")])
        return
    base_require("FLUX.2", [("diffusers", ("AutoencoderKLFlux2", "Flux2KleinPipeline", "Flux2Transformer2DModel"),
                             "diffusers >= 0.37"), ("transformers", ("Qwen3ForCausalLM",), "transformers >= 4.51")])


def variant_of(transformer) -> str:
    """dev is guidance-distilled (a guidance input); klein 9B is 4096 wide, 4B 3072."""
    c = transformer.config
    if bool(getattr(c, "guidance_embeds", False)):
        return "flux2-dev"
    return "flux2-klein-9b" if int(c.num_attention_heads) * int(c.attention_head_dim) >= 4096 else "flux2-klein-4b"


def is_dev(model) -> bool:
    return model.extra.get("variant") == "flux2-dev"


def calibrate_vae(vae) -> None:
    """The tiny VAE's batch-norm running statistics (over its patchified latents) from structured test images, as
    the released VAE carries them."""
    import numpy as np
    import torch

    from ..data.demo import procedural_images
    from ..families.flux2 import patchify

    imgs = procedural_images(8, TINY_RESOLUTION, seed=7)
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1) for im in imgs])
    with torch.no_grad():
        lat = patchify(vae.encode(x).latent_dist.mean)
        vae.bn.running_mean.copy_(lat.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(lat.var(dim=(0, 2, 3)))


def build_tiny_flux2_klein(seed: int = TINY_SEED) -> BaseModel:
    """`tiny-flux2-klein`: see the module docstring."""
    require()
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .z_image import tiny_tokenizer

    tok = tiny_tokenizer()
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    tr = seeded(seed, lambda: Flux2Transformer2DModel(**TINY_TRANSFORMER))
    vae = seeded(seed + 1, lambda: AutoencoderKLFlux2(**TINY_VAE))
    te = seeded(seed + 2, lambda: Qwen3ForCausalLM(Qwen3Config(**TINY_TEXT, vocab_size=len(tok), pad_token_id=pad,
                                                               bos_token_id=pad, eos_token_id=pad)))
    calibrate_vae(vae)
    for m in (tr, vae, te):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=tok,
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), kind="flux2",
                     name="tiny-flux2-klein", path="tiny-flux2-klein", native_resolution=TINY_RESOLUTION,
                     extra={"variant": "flux2-klein-4b", "text_default_length": 64, "text_layers": TINY_TEXT_LAYERS})


def mistral_tokenizer():
    """The tiny dev model's tokenizer: the byte-level BPE of models/qwen_image.py with Mistral's special tokens and
    chat form."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from .qwen_image import _tiny_tokenizer_json

    tk = Tokenizer.from_str(_tiny_tokenizer_json())
    tk.add_special_tokens(list(MISTRAL_SPECIAL))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=1024)
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def build_tiny_flux2_dev(seed: int = TINY_SEED + 10) -> BaseModel:
    """`tiny-flux2-dev`: see the module docstring."""
    require(dev=True)
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = mistral_tokenizer()
    cfg = Mistral3Config(text_config=dict(TINY_MISTRAL, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                         vision_config=TINY_PIXTRAL, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                         spatial_merge_size=2, multimodal_projector_bias=False)
    tr = seeded(seed, lambda: Flux2Transformer2DModel(**dict(TINY_TRANSFORMER, guidance_embeds=True)))
    vae = seeded(seed + 1, lambda: AutoencoderKLFlux2(**TINY_VAE))
    te = seeded(seed + 2, lambda: Mistral3ForConditionalGeneration(cfg))
    calibrate_vae(vae)
    for m in (tr, vae, te):
        m.eval().requires_grad_(False)
    return BaseModel(unet=tr, vae=vae, text_encoder=te, tokenizer=tok,
                     noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), kind="flux2",
                     name="tiny-flux2-dev", path="tiny-flux2-dev", native_resolution=TINY_RESOLUTION,
                     extra={"variant": "flux2-dev", "text_default_length": TINY_TEXT_LENGTH["dev"],
                            "text_layers": TINY_TEXT_LAYERS})


def pipeline_class(model) -> str:
    return "Flux2Pipeline" if is_dev(model) else "Flux2KleinPipeline"


def save_flux2_folder(model: BaseModel, folder: str) -> str:
    """Write a FLUX.2 BaseModel as its diffusers pipeline folder (Flux2KleinPipeline; dev: Flux2Pipeline)."""
    import diffusers

    cls = getattr(diffusers, pipeline_class(model))
    cls(scheduler=model.noise_scheduler, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        transformer=model.unet).save_pretrained(folder, safe_serialization=True)
    return folder


def _chat_template(folder: str):
    """The chat template a tokenizer/ folder keeps beside its tokenizer config (chat_template.jinja, or the
    processor's chat_template.json), or None."""
    import json

    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def load_flux2_folder(folder: str, transformer=None) -> BaseModel:
    """A diffusers Flux2KleinPipeline folder (transformer/, vae/, text_encoder/ (Qwen3), tokenizer/, scheduler/) or a
    Flux2Pipeline (dev) folder (text_encoder/ = Mistral3); with `transformer` given (a single file's), the folder's
    own transformer/ is not read."""
    import json

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
        dev = json.load(fh).get("_class_name") == "Flux2Pipeline"
    require(dev=dev)
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import AutoTokenizer

    from .diffusers_folder import load_components

    if dev:
        from transformers import Mistral3ForConditionalGeneration as TextEncoder
    else:
        from transformers import Qwen3ForCausalLM as TextEncoder
    te_name = "Mistral3" if dev else "Qwen3"
    parts = [("vae", AutoencoderKLFlux2), ("text_encoder", TextEncoder), ("tokenizer", AutoTokenizer),
             ("scheduler", FlowMatchEulerDiscreteScheduler)]
    if transformer is None:
        parts.insert(0, ("transformer", Flux2Transformer2DModel))
    title = "FLUX.2 [dev]" if dev else "FLUX.2 [klein]"
    c = load_components(folder, parts, f"{title} diffusers folder",
                        f"transformer/, vae/, text_encoder/ ({te_name}), tokenizer/ and scheduler/ with their weights")
    tr = c["transformer"] if transformer is None else transformer
    te, tok = c["text_encoder"], c["tokenizer"]
    if tok.chat_template is None:
        tok.chat_template = _chat_template(os.path.join(folder, "tokenizer"))
    if tok.chat_template is None:
        raise ModelError(f"the tokenizer in '{folder}' has no chat template: {title}'s prompts go through "
                         f"{te_name}'s (tokenizer/chat_template.jinja or chat_template.json in the release).")
    if (variant_of(tr) == "flux2-dev") != dev:
        raise ModelError(f"'{folder}' is a {title} folder but its transformer is "
                         f"{'not ' if dev else ''}guidance-distilled (FLUX.2 [dev] is, [klein] is not): use the "
                         f"transformer of the same release.")
    small = int(tr.config.num_layers) < 4
    n = int(getattr(te.config, "text_config", te.config).num_hidden_layers)
    extra = {"variant": variant_of(tr), "text_layers": TINY_TEXT_LAYERS if small else TEXT_LAYERS["dev" if dev else
                                                                                                    "klein"]}
    if small:
        extra["text_default_length"] = TINY_TEXT_LENGTH["dev" if dev else "klein"]
    if n < max(extra["text_layers"]):
        raise ModelError(f"the text encoder in '{folder}' has {n} layers; {title} stacks hidden states "
                         f"{extra['text_layers']}: use the release's {te_name} text encoder.")
    return BaseModel(unet=tr, vae=c["vae"], text_encoder=te, tokenizer=tok,
                     noise_scheduler=c["scheduler"], kind="flux2", name=os.path.basename(os.path.normpath(folder)),
                     path=os.path.abspath(folder), native_resolution=TINY_RESOLUTION if small else 1024, extra=extra)
