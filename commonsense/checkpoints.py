"""Training checkpoints: which checkpoint-N folders are whole, and what --resume_from_checkpoint means.

transformers writes checkpoint-N/ file by file; the Trainer (commonsense.trainer) writes
CHECKPOINT_COMPLETE into it last, so a folder without the marker was cut off mid-save and is
never resumed. A folder that holds an adapter but no Trainer state is a warm start instead.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from .train_options import FinetuneError

CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last into checkpoint-N/
# --resume_from_checkpoint values meaning "the newest complete checkpoint in output_dir".
AUTO_RESUME = ("auto", True, "True", "true")


def checkpoint_step(name: str) -> Optional[int]:
    """N for a folder named checkpoint-N (the Trainer's checkpoints), else None."""
    match = re.fullmatch(r"checkpoint-([0-9]+)", name)
    return int(match[1]) if match else None


def is_complete_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CHECKPOINT_COMPLETE))


def newest_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The highest-step checkpoint-N folder in output_dir that has its completion marker."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        step = checkpoint_step(name)
        if step is not None and is_complete_checkpoint(os.path.join(output_dir, name)):
            steps.append(step)
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def adapter_warm_start(resume_from_checkpoint) -> Optional[str]:
    """The adapter folder to warm-start from, when ``resume_from_checkpoint`` names one.

    As in the original, a folder holding an adapter but no Trainer state (a final adapter, a
    released one) is not resumed: its weights are loaded and training starts at step 0 with a
    fresh optimizer and schedule. A ``checkpoint-N`` folder is always a checkpoint (see
    resolve_resume), even one cut off before its Trainer state was written.
    """
    if not resume_from_checkpoint or resume_from_checkpoint in AUTO_RESUME:
        return None
    folder = str(resume_from_checkpoint)
    if not os.path.isdir(folder) or checkpoint_step(os.path.basename(os.path.normpath(folder))) is not None:
        return None
    has_adapter = os.path.isfile(os.path.join(folder, "adapter_config.json")) and any(
        os.path.isfile(os.path.join(folder, name)) for name in ("adapter_model.bin", "adapter_model.safetensors")
    )
    if has_adapter and not os.path.isfile(os.path.join(folder, "trainer_state.json")):
        return folder
    return None


def resolve_resume(resume_from_checkpoint, output_dir: str):
    """``auto``: the newest complete checkpoint in output_dir (None if there is none); else the path.

    A checkpoint without its marker was cut off mid-save (a kill, a full disk): ``auto`` skips
    it and an explicit path to it is an error. (An adapter folder is a warm start instead:
    adapter_warm_start.)
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint in AUTO_RESUME:
        return newest_complete_checkpoint(output_dir)
    if not os.path.isdir(resume_from_checkpoint):
        raise FinetuneError(f"resume_from_checkpoint: no checkpoint folder {resume_from_checkpoint}")
    if not is_complete_checkpoint(resume_from_checkpoint):
        raise FinetuneError(
            f"resume_from_checkpoint: {resume_from_checkpoint} is incomplete (no {CHECKPOINT_COMPLETE}; "
            "the run stopped while saving it); pass an earlier checkpoint or 'auto'"
        )
    return resume_from_checkpoint

