#!/usr/bin/env bash
# Sets up a venv (.venv, reused between runs), installs the test requirements and runs the whole suite.
# Fails on any failing test and also when pytest collects no test (exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# The core must stay importable on the WebUI's Python 3.10.
.venv/bin/vermin -q -t=3.10- --no-tips --violations lora_train tests
set +e
.venv/bin/python -m pytest -q tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
