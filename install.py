"""Run by AUTOMATIC1111 / Forge at start-up (extensions' install.py convention: `launch.is_installed`,
`launch.run_pip`). Installs only what lora_train is missing, never touches the WebUI's own torch, gradio,
transformers, numpy or anything its requirements_versions.txt pins, and says what to do on a conflict
instead of breaking the WebUI. The decisions are in lora_train/install_plan.py (tested without a WebUI).
"""
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from lora_train.hosts import install_plan  # noqa: E402  (pure Python: imports nothing that may be missing)


def _webui_root():
    try:
        from modules import paths_internal

        return paths_internal.script_path
    except Exception:
        return os.getcwd()  # the WebUI runs install.py from its own folder


def _host_name(root):
    return "Forge" if os.path.isdir(os.path.join(root, "backend")) else "the WebUI"


def main(launch=None):
    if launch is None:
        import launch  # the WebUI's launch module (PYTHONPATH holds the WebUI folder when it runs us)

    root = _webui_root()
    plan = install_plan.current_plan(root, _host_name(root))
    print(plan.report())
    if not plan.ok or not plan.installs:
        return plan
    names = [install_plan.requirement_name(r) for r in plan.installs]
    missing = [n for n in names if not launch.is_installed(n)]
    desc = "requirements for the LoRA Train tab: " + ", ".join(
        f"{n} ({'missing' if n in missing else 'too old'})" for n in names)
    fd, cfile = tempfile.mkstemp(prefix="lora_train_constraints_", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(plan.constraints_text())
        launch.run_pip(plan.pip_command(cfile), desc)
    finally:
        os.unlink(cfile)
    return plan


if __name__ == "__main__":
    main()
