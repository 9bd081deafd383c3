#!/usr/bin/env bash
# The weight-decomposition experiment on SmolLM2-135M (docs: experiment/decomposition.md).
#
#   bash scripts/decomposition_smollm2.sh          # train FT, LoRA, DoRA; then analyze
#
# FT, LoRA and DoRA train on the same 768 rows (96 per task, seed 42, from ../shared/data/commonsense),
# batch 16, the same number of steps and seed, keeping every checkpoint (3 intermediate + final).
# LoRA and DoRA adapt q_proj and v_proj, as the paper's analysis; FT trains every decoder linear
# layer, as the paper's FT baseline. Rerunning resumes: finished runs are skipped, a stopped one
# continues from its newest complete checkpoint. The checkpoints (several GB for FT) stay in $RUNS,
# which is not committed; the analysis goes to $OUT.
#   STEPS=48 SAVE=12 RUNS=experiment/decomposition_runs OUT=experiment/decomposition ANALYZE=1
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-48}
SAVE=${SAVE:-12}
RUNS=${RUNS:-experiment/decomposition_runs}
OUT=${OUT:-experiment/decomposition}
ANALYZE=${ANALYZE:-1}
SOURCE=${SOURCE:-../shared/data/commonsense}
export TOKENIZERS_PARALLELISM=false

mkdir -p "$RUNS"
if [[ ! -f $RUNS/train.json ]]; then
    "$PYTHON" -m commonsense.data build --source "$SOURCE" --out "$RUNS/train.json" --limit_per_task 96 --seed 42
fi
common=(--base_model smollm2-135m --data_path "$RUNS/train.json" --batch_size 16 --micro_batch_size 8
        --cutoff_len 256 --val_set_size 0 --max_steps "$STEPS" --save_step "$SAVE" --save_total_limit 100
        --warmup_steps 5 --logging_steps 4 --seed 42 --lora_dropout 0.05 --resume_from_checkpoint auto)
train() {  # train NAME FLAGS...: one finetune.py run, skipped once it has finished
    local name=$1
    shift
    if [[ -f $RUNS/$name/train_log.json ]]; then
        echo "$name: done ($RUNS/$name)"
        return
    fi
    echo "$name: training ($(date -u +%H:%M:%S) UTC)"
    "$PYTHON" finetune.py "${common[@]}" --output_dir "$RUNS/$name" "$@"
}
# Learning rates: the seed's for LoRA r32 (3e-4) and DoRA (2e-4); FT at 2e-5, the usual full
# fine-tuning rate for LLaMA-class models (a rate near the adapters' would wreck a full model).
train FT --adapter_name ft --learning_rate 2e-5
train LoRA --adapter_name lora --lora_r 32 --lora_alpha 64 --learning_rate 3e-4 --target_modules q_proj,v_proj
train DoRA --adapter_name dora --lora_r 32 --lora_alpha 64 --learning_rate 2e-4 --target_modules q_proj,v_proj
# A second view: the adapters on the seed's q/k/v/up/down (the analysis still reads q_proj and v_proj).
QKVUD=q_proj,k_proj,v_proj,up_proj,down_proj
train LoRA_qkvud --adapter_name lora --lora_r 32 --lora_alpha 64 --learning_rate 3e-4 --target_modules $QKVUD
train DoRA_qkvud --adapter_name dora --lora_r 32 --lora_alpha 64 --learning_rate 2e-4 --target_modules $QKVUD

if [[ $ANALYZE == 1 ]]; then
    "$PYTHON" analyze_decomposition.py --base_model smollm2-135m \
        --runs FT="$RUNS/FT" LoRA="$RUNS/LoRA" DoRA="$RUNS/DoRA" --modules q_proj v_proj --output_dir "$OUT"
    "$PYTHON" analyze_decomposition.py --base_model smollm2-135m \
        --runs FT="$RUNS/FT" LoRA="$RUNS/LoRA_qkvud" DoRA="$RUNS/DoRA_qkvud" --modules q_proj v_proj \
        --output_dir "$OUT/qkvud"
fi
