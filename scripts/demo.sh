#!/usr/bin/env bash
# Run the L-GM demo: set up .venv in the repository on first use, then train, draw and summarise.
# Usage: bash scripts/demo.sh [options of python -m lgm_op.demo]   (--help lists them)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Install (editable, with the demo's extras) unless a previous run already did: the package
# itself is imported from this folder, so its dependencies are what must be there.
if ! .venv/bin/python -c "import mxnet, numpy, mlxtend, sklearn, matplotlib, tqdm" 2>/dev/null; then
    .venv/bin/pip install -q -e ".[demo]"
fi
exec .venv/bin/python -m lgm_op.demo "$@"
