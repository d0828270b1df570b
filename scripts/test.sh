#!/usr/bin/env bash
# The test suite on a fresh machine: makes .venv (Python 3.11) if missing, installs the package
# with its test extras (MXNet 1.9.1, NumPy < 1.24, PyTorch's CPU build 2.13.0, the CUDA compile
# toolchain from pip), runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k kernels`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest "$@"
