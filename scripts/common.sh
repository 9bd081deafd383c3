# shellcheck shell=bash
# Variables set here (TARGETS_QKVUD, LORA_R, OUTPUT_DIR, ...) are used by the sourcing scripts.
# shellcheck disable=SC2034
# Shared code of the fine-tune / evaluation scripts at the repository root.
#
# Sourced (not run) by those scripts, after `set -euo pipefail`. It changes the
# working directory to the repository root, so finetune.py, commonsense_evaluate.py,
# commonsense_170k.json and dataset/ are found whatever the caller's cwd; path
# arguments are resolved against the caller's cwd first (see abs_path).
#
# Environment:
#   DRY_RUN=1    print each command (shell-quoted, one per line) instead of running it
#   PYTHON       interpreter for finetune.py / commonsense_evaluate.py (default: python)
#   TORCHRUN     launcher used with several GPU ids (default: torchrun)

# The original's LoRA/DoRA target modules (attention q,k,v and MLP up, down), as finetune.py takes them.
TARGETS_QKVUD='["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]'

SCRIPT_NAME=${SCRIPT_ALIAS:-$(basename "$0")}  # an alias (llama2_7B_DoRA_r.sh, ...) passes the name typed
CALLER_PWD=$PWD
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
DRY_RUN=${DRY_RUN:-0}

cd "$REPO_ROOT" || exit 2

# ---- messages --------------------------------------------------------------------------------
die() {  # die MESSAGE: one "error:" line on stderr, exit status 2
    echo "$SCRIPT_NAME: error: $*" >&2
    exit 2
}

note() {
    echo "$SCRIPT_NAME: $*" >&2
}

is_dry_run() {
    [[ $DRY_RUN == 1 ]]
}

# ---- arguments -------------------------------------------------------------------------------
expect_args() {  # expect_args "USAGE" WANTED GOT: one usage line and exit 2 on a wrong count
    if [[ $3 -ne $2 ]]; then
        echo "usage: $SCRIPT_NAME $1" >&2
        exit 2
    fi
}

check_positive_int() {  # check_positive_int NAME VALUE
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

check_gpu_ids() {  # "0" or "0,1,...": comma-separated device ids, no spaces
    [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPU ids must look like 0 or 0,1 (comma-separated, no spaces), got '$1'"
}

check_nonempty() {  # check_nonempty NAME VALUE
    [[ -n $2 ]] || die "$1 must not be empty"
}

gpu_count() {  # gpu_count "0,1" -> 2
    local -a ids
    IFS=, read -r -a ids <<<"$1"
    echo "${#ids[@]}"
}

first_gpu() {  # first_gpu "2,3" -> 2
    echo "${1%%,*}"
}

abs_path() {  # a path as the caller meant it: relative paths are taken from the caller's cwd
    case $1 in
        /*) echo "$1" ;;
        ./*) echo "$CALLER_PWD/${1#./}" ;;
        *) echo "$CALLER_PWD/$1" ;;
    esac
}

# parse_train_args "$@": the training scripts' R ALPHA OUTPUT_DIR GPU_IDS;
# sets LORA_R, LORA_ALPHA, OUTPUT_DIR (absolute) and GPU_IDS.
parse_train_args() {
    expect_args "R ALPHA OUTPUT_DIR GPU_IDS   (e.g. 32 64 ./finetuned_result/dora_r32 0)" 4 $#
    check_positive_int "rank R" "$1"
    check_positive_int "ALPHA" "$2"
    check_nonempty "OUTPUT_DIR" "$3"
    check_gpu_ids "$4"
    LORA_R=$1
    LORA_ALPHA=$2
    OUTPUT_DIR=$(abs_path "$3")
    GPU_IDS=$4
}

# parse_eval_args "$@": the evaluation scripts' WEIGHTS_DIR GPU_IDS; sets WEIGHTS_DIR (absolute) and GPU_IDS.
parse_eval_args() {
    expect_args "WEIGHTS_DIR GPU_IDS   (e.g. ./finetuned_result/dora_r32 0)" 2 $#
    check_nonempty "WEIGHTS_DIR" "$1"
    check_gpu_ids "$2"
    WEIGHTS_DIR=$(abs_path "$1")
    GPU_IDS=$2
    if ! is_dry_run && [[ ! -d $WEIGHTS_DIR ]]; then
        die "adapter folder $WEIGHTS_DIR not found (download the DoRA weights or train them first)"
    fi
}

require_train_data() {  # require_train_data PATH: fail early, with the way to build it, if it is missing
    [[ -f $1 ]] && return 0
    local message="training data $1 not found; download commonsense_170k.json (see README) or build a mix with: $PYTHON -m commonsense.data build --out $1"
    if is_dry_run; then
        note "warning: $message"
    else
        die "$message"
    fi
}

# micro_batch_for BATCH MICRO GPU_IDS: the per-device micro batch to pass. finetune.py keeps the
# global batch at BATCH and needs the BATCH/MICRO accumulation steps to split evenly over the
# processes; when they do not (the original's 16/16 on 2 GPUs), use the largest smaller micro
# batch that does, so the optimisation (global batch, steps, learning rate) is unchanged.
micro_batch_for() {
    local batch=$1 micro=$2 n
    n=$(gpu_count "$3")
    local m=$micro
    while ((m >= 1)); do
        if ((batch % (m * n) == 0)); then
            if ((m != micro)); then
                note "micro_batch_size $micro -> $m per GPU so that batch_size $batch splits over $n GPUs"
            fi
            echo "$m"
            return 0
        fi
        ((m--))
    done
    die "batch_size $batch cannot be split evenly over $n GPUs; use a GPU count that divides it"
}

# ---- running ---------------------------------------------------------------------------------
shell_quote() {  # one word, quoted for a POSIX shell only when needed
    if [[ $1 =~ ^[A-Za-z0-9_./,:=@%+-]+$ ]]; then
        printf '%s' "$1"
    else
        local squote="'\\''"
        printf "'%s'" "${1//\'/$squote}"
    fi
}

quote_words() {  # quote_words WORD...: the words shell-quoted, space-separated
    local word sep=""
    for word in "$@"; do
        printf '%s' "$sep"
        shell_quote "$word"
        sep=" "
    done
}

# run_on_gpus GPU_IDS CMD...: run CMD with CUDA_VISIBLE_DEVICES=GPU_IDS (or print it under DRY_RUN=1).
run_on_gpus() {
    local gpus=$1
    shift
    local line
    line="CUDA_VISIBLE_DEVICES=$(shell_quote "$gpus") $(quote_words "$@")"
    if is_dry_run; then
        printf '%s\n' "$line"
        return 0
    fi
    note "+ $line"
    CUDA_VISIBLE_DEVICES=$gpus "$@"
}

# run_on_gpus_tee GPU_IDS LOG CMD...: as run_on_gpus, stdout also appended to LOG (the original's `|tee -a`).
run_on_gpus_tee() {
    local gpus=$1 log=$2
    shift 2
    local line
    line="CUDA_VISIBLE_DEVICES=$(shell_quote "$gpus") $(quote_words "$@") | tee -a $(shell_quote "$log")"
    if is_dry_run; then
        printf '%s\n' "$line"
        return 0
    fi
    note "+ $line"
    mkdir -p "$(dirname "$log")"
    CUDA_VISIBLE_DEVICES=$gpus "$@" | tee -a "$log"
}

# launch_train GPU_IDS FINETUNE_ARGS...: finetune.py on the given devices; one id runs
# `$PYTHON finetune.py`, several run `$TORCHRUN --standalone --nproc_per_node N finetune.py` (DDP;
# finetune.py reads WORLD_SIZE and splits the gradient accumulation over the processes).
# --standalone takes a free port, so two trainings on one machine (GPUs 0,1 and 2,3) do not collide.
launch_train() {
    local gpus=$1 n
    shift
    n=$(gpu_count "$gpus")
    if ((n > 1)); then
        run_on_gpus "$gpus" "$TORCHRUN" --standalone --nproc_per_node "$n" finetune.py "$@"
    else
        run_on_gpus "$gpus" "$PYTHON" finetune.py "$@"
    fi
}

# seed_train BASE_MODEL DATA_PATH MICRO_BATCH LEARNING_RATE TARGET_FLAGS...: the seed's DoRA recipe
# (global batch 16, 3 epochs, cutoff 256, val 120, eval/save every 80, gradient checkpointing) on
# GPU_IDS, with LORA_R, LORA_ALPHA and OUTPUT_DIR from parse_train_args. TARGET_FLAGS are the
# --target_modules (and --Wdecompose_target_modules) arguments.
seed_train() {
    local base_model=$1 data_path=$2 micro=$3 learning_rate=$4
    shift 4
    micro=$(micro_batch_for 16 "$micro" "$GPU_IDS")
    require_train_data "$data_path"
    launch_train "$GPU_IDS" \
        --base_model "$base_model" \
        --data_path "$data_path" \
        --output_dir "$OUTPUT_DIR" \
        --batch_size 16 --micro_batch_size "$micro" --num_epochs 3 \
        --learning_rate "$learning_rate" --cutoff_len 256 --val_set_size 120 \
        --eval_step 80 --save_step 80 --adapter_name dora \
        "$@" \
        --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --use_gradient_checkpointing
}

# evaluate_all_tasks GPU_IDS MODEL ADAPTER BASE_MODEL WEIGHTS_DIR: the eight test sets in one
# commonsense_evaluate.py process (the model loads once), batch size EVAL_BATCH_SIZE (default 1,
# as the seed), on the first GPU id. As the seed's `| tee -a WEIGHTS_DIR/<task>.txt`, each task's
# output is appended to WEIGHTS_DIR/<task>.txt; the whole run also goes to WEIGHTS_DIR/all.txt.
evaluate_all_tasks() {
    local gpu model=$2 adapter=$3 base_model=$4 weights=$5
    gpu=$(first_gpu "$1")
    run_on_gpus_tee "$gpu" "$weights/all.txt" \
        "$PYTHON" commonsense_evaluate.py \
        --model "$model" \
        --adapter "$adapter" \
        --dataset all \
        --base_model "$base_model" \
        --batch_size "${EVAL_BATCH_SIZE:-1}" \
        --lora_weights "$weights" \
        --task_log_dir "$weights"
}
