#!/usr/bin/env bash
# Prepare the GPU machine for the studio, from the wheels in .whl/ (tools/gpu_wheels.sh makes them):
# the missing packages, nvidia-pytriton (repacked: only the 3.12 stub) and a separate environment for
# the Python backend stub (numpy 1.26 first: the 2.51 stub breaks BYTES tensors under numpy 2, while
# the image's scipy and transformers need numpy 2). Source it, so STUDIO_STUB_PYTHON_BIN is exported:
#
#   source tools/gpu_env.sh
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps $(ls .whl/*.whl | grep -v /numpy-) || return 1 2>/dev/null || exit 1
if compgen -G ".whl/numpy-1.*.whl" >/dev/null; then
  STUB_ENV=/tmp/stub-env
  SITE=$($PY -c "import site; print(site.getsitepackages()[0])")
  VER=$($PY -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
  $PY -m venv --without-pip "$STUB_ENV"
  $PY -m pip install -q --no-index --no-deps --target "$STUB_ENV/lib/python$VER/site-packages" .whl/numpy-1.*.whl
  # the image's packages, linked one by one, except numpy (1.26 above) and what is built against
  # numpy 2 and optional for the stub (scipy, scikit-learn): transformers then skips them
  for entry in "$SITE"/*; do
    case "$(basename "$entry")" in numpy*|scipy*|sklearn*|scikit_learn*) continue ;; esac
    [[ -e "$STUB_ENV/lib/python$VER/site-packages/$(basename "$entry")" ]] || \
      ln -s "$entry" "$STUB_ENV/lib/python$VER/site-packages/"
  done
  export STUDIO_STUB_PYTHON_BIN=$STUB_ENV/bin
fi
if [[ -f .whl/pytriton312.tar.xz ]]; then
  $PY -c "import site, tarfile; tarfile.open('.whl/pytriton312.tar.xz').extractall(site.getsitepackages()[0])"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
