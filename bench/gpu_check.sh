#!/usr/bin/env bash
# The GPU check as one device command (issue: "On a GPU, in one prepared 8-minute run").
#
#   bash bench/gpu_prepare.sh                 # here, once: wheels + sd-scripts into bench/wheels, bench/vendor
#   run: bash bench/gpu_check.sh --out "$OUT"   with carry ["bench/wheels", "bench/vendor"], timeout_s 560
#   bash bench/gpu_check.sh --dry-run --out /tmp/gpu_dry   # on a CPU: tiny models, the same phases (in the tests)
#
# It installs the carried wheels (the device image has torch, peft, transformers, accelerate; not diffusers,
# bitsandbytes or sd-scripts' extras), then runs bench/gpu_check.py with a time budget (default 480 s) and keeps
# its log beside the JSON in --out (gpu_check.json, gpu_check.log, RESULTS_section.md for bench/RESULTS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench_out}
DRY=()
BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --dry-run) DRY=(--dry-run); shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR, --dry-run, --budget SECONDS)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ ${#DRY[@]} -gt 0 ] && PY=${PYTHON:-.venv/bin/python}
LOG="$OUT_DIR/gpu_check.log"
{
  echo "== gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') python $($PY -c 'import sys; print(sys.version.split()[0])')"
  if [ ${#DRY[@]} -eq 0 ] && ls bench/wheels/*.whl >/dev/null 2>&1; then
    echo "== installing the carried wheels: $(ls bench/wheels | tr '\n' ' ')"
    # the device reaches no registry: --no-index --no-deps (bench/gpu_prepare.sh names each need), into a
    # folder of our own on PYTHONPATH (the image's venv stays as it is)
    $PY -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/lora_train_site bench/wheels/*.whl \
      || echo "== some wheels did not install (see above): the phases that need them say so"
    export PYTHONPATH=/tmp/lora_train_site${PYTHONPATH:+:$PYTHONPATH}
  elif [ ${#DRY[@]} -eq 0 ]; then
    echo "== no bench/wheels: run bench/gpu_prepare.sh here and carry bench/wheels"
  fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  $PY bench/gpu_check.py --out "$OUT_DIR" --budget "$BUDGET" "${DRY[@]}"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
