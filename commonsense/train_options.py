"""finetune.py's options, checked before any work: flags, module lists, batch sizes, counts and rates."""
from __future__ import annotations

import json
import math
from typing import List, Optional, Sequence, Union

from .io import check_writable_dir


class FinetuneError(ValueError):
    """A training option or combination of options that cannot work."""


def parse_module_list(value) -> Optional[Union[List[str], str]]:
    """target_modules as the scripts pass it: a list, a JSON list string, "a,b,c" or one name.

    Any other string is kept as a regular expression (full match), as in the fork. One plain
    name ("q_proj") is a list of one: as a regular expression it would have to match the
    module's whole dotted path, and so would match nothing.
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise FinetuneError(f"cannot parse module list {text!r} (expected a JSON list of names)") from None
        if not all(isinstance(v, str) for v in parsed):
            raise FinetuneError(f"module list {text!r} must hold names (strings)")
        return parsed
    if all(part.strip().replace("_", "").replace(".", "").isalnum() for part in text.split(",")):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def check_batch_sizes(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """The gradient-accumulation steps that keep the global batch equal to ``batch_size``."""
    for name, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size)):
        if not _is_int(value) or value <= 0:
            raise FinetuneError(f"{name} must be a positive integer, got {value!r}")
    if micro_batch_size > batch_size:
        raise FinetuneError(f"micro_batch_size {micro_batch_size} is larger than batch_size {batch_size} "
                            "(batch_size is the global batch, micro_batch_size its per-step part)")
    if batch_size % micro_batch_size:
        raise FinetuneError(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size}")
    steps = batch_size // micro_batch_size
    if steps % world_size:
        raise FinetuneError(
            f"batch_size {batch_size} / micro_batch_size {micro_batch_size} = {steps} accumulation steps "
            f"cannot be split evenly over {world_size} processes"
        )
    return steps // world_size


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_positive_number(name: str, value) -> None:
    """A finite number > 0 (an epoch count, a learning rate), else one line naming ``name``."""
    if not _is_finite_number(value) or value <= 0:
        raise FinetuneError(f"{name} must be a positive number, got {value!r}")


# Counts that must be at least 1 (0 would mean: never log, never save, never evaluate, or cut
# every prompt), and counts where 0 is a real choice (no validation set, no warmup).
POSITIVE_COUNTS = ("cutoff_len", "eval_step", "save_step", "logging_steps", "save_total_limit")
NON_NEGATIVE_COUNTS = ("val_set_size", "warmup_steps", "seed")


def check_counts_and_rates(options: dict) -> None:
    """Refuse, before any loading, every count, size and rate that makes no sense.

    ``options`` maps train()'s parameter names to their values; fire passes what it cannot
    read as a number (``nan``, ``1e-4x``) as a string, so the types are checked too. Without
    this, num_epochs 0 or learning_rate 0 trains nothing and still saves an adapter.
    """
    for name in POSITIVE_COUNTS + NON_NEGATIVE_COUNTS:
        value, least = options[name], 1 if name in POSITIVE_COUNTS else 0
        if not _is_int(value) or value < least:
            kind = "a positive integer" if least else "an integer >= 0"
            raise FinetuneError(f"{name} must be {kind}, got {value!r}")
    check_positive_number("num_epochs", options["num_epochs"])
    if not _is_int(options["max_steps"]) or not (options["max_steps"] > 0 or options["max_steps"] == -1):
        raise FinetuneError(f"max_steps must be a positive integer, or -1 to train num_epochs epochs, "
                            f"got {options['max_steps']!r}")
    check_positive_number("learning_rate", options["learning_rate"])
    if not _is_finite_number(options["weight_decay"]) or options["weight_decay"] < 0:
        raise FinetuneError(f"weight_decay must be a number >= 0, got {options['weight_decay']!r}")
    if options["val_set_size"] > 0 and options["save_step"] % options["eval_step"]:
        # The best checkpoint is picked among the evaluated ones: each save must follow an evaluation.
        raise FinetuneError(f"save_step {options['save_step']} must be a multiple of eval_step "
                            f"{options['eval_step']} when there is a validation set (val_set_size > 0)")


# Flags of the original finetune.py that this one does not take, and why (checked before any
# work: fire would otherwise run the whole training and only then fail on the leftover flag).
_BOTTLENECK = ("an option of LLM-Adapters' bottleneck adapter, which the original finetune.py carried; "
               "this project trains FT, LoRA and DoRA only (the methods the DoRA paper compares)")
ORIGINAL_ONLY_FLAGS = {
    "lora_target_modules": "the original accepted it but never read it (--target_modules chose the modules); "
                           "pass --target_modules",
    "bottleneck_size": _BOTTLENECK,
    "non_linearity": _BOTTLENECK,
    "adapter_dropout": _BOTTLENECK,
    "use_parallel_adapter": _BOTTLENECK,
    "use_adapterp": _BOTTLENECK,
    "scaling": _BOTTLENECK,
    "num_virtual_tokens": "an option of LLM-Adapters' prefix tuning, which the original finetune.py carried; "
                          "this project trains FT, LoRA and DoRA only",
}


def check_flags(argv: List[str], known: Sequence[str]) -> None:
    """Refuse, in one line, any --flag not in ``known`` (train()'s parameters), naming why for the original's."""
    for word in argv:
        if not word.startswith("--"):
            continue
        name = word[2:].split("=", 1)[0].replace("-", "_")
        if name in known or name in ("help", "debug") or (name.startswith("no") and name[2:] in known):
            continue  # --noflag: fire's way to pass False
        if name in ORIGINAL_ONLY_FLAGS:
            raise FinetuneError(f"--{name}: {ORIGINAL_ONLY_FLAGS[name]}")
        raise FinetuneError(f"unknown flag --{name} (finetune.py's flags: {', '.join('--' + f for f in known)})")


def check_output_dir(output_dir: str) -> None:
    """Fail before any work if output_dir cannot be created or written (creates nothing)."""
    if not output_dir:
        raise FinetuneError("output_dir must not be empty")
    check_writable_dir(output_dir, "output_dir")

