"""The ComfyUI nodes (classic node API: INPUT_TYPES / RETURN_TYPES / FUNCTION / CATEGORY).

Import cost at ComfyUI start: only lora_train's light modules (config, advisor, prompt, io_utils) and this
package's glue; torch-heavy parts of the core (trainer, diffusers, peft) load when a node runs. ComfyUI's own
modules (folder_paths, comfy.*, nodes) are imported inside the functions that use them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Sequence, Tuple

from lora_train.tuning.advisor import BASES, DETAILS, TASKS
from lora_train.config import DEFAULT_NAME, NETWORK_TYPES, OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainConfig
from lora_train.prompt import parse_floats, parse_ints

from lora_train.hosts.comfyui import ComfyUIHost, pil_to_image, save_preview
from .auto_node import LoraTrainAuto
from .names import CATEGORY, DATASET_TYPE, NODE_NAMES

log = logging.getLogger("lora_train.comfyui")

CAPTION_BACKENDS = ("template", "transformers", "wd14")  # lora_train.captions.BACKENDS minus the WebUI-only "host"
CAPTION_MODES = ("skip", "overwrite", "append")            # lora_train.captions.MODES
PRECISION_CHOICES = tuple(PRECISIONS)  # "auto" first: bf16 / fp16 on CUDA, fp32 on the CPU
#: every front door starts from the config's defaults (the advisor's starting point)
DEFAULTS = TrainConfig().validate()
INT_MAX = 0xFFFFFFFF


# ============================================================================= helpers
def folder_fingerprint(folder: str) -> str:
    """Changes when any file under `folder` is added, removed, renamed, resized or touched (IS_CHANGED)."""
    folder = os.path.abspath(os.path.expanduser(str(folder or "")))
    if not os.path.isdir(folder):
        return f"missing:{folder}"
    h = hashlib.sha256(folder.encode())
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for n in sorted(files):
            p = os.path.join(root, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            h.update(f"{os.path.relpath(p, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _values_hash(**kw: Any) -> str:
    return hashlib.sha256(repr(sorted((k, repr(v)) for k, v in kw.items())).encode()).hexdigest()


def clean_lora_name(name: str) -> str:
    """A file stem for a new LoRA from the node's text (lora_train.names.clean_name); empty is an error."""
    from lora_train.names import clean_name

    stem = clean_name(name, default="")
    if not stem:
        raise ValueError("lora_name is empty: type a name for the new LoRA file, e.g. my_style.")
    return stem


def lora_stem(name: str) -> str:
    """'sub/x.safetensors' (as ComfyUI lists it) -> 'x' (as written in <lora:x:1> tags)."""
    base = os.path.basename(str(name or "").strip().replace("\\", "/"))
    return base[: -len(".safetensors")] if base.lower().endswith(".safetensors") else base


def _contact_sheet(paths: Sequence[str], size: int = 128, cols: int = 4):
    from PIL import Image, ImageOps

    from lora_train.data.dataset import load_image

    thumbs = []
    for p in list(paths)[: cols * 2]:
        try:
            im = load_image(p, draft_size=(size, size))
            thumbs.append(ImageOps.fit(im, (size, size)))
        except Exception:  # noqa: BLE001 - a preview never fails the node
            continue
    if not thumbs:
        return None
    rows = (len(thumbs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size, rows * size), "white")
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * size, (i // cols) * size))
    return sheet


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
                                   "model (BLIP, GIT, Florence-2); wd14: a local WD14 tagger (onnx)."}),
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

    def caption(self, dataset, backend, mode, trigger_word, template, model, save_captions):
        import comfy.model_management as mm
        import comfy.utils

        from lora_train.captions import caption_folder, make_captioner

        trigger = str(trigger_word or "").strip() or dataset.trigger_word
        opts: Dict[str, Any] = {}
        if backend == "template":
            opts = {"template": template, "trigger": trigger}
        elif model and str(model).strip():
            opts = {"model": str(model).strip()}
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


# ============================================================================= training
def _device_and_precision(choice: str) -> Tuple[str, str]:
    import torch

    try:
        import comfy.model_management as mm

        device = mm.get_torch_device()
    except Exception:  # noqa: BLE001 - fakes / very old ComfyUI
        device = torch.device("cpu")
    from lora_train.training.device import resolve_precision

    return str(device), resolve_precision(choice, device)


def _advice_lines(res, cfg) -> List[str]:
    """The live diagnosis summary, and the table's lr when the run's lr is far from the start for its effective
    batch (config.LR_BY_BATCH: 1 -> 1e-4, 2 -> 1.5e-4, 4 -> 2e-4; one knob at a time)."""
    from lora_train.config import learning_rate_for
    from lora_train.tuning.advisor import Finding, format_findings

    out = [format_findings([Finding(**f) for f in res.findings])]
    eff = cfg.batch_size * cfg.gradient_accumulation_steps
    lr = learning_rate_for(eff)
    if abs(cfg.learning_rate - lr) > 0.25 * lr:
        out.append(f"lr note: effective batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} = {eff}; the "
                   f"table's start for it is {lr:.3g}; this run used {cfg.learning_rate:.3g}. If you changed batch "
                   f"or accumulation, set learning_rate to {lr:.3g} (or wire Suggest settings in).")
    return out


#: the Train node's network type inputs (optional: workflows saved before them keep working)
NETWORK_INPUTS = {
    "network_type": (list(NETWORK_TYPES), {"default": "lora", "tooltip": "lora; locon (+ ResNet convs: styles, "
                                                                        "textures); loha / lokr (LyCORIS, small files); "
                                                                        "dora (often better at a lower lr)."}),
    "conv_rank": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "Rank of the ResNet 3x3 convolutions "
                                                                         "(0: off; locon: 0 = rank)."}),
    "conv_alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 1.0,
                             "tooltip": "Alpha of the convolutions; 0 = same as conv_rank."}),
    "factor": ("INT", {"default": -1, "min": -1, "max": 1024, "tooltip": "LoKr Kronecker factor (-1: automatic)."}),
    "full_matrix": ("BOOLEAN", {"default": False, "tooltip": "LoKr: full matrices instead of a low-rank w2."}),
    "dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": "lora / locon: input dropout."}),
    "rank_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                               "tooltip": "loha / lokr / dora: drop rows of the weight delta while training."}),
    "module_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                 "tooltip": "loha / lokr / dora: skip a module while training."}),
    "loraplus_lr_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 1.0,
                                    "tooltip": "LoRA+: the up/B matrices train at ratio x lr (e.g. 16); 0: off."}),
}

#: the Train node's optional kohya options (kohya names; 0 / empty = from kohya_config, or off)
KOHYA_TRAIN_OPTIONS = {
    "kohya_config": ("STRING", {"default": "", "tooltip": "Optional kohya training TOML (or kohya_ss .json): keys "
                                "without a widget here (e.g. min_snr_gamma, block weights) are taken from it; the "
                                "widgets win."}),
    "clip_skip": ("INT", {"default": 0, "min": 0, "max": 12, "tooltip": "SD1/SD2: 2 for anime SD1.5 models (as "
                          "kohya / the WebUI's CLIP skip); 0 or 1: off."}),
    "max_token_length": (["75", "150", "225"], {"default": "75", "tooltip": "Long captions: 75-token chunks, "
                                                "each with BOS/EOS, as the WebUIs encode prompts."}),
    "shuffle_caption": ("BOOLEAN", {"default": False, "tooltip": "Shuffle the comma-separated tags every step."}),
    "keep_tokens": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Tags kept in front when shuffling."}),
    "caption_tag_dropout_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                           "tooltip": "Drop each (not kept) tag with this probability."}),
    "reg_data_dir": ("STRING", {"default": "", "tooltip": "Regularization images (kohya N_class folders)."}),
    "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                    "tooltip": "Loss weight of the reg images."}),
    "loss_type": (["l2", "l1", "huber", "smooth_l1"], {"default": "l2", "tooltip": "kohya loss type (huber: "
                  "huber_schedule snr, huber_c 0.1 unless kohya_config says otherwise)."}),
    "network_weights": ("STRING", {"default": "", "tooltip": "Start from this LoRA file (same rank, or "
                                   "dim_from_weights in kohya_config)."}),
    "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9999, "step": 0.0001,
                            "tooltip": "EMA of the LoRA weights (e.g. 0.999); the saved file is the EMA copy."}),
}


#: the Train node's Flux / SD3 memory option (optional input)
FLOW_TRAIN_OPTIONS = {
    "fp8_base": (["auto", "on", "off"], {"default": "auto", "tooltip": "Flux / SD3.5: store the frozen "
                 "transformer weights in fp8 while training. auto: on for >= 4 B parameter models on a GPU "
                 "(Flux.1, SD3.5 Large). SD1 / SDXL: ignored."}),
}

class LoraTrainTrain:
    DESCRIPTION = ("Train a LoRA on the MODEL / CLIP / VAE of the graph, inside ComfyUI (no subprocess). Saves a "
                   "new file in the loras folder (never overwrites: my_lora_v2, ...), with kohya metadata.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model to train on (MODEL of a checkpoint loader)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (CLIP of the same loader)."}),
            "vae": ("VAE", {"tooltip": "Its VAE (VAE of the same loader); encodes the training images."}),
            "dataset": (DATASET_TYPE, {"tooltip": "Images and captions from 'Dataset from folder' / 'Caption dataset'."}),
            "lora_name": ("STRING", {"default": DEFAULT_NAME, "tooltip": "File name of the new LoRA; a free name is "
                                                                      "taken when it exists (my_lora_v2, ...)."}),
            "learning_rate": ("FLOAT", {"default": DEFAULTS.learning_rate, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                        "tooltip": "UNet learning rate (text encoder: half of it)."}),
            "rank": ("INT", {"default": DEFAULTS.lora_rank, "min": 1, "max": 256, "tooltip": "LoRA rank (dim): capacity and file size."}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 1.0,
                                "tooltip": "LoRA alpha; scale = alpha / rank. 0 = same as rank."}),
            "batch_size": ("INT", {"default": DEFAULTS.batch_size, "min": 1, "max": 64, "tooltip": "Images per step."}),
            "gradient_accumulation": ("INT", {"default": DEFAULTS.gradient_accumulation_steps, "min": 1, "max": 128,
                                              "tooltip": "Steps whose gradients are summed before an update."}),
            "epochs": ("INT", {"default": DEFAULTS.epochs, "min": 1, "max": 10000, "tooltip": "Passes over the dataset."}),
            "max_steps": ("INT", {"default": 0, "min": 0, "max": 1000000,
                                  "tooltip": "Stop after this many optimizer steps; 0 = use epochs."}),
            "lr_scheduler": (list(SCHEDULERS), {"default": DEFAULTS.lr_scheduler, "tooltip": "How the learning rate changes."}),
            "warmup_steps": ("INT", {"default": DEFAULTS.lr_warmup_steps, "min": 0, "max": 100000,
                                     "tooltip": "Learning-rate warmup steps."}),
            "optimizer": (list(OPTIMIZERS), {"default": DEFAULTS.optimizer, "tooltip": "Optimizer (AdamW8bit needs bitsandbytes, "
                                                                              "Prodigy needs prodigyopt)."}),
            "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "Also train the text encoder."}),
            "training_seed": ("INT", {"default": DEFAULTS.seed, "min": 0, "max": INT_MAX,
                                      "tooltip": "Seed of the run (same seed + same inputs = same LoRA)."}),
            "save_every_n_epochs": ("INT", {"default": DEFAULTS.save_every_n_epochs, "min": 0, "max": 10000,
                                            "tooltip": "Also save name-00000N files every N epochs (0 = final only); "
                                                       "the sweep can compare them."}),
            "mixed_precision": (list(PRECISION_CHOICES), {"default": "auto", "tooltip": "auto: bf16/fp16 on CUDA, fp32 on CPU."}),
        }, "optional": {**NETWORK_INPUTS, **KOHYA_TRAIN_OPTIONS, **FLOW_TRAIN_OPTIONS},
            "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("lora_name", "lora_path", "loss_plot", "report")
    OUTPUT_TOOLTIPS = ("The new LoRA as ComfyUI lists it (for the sweep / LoRA loaders).", "Full path of the file.",
                       "Loss curve.", "What was trained and where it went.")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **kw):
        # Only the widget values (links are not passed here); ComfyUI re-runs also when an upstream node changed.
        return _values_hash(**{k: v for k, v in kw.items() if isinstance(v, (str, int, float, bool))})

    def train(self, model, clip, vae, dataset, lora_name, learning_rate, rank, alpha, batch_size,
              gradient_accumulation, epochs, max_steps, lr_scheduler, warmup_steps, optimizer, train_text_encoder,
              training_seed, save_every_n_epochs, mixed_precision="auto", unique_id=None, network_type="lora",
              conv_rank=0, conv_alpha=0.0, factor=-1, full_matrix=False, dropout=0.0, rank_dropout=0.0,
              module_dropout=0.0, loraplus_lr_ratio=0.0, kohya_config="", clip_skip=0,
              max_token_length="75", shuffle_caption=False, keep_tokens=0, caption_tag_dropout_rate=0.0,
              reg_data_dir="", prior_loss_weight=1.0, loss_type="l2", network_weights="", ema_decay=0.0,
              fp8_base="auto"):
        from lora_train.config import TrainConfig
        from lora_train.plots import loss_plot
        from lora_train.run import train_for_host

        host = ComfyUIHost(model, clip, vae, node_id=unique_id)
        device, precision = _device_and_precision(mixed_precision)
        plan = host.memory_plan(device, fp8_base)  # Flux / SD3 only (hosts/comfyui_flow.py); None for UNets
        from lora_train.kohya.toml_config import node_config

        node_kw = dict(
            train_data_dir=dataset.folder, caption_extension=dataset.caption_extension,
            trigger_word=dataset.trigger_word, resolution=dataset.resolution, base_model="comfyui",
            output_name=clean_lora_name(lora_name), lora_rank=int(rank),
            lora_alpha=float(alpha) if alpha and alpha > 0 else None, train_text_encoder=bool(train_text_encoder),
            learning_rate=float(learning_rate), optimizer=optimizer, lr_scheduler=lr_scheduler,
            lr_warmup_steps=int(warmup_steps), batch_size=int(batch_size),
            gradient_accumulation_steps=int(gradient_accumulation), epochs=int(epochs),
            max_train_steps=int(max_steps) if max_steps and max_steps > 0 else None, seed=int(training_seed),
            mixed_precision=precision, device=device, save_every_n_epochs=int(save_every_n_epochs),
            save_state_every_n_epochs=0, save_state_every_n_steps=0, network_type=network_type,
            conv_rank=int(conv_rank), conv_alpha=float(conv_alpha) if conv_alpha and conv_alpha > 0 else None,
            factor=int(factor), full_matrix=bool(full_matrix), dropout=float(dropout), rank_dropout=float(rank_dropout),
            module_dropout=float(module_dropout),
            loraplus_lr_ratio=float(loraplus_lr_ratio) if loraplus_lr_ratio and loraplus_lr_ratio > 0 else None,
            **({"fp8_base": plan.fp8_base} if plan else {}))
        kohya_options = dict(kohya_config=kohya_config, clip_skip=clip_skip, max_token_length=max_token_length,
                             shuffle_caption=shuffle_caption, keep_tokens=keep_tokens,
                             caption_tag_dropout_rate=caption_tag_dropout_rate, reg_data_dir=reg_data_dir,
                             prior_loss_weight=prior_loss_weight, loss_type=loss_type,
                             network_weights=network_weights, ema_decay=ema_decay)
        cfg = TrainConfig.from_dict(node_config(node_kw, getattr(dataset, "kohya", {}), kohya_options))
        ds = dataset.load()
        holder: Dict[str, Any] = {}
        stopped_by_user = [False]

        def user_stop() -> None:
            stopped_by_user[0] = True
            if "trainer" in holder:
                holder["trainer"].stop()  # ends after this step and saves what was trained

        def on_event(ev: Dict[str, Any]) -> None:
            kind = ev.get("kind")
            if stopped_by_user[0] or host.interrupted():
                user_stop()
                return
            try:
                if kind == "start":
                    host.progress(0, int(ev.get("total_steps") or 1))
                elif kind == "step":
                    host.progress(int(ev["step"]), int(ev["total_steps"]))
            except Exception as exc:  # noqa: BLE001
                # ComfyUI's progress hook (main.py) raises InterruptProcessingException when Cancel was pressed
                # (and clears the flag): stop cleanly instead of letting it kill the run unsaved.
                if type(exc).__name__ != "InterruptProcessingException":
                    raise
                user_stop()
                return
            if kind == "step" and (ev["step"] % 10 == 0 or ev["step"] == ev["total_steps"]):
                log.info("lora_train: step %s/%s loss %.4f", ev["step"], ev["total_steps"], ev["loss"])

        t0 = time.time()
        run = train_for_host(host, cfg, None, dataset=ds, callback=on_event,
                             on_trainer=lambda t: holder.__setitem__("trainer", t))
        holder.clear()
        res, name, loras_dir = run.result, run.name, host.output_dir()
        published = run.published
        final = run.lora_path or ""
        losses = res.losses
        if res.loss_png and os.path.isfile(res.loss_png):
            from PIL import Image

            with Image.open(res.loss_png) as im:
                plot = im.convert("RGB")
        else:
            plot = loss_plot(list(range(1, len(losses) + 1)), losses, title=f"{name} loss")
        lines = [f"LoRA '{name}': {res.steps} steps, {res.epochs_done} epoch(s) in {time.time() - t0:.0f} s on {device}"
                 f"{' (stopped by interrupt: what was trained is saved)' if stopped_by_user[0] else ''}."]
        if final:
            lines.append(f"saved {final}")
        if len(published) > 1:
            lines.append("epoch files: " + ", ".join(os.path.basename(p) for p in published[:-1]))
        if losses:
            k = max(1, len(losses) // 10)
            lines.append(f"loss: first {sum(losses[:k]) / k:.4f}, last {sum(losses[-k:]) / k:.4f} (mean of {k} steps)")
        if res.message:
            lines.append(res.message)
        lines.extend(run.warnings)
        if plan:
            lines.append(plan.text)
        lines.extend(_advice_lines(res, cfg))
        lines.append(f"run folder (config, loss log): {res.output_dir}")
        report = "\n".join(lines)
        log.info(report)
        if stopped_by_user[0]:
            import comfy.model_management as mm

            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()  # end the prompt as ComfyUI's own interrupt does
        if not final:
            raise RuntimeError(f"training produced no LoRA file: {res.message or 'no step was trained'}")
        lora_listed = os.path.relpath(final, loras_dir).replace(os.sep, "/")
        return {"ui": {"text": [report], "images": [save_preview(plot, "lora_train_loss")]},
                "result": (lora_listed, final, pil_to_image(plot), report)}


# ============================================================================= using LoRAs
def _lora_list() -> List[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


class LoraTrainApplyLora:
    DESCRIPTION = "Apply a LoRA to MODEL and CLIP with ComfyUI's own LoRA loader."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the LoRA is applied to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder the LoRA is applied to."}),
            "lora_name": (_lora_list(), {"tooltip": "A LoRA from the loras folder."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                         "tooltip": "Strength on the UNet (0 = off)."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                        "tooltip": "Strength on the text encoder (0 = off)."}),
        }, "optional": {
            "lora_override": ("STRING", {"forceInput": True, "tooltip": "Connect Train LoRA's lora_name here to use "
                                                                       "the file it just wrote instead of the list."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the LoRA.", "The text encoder with the LoRA.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, clip, lora_name, strength_model, strength_clip, lora_override=None):
        name = lora_override if lora_override else lora_name
        host = ComfyUIHost(model, clip)
        return host.apply_lora(model, clip, name, float(strength_model), float(strength_clip))


class LoraTrainPromptWithTags:
    DESCRIPTION = ("A prompt with <lora:name:weight> tags (as in the WebUI): the tags are applied through ComfyUI's "
                   "LoRA loader and removed from the text, which is encoded as CONDITIONING.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the tagged LoRAs are applied to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder (LoRAs applied, then encodes the text)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "a photo <lora:my_lora:0.8>",
                                "tooltip": "Prompt; <lora:name:w> or <lora:name:te=0.5:unet=0.8> tags name LoRAs "
                                           "in the loras folder by file name."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "CONDITIONING")
    RETURN_NAMES = ("model", "clip", "text", "conditioning")
    OUTPUT_TOOLTIPS = ("Model with the LoRAs.", "Text encoder with the LoRAs.", "The prompt without the tags.",
                       "The encoded prompt.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, clip, text):
        host = ComfyUIHost(model, clip)
        model, clip, cleaned, _tags = host.apply_prompt_loras(model, clip, text)
        return (model, clip, cleaned, host.encode(clip, cleaned))


def _sampler_choices() -> Tuple[List[str], List[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:  # noqa: BLE001 - outside ComfyUI
        return ["euler"], ["normal"]


class LoraTrainStrengthSweep:
    DESCRIPTION = ("A labelled grid: the LoRA at several strengths (base = strength 0 column first) x seeds, or x "
                   "epoch files; every cell made with ComfyUI's sampler and LoRA loader.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_choices()
        return {"required": {
            "model": ("MODEL", {"tooltip": "Base model (without the LoRA)."}),
            "clip": ("CLIP", {"tooltip": "Base text encoder."}),
            "vae": ("VAE", {"tooltip": "Decodes the samples."}),
            "lora_name": ("STRING", {"default": "", "tooltip": "The LoRA: a name from the loras folder, or connect "
                                                               "Train LoRA's lora_name."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "a photo",
                                  "tooltip": "Prompt; the LoRA tag is added per column (other <lora:...> tags stay)."}),
            "negative": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "",
                                    "tooltip": "Negative prompt."}),
            "strengths": ("STRING", {"default": "0.5, 1.0", "tooltip": "Comma-separated strengths; the base column "
                                                                      "(0) is always added first."}),
            "seeds": ("STRING", {"default": "1", "tooltip": "Comma-separated seeds, one row each."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "CFG scale."}),
            "sampler_name": (samplers, {"tooltip": "ComfyUI sampler."}),
            "scheduler": (schedulers, {"tooltip": "ComfyUI scheduler."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
            "epochs_axis": ("BOOLEAN", {"default": False, "tooltip": "Rows = the run's epoch files (name-00000N) and "
                                                                     "the final, for each seed."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("grid", "cells", "info")
    OUTPUT_TOOLTIPS = ("The labelled grid image.", "Every cell as a batch, row by row (base column first).",
                       "Columns, rows and generation parameters.")
    FUNCTION = "sweep"
    CATEGORY = CATEGORY

    def sweep(self, model, clip, vae, lora_name, prompt, negative, strengths, seeds, steps, cfg, sampler_name,
              scheduler, width, height, epochs_axis, unique_id=None):
        from lora_train.prompt import LoraLibrary
        from lora_train.sampler import GenParams, build_grid, epoch_axis

        host = ComfyUIHost(model, clip, vae, sampler_name=sampler_name, scheduler=scheduler, node_id=unique_id)
        path = host.resolve_lora(lora_name)
        stem = lora_stem(path)
        strength_list = parse_floats(strengths, "strengths")
        seed_list = parse_ints(seeds, "seeds")
        base = GenParams(prompt=str(prompt or ""), negative_prompt=str(negative or ""), seed=seed_list[0],
                         steps=int(steps), cfg_scale=float(cfg), width=int(width), height=int(height),
                         sampler=f"{sampler_name} {scheduler}")
        epochs = epoch_axis(LoraLibrary([os.path.dirname(path)]), stem) if epochs_axis else None
        grid = build_grid(host.generate, base, stem, strength_list, seed_list, epochs=epochs,
                          progress=lambda d, t: host.progress(d, t))
        info = (f"{grid.title}\ncolumns: {', '.join(grid.col_labels)}\nrows: {', '.join(grid.row_labels)}\n"
                f"LoRA file: {path}")
        import torch

        cells = torch.cat([pil_to_image(c.image) for c in grid.cells], dim=0)
        return (pil_to_image(grid.image), cells, info)


NODE_CLASS_MAPPINGS = {
    "LoraTrainDatasetFromFolder": LoraTrainDatasetFromFolder,
    "LoraTrainCaptionDataset": LoraTrainCaptionDataset,
    "LoraTrainSuggestSettings": LoraTrainSuggestSettings,
    "LoraTrainTrain": LoraTrainTrain,
    "LoraTrainApplyLora": LoraTrainApplyLora,
    "LoraTrainPromptWithTags": LoraTrainPromptWithTags,
    "LoraTrainStrengthSweep": LoraTrainStrengthSweep,
    "LoraTrainAuto": LoraTrainAuto,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: NODE_NAMES[k] for k in NODE_CLASS_MAPPINGS}
