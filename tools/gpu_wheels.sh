#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks, for Python 3.12 on x86-64 Linux: that
# machine has torch, CUDA, torchaudio and transformers but no package registry. The GPU scripts in
# tools/ install from here; the device call names `.whl` in `carry` (the tree that travels must stay
# under 64 MiB, so nvidia-pytriton travels repacked with only its 3.12 backend stub).
#
#   bash tools/gpu_wheels.sh          # then, on the GPU machine: the scripts install .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST" "$DEST/pytest"
PLAT=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64
      --platform manylinux1_x86_64 --platform any --python-version 3.12 --implementation cp --only-binary=:all:)
# what the app and the Triton models import beyond the GPU image: every F5 request needs rjieba (with
# pypinyin at the pinned versions: the unit lists depend on their dictionaries)
python3 -m pip download -q --no-deps -d "$DEST" "${PLAT[@]}" \
  numpy==1.26.4 "tritonclient[grpc,http]" python-rapidjson soundfile cffi pycparser \
  pypinyin==0.55.0 rjieba==0.2.2
python3 -m pip download -q --no-deps -d "$DEST/pytest" "${PLAT[@]}" pytest pluggy iniconfig packaging
# nvidia-pytriton repacked: its tritonserver and only the 3.12 stub, as a tarball of site-packages
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" "${PLAT[@]}" nvidia-pytriton==0.7.0
python3 -m zipfile -e "$tmp"/nvidia_pytriton-*.whl "$tmp/site"
find "$tmp/site/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
# zip archives drop the execute bits: give them back to the server, its backends' stubs and libraries
find "$tmp/site/pytriton/tritonserver" -type f \( -path "*/bin/*" -o -name triton_python_backend_stub \
  -o -name "*.so" -o -name "*.so.*" \) -exec chmod 755 {} +
tar -C "$tmp/site" -cJf "$DEST/pytriton312.tar.xz" .
du -sh "$DEST"
