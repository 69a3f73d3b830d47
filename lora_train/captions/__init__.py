"""Captioning, split by concern:

- ``backends``  captioners behind one interface (template, transformers, WD14, host); ``vlm`` chat VLMs
  (Qwen2.5-VL / Qwen3-VL / LLaVA / JoyCaption) with ``styles`` (the prompts, as data); ``registry``
  ``make_captioner`` by name; ``checks`` the caption checks before training;
- ``text``      caption text operations (trigger, replace, tag dedupe / sort with keep_tokens, frequency);
- ``table``     the caption table for the UIs and the caption storage (reads via ``lora_train.data.folder``);
- ``run``       ``caption_folder``: a captioner over a dataset folder with modes skip / overwrite / append.
"""
from .backends import (DEFAULT_TEMPLATE, DEFAULT_TRANSFORMERS_MODEL, DEFAULT_WD14_MODEL, KAOMOJIS,
                       CaptionerError, CaptionResult, Captioner, HostCaptioner, Tags, TemplateCaptioner,
                       TransformersCaptioner, WD14Tagger, caption_text, folder_label, hf_cache_dir,
                       read_selected_tags, result_tags, wd14_tag_name)
from .registry import BACKENDS, make_captioner
from .run import MODES, CaptionReport, ProgressFn, caption_folder, tag_frequency
from .table import CaptionConflict, CaptionRow, CaptionTable, ImageEntry, MetadataFile, list_images, thumbnail
from .text import (Pairs, append_caption, format_tag_frequency, has_trigger, parse_pairs, process_caption,
                   same_caption, tag_frequency_of)

__all__ = [
    "BACKENDS", "DEFAULT_TEMPLATE", "DEFAULT_TRANSFORMERS_MODEL", "DEFAULT_WD14_MODEL", "KAOMOJIS", "MODES",
    "CaptionConflict", "CaptionReport", "CaptionResult", "CaptionRow", "CaptionTable", "Captioner", "CaptionerError",
    "HostCaptioner", "ImageEntry", "MetadataFile", "Pairs", "ProgressFn", "Tags", "TemplateCaptioner",
    "TransformersCaptioner", "WD14Tagger", "append_caption", "caption_folder", "caption_text", "folder_label",
    "format_tag_frequency", "has_trigger", "hf_cache_dir", "list_images", "make_captioner", "parse_pairs",
    "process_caption", "read_selected_tags", "result_tags", "same_caption", "tag_frequency", "tag_frequency_of",
    "thumbnail", "wd14_tag_name",
]
