"""Chat vision-language captioners through transformers: Qwen2.5-VL / Qwen3-VL, LLaVA-family models (JoyCaption,
LLaVA 1.5 / NeXT), and any model `AutoModelForImageTextToText` loads with a processor whose chat template takes
an image. The instruction comes from a caption style (captions/styles.py); the answer is cleaned into the style's
form (tags: a comma-separated list; text: one line), and the trigger goes first later (captions/text.py).

Nothing is downloaded: the model is a local folder or a repo already in the Hugging Face cache (the error names
the folder to put it in). 8-bit / 4-bit loading needs bitsandbytes (and a CUDA device); without it the message says
so. Batched (left padding, greedy decoding); `unload()` frees the model so the host's VRAM goes back.

Works with transformers >= 4.45 (AutoModelForImageTextToText); older ones (AUTOMATIC1111's 4.30.2) get a message.
Qwen2-VL-family processors need torchvision (their video processor); the message says so when it is missing.
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence

from PIL import Image

from . import styles as styles_mod
from .backends import CaptionerError, TransformersCaptioner

QUANTIZE = ("none", "8bit", "4bit")
#: openings the chat models put before the description, dropped from captions
_PREAMBLE = re.compile(r"^\s*(here (is|are)|here's|sure[,!.]?|certainly[,!.]?)[^:\n]*:\s*", re.I)


class VLMCaptioner(TransformersCaptioner):
    """A chat VLM captioner (see the module docstring). `style`: a name of the styles file (default
    "detailed"); `prompt` replaces the style's instruction; `quantize`: none | 8bit | 4bit."""

    name = "vlm"

    def __init__(self, model: Optional[str] = None, device: Optional[str] = None, dtype: Any = None,
                 style: str = "detailed", styles_file: Optional[str] = None, prompt: Optional[str] = None,
                 max_new_tokens: Optional[int] = None, quantize: str = "none", trust_remote_code: bool = False,
                 allow_pickle: bool = False):
        if not model:
            raise CaptionerError("vlm", "no model given", fix="pass --model with a local folder of a chat VLM "
                                 "(Qwen2.5-VL, Qwen3-VL, JoyCaption / LLaVA), e.g. models/Qwen2.5-VL-7B-Instruct "
                                 "with config.json, the weights and the processor files")
        if quantize not in QUANTIZE:
            raise CaptionerError("vlm", f"quantize {quantize!r} is not one of {', '.join(QUANTIZE)}")
        try:
            self.style = styles_mod.get(style, styles_file)
        except ValueError as exc:
            raise CaptionerError("vlm", str(exc)) from None
        self.quantize = quantize
        self.instruction = prompt or self.style.prompt
        super().__init__(model=model, device=device, dtype=dtype, prompt=None,
                         max_new_tokens=max_new_tokens or self.style.max_new_tokens, num_beams=1,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    # -- loading
    def _load(self):
        import transformers

        cls = getattr(transformers, "AutoModelForImageTextToText", None)
        if cls is None:  # AUTOMATIC1111 pins transformers 4.30.2
            raise CaptionerError("vlm", f"chat vision-language models need transformers >= 4.45 "
                                 f"(AutoModelForImageTextToText); this environment has {transformers.__version__}",
                                 fix="caption in Forge, ComfyUI or `python -m lora_train caption` (current "
                                     "transformers), or use the transformers backend (BLIP / GIT) here")
        kw = dict(local_files_only=True, trust_remote_code=self.trust_remote_code)
        try:
            processor = transformers.AutoProcessor.from_pretrained(self.folder, **kw)
        except (ImportError, AttributeError) as exc:
            raise CaptionerError("vlm", f"the processor of '{self.folder}' needs a package that is missing ({exc})",
                                 self.folder, "pip install torchvision (Qwen2-VL-family processors need it)") from exc
        except (OSError, ValueError, KeyError) as exc:
            raise CaptionerError("vlm", f"cannot load the processor from '{self.folder}' ({exc})", self.folder,
                                 "the folder needs preprocessor_config.json / processor_config.json, the tokenizer "
                                 "files and a chat template (chat_template.json or .jinja)") from exc
        if getattr(processor, "chat_template", None) is None and \
                getattr(getattr(processor, "tokenizer", None), "chat_template", None) is None:
            raise CaptionerError("vlm", f"'{self.folder}' has no chat template", self.folder,
                                 "use the model's instruct / chat release (its chat_template.json), or the "
                                 "transformers backend for plain captioning models (BLIP, GIT, Florence-2)")
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # batched generation continues each prompt where it ends
        load_kw = dict(kw)
        if self.use_safetensors:
            load_kw["use_safetensors"] = True
        if self.quantize != "none":
            load_kw["quantization_config"] = _quantization(self.quantize, self.device)
            load_kw["device_map"] = {"": self.device.index or 0}
        try:
            model = cls.from_pretrained(self.folder, **load_kw)
        except ValueError as exc:
            raise CaptionerError("vlm", f"'{self.folder}' is not a vision-language model transformers "
                                 f"{transformers.__version__} loads ({exc})", self.folder,
                                 "use a Qwen2.5-VL / Qwen3-VL / LLaVA-family chat model, or update transformers"
                                 ) from exc
        except OSError as exc:
            raise CaptionerError("vlm", f"cannot load the weights from '{self.folder}' ({exc})", self.folder,
                                 "download the complete model again (config.json, *.safetensors)") from exc
        if self.quantize == "none":
            model = model.to(self.device, dtype=self.dtype)
        return processor, model.eval(), str(getattr(model.config, "model_type", ""))

    # -- captioning
    def messages(self) -> List[dict]:
        """The chat turn the model gets for one image: the image, then the style's instruction."""
        content = [{"type": "image"}] * self.style.images + [{"type": "text", "text": self.instruction}]
        return [{"role": "user", "content": content}]

    def prompt_text(self) -> str:
        return self.processor.apply_chat_template(self.messages(), add_generation_prompt=True, tokenize=False)

    def caption_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> List[str]:
        if self.style.images != 1:
            raise CaptionerError("vlm", f"style '{self.style.name}' takes {self.style.images} images a caption",
                                 fix="caption image pairs with caption_pairs (control, target), or pick a "
                                     "one-image style")
        return self._generate([[im] for im in images])

    def caption_pairs(self, pairs: Sequence[Sequence[Image.Image]]) -> List[str]:
        """One instruction per (control, target) pair, with a two-image style such as "edit"."""
        if self.style.images != 2:
            raise CaptionerError("vlm", f"style '{self.style.name}' takes one image", fix="use the edit style for "
                                 "pairs")
        return self._generate([list(p) for p in pairs])

    def _generate(self, groups: Sequence[Sequence[Image.Image]]) -> List[str]:
        import torch

        if self.model is None:
            raise CaptionerError("vlm", "the model was unloaded", fix="build a new captioner")
        images = [im.convert("RGB") for g in groups for im in g]
        text = self.prompt_text()
        inputs = self.processor(text=[text] * len(groups), images=images, padding=True, return_tensors="pt")
        inputs = {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                  if hasattr(v, "to") else v for k, v in dict(inputs).items()}
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:]
        return [clean(t, self.style.form) for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def unload(self) -> None:
        self.processor = None
        super().unload()
        import gc

        gc.collect()


def clean(text: str, form: str) -> str:
    """A model's answer in the style's form: tags -> "a, b, c" (deduplicated, in order); text -> one line."""
    text = _PREAMBLE.sub("", (text or "").strip()).strip().strip('"').strip()
    if form == "tags":
        parts = [re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", "", p).strip().strip(".").lower() for p in re.split(r"[,\n;]+", text)]
        out: List[str] = []
        for p in parts:
            if p and p not in out:
                out.append(p)
        return ", ".join(out)
    return re.sub(r"\s+", " ", text)


def _quantization(bits: str, device):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise CaptionerError("vlm", f"{bits} loading needs bitsandbytes", fix="pip install bitsandbytes (CUDA), "
                             "or quantize none") from None
    if getattr(device, "type", "cpu") != "cuda":
        raise CaptionerError("vlm", f"{bits} loading needs a CUDA device", fix="use quantize none on the CPU")
    import torch

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
