#!/usr/bin/env bash
# Evaluate LLaMA2-7B + DoRA weights on the eight commonsense test sets (one process, batch size 1 as
# the seed or EVAL_BATCH_SIZE; each task's output appended to WEIGHTS_DIR/<task>.txt; per-example
# results go to experiment/).
#
#   bash llama2_7B_DoRA_eval.sh WEIGHTS_DIR GPU_IDS
#   bash llama2_7B_DoRA_eval.sh ./finetuned_result/dora_r32 0
#
# DRY_RUN=1 prints the commands instead of running them; PYTHON picks the interpreter.
# With several GPU ids only the first is used.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

parse_eval_args "$@"
evaluate_all_tasks "$GPU_IDS" LLaMA2-7B DoRA 'meta-llama/Llama-2-7b-hf' "$WEIGHTS_DIR"
