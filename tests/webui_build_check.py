"""Build the whole tab (no launch) under the gradio of the running interpreter and check its wiring.

Run by tests/test_webui_tab.py inside throwaway venvs that hold only a host's gradio and its pins: no torch,
so this also proves the tab builds without importing the core's heavy modules. Prints one JSON line.

    python tests/webui_build_check.py [a1111|standalone] [--launch | --serve PORT]
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


class DuckHost:
    """A Host as the WebUI adapter is one: only the methods the tab calls at build time are real here."""

    def __init__(self, name, lora_dir):
        self.name = name
        self._dir = lora_dir
        self.has_txt2img = self.polls_from_page = name in ("a1111", "forge")

    def lora_dirs(self):
        return [self._dir]

    def output_dir(self):
        return self._dir

    def runs_dir(self):  # as hosts.base.Host: beside the LoRA folder (the presets folder is found from it)
        return os.path.join(os.path.dirname(os.path.abspath(self._dir)), "lora_train_runs")

    def refresh_loras(self):
        return None

    def captioners(self):
        return {}

    def checkpoints(self):
        return {"v1-5-pruned-emaonly.safetensors [6ce0161689]": "/models/v1-5-pruned-emaonly.safetensors"}

    def loaded_checkpoint(self):
        return ("v1-5-pruned-emaonly.safetensors [6ce0161689]", "/models/v1-5-pruned-emaonly.safetensors")

    def check_path(self, path, what="path", must_exist=True, folder=True):
        return os.path.realpath(path)


def main():
    import tempfile

    import gradio as gr

    host_name = sys.argv[1] if len(sys.argv) > 1 else "a1111"
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "old_style.safetensors"), "wb").close()
        from lora_train.ui import build_tab

        blocks = build_tab(DuckHost(host_name, d))
        if "--serve" in sys.argv:  # for the browser test: serve until killed, with a finished job to show
            from lora_train.cli.ui import launch
            from lora_train.ui import jobs

            job = jobs.claim("train", "fake_run")
            job.touch(steps=[1, 2, 3], losses=[1.0, 0.8, 0.7], step=3, total_steps=3)
            jobs.finish(job, "done", message="finished after 3 step(s)")

            launch(blocks, "127.0.0.1", int(sys.argv[sys.argv.index("--serve") + 1]), block=True)
            return
        assert isinstance(blocks, gr.Blocks), type(blocks)
        cfg = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    comps = cfg["components"]
    deps = cfg["dependencies"]
    ids = sorted(c["props"].get("elem_id") for c in comps if c.get("props", {}).get("elem_id"))
    js = [d.get("js") for d in deps if d.get("js")]
    config_keys, config_dupes = ui_config_keys(blocks, "lora_train")
    heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft", "accelerate") if m in sys.modules)
    served = None
    if "--launch" in sys.argv:
        served = launch_and_fetch(blocks)
    print(json.dumps({"gradio": gr.__version__, "components": len(comps), "dependencies": len(deps),
                      "elem_ids": ids, "js": js, "heavy_imports": heavy, "served": served,
                      "ui_config_keys": config_keys, "ui_config_duplicates": config_dupes}))


def ui_config_keys(blocks, path):
    """The keys AUTOMATIC1111 1.10.1 / Forge save into ui-config.json for a tab (modules/ui_loadsave.py:
    add_block walks the children; a component with a label is saved under `path/label/field`, a button under
    `path/its text/visible`; `do_not_save_to_config` leaves one out). Returns (sorted keys, duplicated keys)."""
    import gradio as gr

    saved_types = tuple(getattr(gr, n) for n in ("Slider", "Radio", "Checkbox", "Textbox", "Number", "Dropdown",
                                                   "Button") if hasattr(gr, n))
    seen, dupes = [], []

    def add(key):
        (dupes if key in seen else seen).append(key)

    def walk(x):
        if hasattr(x, "children"):
            for c in x.children:
                walk(c)
            return
        if type(x) not in saved_types or getattr(x, "do_not_save_to_config", False):
            return
        label = getattr(x, "label", None)
        if label is not None:
            field = "value" if not isinstance(x, gr.Button) else "visible"
            add(f"{path}/{label}/{field}")
        elif isinstance(x, gr.Button) and getattr(x, "value", None) is not None:
            add(f"{path}/{x.value}/visible")

    walk(blocks)
    return sorted(seen), sorted(set(dupes))


def launch_and_fetch(blocks):
    """Launch on 127.0.0.1 as the ui command does (queue on), fetch the page and its config, close."""
    import socket
    import urllib.request

    from lora_train.cli.ui import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(blocks, "127.0.0.1", port, block=False)
    try:
        out = {}
        for path in ("/", "/config"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
                body = r.read()
                out[path] = [r.status, len(body), b"lora_train_start" in body]
        return out
    finally:
        blocks.close()


if __name__ == "__main__":
    main()
