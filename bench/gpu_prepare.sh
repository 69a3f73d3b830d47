#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh carries to the GPU machine (which reaches no registry): wheels in bench/wheels
# and kohya sd-scripts' code in bench/vendor/sd-scripts (a snapshot from the local mirror, `fetch
# kohya-ss/sd-scripts`; never committed: both folders are in .gitignore). Keeps the total under the 64 MiB that
# travels (the working tree counts too): the device image already has opencv-python-headless, einops, rich,
# torchvision and tensorboard (.library/device/KINDS.md), so only what it lacks is carried; bitsandbytes (~60 MB)
# fits only when the rest leaves room, else the 8-bit case says "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p bench/wheels bench/vendor
rm -f bench/wheels/*.whl
# for the device's Python 3.12 on x86-64 (one version of each; --no-deps: each need is named)
PIP=("$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps --python-version 3.12
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d bench/wheels)
"${PIP[@]}" "diffusers==0.42.1" toml voluptuous imagesize ftfy wcwidth
MIRROR=${SD_SCRIPTS_MIRROR:-/work/.mirror/kohya-ss+sd-scripts/repo}
if [ -d "$MIRROR" ]; then
  rm -rf bench/vendor/sd-scripts && mkdir -p bench/vendor/sd-scripts
  # the Python code only; the mirror leaves out its largest files (listed, blobs absent): those are skipped
  git --git-dir="$MIRROR" ls-tree -r --name-only HEAD | grep -E '\.(py|json|toml|txt)$' \
    | grep -vE '^(docs|tests|tools|finetune|configs|bitsandbytes_windows|\.github)/' | while read -r f; do
      mkdir -p "bench/vendor/sd-scripts/$(dirname "$f")"
      git --git-dir="$MIRROR" show "HEAD:$f" > "bench/vendor/sd-scripts/$f" 2>/dev/null \
        || { rm -f "bench/vendor/sd-scripts/$f"; echo "sd-scripts: $f is not in the mirror (skipped)" >&2; }
    done
  echo "sd-scripts @ $(git --git-dir="$MIRROR" rev-parse --short HEAD) in bench/vendor/sd-scripts"
else
  echo "no sd-scripts mirror at $MIRROR: fetch kohya-ss/sd-scripts first (the kohya phase will say skipped)" >&2
fi
tree=$(git ls-files -z | xargs -0 du -cm 2>/dev/null | tail -1 | cut -f1)
used=$(du -scm bench/wheels bench/vendor | tail -1 | cut -f1)
if [ $((tree + used + 62)) -le 60 ]; then  # bitsandbytes' manylinux wheel is about 62 MiB
  "${PIP[@]}" bitsandbytes || true
else
  echo "bitsandbytes is not carried: the working tree (${tree} MiB) and the rest (${used} MiB) leave no room for it"
fi
du -sh bench/wheels bench/vendor
echo "total $(du -scm bench/wheels bench/vendor | tail -1 | cut -f1) MiB of the 64 MiB that travels"
