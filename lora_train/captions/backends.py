"""Captioners behind one interface (all return a caption for one PIL image; ``path`` is the image's file path):
  - TemplateCaptioner  "{trigger}, {folder}, {words}" from the file name / folder (no model at all);
  - TransformersCaptioner  an image-to-text model (BLIP, GIT, Florence-2 class) from a local folder or the
    local Hugging Face cache; never downloads;
  - WD14Tagger  a WD14-family booru tagger (ONNX through the optional onnxruntime): tags with confidences;
  - HostCaptioner  wraps a callable the host gives (the WebUI's BLIP / DeepBooru interrogators).
``make_captioner(backend, **opts)`` builds one by name. Nothing here imports transformers or onnxruntime until a
backend that needs them is built.
"""
from __future__ import annotations

import csv
import difflib
import logging
import os
import re
import string
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

from PIL import Image

from ..data.folder import REPEAT_RE, split_tags

log = logging.getLogger(__name__)

Tags = List[Tuple[str, float]]
CaptionResult = Union[str, Tags]
DEFAULT_TEMPLATE = "{trigger}, {folder}, {words}"
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


def folder_words(dirpath: str) -> str:
    """The folder's label as words for a caption: `10_red_style` -> `red style`."""
    return " ".join(re.sub(r"[_\-]+", " ", folder_label(dirpath)).split())


_TEMPLATE_FIELDS = ("trigger", "folder", "stem", "words", "name", "ext", "parent", "width", "height")


def file_name_words(stem: str) -> str:
    """The words of a file name: `_` / `-` as spaces, a leading or trailing counter dropped (`01_red` -> `red`,
    `red_dress_01` -> `red dress`, `IMG (3)` -> `IMG`); '' for a name that is only a counter (`0001`)."""
    words = re.sub(r"[\s_\-.]+", " ", stem).strip()
    words = re.sub(r"(\s*\(\d+\)|\s+\d+)$", "", words).strip()
    words = re.sub(r"^\d+\s+", "", words).strip()
    return "" if words.isdigit() else words


class TemplateCaptioner(Captioner):
    """Captions from a template: {trigger} {folder} {stem} {words} {name} {ext} {parent} {width} {height}.

    {folder} drops kohya's repeat prefix and reads `_` / `-` as spaces (`10_red_cat` -> `red cat`), {parent} is the raw folder name, {words} is the
    stem with `_`/`-` as spaces and a leading or trailing counter removed (`01_red` -> `red`, `red_dress_01` ->
    `red dress`; `file_name_words`), {stem} the name as it is. Empty pieces
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
        words = file_name_words(stem)
        dirpath = os.path.dirname(os.path.abspath(path)) if path else ""
        w, h = image.size if image is not None else (0, 0)
        text = self.template.format(trigger=self.trigger, folder=folder_words(dirpath) if dirpath else "",
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
            out: CaptionResult = caption_text(result)
        else:
            tags = result_tags(result)
            out = tags if tags is not None else caption_text(result)
        check_host_caption(self.name, caption_text(out))
        return out

    def unload(self) -> None:
        if self.unload_fn is not None:
            self.unload_fn()


#: what the WebUIs' interrogators put into a caption when they failed (A1111 / Forge `interrogate`: "<error>",
#: after whatever part of the caption was made before the failure)
HOST_ERROR_MARKER = re.compile(r"<\s*error\s*>", re.IGNORECASE)
OTHER_BACKENDS = ("pick another captioner: template (trigger + file name words), or a transformers / WD14 model "
                  "folder; or fix the host's interrogator (its console says why)")


def check_host_caption(name: str, text: str) -> None:
    """Raise CaptionerError when a host interrogator's caption is empty or carries its error marker: such a
    caption is a failure, never a caption to write."""
    if not text.strip():
        raise CaptionerError(name, "the host's interrogator returned an empty caption", fix=OTHER_BACKENDS)
    if HOST_ERROR_MARKER.search(text):
        raise CaptionerError(name, f"the host's interrogator failed (it returned '{text.strip()[:80]}', not a "
                                   f"caption)", fix=OTHER_BACKENDS)


# ---------------------------------------------------------------------------- model look-up helpers
from ..io_utils import hf_cache_dir  # noqa: E402  (torch-free: the tab lists the cache without importing us)


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
