"""ComfyUI nodes: the dataset (a folder of images and captions), captioning it, the advisor's settings."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict

from lora_train.hosts.comfyui import save_preview
from lora_train.tuning.advisor import BASES, DETAILS, TASKS

from .common import log, CAPTION_BACKENDS, CAPTION_MODES, folder_fingerprint, _values_hash, _contact_sheet
from .names import CATEGORY, DATASET_TYPE


# ============================================================================= DATASET
@dataclass
class DatasetRef:
    """What flows on a LORA_TRAIN_DATASET link: where the images are and how to read them; captions made by
    the Caption node and not saved to disk travel in `captions` (image path -> caption)."""

    folder: str
    resolution: int = 512
    trigger_word: str = ""
    repeats: int = 1
    caption_extension: str = ".txt"
    captions: Dict[str, str] = field(default_factory=dict)
    image_count: int = 0
    fingerprint: str = ""
    kohya: Dict[str, Any] = field(default_factory=dict)  # config keys from a kohya dataset/training TOML

    def load(self):
        from lora_train.data.dataset import _with_trigger, load_dataset

        ds = load_dataset(self.folder, self.resolution, self.trigger_word, self.caption_extension)
        for it in ds.items:
            if it.path in self.captions:
                it.caption = _with_trigger(self.captions[it.path], self.trigger_word) if self.trigger_word \
                    else self.captions[it.path]
                it.caption_source = "comfyui"
            it.repeats = max(1, int(it.repeats) * int(self.repeats))
        return ds


def _caption_preview(ds, limit: int = 12) -> str:
    lines = [f"{os.path.relpath(it.path, ds.root)}: {it.caption}" for it in ds.items[:limit]]
    if len(ds.items) > limit:
        lines.append(f"... and {len(ds.items) - limit} more")
    return "\n".join(lines)


class LoraTrainDatasetFromFolder:
    DESCRIPTION = ("A folder of training images with same-name .txt captions (or metadata.csv/jsonl, or kohya "
                   "N_name subfolders). Nothing is written into the folder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "Folder that holds the training images (and their .txt "
                                                            "captions). Absolute path, or relative to ComfyUI's input folder."}),
            "trigger_word": ("STRING", {"default": "", "tooltip": "Word put at the start of every caption that does "
                                                                  "not have it yet; use it in prompts to call the LoRA."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                   "tooltip": "Training resolution (images are resized and cropped to it). 512 for "
                                              "SD1.x, 1024 for SDXL."}),
            "repeats": ("INT", {"default": 1, "min": 1, "max": 100,
                                "tooltip": "How many times each image is seen per epoch (multiplies the N of kohya "
                                           "N_name subfolders)."}),
        }, "optional": {
            "kohya_config": ("STRING", {"default": "", "tooltip": "Optional kohya dataset_config / training TOML "
                                        "(or kohya_ss .json): an empty folder, trigger word and repeats 1 are taken "
                                        "from it, and its caption / reg / loss options go to the Train node."}),
        }}

    RETURN_TYPES = (DATASET_TYPE, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset, for Caption / Suggest / Train.", "Image count and the first captions.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @staticmethod
    def resolve_folder(folder: str) -> str:
        folder = os.path.expanduser(str(folder or "").strip())
        if not folder:
            raise ValueError("folder is empty: type the path of the folder that holds your training images.")
        if not os.path.isabs(folder):
            import folder_paths

            folder = os.path.join(folder_paths.get_input_directory(), folder)
        return os.path.abspath(folder)

    @classmethod
    def IS_CHANGED(cls, folder="", trigger_word="", resolution=512, repeats=1, kohya_config="", **_):
        try:
            path = cls.resolve_folder(folder)
        except Exception:  # noqa: BLE001 - validation reports it
            path = str(folder)
        return _values_hash(fp=folder_fingerprint(path), t=trigger_word, r=resolution, n=repeats, k=kohya_config)

    def load(self, folder, trigger_word, resolution, repeats, kohya_config=""):
        kohya: Dict[str, Any] = {}
        if str(kohya_config or "").strip():  # kohya TOML: fills what the widgets leave empty
            from lora_train.kohya.toml_config import load_kohya

            imp = load_kohya(str(kohya_config).strip())
            kohya = {k: v for k, v in imp.data.items() if k not in ("train_data_dir", "output_dir", "output_name")}
            folder = folder if str(folder or "").strip() else imp.config.train_data_dir
            trigger_word = trigger_word if str(trigger_word or "").strip() else imp.config.trigger_word
            repeats = repeats if int(repeats) != 1 else kohya.pop("num_repeats", 1)
            for w in imp.warnings:
                log.warning("lora_train: %s", w)
        path = self.resolve_folder(folder)
        ref = DatasetRef(folder=path, resolution=int(resolution), trigger_word=str(trigger_word or "").strip(),
                         repeats=int(repeats), fingerprint=folder_fingerprint(path), kohya=kohya)
        ds = ref.load()
        ref.image_count = ds.image_count
        summary = (f"{ds.image_count} images, {len(ds)} samples per epoch (repeats applied), "
                   f"resolution {ref.resolution}, from {path}")
        if ds.warnings:
            summary += "\n" + "\n".join(f"warning: {w}" for w in ds.warnings)
        summary += "\n" + _caption_preview(ds)
        ui: Dict[str, Any] = {"text": [summary]}
        sheet = _contact_sheet([it.path for it in ds.items])
        if sheet is not None:
            ui["images"] = [save_preview(sheet, "lora_train_dataset")]
        return {"ui": ui, "result": (ref, summary)}


class LoraTrainCaptionDataset:
    DESCRIPTION = ("Caption the dataset's images with a template, a local transformers captioning model or a WD14 "
                   "tagger. Captions stay in the graph unless save_captions writes them as .txt files.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (DATASET_TYPE, {"tooltip": "The dataset from 'Dataset from folder'."}),
            "backend": (list(CAPTION_BACKENDS), {"default": "template",
                        "tooltip": "template: from file/folder names (no model); transformers: a local image-to-text "
                                   "model (BLIP, GIT, Florence-2); vlm: a local chat vision-language model "
                                   "(Qwen2.5-VL, Qwen3-VL, JoyCaption / LLaVA) asked in the chosen style; wd14: a "
                                   "local WD14 tagger (onnx)."}),
            "mode": (list(CAPTION_MODES), {"default": "skip",
                     "tooltip": "skip: keep existing captions; overwrite: replace them; append: add after them."}),
            "trigger_word": ("STRING", {"default": "", "tooltip": "Put first in every caption (empty: the dataset's "
                                                                  "trigger word)."}),
            "template": ("STRING", {"default": "{trigger}, {words}", "tooltip": "Template backend: placeholders "
                         "{trigger} {folder} {stem} {words} {name} {ext} {parent} {width} {height}."}),
            "model": ("STRING", {"default": "", "tooltip": "transformers / wd14: a local model folder or a repo id "
                                                           "already in the Hugging Face cache (nothing is downloaded)."}),
            "save_captions": ("BOOLEAN", {"default": False, "tooltip": "Write the captions as .txt files beside the "
                                                                       "images (existing ones only per mode)."}),
        }, "optional": {
            "style": (["auto", "tags", "short", "detailed", "edit"], {"default": "auto", "tooltip": "vlm: what the "
                      "model is asked (lora_train/captions/styles.json). auto: the family's (family input)."}),
            "family": (["auto"] + list(BASES), {"default": "auto", "tooltip": "The base you will train: "
                       "picks the style and checks the captions' length against its text encoder."}),
            "concept": ("STRING", {"default": "", "tooltip": "What the LoRA should learn (e.g. 'red hair'): the "
                                                             "checks list captions that name it."}),
        }}

    RETURN_TYPES = (DATASET_TYPE, "STRING")
    RETURN_NAMES = ("dataset", "captions")
    OUTPUT_TOOLTIPS = ("The dataset with these captions.", "The captions, one line per image.")
    FUNCTION = "caption"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **kw):
        return _values_hash(**{k: v for k, v in kw.items() if isinstance(v, (str, int, float, bool))})

    def caption(self, dataset, backend, mode, trigger_word, template, model, save_captions, style="auto",
                family="auto", concept=""):
        import comfy.model_management as mm
        import comfy.utils

        from lora_train.captions import caption_folder, make_captioner

        trigger = str(trigger_word or "").strip() or dataset.trigger_word
        opts: Dict[str, Any] = {}
        if backend == "template":
            opts = {"template": template, "trigger": trigger}
        elif model and str(model).strip():
            opts = {"model": str(model).strip()}
        fam = None if family == "auto" else family
        if backend == "vlm":
            from lora_train.captions import styles

            opts["style"] = styles.for_family(fam) if style == "auto" else style
            opts["device"] = str(mm.get_torch_device())
        pbar = comfy.utils.ProgressBar(max(1, dataset.image_count or 1))
        with make_captioner(backend, **opts) as cap:
            report = caption_folder(dataset.folder, cap, mode=mode, trigger=trigger or None,
                                    caption_extension=dataset.caption_extension, dry_run=not save_captions,
                                    progress=lambda i, n, _p: pbar.update_absolute(i, n),
                                    should_stop=mm.processing_interrupted)
        if report.stopped:
            mm.throw_exception_if_processing_interrupted()
        ref = replace(dataset, captions={**dataset.captions, **report.captions}, trigger_word=trigger)
        ds = ref.load()
        text = report.summary() + ("" if save_captions else " (in the graph only; save_captions writes .txt files)")
        if report.failed:
            text += "\n" + "\n".join(f"failed: {line}" for line in report.failure_lines(10))
        from lora_train.captions.checks import check_captions

        found = check_captions([(it.path, it.caption) for it in ds.items], trigger, fam, concept)
        if found:
            text += "\ncaption checks:\n" + "\n".join(f"{f.severity}: {f}" for f in found)
        text += "\n" + _caption_preview(ds, limit=50)
        return {"ui": {"text": [text]}, "result": (ref, text)}


class LoraTrainSuggestSettings:
    DESCRIPTION = "First-run settings from the dataset size, the task and the GPU memory, each with its reason."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (DATASET_TYPE, {"tooltip": "The dataset to train on (its image count sets epochs and steps)."}),
            "task": (list(TASKS), {"default": "style", "tooltip": "What the LoRA should learn."}),
            "base": (list(BASES), {"default": "sd1", "tooltip": "Base model family of the checkpoint you train on."}),
            "vram_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 1.0,
                                  "tooltip": "GPU memory in GB; 0 = detect."}),
            "detail": (list(DETAILS), {"default": "normal", "tooltip": "demanding (faces, logos) raises the rank."}),
        }}

    RETURN_TYPES = ("FLOAT", "INT", "FLOAT", "INT", "INT", "INT", "INT", "STRING")
    RETURN_NAMES = ("learning_rate", "rank", "alpha", "batch_size", "gradient_accumulation", "epochs",
                    "warmup_steps", "report")
    OUTPUT_TOOLTIPS = ("UNet learning rate.", "LoRA rank.", "LoRA alpha.", "Batch size.", "Gradient accumulation steps.",
                       "Epochs.", "Learning-rate warmup steps.", "Each setting with its reason.")
    FUNCTION = "suggest"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def suggest(self, dataset, task, base, vram_gb, detail):
        from lora_train.tuning.advisor import suggest

        n = dataset.image_count or dataset.load().image_count
        s = suggest(n, task=task, base=base, vram_gb=float(vram_gb) if vram_gb and vram_gb > 0 else None,
                    detail=detail, resolution=dataset.resolution, samples_per_epoch=n * max(1, dataset.repeats),
                    vram_field="the node's vram_gb input")
        text = s.table()
        return {"ui": {"text": [text]},
                "result": (float(s.learning_rate), int(s.lora_rank), float(s.lora_alpha), int(s.batch_size),
                           int(s.gradient_accumulation_steps), int(s.epochs), int(s.lr_warmup_steps), text)}
