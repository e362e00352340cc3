#!/usr/bin/env bash
# Spark end-to-end sweep on the GPU machine: the same environment set-up as gpu_sweep.sh, then
# tools/gpu_spark_sweep.py. Usage (repo copy as cwd, .whl carried): bash tools/gpu_spark_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./sweep-out}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$PY -m pip install -q --no-index --no-deps $(ls .whl/*.whl | grep -v /numpy-)
$PY -c "import site, tarfile; tarfile.open('.whl/pytriton312.tar.xz').extractall(site.getsitepackages()[0])"
SITE=$($PY -c "import site; print(site.getsitepackages()[0])")
VER=$($PY -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
$PY -m venv --without-pip /tmp/stub-env
$PY -m pip install -q --no-index --no-deps --target /tmp/stub-env/lib/python$VER/site-packages .whl/numpy-1.*.whl
# the image's packages, linked one by one, except numpy (1.26 above) and what is built against
# numpy 2 and optional for us (scipy, scikit-learn): transformers then skips them
for entry in "$SITE"/*; do
  case "$(basename "$entry")" in numpy*|scipy*|sklearn*|scikit_learn*) continue ;; esac
  [[ -e /tmp/stub-env/lib/python$VER/site-packages/$(basename "$entry") ]] || ln -s "$entry" /tmp/stub-env/lib/python$VER/site-packages/
done
/tmp/stub-env/bin/python -c "import numpy, torch, transformers; from transformers import Qwen2ForCausalLM; print('stub env ok: numpy', numpy.__version__)"
export STUDIO_STUB_PYTHON_BIN=/tmp/stub-env/bin
$PY tools/gpu_spark_sweep.py --out "$OUT" "$@"
