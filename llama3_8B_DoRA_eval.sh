#!/usr/bin/env bash
# Evaluate LLaMA3-8B + DoRA weights on the eight commonsense test sets (one process, batch size 1 as
# the seed or EVAL_BATCH_SIZE; each task's output appended to WEIGHTS_DIR/<task>.txt; per-example
# results go to experiment/).
#
#   bash llama3_8B_DoRA_eval.sh WEIGHTS_DIR GPU_IDS
#   bash llama3_8B_DoRA_eval.sh ./finetuned_result/dora_r32 0
#
# DRY_RUN=1 prints the commands instead of running them; PYTHON picks the interpreter.
# With several GPU ids only the first is used.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

parse_eval_args "$@"
evaluate_all_tasks "$GPU_IDS" LLaMA3-8B DoRA 'meta-llama/Meta-Llama-3-8B' "$WEIGHTS_DIR"
