#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Triton kernels run under
# the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no
# GPU). Extra arguments go to pytest, from the repository root: test paths
# (e.g. tests/test_nn.py) run only those; without one, pytest.ini's testpaths
# (tests/) runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
