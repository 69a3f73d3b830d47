"""AUTOMATIC1111 / Forge entry point: registers the "LoRA Train" tab through script_callbacks.on_ui_tabs.

The tab is `lora_train.ui.build_tab(host)` with the host adapter for the WebUI we run in (Forge or
A1111, detected). If our import or the tab's construction fails (a missing package, an incompatible
gradio), the WebUI still starts: the error goes to the console and a tab shows it with what to do.
"""
import os
import sys
import traceback

EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ensure_path():
    # the WebUI puts an extension's folder on sys.path only while it loads that extension's scripts and then
    # restores sys.path, so our package folder is added (for good) when the tab is built
    if EXT_DIR not in sys.path:
        sys.path.append(EXT_DIR)


_ensure_path()

TAB_TITLE = "LoRA Train"
TAB_ID = "lora_train"


def _error_tab(message):
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(message)
    return blocks


def on_ui_tabs():
    try:
        _ensure_path()
        from lora_train.ui import build_tab
        from lora_train.hosts.webui import make_host

        host = make_host()
        return [(build_tab(host), TAB_TITLE, TAB_ID)]
    except Exception as e:  # never take the WebUI down with us
        tb = traceback.format_exc()
        print(f"[lora_train] the LoRA Train tab could not be built: {e}\n{tb}", file=sys.stderr)
        msg = (f"## LoRA Train could not start\n\n`{type(e).__name__}: {e}`\n\n"
               f"Most often a package is missing or too old. The extension's `install.py` runs when the WebUI "
               f"starts and prints what it installed or why it refused (look for `[lora_train]` in the console); "
               f"restart the WebUI after fixing it. The full traceback is in the console.")
        try:
            return [(_error_tab(msg), TAB_TITLE, TAB_ID)]
        except Exception:
            print("[lora_train] could not show the error tab either", file=sys.stderr)
            return []


try:
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
except Exception:  # imported outside a WebUI (e.g. by a linter)
    pass
