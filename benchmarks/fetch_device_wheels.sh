#!/usr/bin/env bash
# Run here (not on the device) before the device check: the GPU machine has PyTorch, transformers and
# huggingface_hub but not diffusers, and it cannot download. The wheels go to .whl/ (git-ignored), which
# the device call carries. Versions: the ones the CPU tests pass with; the device's Python is 3.12, and it
# already has diffusers' other needs (filelock, huggingface-hub >= 1.32, numpy, regex, requests,
# safetensors >= 0.8, Pillow, zipp): KINDS.md's package list.
set -euo pipefail
cd "$(dirname "$0")/.."
# In a git worktree .git is a file: ask git where this checkout's exclude file is.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0
ls -l .whl
