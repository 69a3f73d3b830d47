"""ComfyUI entry point: ComfyUI imports this file when the repo is cloned into `custom_nodes/`.

It exports NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS and WEB_DIRECTORY and never fails ComfyUI's
start: when a dependency is missing or the nodes cannot be imported, the problem is logged and placeholder
nodes (same ids, so saved workflows still load) raise a clear error saying what to do when they run.
ComfyUI imports this file as a package (nodes.load_custom_node); imported as a plain module (pytest
collecting the repo root) it registers nothing.
"""
import importlib.util
import logging
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
WEB_DIRECTORY = "./nodes/web"  # lora_train.js: shows the reports as text on the nodes
REQUIRED_MODULES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "yaml", "PIL", "numpy")
_log = logging.getLogger("lora_train")


def _placeholders(problem: str):
    from .nodes.names import CATEGORY, NODE_NAMES  # import-free module

    def make(node_id: str, display: str):
        def run(self, **_kwargs):
            raise RuntimeError(f"{display} is not available: {problem}")

        return type(node_id, (), {
            "INPUT_TYPES": classmethod(lambda cls: {"required": {}, "optional": {}}),
            "RETURN_TYPES": (), "FUNCTION": "run", "CATEGORY": CATEGORY, "OUTPUT_NODE": True,
            "DESCRIPTION": f"Not available: {problem}", "run": run,
        })

    return ({k: make(k, v) for k, v in NODE_NAMES.items()},
            {k: f"{v} [unavailable]" for k, v in NODE_NAMES.items()})


def _load():
    if _ROOT not in sys.path:  # the core package `lora_train/` sits beside this file
        sys.path.append(_ROOT)
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        req = os.path.join(_ROOT, "requirements.txt")
        problem = (f"missing Python package(s) {', '.join(missing)} in ComfyUI's Python. Install them with: "
                   f"\"{sys.executable}\" -m pip install -r \"{req}\" and restart ComfyUI.")
        _log.error("lora_train: %s", problem)
        return _placeholders(problem)
    try:
        from .nodes.lora_nodes import NODE_CLASS_MAPPINGS as classes
        from .nodes.lora_nodes import NODE_DISPLAY_NAME_MAPPINGS as names
    except Exception as exc:  # noqa: BLE001 - never break ComfyUI's start
        _log.exception("lora_train: the nodes could not be imported")
        return _placeholders(f"import failed ({type(exc).__name__}: {exc}); see ComfyUI's log, and reinstall "
                             f"the requirements with \"{sys.executable}\" -m pip install -r requirements.txt.")
    return classes, names


if __package__:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _load()
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
