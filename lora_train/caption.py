"""Captioning: captioners behind one interface, caption operations over a folder, and a caption table.

Captioners (all return a caption for one PIL image; ``path`` is the image's file path, used by some):
  - TemplateCaptioner  "{trigger}, {folder}, {stem}" from the file name / folder (no model at all);
  - TransformersCaptioner  an image-to-text model (BLIP, GIT, Florence-2 class) from a local folder or the
    local Hugging Face cache; never downloads;
  - WD14Tagger  a WD14-family booru tagger (ONNX through the optional onnxruntime): tags with confidences;
  - HostCaptioner  wraps a callable the host gives (the WebUI's BLIP / DeepBooru interrogators).
``make_captioner(backend, **opts)`` builds one by name.

Operations: ``caption_folder`` runs a captioner over a dataset folder (the folder and its kohya ``N_name``
subfolders, like ``dataset.load_dataset``) with modes skip / overwrite / append, trigger prefix, find-and-
replace, tag dedupe and ordering with ``keep_tokens`` fixed, and writes ``.txt`` sidecars or
``metadata.csv`` atomically. Existing captions are never touched unless the mode says so.

``CaptionTable`` lists, edits and bulk-edits the captions of a folder for the UIs and saves only the files
that changed (atomic, with a check that nobody changed them on disk meanwhile).

Nothing here imports transformers or onnxruntime until a backend that needs them is built.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from PIL import Image

from .dataset import load_image, split_tags
from .folder import (IMAGE_EXTS, METADATA_NAMES, REPEAT_RE, FolderRow, decode_text, encode_text, meta_key,
                     metadata_path, scan_folder)
from .io_utils import atomic_write_bytes

log = logging.getLogger(__name__)

Tags = List[Tuple[str, float]]
CaptionResult = Union[str, Tags]
ProgressFn = Callable[[int, int, str], None]

MODES = ("skip", "overwrite", "append")
DEFAULT_TEMPLATE = "{trigger}, {folder}, {stem}"
DEFAULT_TRANSFORMERS_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_WD14_MODEL = "SmilingWolf/wd-swinv2-tagger-v3"
_REPEAT_RE = REPEAT_RE


class CaptionerError(RuntimeError):
    """A captioner cannot be built or used. The message names the backend, the path and the fix."""

    def __init__(self, backend: str, problem: str, path: str = "", fix: str = ""):
        self.backend, self.problem, self.path, self.fix = backend, problem, path, fix
        msg = f"{backend} captioner: {problem}"
        if path:
            msg += f" (expected at '{path}')"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


class CaptionConflict(RuntimeError):
    """CaptionTable.save found caption files changed on disk since they were read."""

    def __init__(self, paths: List[str]):
        self.paths = paths
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(f"{len(paths)} caption file(s) changed on disk since they were loaded: {shown}. "
                         f"Reload the table (your edits would overwrite them) or save with force=True.")


# ============================================================================ captioners
class Captioner:
    """One caption for one image: a string, or a list of (tag, confidence) for taggers."""

    name = "base"

    def caption(self, image: Image.Image, path: str = "") -> CaptionResult:
        raise NotImplementedError

    def caption_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> List[CaptionResult]:
        return [self.caption(im, p) for im, p in zip(images, paths)]

    def unload(self) -> None:
        """Free the model's memory (the host's VRAM goes back to generation)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unload()


def caption_text(result: Any) -> str:
    """A captioner result (string, tag list, (tag, conf) list or {tag: conf}) as one caption string."""
    if result is None:
        return ""
    if isinstance(result, str):
        return " ".join(result.split())
    if isinstance(result, dict):
        result = sorted(result.items(), key=lambda kv: -float(kv[1]))
    tags = []
    for item in result:
        tag = item[0] if isinstance(item, (tuple, list)) else item
        tag = " ".join(str(tag).split())
        if tag:
            tags.append(tag)
    return ", ".join(tags)


def result_tags(result: Any) -> Optional[Tags]:
    """(tag, confidence) pairs when the captioner gave confidences, else None."""
    if isinstance(result, dict):
        return sorted(((str(k), float(v)) for k, v in result.items()), key=lambda kv: -kv[1])
    if isinstance(result, (list, tuple)) and result and all(isinstance(x, (tuple, list)) and len(x) == 2
                                                             for x in result):
        return [(str(t), float(c)) for t, c in result]
    return None


def folder_label(dirpath: str) -> str:
    """The folder name as the dataset loader uses it: kohya's `10_name` -> `name`."""
    base = os.path.basename(os.path.normpath(dirpath))
    m = _REPEAT_RE.match(base)
    return m.group(2) if m else base


_TEMPLATE_FIELDS = ("trigger", "folder", "stem", "words", "name", "ext", "parent", "width", "height")


class TemplateCaptioner(Captioner):
    """Captions from a template: {trigger} {folder} {stem} {words} {name} {ext} {parent} {width} {height}.

    {folder} drops kohya's repeat prefix (`10_cat` -> `cat`), {parent} is the raw folder name, {words} is the
    stem with `_`/`-` as spaces and a trailing counter removed (`red_dress_01` -> `red dress`). Empty pieces
    of a comma list are dropped, so an empty {trigger} leaves no stray comma.
    """

    name = "template"

    def __init__(self, template: str = DEFAULT_TEMPLATE, trigger: str = ""):
        try:
            used = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise CaptionerError("template", f"template '{template}' is not valid ({exc})",
                                 fix="use placeholders in braces, e.g. \"{trigger}, {folder}, {stem}\"") from exc
        for f in used:
            if f.split(".")[0].split("[")[0] not in _TEMPLATE_FIELDS:
                near = difflib.get_close_matches(f, _TEMPLATE_FIELDS, n=1)
                hint = f" (did you mean {{{near[0]}}}?)" if near else ""
                raise CaptionerError("template", f"unknown placeholder {{{f}}} in '{template}'{hint}",
                                     fix="use " + ", ".join("{%s}" % x for x in _TEMPLATE_FIELDS))
        self.template, self.trigger = template, trigger or ""

    def caption(self, image: Optional[Image.Image], path: str = "") -> str:
        name = os.path.basename(path)
        stem, ext = os.path.splitext(name)
        words = re.sub(r"[\s_\-]+", " ", stem)
        words = re.sub(r"(\s*\(\d+\)|\s+\d+)$", "", words).strip() or stem
        dirpath = os.path.dirname(os.path.abspath(path)) if path else ""
        w, h = image.size if image is not None else (0, 0)
        text = self.template.format(trigger=self.trigger, folder=folder_label(dirpath) if dirpath else "",
                                    stem=stem, words=words, name=name, ext=ext.lstrip("."),
                                    parent=os.path.basename(dirpath), width=w, height=h)
        text = " ".join(text.split())
        if "," in text:
            text = ", ".join(t for t in split_tags(text))
        return text


class HostCaptioner(Captioner):
    """A captioner the host provides: fn(pil_image) -> str | [tag] | [(tag, conf)] | {tag: conf}.

    WebUI: ``HostCaptioner(lambda im: shared.interrogator.interrogate(im), name="webui-blip")`` or
    DeepBooru's ``deepbooru.model.tag(im)``. ``unload`` calls the optional ``unload_fn`` (e.g. the
    interrogator's ``unload``/``send_blip_to_ram``).
    """

    def __init__(self, fn: Optional[Callable[[Image.Image], Any]] = None, name: str = "host",
                 unload_fn: Optional[Callable[[], Any]] = None):
        if not callable(fn):
            raise CaptionerError(name, "the host gave no interrogator function",
                                 fix="pass a callable that takes a PIL image and returns a caption")
        self.fn, self.name, self.unload_fn = fn, name, unload_fn

    def caption(self, image: Image.Image, path: str = "") -> CaptionResult:
        result = self.fn(image)
        if isinstance(result, str) or result is None:
            return caption_text(result)
        tags = result_tags(result)
        return tags if tags is not None else caption_text(result)

    def unload(self) -> None:
        if self.unload_fn is not None:
            self.unload_fn()


# ---------------------------------------------------------------------------- model look-up helpers
def hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return getattr(constants, "HF_HUB_CACHE", None) or getattr(constants, "HUGGINGFACE_HUB_CACHE")
    except Exception:  # pragma: no cover - hub missing or very old
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def _looks_like_repo_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", spec)) and not spec.startswith((".", "~"))


def _repo_cache_path(repo: str) -> str:
    return os.path.join(hf_cache_dir(), "models--" + repo.replace("/", "--"))


def _cached_file(repo: str, filename: str) -> Optional[str]:
    """A file of `repo` in the local Hugging Face cache, or None (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(repo, filename)
    except Exception:
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _download_hint(repo: str, target: str) -> str:
    return (f"on a machine with internet run `hf download {repo} --local-dir \"{target}\"` (older huggingface_hub: "
            f"`huggingface-cli download ...`) and copy the folder here, then pass its path as the model")


class TransformersCaptioner(Captioner):
    """An image-to-text model through transformers (BLIP, GIT, Florence-2 class), local files only.

    ``model`` is a folder (config.json, weights, processor + tokenizer files) or a Hugging Face repo id that
    is already in the local cache. ``prompt`` is an optional text prefix (BLIP conditional captioning) or a
    task token (Florence-2: ``<DETAILED_CAPTION>``, the default for Florence-2 models).
    """

    name = "transformers"

    def __init__(self, model: Optional[str] = None, device: Optional[str] = None, dtype: Any = None,
                 prompt: Optional[str] = None, max_new_tokens: int = 60, num_beams: int = 1,
                 trust_remote_code: bool = False, allow_pickle: bool = False):
        self.spec = model or DEFAULT_TRANSFORMERS_MODEL
        self.folder = self._resolve(self.spec)
        self.use_safetensors = self._check_weights(self.folder, allow_pickle)
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.max_new_tokens, self.num_beams = int(max_new_tokens), int(num_beams)
        self.trust_remote_code = trust_remote_code
        self.processor, self.model, self.model_type = self._load()
        self.is_florence = "florence" in self.model_type.lower()
        self.prompt = prompt if prompt is not None else ("<DETAILED_CAPTION>" if self.is_florence else None)

    # -- resolution and loading
    @staticmethod
    def _resolve(spec: str) -> str:
        path = os.path.abspath(os.path.expanduser(spec))
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise CaptionerError("transformers", f"'{path}' has no config.json, so it is not a transformers "
                                     f"model folder", os.path.join(path, "config.json"),
                                     _download_hint(DEFAULT_TRANSFORMERS_MODEL, path) +
                                     " (the folder needs config.json, the weights, preprocessor_config.json and "
                                     "the tokenizer files)")
            return path
        if os.path.exists(path):
            raise CaptionerError("transformers", f"'{path}' is a file; the model must be a folder", path,
                                 "pass the folder that holds config.json, the weights and the processor files")
        if _looks_like_repo_id(spec):
            cfg = _cached_file(spec, "config.json")
            if cfg:
                return os.path.dirname(cfg)
            raise CaptionerError("transformers", f"model '{spec}' is not in the local Hugging Face cache (and no "
                                 f"folder '{path}' exists); downloads are off", _repo_cache_path(spec),
                                 f"on a machine with internet run `hf download {spec}` (fills {hf_cache_dir()}; "
                                 f"set HF_HOME to use another cache) or download it into a folder and pass that "
                                 f"folder as --model")
        raise CaptionerError("transformers", f"model folder '{spec}' does not exist", path,
                             _download_hint(DEFAULT_TRANSFORMERS_MODEL, path))

    @staticmethod
    def _check_weights(folder: str, allow_pickle: bool) -> Optional[bool]:
        """True when safetensors weights exist; pickled-only weights (.bin/.pt) need ``allow_pickle``."""
        files = os.listdir(folder)
        if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
            return True
        if any(f.endswith((".bin", ".pt", ".pth", ".bin.index.json")) for f in files):
            if allow_pickle:
                return None
            raise CaptionerError("transformers", f"'{folder}' only has pickled weights (pytorch_model.bin), which "
                                 f"are not loaded by default", os.path.join(folder, "model.safetensors"),
                                 "get the model.safetensors of this model (most hub repos have one), or pass "
                                 "allow_pickle=True if you trust the file")
        raise CaptionerError("transformers", f"no weights in '{folder}'", os.path.join(folder, "model.safetensors"),
                             "download the complete model (config.json, model.safetensors, processor and "
                             "tokenizer files) into that folder")

    def _load(self):
        try:
            import transformers
            from transformers import AutoConfig, AutoProcessor
        except ImportError as exc:  # pragma: no cover - transformers is a core dependency
            raise CaptionerError("transformers", f"transformers cannot be imported ({exc})",
                                 fix="pip install transformers") from exc
        kw = dict(local_files_only=True, trust_remote_code=self.trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(self.folder, **kw)
            processor = AutoProcessor.from_pretrained(self.folder, **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise CaptionerError("transformers", f"cannot load the config/processor from '{self.folder}' ({exc})",
                                 self.folder, "make sure the folder holds config.json, preprocessor_config.json and "
                                 "the tokenizer files; models with custom code need trust_remote_code=True"
                                 ) from exc
        model_type = getattr(config, "model_type", "") or ""
        classes = [getattr(transformers, n) for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq",
                                                       "AutoModelForCausalLM") if hasattr(transformers, n)]
        last: Optional[Exception] = None
        for cls in classes:
            mapping = getattr(cls, "_model_mapping", None)
            try:
                if mapping is not None and type(config) not in mapping and not getattr(config, "auto_map", None):
                    continue
            except Exception:
                pass
            try:
                extra = {} if self.use_safetensors is None else {"use_safetensors": True}
                model = cls.from_pretrained(self.folder, **kw, **extra)
                break
            except ValueError as exc:  # "Unrecognized configuration class": try the next auto class
                last = exc
            except OSError as exc:
                raise CaptionerError("transformers", f"cannot load the weights from '{self.folder}' ({exc})",
                                     self.folder, "the folder needs model.safetensors (or pytorch_model.bin); "
                                     "download the complete model again") from exc
        else:
            raise CaptionerError("transformers", f"'{model_type}' is not an image-to-text model that transformers "
                                 f"{transformers.__version__} can load ({last})", self.folder,
                                 "use a BLIP, GIT or Florence-2 captioning model (Florence-2 on old transformers "
                                 "needs trust_remote_code=True)")
        model = model.to(self.device, dtype=self.dtype).eval()
        return processor, model, model_type

    # -- captioning
    def _inputs(self, images, prompt):
        kwargs = {"images": images, "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(images)
        inputs = self.processor(**kwargs)
        out = {}
        for k, v in dict(inputs).items():
            if hasattr(v, "to"):
                v = v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def caption_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> List[str]:
        import torch

        images = [im.convert("RGB") for im in images]
        if self.prompt and len(images) > 1:  # prompts would need padding; keep it simple and exact
            return [self.caption_batch([im], [p])[0] for im, p in zip(images, paths)]
        inputs = self._inputs(images, self.prompt)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        if self.is_florence and hasattr(self.processor, "post_process_generation"):
            texts = self.processor.batch_decode(ids, skip_special_tokens=False)
            out = []
            for text, im in zip(texts, images):
                parsed = self.processor.post_process_generation(text, task=self.prompt, image_size=im.size)
                out.append(caption_text(parsed.get(self.prompt, text) if isinstance(parsed, dict) else parsed))
            return out
        return [caption_text(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def caption(self, image: Image.Image, path: str = "") -> str:
        return self.caption_batch([image], [path])[0]

    def unload(self) -> None:
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass


# ---------------------------------------------------------------------------- WD14 tagger
# Tags that keep their underscores (as the WebUI tagger and SmilingWolf's demo do).
KAOMOJIS = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
            "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
WD14_GENERAL, WD14_CHARACTER, WD14_RATING = 0, 4, 9


def wd14_tag_name(name: str, replace_underscores: bool = True, escape: bool = False) -> str:
    if replace_underscores and name not in KAOMOJIS:
        name = name.replace("_", " ")
    if escape:
        name = name.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return name


def read_selected_tags(csv_path: str) -> Tuple[List[str], List[int]]:
    """Names and categories from a WD14 selected_tags.csv (tag_id,name,category,count)."""
    names, cats = [], []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "name" not in reader.fieldnames:
            raise CaptionerError("wd14", f"{csv_path} has no 'name' column", csv_path,
                                 "use the selected_tags.csv that comes with the model (tag_id,name,category,count)")
        for row in reader:
            names.append(row["name"])
            try:
                cats.append(int(row.get("category") or 0))
            except ValueError:
                cats.append(WD14_GENERAL)
    return names, cats


class WD14Tagger(Captioner):
    """WD14-family booru tagger: an ONNX model + selected_tags.csv, run with onnxruntime (optional).

    ``model`` is a folder with model.onnx and selected_tags.csv, the .onnx file itself (the csv beside it),
    or a repo id in the local Hugging Face cache (default SmilingWolf/wd-swinv2-tagger-v3). Returns
    [(tag, confidence)]: character tags over ``character_threshold`` first, then general tags over
    ``threshold``, each by falling confidence; rating tags only with ``include_ratings``.
    """

    name = "wd14"

    def __init__(self, model: Optional[str] = None, threshold: float = 0.35, character_threshold: float = 0.85,
                 include_characters: bool = True, include_ratings: bool = False, replace_underscores: bool = True,
                 escape: bool = False, exclude_tags: Iterable[str] = (), providers: Optional[List[str]] = None,
                 device: Optional[str] = None):
        self.spec = model or DEFAULT_WD14_MODEL
        self.onnx_path, self.csv_path = self._resolve(self.spec)
        ort = _import_onnxruntime()
        self.threshold, self.character_threshold = float(threshold), float(character_threshold)
        self.include_characters, self.include_ratings = include_characters, include_ratings
        self.replace_underscores, self.escape = replace_underscores, escape
        self.exclude = {t.strip().lower().replace("_", " ") for t in exclude_tags if t.strip()}
        self.tags, self.categories = read_selected_tags(self.csv_path)
        if providers is None:
            avail = ort.get_available_providers()
            wanted = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
            providers = [p for p in wanted if p in avail] or avail
        try:
            self.session = ort.InferenceSession(self.onnx_path, providers=providers)
        except Exception as exc:
            raise CaptionerError("wd14", f"onnxruntime cannot load '{self.onnx_path}' ({exc})", self.onnx_path,
                                 "download model.onnx again (a partial download or a Git LFS pointer file fails "
                                 "like this)") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        self.channels_first = len(shape) == 4 and shape[1] == 3 and shape[3] != 3
        side = shape[2] if self.channels_first else (shape[1] if len(shape) == 4 else None)
        self.size = side if isinstance(side, int) and side > 0 else 448
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.tags):
            raise CaptionerError("wd14", f"the model gives {n_out} scores but {self.csv_path} lists "
                                 f"{len(self.tags)} tags", self.csv_path,
                                 "use the selected_tags.csv from the same model repository as model.onnx")

    @staticmethod
    def _resolve(spec: str) -> Tuple[str, str]:
        path = os.path.abspath(os.path.expanduser(spec))
        fix_files = ("put model.onnx and selected_tags.csv of a WD14 tagger (e.g. SmilingWolf/wd-swinv2-tagger-v3) "
                     "there: " + _download_hint(DEFAULT_WD14_MODEL, path if not path.endswith(".onnx")
                                               else os.path.dirname(path)))
        if os.path.isfile(path) and path.lower().endswith(".onnx"):
            onnx_path = path
            csv_path = os.path.join(os.path.dirname(path), "selected_tags.csv")
        elif os.path.isdir(path):
            onnx_path = os.path.join(path, "model.onnx")
            if not os.path.isfile(onnx_path):
                found = sorted(f for f in os.listdir(path) if f.lower().endswith(".onnx"))
                onnx_path = os.path.join(path, found[0]) if len(found) == 1 else onnx_path
            csv_path = os.path.join(path, "selected_tags.csv")
        elif not os.path.exists(path) and _looks_like_repo_id(spec):
            onnx_path, csv_path = _cached_file(spec, "model.onnx"), _cached_file(spec, "selected_tags.csv")
            if not onnx_path or not csv_path:
                raise CaptionerError("wd14", f"tagger '{spec}' is not in the local Hugging Face cache (and no "
                                     f"folder '{path}' exists); downloads are off", _repo_cache_path(spec),
                                     f"on a machine with internet run `hf download {spec} model.onnx "
                                     f"selected_tags.csv` (fills {hf_cache_dir()}) or put both files in a folder "
                                     f"and pass that folder as --model")
            return onnx_path, csv_path
        else:
            raise CaptionerError("wd14", f"tagger folder '{spec}' does not exist", path, fix_files)
        if not os.path.isfile(onnx_path):
            raise CaptionerError("wd14", "model.onnx not found", onnx_path, fix_files)
        if not os.path.isfile(csv_path):
            raise CaptionerError("wd14", "selected_tags.csv not found", csv_path, fix_files)
        return onnx_path, csv_path

    def prepare(self, image: Image.Image):
        """Pad to a white square, resize to the model's side, RGB -> BGR, float32 0..255 (as WD14 expects)."""
        import numpy as np

        image = image.convert("RGB")
        w, h = image.size
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        if side != self.size:
            canvas = canvas.resize((self.size, self.size), Image.BICUBIC)
        arr = np.ascontiguousarray(np.asarray(canvas, dtype=np.float32)[:, :, ::-1])
        if self.channels_first:
            arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
        return arr[None]

    def scores(self, image: Image.Image):
        out = self.session.run(None, {self.input_name: self.prepare(image)})[0]
        return out.reshape(-1)[: len(self.tags)]

    def caption(self, image: Image.Image, path: str = "") -> Tags:
        probs = self.scores(image)
        chars, general, ratings = [], [], []
        for name, cat, p in zip(self.tags, self.categories, probs.tolist()):
            if cat == WD14_RATING:
                ratings.append((name, p))
            elif cat == WD14_CHARACTER:
                if self.include_characters and p >= self.character_threshold:
                    chars.append((name, p))
            elif p >= self.threshold:
                general.append((name, p))
        picked = []
        if self.include_ratings and ratings:
            picked.append(max(ratings, key=lambda kv: kv[1]))
        picked += sorted(chars, key=lambda kv: -kv[1]) + sorted(general, key=lambda kv: -kv[1])
        out = []
        for name, p in picked:
            tag = wd14_tag_name(name, self.replace_underscores, self.escape)
            if tag.lower() not in self.exclude and name.lower().replace("_", " ") not in self.exclude:
                out.append((tag, float(p)))
        return out

    def unload(self) -> None:
        self.session = None


def _import_onnxruntime():
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise CaptionerError("wd14", "onnxruntime is not installed (it is an optional dependency)",
                             fix="pip install onnxruntime (or onnxruntime-gpu for CUDA) into the Python that runs "
                                 "lora_train, then run again") from exc
    return onnxruntime


# ---------------------------------------------------------------------------- factory
BACKENDS = ("template", "transformers", "wd14", "host")
_ALIASES = {"blip": "transformers", "git": "transformers", "florence": "transformers", "florence2": "transformers",
            "hf": "transformers", "tagger": "wd14", "wd": "wd14", "onnx": "wd14", "filename": "template"}


def make_captioner(backend: str, **opts) -> Captioner:
    """Build a captioner by name: template | transformers | wd14 | host (aliases: blip, git, florence, tagger).

    Options go to the backend's constructor; unknown options are an error, ``None`` values are dropped.
    ``host`` needs ``fn=`` (the host's interrogator).
    """
    key = (backend or "").strip().lower()
    key = _ALIASES.get(key, key)
    cls = {"template": TemplateCaptioner, "transformers": TransformersCaptioner, "wd14": WD14Tagger,
           "host": HostCaptioner}.get(key)
    if cls is None:
        near = difflib.get_close_matches(key, list(BACKENDS) + list(_ALIASES), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise CaptionerError(backend or "?", f"unknown captioning backend '{backend}'{hint}",
                             fix="choose one of " + ", ".join(BACKENDS))
    opts = {k: v for k, v in opts.items() if v is not None}
    import inspect

    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in opts if k not in params]
    if unknown:
        valid = [p for p in params if p != "self"]
        raise CaptionerError(key, f"unknown option(s) {', '.join(unknown)}", fix="valid options: " + ", ".join(valid))
    return cls(**opts)


# ============================================================================ caption text operations
Pairs = Sequence[Tuple[str, str]]


def parse_pairs(items: Iterable[str]) -> List[Tuple[str, str]]:
    """["old=new", ...] -> [(old, new)]; the first '=' separates (for the CLI's --replace)."""
    out = []
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"'{item}' is not OLD=NEW (use an empty NEW to delete: 'OLD=')")
        old, new = item.split("=", 1)
        if not old:
            raise ValueError(f"'{item}': OLD is empty")
        out.append((old, new))
    return out


def _norm(tag: str) -> str:
    return " ".join(tag.lower().split())


def has_trigger(caption: str, trigger: str) -> bool:
    """True when the caption already starts with the trigger (as a tag or as its first word)."""
    if not trigger:
        return True
    tags = split_tags(caption)
    if not tags:
        return False
    first, t = _norm(tags[0]), _norm(trigger)
    return first == t or first.startswith(t + " ")


def process_caption(text: str, trigger: Optional[str] = None, replace: Pairs = (), dedupe: bool = False,
                    keep_tokens: Optional[int] = None, *, replace_tags: Pairs = (), remove_tags: Iterable[str] = (),
                    add_tags: Iterable[str] = (), sort: Optional[str] = None) -> str:
    """Apply the caption edits, in this order:

    1. ``replace``: plain find-and-replace on the text ((old, new) pairs, in order);
    2. ``replace_tags`` / ``remove_tags`` / ``add_tags``: whole comma-separated tags, case-insensitive;
    3. ``trigger``: put first (moved there if it is elsewhere; never duplicated; a caption that already starts
       with it, e.g. "sks person on a beach", is left as it is);
    4. ``dedupe``: drop later repeats of a tag (case-insensitive);
    5. ``sort="alpha"``: sort the tags after the fixed ones.
    The first ``keep_tokens`` tags (kohya semantics; the trigger counts as the first) stay fixed: not moved by
    the sort. With only ``replace`` the text keeps its own formatting; tag edits re-join with ", ".
    """
    for old, new in replace or ():
        if old:
            text = text.replace(old, new)
    tag_ops = bool(replace_tags or remove_tags or add_tags or trigger or dedupe or sort or keep_tokens)
    if not tag_ops:
        return " ".join(text.split())
    if sort not in (None, "", "none", "alpha"):
        raise ValueError(f"sort must be None or 'alpha', not {sort!r}")
    tags = [" ".join(t.split()) for t in split_tags(text)]
    if replace_tags:
        mapping = {_norm(o): n.strip() for o, n in replace_tags}
        tags = [mapping.get(_norm(t), t) for t in tags]
        tags = [t for t in tags if t]
    if remove_tags:
        drop = {_norm(t) for t in remove_tags}
        tags = [t for t in tags if _norm(t) not in drop]
    for t in add_tags or ():
        t = " ".join(t.split()).strip(", ")
        if t and _norm(t) not in {_norm(x) for x in tags}:
            tags.append(t)
    fixed_n = max(0, int(keep_tokens or 0))
    if trigger:
        trig = " ".join(trigger.split())
        if not has_trigger(", ".join(tags), trig):
            tags = [trig] + [t for t in tags if _norm(t) != _norm(trig)]
        fixed_n = max(fixed_n, 1)
    fixed, rest = tags[:fixed_n], tags[fixed_n:]
    if dedupe:
        seen = {_norm(t) for t in fixed}
        kept_fixed, fseen = [], set()
        for t in fixed:  # repeats inside the fixed part go too, the first stays in place
            if _norm(t) not in fseen:
                kept_fixed.append(t)
                fseen.add(_norm(t))
        fixed, out = kept_fixed, []
        for t in rest:
            if _norm(t) not in seen:
                out.append(t)
                seen.add(_norm(t))
        rest = out
    if sort == "alpha":
        rest = sorted(rest, key=lambda t: (_norm(t), t))
    return ", ".join(fixed + rest)


def same_caption(a: str, b: str) -> bool:
    """Equal up to spacing around and inside tags (what the dataset loader would see as the same)."""
    return [" ".join(t.split()) for t in split_tags(a or "")] == [" ".join(t.split()) for t in split_tags(b or "")]


def append_caption(existing: str, new: str) -> str:
    existing, new = existing.strip().rstrip(","), new.strip()
    if not existing:
        return new
    if not new:
        return existing
    return f"{existing}, {new}"


def tag_frequency_of(captions: Iterable[Tuple[str, str]]) -> Dict[str, Dict[str, int]]:
    """{folder: {tag: count}} from (folder, caption) pairs (the structure of ImageDataset.tag_frequency)."""
    freq: Dict[str, Counter] = {}
    for folder, caption in captions:
        c = freq.setdefault(folder, Counter())
        for tag in split_tags(caption or ""):
            c[tag] += 1
    return {k: dict(v) for k, v in freq.items()}


def format_tag_frequency(freq: Dict[str, Dict[str, int]], top: int = 20) -> str:
    lines = []
    for folder, tags in freq.items():
        items = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"{folder}: {len(items)} distinct tag(s)")
        for tag, n in items[:top]:
            lines.append(f"  {n:5d}  {tag}")
        if len(items) > top:
            lines.append(f"  ... {len(items) - top} more")
    return "\n".join(lines)


# ============================================================================ folder scanning and storage
@dataclass
class ImageEntry:
    path: str            # absolute image path
    folder: str          # the scanned folder it belongs to (holds the metadata file; absolute)
    folder_name: str     # label as the dataset loader uses it (kohya prefix removed)
    key: str = ""        # its file_name in the folder's metadata ("a.png", "sub/b.png")
    row: Optional[FolderRow] = None  # what lora_train.folder read for it (caption, source, sidecar, encoding)


def list_images(root: str, caption_extension: str = ".txt") -> List[ImageEntry]:
    """Images of `root` and of its kohya `N_name` subfolders, as the dataset loader reads them (lora_train.folder)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"caption folder '{root}' does not exist or is not a folder")
    return [ImageEntry(r.path, r.folder, r.folder_name, r.meta_key, r)
            for r in scan_folder(root, caption_extension).rows]


class MetadataFile:
    """A folder's metadata.csv / metadata.jsonl (file_name,text), rows kept in order, other columns kept."""

    def __init__(self, folder: str, name: Optional[str] = None):
        self.folder = folder
        if name is None:
            name = next((n for n in METADATA_NAMES if os.path.isfile(os.path.join(folder, n))), "metadata.csv")
        self.path = os.path.join(folder, name)
        self.jsonl = name.endswith(".jsonl")
        self.rows: Dict[str, Dict[str, Any]] = {}
        self.fieldnames: List[str] = ["file_name", "text"]
        self.exists = os.path.isfile(self.path)
        self.raw: Optional[bytes] = None
        self.text_col = ""       # csv: the caption column ("text" or "caption")
        self.encoding = "utf-8"  # kept on save when the file was UTF-8 with a BOM or UTF-16; else UTF-8
        self.changed = False
        if self.exists:
            self._read()

    def _read(self) -> None:
        with open(self.path, "rb") as fh:
            self.raw = fh.read()
        text, enc, guessed = decode_text(self.raw)
        if guessed:
            raise ValueError(f"{self.path}: is not UTF-8 text; save it as UTF-8 (in Excel: Save As -> CSV UTF-8)")
        self.encoding = enc
        if self.jsonl:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{self.path}, line {n}: not valid JSON ({exc})") from exc
                    if isinstance(row, dict) and meta_key(row.get("file_name")):
                        self.rows[meta_key(row["file_name"])] = row
            return
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = list(reader.fieldnames or [])
        self.text_col = "text" if "text" in fields else "caption" if "caption" in fields else ""
        if "file_name" not in fields or not self.text_col:
            raise ValueError(f"{self.path}: needs the columns file_name,text (found "
                             f"{','.join(fields)}); fix the header line")
        self.fieldnames = fields
        for row in reader:
            if meta_key(row.get("file_name")):
                self.rows[meta_key(row["file_name"])] = row

    def _text_key(self, row: Dict[str, Any]) -> str:
        """"text", or "caption" where the file uses that column / key (Hugging Face imagefolder accepts both)."""
        if "text" in row:
            return "text"
        return "caption" if ("caption" in row or getattr(self, "text_col", "") == "caption") else "text"

    def get(self, file_name: str) -> Optional[str]:
        row = self.rows.get(meta_key(file_name) or file_name)
        if row is None:
            return None
        return str(row.get(self._text_key(row)) or "")

    def set(self, file_name: str, text: str) -> None:
        key = meta_key(file_name) or file_name
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = {"file_name": key, getattr(self, "text_col", "") or "text": text}
            self.changed = True
        elif row.get(self._text_key(row)) != text:
            row[self._text_key(row)] = text
            self.changed = True

    def on_disk_changed(self) -> bool:
        now = None
        if os.path.isfile(self.path):
            with open(self.path, "rb") as fh:
                now = fh.read()
        return now != self.raw

    def render(self) -> str:
        if self.jsonl:
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows.values())
        if not self.fieldnames:
            self.fieldnames = ["file_name", "text"]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows.values():
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.fieldnames})
        return buf.getvalue()

    def save(self) -> bool:
        if not self.changed:
            return False
        data = encode_text(self.render(), self.encoding)
        atomic_write_bytes(self.path, data)
        self.raw, self.exists, self.changed = data, True, False
        return True


def _read_sidecar(path: str) -> Tuple[Optional[bytes], Optional[str]]:
    """(raw bytes or None when absent, decoded text or None when not Unicode text (lora_train.folder.decode_text))."""
    if not os.path.isfile(path):
        return None, None
    with open(path, "rb") as fh:
        raw = fh.read()
    text, _, guessed = decode_text(raw)
    return raw, (None if guessed else text)


def _sidecar_bytes(row: Optional[FolderRow], text: str) -> bytes:
    """A caption written over an existing sidecar keeps that file's encoding when it was UTF-8 with a BOM or UTF-16
    (Windows Notepad "Unicode"); everything else (new files, plain UTF-8, undecodable legacy files) is UTF-8."""
    keep = row is not None and row.source == "txt" and not row.problem
    return encode_text(text, row.encoding if keep else "utf-8")


# ============================================================================ caption_folder
@dataclass
class CaptionReport:
    written: List[str] = field(default_factory=list)                 # image paths whose caption was written
    skipped: List[str] = field(default_factory=list)                 # kept their existing caption
    failed: List[Tuple[str, str]] = field(default_factory=list)      # (image path, reason)
    captions: Dict[str, str] = field(default_factory=dict)           # image path -> caption it now has
    tags: Dict[str, Tags] = field(default_factory=dict)              # image path -> (tag, confidence), taggers
    folders: Dict[str, str] = field(default_factory=dict)            # image path -> folder label
    files: List[str] = field(default_factory=list)                   # caption files written
    warnings: List[str] = field(default_factory=list)
    stopped: bool = False
    dry_run: bool = False

    @property
    def total(self) -> int:
        return len(self.written) + len(self.skipped) + len(self.failed)

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        return tag_frequency_of((self.folders.get(p, ""), c) for p, c in self.captions.items())

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        s = f"{verb} {len(self.written)}, skipped {len(self.skipped)} (already captioned), failed {len(self.failed)}"
        if self.stopped:
            s += " (stopped early)"
        return s


def _resolve_out(out: str) -> str:
    """'txt' or the metadata file's base name ('metadata.csv' / 'metadata.jsonl')."""
    if out in (None, "", "txt", ".txt", "sidecar"):
        return "txt"
    base = os.path.basename(out)
    if base not in METADATA_NAMES:
        raise ValueError(f"out must be 'txt' or metadata.csv / metadata.jsonl, not '{out}' (the dataset loader only "
                         f"reads those names, from the image folder itself)")
    return base


def caption_folder(folder: str, captioner: Captioner, mode: str = "skip", trigger: Optional[str] = None,
                   replace: Pairs = (), dedupe: bool = False, keep_tokens: Optional[int] = None, out: str = "txt",
                   caption_extension: str = ".txt", progress: Optional[ProgressFn] = None, *,
                   replace_tags: Pairs = (), remove_tags: Iterable[str] = (), add_tags: Iterable[str] = (),
                   sort: Optional[str] = None, batch_size: int = 1, should_stop: Optional[Callable[[], bool]] = None,
                   dry_run: bool = False) -> CaptionReport:
    """Caption every image of `folder` (and its kohya `N_name` subfolders) with `captioner`.

    mode: ``skip`` leaves images that already have a caption alone (their files byte for byte, and the
    captioner is not even run on them); ``overwrite`` replaces captions; ``append`` adds the new caption after
    the existing one. "Existing caption" is what the dataset loader would read: a metadata.csv/jsonl row,
    else a non-empty ``.txt`` sidecar (an empty sidecar counts as no caption).
    out: ``"txt"`` writes ``<stem><caption_extension>`` sidecars; ``"metadata.csv"`` (or a path ending in it)
    writes/updates ``metadata.csv`` in each image folder, keeping its other rows and columns.
    Each caption goes through ``process_caption`` (trigger, replace, dedupe, keep_tokens, ...). Unreadable
    images and captioner errors are reported in ``report.failed`` and the run goes on. ``progress(i, n,
    path)`` is called once per image after it is handled (i = 1..n). ``should_stop()`` -> True stops after
    the current image (what was done is saved). ``dry_run`` computes everything and writes nothing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    target = _resolve_out(out)
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    entries = list_images(folder, caption_extension)
    report = CaptionReport(dry_run=dry_run)
    if not entries:
        report.warnings.append(f"no images in '{os.path.abspath(folder)}' (looked for {', '.join(IMAGE_EXTS)} "
                               f"in the folder and its kohya N_name subfolders)")
        return report
    metas: Dict[str, MetadataFile] = {}

    def meta_for(d: str) -> MetadataFile:
        if d not in metas:  # the folder's own metadata file if it has one (the one the loader reads)
            have = next((n for n in METADATA_NAMES if os.path.isfile(os.path.join(d, n))), None)
            metas[d] = MetadataFile(d, have or target)
        return metas[d]

    # what the loader reads now, per folder: its metadata file (csv before jsonl), then .txt sidecars
    readers: Dict[str, Optional[MetadataFile]] = {}
    for e in entries:
        if e.folder not in readers:
            name = next((n for n in METADATA_NAMES if os.path.isfile(os.path.join(e.folder, n))), None)
            readers[e.folder] = MetadataFile(e.folder, name) if name else None
            if target != "txt" and name and name != target:
                report.warnings.append(f"{os.path.join(e.folder, name)} exists and is what the dataset loader "
                                       f"reads, so the captions go there instead of {target}")
    shadowed: Dict[str, int] = Counter()
    opts = dict(trigger=trigger, replace=replace, dedupe=dedupe, keep_tokens=keep_tokens, replace_tags=replace_tags,
                remove_tags=remove_tags, add_tags=add_tags, sort=sort)
    n = len(entries)
    done = 0
    todo: List[Tuple[ImageEntry, Optional[str]]] = []

    def existing_caption(e: ImageEntry) -> Tuple[Optional[str], Optional[str]]:
        """(caption or None, problem or None), as lora_train.folder read it."""
        r = e.row
        if r is None or r.source == "none":
            return None, None
        if r.problem:
            return "", "its caption file is not UTF-8 text"
        return r.caption, None

    def finish(e: ImageEntry) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, n, e.path)

    def write(e: ImageEntry, caption: str) -> None:
        name = e.key or os.path.basename(e.path)
        if target == "txt":
            reader = readers[e.folder]
            if reader is not None and reader.get(name) is not None:
                shadowed[reader.path] += 1
            dest = (e.row.sidecar if e.row is not None else "") or os.path.splitext(e.path)[0] + caption_extension
            if not dry_run:
                atomic_write_bytes(dest, _sidecar_bytes(e.row, caption))
            report.files.append(dest)
        else:
            meta_for(e.folder).set(name, caption)

    def handle(e: ImageEntry, existing: Optional[str], result: Any) -> None:
        new = caption_text(result)
        tags = result_tags(result)
        if not new.strip():
            report.failed.append((e.path, "the captioner returned an empty caption"))
            return
        text = append_caption(existing, new) if (mode == "append" and existing) else new
        text = process_caption(text, **opts)
        try:
            write(e, text)
        except OSError as exc:
            report.failed.append((e.path, f"cannot write the caption ({exc})"))
            return
        report.written.append(e.path)
        report.captions[e.path] = text
        if tags is not None:
            report.tags[e.path] = tags

    def flush() -> None:
        batch = list(todo)
        todo.clear()
        images, ok = [], []
        for e, existing in batch:
            try:
                images.append(load_image(e.path))
                ok.append((e, existing))
            except Exception as exc:  # corrupt / truncated / not an image: report and go on
                cause = exc.__cause__ or exc  # load_image wraps decoder errors in a training-time message
                report.failed.append((e.path, f"cannot read the image ({type(cause).__name__}: {cause}); "
                                              f"replace or remove the file"))
                finish(e)
        if not ok:
            return
        results: Optional[List[Any]] = None
        if len(ok) > 1:
            try:
                results = captioner.caption_batch(images, [e.path for e, _ in ok])
            except Exception as exc:  # retry one by one to find the image at fault
                log.debug("batch failed (%s); captioning one by one", exc)
        for k, (e, existing) in enumerate(ok):
            try:
                result = results[k] if results is not None else captioner.caption(images[k], e.path)
            except Exception as exc:
                report.failed.append((e.path, f"{captioner.name} failed ({type(exc).__name__}: {exc})"))
            else:
                handle(e, existing, result)
            finish(e)

    try:
        for e in entries:
            if should_stop is not None and should_stop():
                report.stopped = True
                break
            report.folders[e.path] = e.folder_name
            existing, problem = existing_caption(e)
            if problem and mode == "append":
                report.failed.append((e.path, problem + ": convert it to UTF-8 or use mode overwrite"))
                finish(e)
                continue
            if existing is not None and mode == "skip":
                report.skipped.append(e.path)
                report.captions[e.path] = existing
                finish(e)
                continue
            todo.append((e, existing if mode == "append" else None))
            if len(todo) >= max(1, int(batch_size)):
                flush()
        if todo and not report.stopped:
            flush()
    finally:
        todo.clear()
        for m in metas.values():  # metadata rows computed so far are saved even on an interrupt
            if m.changed:
                if not dry_run:
                    m.save()
                report.files.append(m.path)
    for path, count in shadowed.items():
        report.warnings.append(f"{path} has captions for {count} of the images written as {caption_extension} files; "
                               f"the dataset loader reads metadata first, so those {caption_extension} files are not "
                               f"used (caption with --out {os.path.basename(path)})")
    return report


def tag_frequency(folder: str, caption_extension: str = ".txt") -> Dict[str, Dict[str, int]]:
    """{folder label: {tag: count}} over the captions the dataset loader would read (images with none skipped)."""
    return CaptionTable(folder, caption_extension).tag_frequency()


# ============================================================================ caption table
class CaptionRow(NamedTuple):
    path: str      # absolute image path
    caption: str   # current text (with unsaved edits)
    source: str    # where it lives: "txt" | "metadata" | "none" (no caption yet; saved as .txt)


class CaptionTable:
    """The captions of a dataset folder, for the UIs: list, edit one, bulk edit, save the changed files.

    Rows follow the dataset loader (root + kohya `N_name` subfolders; metadata.csv/jsonl row before the
    ``.txt`` sidecar). ``save`` writes only the changed captions, atomically, into where each lives (a new
    caption goes to its ``.txt`` sidecar, or to the folder's metadata file when the folder has one), and
    refuses (CaptionConflict) when a file changed on disk since it was read, unless ``force=True``.
    """

    def __init__(self, folder: str, caption_extension: str = ".txt"):
        if not caption_extension.startswith("."):
            caption_extension = "." + caption_extension
        self.folder = os.path.abspath(folder)
        self.caption_extension = caption_extension
        self.reload()

    def reload(self) -> None:
        """Read the rows through lora_train.folder (the trainer's reader): same images, same captions."""
        self._entries = list_images(self.folder, self.caption_extension)
        self._metas: Dict[str, Optional[MetadataFile]] = {}
        self._orig: Dict[str, str] = {}
        self._raw: Dict[str, Optional[bytes]] = {}
        self._source: Dict[str, str] = {}
        self._edits: Dict[str, str] = {}
        self._by_path = {e.path: e for e in self._entries}
        for e in self._entries:
            if e.folder not in self._metas:
                name = metadata_path(e.folder)
                self._metas[e.folder] = MetadataFile(e.folder, os.path.basename(name)) if name else None
            r, meta = e.row, self._metas[e.folder]
            self._orig[e.path] = r.shown  # an undecodable sidecar shows its cp1252 reading, to be fixed and saved
            if r.source == "metadata":
                self._source[e.path] = "metadata"
                continue
            raw, _ = _read_sidecar(r.sidecar)
            self._raw[e.path] = raw
            self._source[e.path] = r.source if r.source == "txt" or meta is None or meta.get(e.key) is None \
                else "metadata"

    def _sidecar(self, path: str) -> str:
        e = self._by_path.get(path)
        return (e.row.sidecar if e is not None and e.row is not None else "") or \
            os.path.splitext(path)[0] + self.caption_extension

    def _key(self, path: str) -> str:
        p = os.path.abspath(path if os.path.isabs(path) else os.path.join(self.folder, path))
        if p not in self._by_path:
            raise KeyError(f"'{path}' is not an image of {self.folder}")
        return p

    # -- views
    def __len__(self) -> int:
        return len(self._entries)

    def rows(self) -> List[CaptionRow]:
        return [CaptionRow(e.path, self.get(e.path), self._source[e.path]) for e in self._entries]

    def paths(self) -> List[str]:
        return [e.path for e in self._entries]

    def get(self, path: str) -> str:
        p = self._key(path)
        return self._edits.get(p, self._orig[p])

    def folder_name(self, path: str) -> str:
        return self._by_path[self._key(path)].folder_name

    @property
    def dirty(self) -> List[str]:
        """Images whose caption differs from what was read."""
        return [e.path for e in self._entries
                if e.path in self._edits and not same_caption(self._edits[e.path], self._orig[e.path])]

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        return tag_frequency_of((e.folder_name, self.get(e.path)) for e in self._entries if self.get(e.path).strip())

    # -- edits
    def edit(self, path: str, text: str) -> None:
        self._edits[self._key(path)] = " ".join((text or "").split())

    def revert(self, path: Optional[str] = None) -> None:
        if path is None:
            self._edits.clear()
        else:
            self._edits.pop(self._key(path), None)

    def bulk_edit(self, paths: Optional[Iterable[str]] = None, *, replace: Pairs = (), replace_tags: Pairs = (),
                  add_tags: Iterable[str] = (), remove_tags: Iterable[str] = (), trigger: Optional[str] = None,
                  dedupe: bool = False, keep_tokens: Optional[int] = None, sort: Optional[str] = None) -> int:
        """Apply ``process_caption`` edits to the given images (all by default); returns how many changed."""
        targets = [self._key(p) for p in paths] if paths is not None else self.paths()
        changed = 0
        add_tags, remove_tags = list(add_tags or ()), list(remove_tags or ())
        for p in targets:
            old = self.get(p)
            new = process_caption(old, trigger=trigger, replace=replace, dedupe=dedupe, keep_tokens=keep_tokens,
                                  replace_tags=replace_tags, remove_tags=remove_tags, add_tags=add_tags, sort=sort)
            if not same_caption(new, old):
                self._edits[p] = new
                changed += 1
        return changed

    # -- saving
    def save(self, force: bool = False) -> List[str]:
        """Write the changed captions; returns the files written. Nothing is written on a conflict."""
        dirty = self.dirty
        if not dirty:
            return []
        conflicts, metas, sidecars = [], {}, []
        for p in dirty:
            e = self._by_path[p]
            meta = self._metas.get(e.folder)
            if self._source[p] == "metadata" or (self._source[p] == "none" and meta is not None):
                metas.setdefault(e.folder, []).append(p)
                if meta is not None and meta.on_disk_changed():
                    conflicts.append(meta.path)
            else:
                sidecars.append(p)
                raw, _ = _read_sidecar(self._sidecar(p))
                if raw != self._raw.get(p):
                    conflicts.append(self._sidecar(p))
        if conflicts and not force:
            raise CaptionConflict(sorted(set(conflicts)))
        written = []
        for p in sidecars:
            dest = self._sidecar(p)
            data = _sidecar_bytes(self._by_path[p].row, self._edits[p])
            atomic_write_bytes(dest, data)
            self._raw[p] = data
            self._orig[p], self._source[p] = self._edits.pop(p), "txt"
            written.append(dest)
        for d, ps in metas.items():
            meta = self._metas.get(d)
            if meta is None or meta.on_disk_changed():  # force: re-read, then apply our rows on top
                meta = MetadataFile(d, os.path.basename(meta.path) if meta is not None else None)
                self._metas[d] = meta
            for p in ps:
                meta.set(self._by_path[p].key or os.path.basename(p), self._edits[p])
            if meta.save():
                written.append(meta.path)
            for p in ps:
                self._orig[p], self._source[p] = self._edits.pop(p), "metadata"
        return written


def thumbnail(path: str, size: int = 256) -> Optional[Image.Image]:
    """A small RGB copy of an image for the UIs, or None when it cannot be read."""
    try:
        im = load_image(path)
    except Exception:
        return None
    im.thumbnail((size, size))
    return im
