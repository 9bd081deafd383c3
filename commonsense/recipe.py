"""The seed's fine-tuning recipe (NVlabs/DoRA commonsense_reasoning/*.sh and finetune.py), in one place.

The demo and the reproduction read it from here. The shell scripts (``scripts/common.sh``
``seed_train``) must keep the original's flags word for word, so they spell the same values
out; tests/test_scripts.py checks them against the original and tests/test_reproduce.py checks
this module against the scripts.
"""
from __future__ import annotations

import math

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
BATCH_SIZE = 16  # the global batch; micro batches x gradient accumulation
CUTOFF_LEN = 256
LORA_DROPOUT = 0.05
# The seed's learning rates per method (its SmolLM2 / LLaMA-7B / LLaMA2-7B scripts; LLaMA3-8B's DoRA
# uses 1e-4). FT: 2e-5, the usual full fine-tuning rate for LLaMA-class models; the seed gives none.
LEARNING_RATE = {"lora": 3e-4, "dora": 2e-4, "ft": 2e-5}
# Exceptions by rank: the seed README's LLaMA-7B rank table lists DoRA r32 (78.4) at 1e-4, although
# its llama_7B_Dora.sh passes 2e-4 whatever the rank.
RANK_LEARNING_RATE = {("dora", 32): 1e-4}
EPOCHS = 3
WARMUP_STEPS = 100
VAL_SET_SIZE = 120
EVAL_STEP = 80  # evaluation and checkpoint interval
LOGGING_STEPS = 10
MIX_ROWS = 170_420  # commonsense_170k.json


def default_learning_rate(method: str, r=None) -> float:
    """The seed's lr for a method at a rank (the LLaMA-7B rank table's rule); FT has no rank."""
    return RANK_LEARNING_RATE.get((method, r), LEARNING_RATE[method])


def lora_alpha(r: int) -> int:
    """The seed's alpha: twice the rank."""
    return 2 * r


def training_steps(rows: int, batch_size: int, micro_batch_size: int, num_epochs: float) -> int:
    """Optimizer steps transformers.Trainer takes: ceil(batches / accumulation) per epoch."""
    batches = math.ceil(rows / micro_batch_size)
    per_epoch = max(math.ceil(batches / (batch_size // micro_batch_size)), 1)
    return math.ceil(num_epochs * per_epoch)


# The seed: 3 epochs over the 170,420-row mix less 120 validation rows, batch 16.
TOTAL_STEPS = training_steps(MIX_ROWS - VAL_SET_SIZE, BATCH_SIZE, BATCH_SIZE, EPOCHS)


def scaled_warmup_steps(total_steps: int) -> int:
    """The seed's warmup share (100 of its 31,932 steps) of a shorter run; at least one step."""
    return max(1, round(total_steps * WARMUP_STEPS / TOTAL_STEPS))


def format_lr(lr: float) -> str:
    """3e-4 as the seed writes it (not 0.0003)."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
