#!/usr/bin/env bash
# The embedded demo on a fresh machine: set up ./.venv, then DoRA-fine-tune SmolLM2-135M and
# evaluate it against the base model on all 8 tasks (about 15 minutes on 2 CPU cores).
#   bash demo.sh [--eval_limit N] [--train_rows N] [--fresh] ...   (python -m commonsense.demo --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup_env.sh
exec .venv/bin/python -m commonsense.demo "$@"
