#!/usr/bin/env bash
# Fine-tune LLaMA-7B with DoRA on commonsense_170k.json. As in the original, this script only trains:
# evaluate afterwards with llama_7B_Dora_eval.sh OUTPUT_DIR GPU_ID.
#
#   bash llama_7B_Dora.sh R ALPHA OUTPUT_DIR GPU_IDS
#   bash llama_7B_Dora.sh 32 64 ./finetuned_result/dora_r32 0      # one GPU
#   bash llama_7B_Dora.sh 32 64 ./finetuned_result/dora_r32 0,1    # torchrun DDP, same global batch
#
# DRY_RUN=1 prints the commands instead of running them; PYTHON picks the interpreter.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

parse_train_args "$@"
base_model='yahma/llama-7b-hf'
data_path='commonsense_170k.json'
seed_train "$base_model" "$data_path" 16 2e-4 \
    --target_modules "$TARGETS_QKVUD"
