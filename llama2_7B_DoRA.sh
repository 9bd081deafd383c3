#!/usr/bin/env bash
# Fine-tune LLaMA2-7B with DoRA on commonsense_170k.json (lr 2e-4), then evaluate the eight test sets.
#
#   bash llama2_7B_DoRA.sh R ALPHA OUTPUT_DIR GPU_IDS
#   bash llama2_7B_DoRA.sh 32 64 ./finetuned_result/r32_lr2e-4 0
#
# DRY_RUN=1 prints the commands instead of running them; PYTHON picks the interpreter.
# Evaluation runs on the first GPU id and appends each task's output to OUTPUT_DIR/<task>.txt.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

parse_train_args "$@"
base_model='meta-llama/Llama-2-7b-hf'
data_path='commonsense_170k.json'
seed_train "$base_model" "$data_path" 16 2e-4 \
    --target_modules "$TARGETS_QKVUD"

evaluate_all_tasks "$GPU_IDS" LLaMA2-7B DoRA "$base_model" "$OUTPUT_DIR"
