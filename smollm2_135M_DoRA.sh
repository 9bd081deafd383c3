#!/usr/bin/env bash
# The original recipe's shape on the embedded SmolLM2-135M: fine-tune with DoRA (q/k/v/up/down,
# lr 2e-4, global batch 16 as micro batches of 4), then evaluate the eight test sets in one process.
#
#   bash smollm2_135M_DoRA.sh R ALPHA OUTPUT_DIR GPU_IDS
#   bash smollm2_135M_DoRA.sh 32 64 ./finetuned_result/smollm2_dora_r32 0
#
# DATA_PATH picks the training file (default commonsense_170k.json; build a mix with
# `python -m commonsense.data build --out commonsense_170k.json`).
# DRY_RUN=1 prints the commands instead of running them; PYTHON picks the interpreter.
# Evaluation runs on the first GPU id; its output is appended to OUTPUT_DIR/all.txt.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

parse_train_args "$@"
base_model='smollm2-135m'
if [[ -n ${DATA_PATH:-} ]]; then
    data_path=$(abs_path "$DATA_PATH")
else
    data_path='commonsense_170k.json'
fi
seed_train "$base_model" "$data_path" 4 2e-4 \
    --target_modules "$TARGETS_QKVUD"

run_on_gpus_tee "$(first_gpu "$GPU_IDS")" "$OUTPUT_DIR/all.txt" \
    "$PYTHON" commonsense_evaluate.py \
    --model SmolLM2-135M \
    --adapter DoRA \
    --dataset all \
    --base_model "$base_model" \
    --batch_size 8 \
    --lora_weights "$OUTPUT_DIR"
