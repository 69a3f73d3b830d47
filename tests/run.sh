#!/usr/bin/env bash
# Sets up a venv (.venv, reused between runs), installs the test requirements and runs the whole suite;
# then runs the core suite again in a second venv (.venv-webui, reused) at the AUTOMATIC1111 WebUI's versions
# (tests/constraints-webui.txt: transformers 4.30.2, diffusers 0.31.0, peft 0.13.2, accelerate 0.21.0, ...),
# leaving out tests marked `frontend` (gradio / ComfyUI / browser) or `current_releases` (the demo's figure, the
# GPU check's dry run and the bench scripts, which run at the current releases); and, where a Python 3.10 interpreter is
# on the machine, the torch-free part of the suite on 3.10 (the WebUI's Python; torch 2.13.0's CPU wheel on
# this disk is for 3.11 only, so the WebUI-versions venv runs on $PYTHON).
# Fails when any run fails, and also when a run collects no test (pytest exit 5).
# Local shortcuts (CI sets none of them): WEBUI_VENV=0 skips the WebUI-versions run, PY310=0 the 3.10 run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_Q=(-q --disable-pip-version-check)
failed=()

# Test files run in parallel, one worker per core up to 4 (pytest-xdist, --dist loadfile: a file's tests stay
# together), each worker with one OpenMP thread: measured here, 2 workers took the current-releases run from 728 s
# to 344 s. PYTEST_WORKERS=1 runs them in one process, as before.
WORKERS=${PYTEST_WORKERS:-$(n=$(nproc 2>/dev/null || echo 1); [ "$n" -gt 4 ] && n=4; echo "$n")}

run_pytest() {  # label python pytest-args...: runs pytest; records a failure, exit 5 included
  local label=$1 py=$2 rc=0 t0=$SECONDS par=()
  shift 2
  if [ "$WORKERS" -gt 1 ] && "$py" -c 'import xdist' >/dev/null 2>&1; then
    par=(-n "$WORKERS" --dist loadfile)
  fi
  echo "== $label: $("$py" -c 'import sys; print(sys.version.split()[0])')${par:+, $WORKERS workers}" >&2
  if [ ${#par[@]} -gt 0 ]; then
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" -m pytest -q "${par[@]}" "$@" || rc=$?
  else
    "$py" -m pytest -q "$@" || rc=$?
  fi
  echo "== $label: pytest exit $rc in $((SECONDS - t0)) s" >&2
  if [ "$rc" -eq 5 ]; then
    echo "$label: pytest collected no tests: failing on purpose" >&2
  fi
  if [ "$rc" -ne 0 ]; then
    failed+=("$label (exit $rc)")
  fi
}

# 1. Current releases (requirements-dev.txt), the whole suite.
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install "${PIP_Q[@]}" -r requirements-dev.txt
# The core must stay importable on the WebUI's Python 3.10.
.venv/bin/vermin -q -t=3.10- --no-tips --violations lora_train tests nodes scripts install.py __init__.py
run_pytest "current releases" .venv/bin/python tests "$@"

# 2. The WebUI's versions: the core suite without the front-end tests.
if [ "${WEBUI_VENV:-1}" != 0 ]; then
  t0=$SECONDS
  if [ ! -x .venv-webui/bin/python ]; then
    "$PY" -m venv .venv-webui
  fi
  # Only the core's requirements and pytest (requirements-dev.txt may carry front-end packages that need newer
  # huggingface_hub / numpy than the WebUI has); pip moves any package that does not match the constraints.
  .venv-webui/bin/python -m pip install "${PIP_Q[@]}" -c tests/constraints-webui.txt torch==2.13.0 \
    -r requirements.txt "pytest>=7.4" "pytest-xdist>=3.5"
  .venv-webui/bin/python - <<'PYEOF' >&2
import importlib.metadata as md
print("== WebUI versions:", ", ".join(f"{p} {md.version(p)}" for p in (
    "torch", "transformers", "diffusers", "peft", "accelerate", "huggingface_hub", "numpy", "safetensors", "Pillow")))
PYEOF
  echo "== WebUI versions: venv ready in $((SECONDS - t0)) s" >&2
  run_pytest "WebUI versions" .venv-webui/bin/python -m "not frontend and not current_releases" tests "$@"
fi

# 3. Python 3.10 itself, where the machine has it: the tests whose modules import no torch.
if [ "${PY310:-1}" != 0 ]; then
  py310=
  for cand in "${PYTHON310:-}" python3.10 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.10*/bin/python3.10; do
    if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
      py310=$cand
      break
    fi
  done
  if [ -n "$py310" ]; then
    if [ ! -x .venv-py310/bin/python ]; then
      "$py310" -m venv .venv-py310
    fi
    .venv-py310/bin/python -m pip install "${PIP_Q[@]}" -c tests/constraints-webui.txt pyyaml numpy Pillow tqdm \
      "pytest>=7.4"
    run_pytest "Python 3.10 (torch-free tests)" .venv-py310/bin/python -m "not frontend" \
      tests/test_config.py tests/test_prompt.py tests/test_network_guard.py
  else
    echo "== no Python 3.10 interpreter here: the 3.10 run is left out (vermin still checks 3.10 syntax)" >&2
  fi
fi

if [ "${#failed[@]}" -ne 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
