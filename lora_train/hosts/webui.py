"""The `Host` of AUTOMATIC1111 (`WebUIHost`) and of Forge (`ForgeHost`). Training goes through the one path
every front door uses (`lora_train.run.train_for_host`, started by the tab's `webui.logic.start_training`). Every `modules.*` / `backend.*` / Lora-extension import happens inside a function,
so this file imports (and its tests run) without a WebUI; `tests/fake_webui/` mimics the API surface used.

What differs between the two hosts (read from A1111 1.10.1 and Forge's current source):
- memory: A1111 `sd_models.unload_model_weights()` moves the model to the CPU and
  `sd_models.send_model_to_device(model)` brings it back (`reload_model_weights` returns early for an
  unchanged checkpoint, so it cannot be used to restore). In Forge those are stubs: memory goes through
  `backend.memory_management.unload_all_models()` and the model comes back through `forge_model_reload()`
  (a no-op while the checkpoint is unchanged; Forge moves models to the GPU on demand).
- weights: A1111's `shared.sd_model.state_dict()` is the ldm layout (text encoder under `.wrapped.`);
  a LoRA used in the last generation is merged into those weights (backups in `network_weights_backup`), so
  they are restored first. Forge's `sd_model` is an engine with `forge_objects.{unet,clip,vae}`; for SD1 its
  modules hold ldm-layout weights (`model.diffusion_model.` / `cond_stage_model.` / `first_stage_model.`);
  when a LoRA is applied (`current_lora_hash` != "[]"), or for other model kinds, the checkpoint file is
  read instead.
- LoRA caches: A1111 keeps `networks.networks_in_memory` and per-layer `network_current_names` (same name and
  strength = weights not re-applied); Forge keeps `networks.load_lora_state_dict` (an lru_cache by file name)
  and `sd_model.current_lora_hash`. Both keep the text conditioning cache
  `processing.StableDiffusionProcessing.cached_c/cached_uc`. Each training run gets a new file name, and
  `invalidate_lora_caches()` clears all of these as well.
- paths: with `--listen`/`--share`/`--ngrok`/`--server-name` (A1111's `cmd_opts.webui_is_non_local`), paths
  typed into the tab must lie inside the WebUI's folders, unless `--enable-insecure-extension-access` (the
  WebUI's own "trust the remote user" flag) is set.

Forge Neo (Haoming02's neo branch of sd-webui-forge-classic) loads Qwen-Image, Z-Image, Wan 2.1 (and Wan 2.2's
A14B experts, which have its shape) and Chroma from the checkpoint (models/Stable-diffusion, or diffusion_models
through --ckpt-dirs) plus the "VAE / Text Encoder" files picked in its top bar (models/VAE, models/text_encoder),
with every config, tokenizer and scheduler from the folder it bundles per model, backend/huggingface/<org>/<repo>/
(backend/loader.py forge_loader: `os.path.join(<backend>/huggingface, estimated_config.huggingface_repo)`). The tab
trains from exactly those files over that folder (`ForgeHost._load_file`, models/split_parts.py).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import re
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .base import Host, HostError, same_file
from ..models.single_file import from_original_state_dict, load_single_file
from ..models.loading import load_base_model
from ..models.base import ModelError
from ..models.flow_single_file import component_files, detect_family, split_files
from .. import families

log = logging.getLogger("lora_train")

_MEMORY_FREED = threading.Event()  # set while the WebUI's model is off the GPU for us
RUNS_SUBDIR = os.path.join("outputs", "lora_train")


def _mod(name: str):
    return importlib.import_module(name)


def _sd_models():
    return _mod("modules.sd_models")


def _shared():
    return _mod("modules.shared")


def networks_module():
    """The Lora extension's `networks` module (A1111 extensions-builtin/Lora, Forge sd_forge_lora), which the
    WebUI imports as a top-level module when it loads that extension; None when it is not there."""
    mod = sys.modules.get("networks")
    if mod is not None and hasattr(mod, "list_available_networks"):
        return mod
    try:
        mod = importlib.import_module("networks")
    except Exception:
        return None
    return mod if hasattr(mod, "list_available_networks") else None


class _Tee(io.TextIOBase):
    """Writes to the stream it replaces and keeps a copy."""

    def __init__(self, stream, copy: io.StringIO):
        self.stream, self.copy = stream, copy

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.stream.write(s) if self.stream is not None else len(s)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()


def last_error_line(text: str) -> str:
    """The last 'SomeError: message' line of a printed traceback ('' when there is none)."""
    found = re.findall(r"^\s*(?:\*\*\*\s*)?([A-Za-z_][\w.]*(?:Error|Exception)\b:?.*)$", text, re.MULTILINE)
    return found[-1].strip() if found else ""


def with_printed_error(name: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """fn(image) of a WebUI interrogator, which prints its exception and returns '<error>' instead of raising:
    that result raises CaptionerError naming the error the WebUI printed (e.g. "No module named 'models.blip'")."""
    from ..captions.backends import HOST_ERROR_MARKER, OTHER_BACKENDS, CaptionerError

    def call(image):
        copy = io.StringIO()
        with contextlib.redirect_stderr(_Tee(sys.stderr, copy)):
            result = fn(image)
        if isinstance(result, str) and HOST_ERROR_MARKER.search(result):
            why = last_error_line(copy.getvalue()) or "its console says why"
            raise CaptionerError(name, f"the WebUI's interrogator failed ({why})", fix=OTHER_BACKENDS)
        return result

    return call


def is_forge() -> bool:
    """Forge: `sd_models.forge_model_reload` exists and `backend.memory_management` is importable."""
    try:
        sd_models = _sd_models()
    except Exception:
        return False
    if not hasattr(sd_models, "forge_model_reload"):
        return False
    try:
        return importlib.util.find_spec("backend.memory_management") is not None
    except (ImportError, ValueError):
        return False


def make_host() -> "WebUIHost":
    return ForgeHost() if is_forge() else WebUIHost()


class WebUIHost(Host):
    """AUTOMATIC1111 1.x (tested against 1.10.1)."""

    name = "a1111"
    title = "AUTOMATIC1111"
    has_txt2img = True
    polls_from_page = True
    model_config = None  # config= for from_original_state_dict (None: the bundled config of the detected kind)

    # ------------------------------------------------------------------ folders
    def caption_model_dirs(self) -> List[str]:
        """models/VLM, models/LLM, models/captioners, models/BLIP (the WebUI's own interrogator models) that exist."""
        root = _mod("modules.paths").models_path
        return [d for d in (os.path.join(root, n) for n in ("VLM", "LLM", "captioners", "BLIP")) if os.path.isdir(d)]

    def lora_dirs(self) -> List[str]:
        cmd = _shared().cmd_opts
        first = getattr(cmd, "lora_dir", None) or os.path.join(_mod("modules.paths").models_path, "Lora")
        dirs = [os.path.abspath(first)]
        # A1111's old LyCORIS folder; Forge Neo's --lora-dirs (its LoRA list reads them after --lora-dir)
        for extra in [getattr(cmd, "lyco_dir_backcompat", None), *(getattr(cmd, "lora_dirs", None) or [])]:
            if extra and os.path.isdir(extra) and os.path.abspath(extra) not in dirs:
                dirs.append(os.path.abspath(extra))
        return dirs

    def runs_dir(self) -> str:
        """Run folders (config, loss log, plots, resumable state) live outside the LoRA folder, so the WebUI's
        LoRA list shows only LoRA files."""
        return os.path.join(_mod("modules.paths").data_path, RUNS_SUBDIR)

    def webui_roots(self) -> List[str]:
        paths = _mod("modules.paths")
        cmd = _shared().cmd_opts
        roots = [paths.data_path, paths.models_path, getattr(paths, "script_path", paths.data_path)]
        roots += [d for d in self.lora_dirs()]
        for attr in ("ckpt_dir", "embeddings_dir", "hypernetwork_dir"):
            v = getattr(cmd, attr, None)
            if v:
                roots.append(v)
        roots += [p for p in (getattr(cmd, "gradio_allowed_path", None) or []) if p]
        out: List[str] = []
        for r in roots:
            r = os.path.abspath(r)
            if r not in out:
                out.append(r)
        return out

    def is_non_local(self) -> bool:
        cmd = _shared().cmd_opts
        v = getattr(cmd, "webui_is_non_local", None)
        if v is None:
            v = any(getattr(cmd, a, None) for a in ("share", "listen", "ngrok", "server_name"))
        return bool(v)

    def allowed_roots(self) -> Optional[List[str]]:
        if not self.is_non_local() or getattr(_shared().cmd_opts, "enable_insecure_extension_access", False):
            return None
        return self.webui_roots()

    def non_local_flags(self) -> List[str]:
        """The command-line flags that make the WebUI treat its users as remote, as typed (e.g. --server-name X)."""
        cmd = _shared().cmd_opts
        out = []
        for attr, flag in (("share", "--share"), ("listen", "--listen"), ("ngrok", "--ngrok"),
                           ("server_name", "--server-name")):
            v = getattr(cmd, attr, None)
            if v:
                out.append(flag if v is True else f"{flag} {v}")
        return out

    def outside_roots_advice(self) -> str:
        flags = " ".join(self.non_local_flags()) or "--listen"
        return (f"restart {self.title} with --enable-insecure-extension-access added to {flags} (that flag lets "
                f"anyone who can open the page read any folder).")

    def home_for(self, what: str, roots) -> str:
        if "model" in what:
            cmd = _shared().cmd_opts
            return os.path.abspath(getattr(cmd, "ckpt_dir", None)
                                   or os.path.join(_mod("modules.paths").models_path, "Stable-diffusion"))
        return roots[0]

    # ------------------------------------------------------------------ checkpoints
    def _model(self):
        """The loaded model without making the WebUI load one (`shared.sd_model` would)."""
        return getattr(_sd_models().model_data, "sd_model", None)

    def checkpoints(self) -> Dict[str, str]:
        return {title: info.filename for title, info in getattr(_sd_models(), "checkpoints_list", {}).items()}

    def loaded_checkpoint(self) -> Optional[Tuple[str, str]]:
        info = getattr(self._model(), "sd_checkpoint_info", None)
        if info is None:
            return None
        return (getattr(info, "title", None) or os.path.basename(info.filename), info.filename)

    def find_checkpoint(self, value: str) -> Optional[Tuple[str, bool]]:
        """As `Host.find_checkpoint`, then by the WebUI's own checkpoint info: every id it registers (title with or
        without the hash, which appears once the WebUI has hashed the file, name, model name, hashes) and
        `sd_models.get_closet_checkpoint_match`, the rule of its own checkpoint list."""
        found = super().find_checkpoint(value)
        if found is not None:
            return found
        value = (value or "").strip()
        if not value:
            return None
        if self._is_loaded(value) is not None:
            return self._model().sd_checkpoint_info.filename, True
        match = getattr(_sd_models(), "get_closet_checkpoint_match", None)
        info = match(value) if callable(match) else None
        if info is None:
            return None
        loaded = self.loaded_checkpoint()
        return info.filename, bool(loaded) and os.path.abspath(info.filename) == os.path.abspath(loaded[1])

    def _is_loaded(self, spec: str) -> Optional[Any]:
        info = getattr(self._model(), "sd_checkpoint_info", None)
        if info is None:
            return None
        ids = {info.filename, getattr(info, "title", None), getattr(info, "name", None),
               getattr(info, "name_for_extra", None), getattr(info, "model_name", None)}
        ids |= set(getattr(info, "ids", []) or [])
        return info if spec in ids or os.path.abspath(spec) == os.path.abspath(info.filename) else None

    def base_model(self, spec: Optional[str] = None):
        spec = (spec or "").strip()
        if spec in ("tiny", "tiny-v"):
            return load_base_model(spec)
        if not spec:
            if self._model() is None or self.loaded_checkpoint() is None:
                raise HostError("the WebUI has no checkpoint loaded: choose one in the checkpoint list at the top of "
                                "the WebUI (or pick a base model in the tab).")
            return self._loaded_base_model()
        if self._is_loaded(spec) is not None:
            return self._loaded_base_model()
        listed = self.listed_checkpoint(spec)
        if listed is not None:  # the host's own list: not a path a remote user typed
            return self._load_file(listed)
        return self._load_file(self.check_path(spec, "base model", must_exist=True, folder=False))

    def listed_checkpoint(self, spec: str) -> Optional[str]:
        """The file of a checkpoint the WebUI itself lists, named by its title or its path (as given or with
        symlinks resolved); None for anything else."""
        known = self.checkpoints()
        if spec in known:
            return known[spec]
        return next((p for p in known.values() if same_file(p, spec)), None)

    def _load_file(self, path: str):
        if self.model_config is not None and os.path.isfile(path):
            return load_single_file(path, config=self.model_config)
        return load_base_model(path)

    def loaded_state_dict(self) -> Dict[str, Any]:
        """The loaded model's weights in the ldm layout, without any LoRA merged into them."""
        model = self._model()
        self.unmerge_loras()
        return model.state_dict()

    def _loaded_base_model(self):
        info = self._model().sd_checkpoint_info
        return from_original_state_dict(self.loaded_state_dict(), name=getattr(info, "name_for_extra", "") or "",
                                        path=info.filename, metadata=getattr(info, "metadata", None) or None,
                                        config=self.model_config)

    # ------------------------------------------------------------------ memory
    @contextlib.contextmanager
    def memory_freed(self) -> Iterator[None]:
        """`with host.memory_freed(): train()`, inside the WebUI: holds the WebUI's own GPU queue lock (a txt2img
        started meanwhile waits instead of running on a model that is off the GPU), shows the job in the WebUI's
        progress state, frees the GPU, and gives everything back after, also on error or stop."""
        with self._queue_lock():
            self.begin_job()
            _MEMORY_FREED.set()
            try:
                self.free_memory()
                try:
                    yield
                finally:
                    self.restore_memory()
            finally:
                _MEMORY_FREED.clear()
                self.end_job()

    def free_memory(self) -> None:
        model = self._model()
        if model is None:
            return
        _sd_models().unload_model_weights(model)
        self._torch_gc()

    def restore_memory(self) -> None:
        model = self._model()
        if model is None:
            return
        _sd_models().send_model_to_device(model)

    @staticmethod
    def _torch_gc() -> None:
        try:
            _mod("modules.devices").torch_gc()
        except Exception:  # not fatal: only returns cached blocks to the driver
            pass

    # ------------------------------------------------------------------ LoRA list and caches
    def refresh_loras(self) -> None:
        self.invalidate_lora_caches()
        net = networks_module()
        if net is not None:
            net.list_available_networks()

    def invalidate_lora_caches(self) -> None:
        """Forget every cached LoRA and conditioning, so a file rewritten under the same name is read again."""
        net = networks_module()
        if net is not None:
            for attr in ("networks_in_memory",):
                cache = getattr(net, attr, None)
                if cache is not None:
                    cache.clear()
            loaded = getattr(net, "loaded_networks", None)
            if loaded is not None:
                loaded.clear()
        self.unmerge_loras()
        self._clear_cond_cache()

    def unmerge_loras(self) -> None:
        """Put back the original weights of every layer a LoRA was merged into (A1111 merges in place and keeps
        backups; `network_current_names` is what it compares before re-applying)."""
        net = networks_module()
        model = self._model()
        if net is None or model is None or not hasattr(model, "modules"):
            return
        import torch

        restore = getattr(net, "network_restore_weights_from_backup", None)
        with torch.no_grad():  # the WebUI's weights require grad; its own restore runs under no_grad
            for m in model.modules():
                if getattr(m, "network_current_names", ()):
                    if restore is not None:
                        restore(m)
                    m.network_current_names = ()

    @staticmethod
    def _clear_cond_cache() -> None:
        try:
            processing = _mod("modules.processing")
        except Exception:
            return
        cls = getattr(processing, "StableDiffusionProcessing", None)
        for attr in ("cached_c", "cached_uc"):
            old = getattr(cls, attr, None)
            if isinstance(old, list):
                setattr(cls, attr, [None] * len(old))

    # ------------------------------------------------------------------ generation
    def generate(self, params):
        """One image through the WebUI's own txt2img processing, so its own LoRA loader reads `<lora:...>`."""
        if _MEMORY_FREED.is_set():
            raise HostError("a LoRA training run is using the GPU (the WebUI's model is unloaded): test after it "
                            "finishes, or stop it first.")
        processing = _mod("modules.processing")
        shared = _shared()
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=getattr(shared, "sd_model", None), prompt=params.prompt, negative_prompt=params.negative_prompt,
            seed=int(params.seed), steps=int(params.steps), cfg_scale=float(params.cfg_scale),
            width=int(params.width), height=int(params.height), sampler_name=params.sampler,
            batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True)
        with self._queue_lock():
            state = shared.state
            state.begin(job="lora_train_test")
            try:
                processed = processing.process_images(p)
            finally:
                try:
                    p.close()
                finally:
                    state.end()
        if not processed.images:
            raise HostError("the WebUI returned no image (interrupted, or see its console for the error).")
        return processed.images[0]

    @staticmethod
    def _queue_lock():
        """The WebUI's own lock around GPU jobs (`modules.call_queue.queue_lock`), so we never run beside a
        txt2img the user started."""
        try:
            return _mod("modules.call_queue").queue_lock
        except Exception:
            return threading.Lock()

    # ------------------------------------------------------------------ job state
    def interrupted(self) -> bool:
        st = getattr(_shared(), "state", None)
        return bool(getattr(st, "interrupted", False))

    def begin_job(self, text: str = "LoRA training") -> None:
        st = _shared().state
        st.begin(job="lora_train")
        st.textinfo = text

    def captioners(self) -> Dict[str, Callable[[Any], str]]:
        """The WebUI's own interrogators: {name: fn(PIL image) -> caption} (BLIP via shared.interrogator,
        DeepBooru tags via modules.deepbooru). They load their models on first use."""
        out: Dict[str, Callable[[Any], str]] = {}
        interrogator = getattr(_shared(), "interrogator", None)
        if interrogator is not None and hasattr(interrogator, "interrogate"):
            name = f"{self.title} BLIP (interrogate)"
            out[name] = with_printed_error(name, lambda img: interrogator.interrogate(img.convert("RGB")))
        try:
            deepbooru = _mod("modules.deepbooru")
        except Exception:
            deepbooru = None
        model = getattr(deepbooru, "model", None)
        if model is not None and hasattr(model, "tag"):
            out[f"{self.title} DeepBooru (tags)"] = lambda img: model.tag(img.convert("RGB"))
        return out

    def end_job(self) -> None:
        _shared().state.end()

    def progress(self, done: int, total: int, text: str = "") -> None:
        st = _shared().state
        st.sampling_step = int(done)
        st.sampling_steps = int(total)
        st.job_count = 1
        if text:
            st.textinfo = text


class ForgeHost(WebUIHost):
    """Forge (the `backend/` engine of lllyasviel/stable-diffusion-webui-forge)."""

    name = "forge"
    title = "Forge"

    def free_memory(self) -> None:
        mm = _mod("backend.memory_management")
        mm.unload_all_models()
        mm.soft_empty_cache()

    def restore_memory(self) -> None:
        # Forge moves models to the GPU when a generation needs them; forge_model_reload() only reloads when the
        # chosen checkpoint changed (it is a no-op otherwise), so this leaves the WebUI as the user left it.
        _sd_models().forge_model_reload()

    def _can_read_memory(self) -> bool:
        model = self._model()
        fo = getattr(model, "forge_objects", None)
        if fo is None or not getattr(model, "is_sd1", False) or getattr(model, "current_lora_hash", "[]") != str([]):
            return False
        import torch

        storage = getattr(getattr(fo.unet, "model", None), "storage_dtype", None)
        return storage in (None, torch.float32, torch.float16, torch.bfloat16)  # fp8 / nf4 / gguf: read the file

    def loaded_state_dict(self) -> Dict[str, Any]:
        fo = self._model().forge_objects
        sd: Dict[str, Any] = {}
        for k, v in fo.unet.model.diffusion_model.state_dict().items():
            sd["model.diffusion_model." + k] = v
        for k, v in fo.vae.first_stage_model.state_dict().items():
            sd["first_stage_model." + k] = v
        for k, v in fo.clip.cond_stage_model.state_dict().items():
            # IntegratedCLIP(CLIPTextModel) under the `clip_l` key; Forge adds a text_projection (and logit_scale)
            # that SD1 checkpoints do not have
            if k.startswith("clip_l.transformer.") and not k.startswith("clip_l.transformer.text_projection"):
                sd["cond_stage_model." + k[len("clip_l."):]] = v
        # Forge loads under torch.inference_mode(): its weights are inference tensors, which cannot become
        # trainable parameters outside it; they are copied into normal tensors (the trainer copies them anyway)
        return {k: (v.clone() if v.is_inference() else v) for k, v in sd.items()}

    def _loaded_base_model(self):
        if self._can_read_memory():
            return super()._loaded_base_model()
        # a LoRA is patched into the weights, or not an SD1 engine: the checkpoint file is the clean source
        return self._load_file(self._model().sd_checkpoint_info.filename)

    def additional_modules(self) -> List[str]:
        """The "VAE / Text Encoder" files Forge loaded with its checkpoint (model_data.forge_loading_parameters'
        additional_modules, else the top bar's shared.opts.forge_additional_modules)."""
        params = getattr(_sd_models().model_data, "forge_loading_parameters", None) or {}
        mods = params.get("additional_modules")
        if mods is None:
            mods = getattr(_shared().opts, "forge_additional_modules", None)
        return [str(m) for m in (mods or []) if m and os.path.isfile(str(m))]

    def _load_file(self, path: str):
        """Flux / SD3 checkpoints in Forge are often the transformer alone, with the VAE and text encoders picked in
        Forge's top bar: those files become the ae / clip_l / clip_g / t5xxl component files. Forge Neo's Qwen-Image,
        Z-Image, Wan and Chroma checkpoints are the transformer alone too: the picked files are the VAE and text
        encoder, over the config folder Neo bundles for the family (`bundled_folder`)."""
        family = detect_family(path) if os.path.isfile(path) else None
        if family is None:
            return super()._load_file(path)
        files = component_files(self.additional_modules(), family)
        split = split_files(family)
        folder = self.bundled_folder(family) if split else None
        if folder:
            files["components_folder"] = folder
        try:
            return load_base_model(path, files=files)
        except ModelError as exc:
            if "but not" in str(exc):
                raise HostError(f"{exc} In {self.title}: pick them in the 'VAE / Text Encoder' list at the top of "
                                f"the page (files in models/VAE and models/text_encoder), then train again.") from None
            if split and not folder:
                title = families.get(family).title
                raise HostError(f"{exc} This {self.title} bundles no {title} config folder (backend/huggingface/...: "
                                f"Forge Neo bundles Qwen-Image's, Z-Image's, Wan's and Chroma's): train {title} from "
                                f"Forge Neo, or give a diffusers {title} folder as the base model.") from None
            raise

    @staticmethod
    def bundled_root() -> Optional[str]:
        """Forge's backend/huggingface folder (where backend/loader.py reads each model's bundled configs: Neo's
        `HF`, older builds' `dir_path`/huggingface), or None."""
        try:
            loader = importlib.import_module("backend.loader")
        except Exception:
            return None
        root = getattr(loader, "HF", None) or os.path.join(
            getattr(loader, "dir_path", None) or os.path.dirname(os.path.abspath(loader.__file__)), "huggingface")
        return root if os.path.isdir(root) else None

    def bundled_folder(self, family: str) -> Optional[str]:
        """The bundled config folder (backend/huggingface/<org>/<repo>) whose model_index.json names the family's
        transformer class: the loaded engine's own (`model_config.huggingface_repo`, the folder Neo loaded it with)
        first, then text-to-image ones (no image encoder: Wan2.1-T2V-14B before Wan2.1-I2V-14B-720P). None when this
        Forge bundles none (classic Forge has no such family)."""
        import json

        root = self.bundled_root()
        want = getattr(families.get(family), "transformer_class", "")
        if not root or not want:
            return None
        found = []
        for depth in (1, 2):
            for index in sorted(self._index_files(root, depth)):
                try:
                    with open(index, encoding="utf-8") as fh:
                        idx = json.load(fh)
                except (OSError, ValueError):
                    continue
                part = idx.get("transformer")
                if isinstance(part, list) and len(part) == 2 and part[1] == want:
                    found.append((os.path.dirname(index), bool(idx.get("image_encoder"))))
        if not found:
            return None
        repo = getattr(getattr(self._model(), "model_config", None), "huggingface_repo", None)
        own = os.path.normcase(os.path.abspath(os.path.join(root, repo))) if repo else None
        found.sort(key=lambda f: (os.path.normcase(os.path.abspath(f[0])) != own, f[1], f[0]))
        return found[0][0]

    @staticmethod
    def _index_files(root: str, depth: int) -> List[str]:
        """model_index.json files `depth` folders below root (<repo>/ or <org>/<repo>/)."""
        out, level = [], [root]
        for _ in range(depth):
            level = [os.path.join(d, n) for d in level for n in (os.listdir(d) if os.path.isdir(d) else [])
                     if os.path.isdir(os.path.join(d, n))]
        for d in level:
            if os.path.isfile(os.path.join(d, "model_index.json")):
                out.append(os.path.join(d, "model_index.json"))
        return out

    def unmerge_loras(self) -> None:
        return None  # Forge patches a clone and resets to forge_objects_original on the next load_networks

    def invalidate_lora_caches(self) -> None:
        net = networks_module()
        if net is not None:
            loader = getattr(net, "load_lora_state_dict", None)
            if loader is not None and hasattr(loader, "cache_clear"):
                loader.cache_clear()
            loaded = getattr(net, "loaded_networks", None)
            if loaded is not None:
                loaded.clear()
        model = self._model()
        if model is not None and hasattr(model, "current_lora_hash"):
            model.current_lora_hash = "lora_train: invalidated"  # never equal: LoRAs are re-read and re-applied
        # each patched module's LoraLoader (backend/patcher/lora.py) re-merges only when its (file, strengths)
        # list changes: without this a rewritten file's old weights stay merged (found by the real Forge run)
        for objs in (getattr(model, "forge_objects", None), getattr(model, "forge_objects_original", None)):
            for m in (getattr(getattr(objs, "unet", None), "model", None),
                      getattr(getattr(objs, "clip", None), "cond_stage_model", None)):
                if hasattr(getattr(m, "lora_loader", None), "loaded_hash"):
                    m.lora_loader.loaded_hash = "lora_train: invalidated"
        self._clear_cond_cache()
