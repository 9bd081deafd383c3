#!/usr/bin/env bash
# One prepared check for a GPU machine (written for an H200, bf16): the Triton kernels and
# DoRA layer tests on the real GPU, then the layer and train-step benchmarks.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Every step has its own timeout (seconds; override with the variables below) and a log;
# a failing step is reported and the script goes on, so one run shows everything. Logs,
# the pytest JUnit XML and the benchmarks' JSON go to $OUT when it is set (else
# benchmarks/results/gpu_check). The exit status is the number of failed steps.
#
#   TIMEOUT_TESTS=150 TIMEOUT_LAYER=90 TIMEOUT_TRAIN=90 TIMEOUT_EVAL=90 TIMEOUT_QUANT=60 TIMEOUT_FSDP=60
# The defaults add up to 540 s, under one device-tool command's 600 s limit.
set -u
cd "$(dirname "$0")/.."

RESULTS="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$RESULTS"
TIMEOUT_TESTS="${TIMEOUT_TESTS:-150}"
TIMEOUT_LAYER="${TIMEOUT_LAYER:-90}"
TIMEOUT_TRAIN="${TIMEOUT_TRAIN:-90}"
TIMEOUT_EVAL="${TIMEOUT_EVAL:-90}"
TIMEOUT_FSDP="${TIMEOUT_FSDP:-60}"
TIMEOUT_QUANT="${TIMEOUT_QUANT:-60}"

if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
PYTHON="${PYTHON:-python}"
export PYTHONUNBUFFERED=1  # logs keep what a timed-out step printed
failures=0

step() {  # step NAME TIMEOUT COMMAND...: run with a timeout, log to $RESULTS/NAME.log
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== $name (timeout ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT"
    [ "$rc" -ne 0 ] && failures=$((failures + 1))
    return 0
}

echo "=== machine"
nvidia-smi || echo "nvidia-smi not available"
"$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("WARNING: triton is not installed: the Triton tests will be SKIPPED and the torch path benchmarked")
EOF

# The GPU variants in test_dora_triton.py run in-process on CUDA (the interpreter ones run
# too, in their CPU subprocess); -rs lists what was skipped, so a missing GPU shows.
# test_precision_matrix.py adds its CUDA half of the dtype matrix (fp16 and bf16 autocast);
# test_precision_training.py's CUDA tests run finetune.py with the seed's fp16 (GradScaler) and --bf16.
step tests "$TIMEOUT_TESTS" "$PYTHON" -m pytest -q -rs \
    peft/tests/test_dora_triton.py peft/tests/test_dora_layer.py peft/tests/test_dora_fast_path.py \
    peft/tests/test_precision_matrix.py tests/test_precision_training.py -k "not cpu" \
    --junitxml="$RESULTS/pytest_gpu.xml"

step dora_layer "$TIMEOUT_LAYER" "$PYTHON" benchmarks/dora_layer.py --device cuda --out "$RESULTS/dora_layer_cuda.json"
step train_step "$TIMEOUT_TRAIN" "$PYTHON" benchmarks/train_step.py --device cuda --out "$RESULTS/train_step_cuda.json"
# (j), the static KV cache, is left out: generate compiles the decoding step on CUDA, and each new
# prompt length may recompile, past this step's time; run it alone with --configs a,h,j.
step eval_speed "$TIMEOUT_EVAL" "$PYTHON" benchmarks/eval_speed.py --base_model smollm2-135m --limit 16 \
    --batch_size 16 --configs a,b,c,d,e,f,g,h,i --out "$RESULTS/eval_speed_cuda.json"
# finetune.py under accelerate FSDP (configs/accelerate_fsdp.yaml), one process per GPU (at most 2),
# on a tiny random LLaMA: adapter-only checkpoints gathered from the shards, written once
step fsdp_train "$TIMEOUT_FSDP" "$PYTHON" -m pytest -q -rs tests/test_distributed.py -k accelerate_fsdp_on_gpus \
    --junitxml="$RESULTS/pytest_fsdp.xml"
# QDoRA/QLoRA: 8-bit and 4-bit bases vs a dequantized float64 reference, and a few training steps
step quantized "$TIMEOUT_QUANT" "$PYTHON" benchmarks/quantized_check.py --device cuda

echo
echo "=== done: $failures failed step(s); results in $RESULTS"
exit "$failures"
