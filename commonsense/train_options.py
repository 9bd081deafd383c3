"""finetune.py's options, checked before any work: flags, module lists, batch sizes, counts and rates."""
from __future__ import annotations

import json
from typing import List, Optional, Sequence, Union

from .io import check_writable_dir


class FinetuneError(ValueError):
    """A training option or combination of options that cannot work."""


def parse_module_list(value) -> Optional[Union[List[str], str]]:
    """target_modules as the scripts pass it: a list, a JSON list string, or "a,b,c".

    Any other string is kept as a regular expression (full match), as in the fork.
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
    if "," in text and all(part.strip().replace("_", "").replace(".", "").isalnum() for part in text.split(",")):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def check_batch_sizes(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """The gradient-accumulation steps that keep the global batch equal to ``batch_size``."""
    for name, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FinetuneError(f"{name} must be a positive integer, got {value!r}")
    if batch_size % micro_batch_size:
        raise FinetuneError(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size}")
    steps = batch_size // micro_batch_size
    if steps % world_size:
        raise FinetuneError(
            f"batch_size {batch_size} / micro_batch_size {micro_batch_size} = {steps} accumulation steps "
            f"cannot be split evenly over {world_size} processes"
        )
    return steps // world_size


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

