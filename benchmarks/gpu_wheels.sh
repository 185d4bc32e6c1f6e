#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, timm, scipy, onnx, onnxruntime, tensorboard, ... but no
# registry): the project's pins from constraints.txt for CPython 3.12 / manylinux x86-64, into .whl/
# (git-ignored through .git/info/exclude; carried by the device run). About 15 MiB. See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=$(grep -E '^(zarr|numcodecs|donfig|google-crc32c|webdataset|braceexpand|pycocotools|faster-coco-eval)==' constraints.txt)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls -la .whl && du -sh .whl
