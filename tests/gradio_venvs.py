"""Throwaway venvs with the hosts' gradio, for the tab build test (made on first use, cached in .venvs/).

Each venv holds only gradio and what its host pins beside it; our package comes in on PYTHONPATH, so the
tab must build without torch (the core is imported lazily, inside the callbacks).

    python tests/gradio_venvs.py 3.41.2     # make (or reuse) .venvs/gradio-3.41.2, print its python
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: LORA_TRAIN_GRADIO_VENVS puts them elsewhere (e.g. a cache folder that outlives a CI checkout)
VENVS = os.environ.get("LORA_TRAIN_GRADIO_VENVS") or os.path.join(ROOT, ".venvs")

#: what each host installs beside its gradio (A1111 1.10.1 requirements_versions.txt; Forge's pins and the
#: working set found here: gradio 4.40.0 imports `HfFolder`, gone from huggingface_hub 1.x).
PINS: Dict[str, List[str]] = {
    # AUTOMATIC1111 1.10: fastapi 0.94 (which needs pydantic 1), httpx 0.24.1, numpy 1.26.2, Pillow 9.5.0
    "3.41.2": ["gradio==3.41.2", "fastapi==0.94.0", "pydantic<2", "httpcore==0.15", "httpx==0.24.1",
               "numpy==1.26.2", "Pillow==9.5.0", "huggingface_hub<1", "pyyaml"],
    # Forge (requirements_versions.txt): gradio 4.40.0 with fastapi 0.104.1, pydantic 2.8.2 (a pydantic >= 2.11
    # breaks gradio 4.40's API schema at launch), huggingface-hub 0.26.2, httpx 0.24.1, numpy 1.26.2, Pillow 9.5.0
    "4.40.0": ["gradio==4.40.0", "fastapi==0.104.1", "pydantic==2.8.2", "huggingface_hub==0.26.2", "httpx==0.24.1",
               "numpy==1.26.2", "Pillow==9.5.0", "pyyaml"],
}


def venv_python(version: str) -> str:
    return os.path.join(VENVS, f"gradio-{version}", "bin", "python")


def ensure(version: str, timeout: int = 1500) -> str:
    """Create .venvs/gradio-<version> with its pins unless a finished one with the same pins is there."""
    if version not in PINS:
        raise KeyError(f"no pins for gradio {version}: known {', '.join(PINS)}")
    folder = os.path.join(VENVS, f"gradio-{version}")
    stamp = os.path.join(folder, ".lora_train_pins")
    want = hashlib.sha256("\n".join(PINS[version]).encode()).hexdigest()
    py = venv_python(version)
    if os.path.isfile(stamp) and os.path.isfile(py):
        with open(stamp, encoding="utf-8") as fh:
            if fh.read().strip() == want:
                return py
    os.makedirs(VENVS, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    cmd = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS[version]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"installing gradio {version} failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    with open(stamp, "w", encoding="utf-8") as fh:
        fh.write(want)
    return py


if __name__ == "__main__":
    for v in sys.argv[1:] or list(PINS):
        print(ensure(v))
