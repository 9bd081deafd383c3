#!/usr/bin/env bash
# Set up ./.venv with the test requirements, then run the test suite.
#   bash scripts/test.sh [pytest args]     e.g. -m slow for the long SmolLM2 runs only
# The default run skips tests marked slow but includes one real SmolLM2 fine-tune + evaluate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh dev
export TOKENIZERS_PARALLELISM=false
if [[ $# -eq 0 ]]; then
    set -- -m "not slow"
fi
exec .venv/bin/python -m pytest -q "$@"
