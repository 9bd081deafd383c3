#!/usr/bin/env bash
# The paper's LoRA-vs-DoRA commonsense comparison on the embedded SmolLM2-135M-Instruct, from
# scratch, in one command: set up ./.venv, then run the grid's default preset (python -m
# commonsense.reproduce with no grid options = --runs base,lora_r32,dora_r16,dora_r32_lr2e-4
# --seeds 42): build the training mix, fine-tune LoRA r32, DoRA r16 and DoRA r32 with finetune.py,
# evaluate them and the base model with commonsense_evaluate.py (generate and loglik), and write
# experiment/reproduction.{md,json}, reproduction_loss.png and reproduction_rank.png.
#   bash reproduce_smollm2.sh [--train_rows 256] [--eval_limit_generate 16] [--eval_limit_loglik 64]
#   bash reproduce_smollm2.sh --full        # on a GPU: the whole mix and the full test sets
# Any grid option works too (--methods, --ranks, --seeds, --lrs, --gpus; docs/grid.md).
# Rerunning skips finished steps; --fresh starts over. python -m commonsense.reproduce --help lists the flags.
# Paths given as arguments are taken from the caller's working directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$root/scripts/setup_env.sh"
export REPRODUCE_LAUNCHER="bash reproduce_smollm2.sh"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m commonsense.reproduce "$@"
