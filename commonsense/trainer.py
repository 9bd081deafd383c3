"""The Trainer subclass finetune.py trains with: adapter checkpoints, completion markers, NaN stops.

Checkpoints hold the adapter in the fork's format (not the frozen base model), each marked
whole once written (commonsense.checkpoints); a non-finite loss or gradient norm stops the run
before it reaches the weights, except the steps an fp16 loss scaler is meant to skip.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from .checkpoints import CHECKPOINT_COMPLETE, newest_complete_checkpoint
from .distributed import fsdp_save_optimizer_and_scheduler, is_main_process, load_adapter, save_adapter
from .io import atomic_write_json, fsync_files, kill_point
from .train_options import FinetuneError


class NonFiniteError(FinetuneError):
    """The loss or the gradient norm became inf/NaN; training stops before the weights do."""


# An fp16 loss scale at or below this that still overflows is a real NaN, not a scale to find.
MIN_LOSS_SCALE = 1.0


def adapter_trainer_class():
    """The AdapterTrainer class, built on first use (importing transformers takes seconds; the CLIs
    refuse bad input before that)."""
    from transformers import Trainer

    from peft.tuners.sharding import keep_magnitude_fp32

    class AdapterTrainer(Trainer):
        """Checkpoints hold the adapter (fork format), not the frozen base model; with
        ``full_model`` (full fine-tuning) they are the Trainer's own model checkpoints."""

        def __init__(self, *args, full_model: bool = False, **kwargs):
            self.full_model = full_model  # full fine-tuning: the Trainer's own checkpoints
            super().__init__(*args, **kwargs)
            self.skipped_steps: List[int] = []  # steps an fp16 loss scaler skipped
            self._non_finite_loss_at: Optional[int] = None
            if self.is_fsdp_enabled:  # before prepare() wraps the model: m stays fp32 under mixed precision
                plugin = self.accelerator.state.fsdp_plugin
                plugin.mixed_precision_policy = keep_magnitude_fp32(plugin.mixed_precision_policy)

        def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
            output_dir = output_dir or self.args.output_dir
            if self.full_model:
                super()._save(output_dir, state_dict=state_dict)
                kill_point("save", self.state.global_step)
                return
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            # Under FSDP, transformers passes the state dict it gathered from the shards.
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
            kill_point("save", self.state.global_step)  # mid-checkpoint: adapter written, the rest not
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _save_checkpoint(self, model, trial) -> None:
            # transformers writes checkpoint-N/ file by file in place; a kill in between leaves a
            # folder that looks like a checkpoint. The marker, written last, says it is whole.
            folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            marker = os.path.join(folder, CHECKPOINT_COMPLETE)
            if self.args.should_save and os.path.exists(marker):
                os.unlink(marker)  # overwriting an older run's checkpoint-N: not whole while it is rewritten
            super()._save_checkpoint(model, trial)
            # Under DDP every process writes its own RNG state into the folder: whole once all have.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                fsync_files(folder)
                atomic_write_json(marker, {"global_step": self.state.global_step})

        # ---- non-finite values: stop, unless an fp16 loss scaler is going to skip the step ----
        # An fp16 run's GradScaler finds its scale by overflowing: a step whose scaled gradients
        # are inf/NaN is skipped (the weights untouched) and the scale halved. That is no error.
        # A NaN that persists is: once the scale is down to MIN_LOSS_SCALE, halving it further
        # cannot help, and the run stops as it would without a scaler.
        def _loss_scaler(self):
            scaler = getattr(self.accelerator, "scaler", None)
            return scaler if scaler is not None and scaler.is_enabled() else None

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
            kill_point("step", step)
            if not torch.isfinite(loss).all():  # checked here: Trainer's logging_nan_inf_filter hides it
                if self._loss_scaler() is None:
                    raise self._non_finite("loss", step)
                self._non_finite_loss_at = step  # judged with the gradients, in _get_grad_norm
            return loss

        def _get_grad_norm(self, model, grad_norm=None):
            grad_norm = super()._get_grad_norm(model, grad_norm)
            # Runs before optimizer.step(): stopping here keeps inf/NaN out of the weights.
            step = self.state.global_step + 1
            finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
            loss_was_finite = self._non_finite_loss_at != step
            self._non_finite_loss_at = None
            scaler = self._loss_scaler()
            what = "gradient norm" if loss_was_finite else "loss"
            if scaler is None:
                if not finite:
                    raise self._non_finite(what, step)
                return grad_norm
            if finite and not loss_was_finite:
                raise self._non_finite("loss", step, " with finite gradients: no loss scaler skips this step")
            if not finite:
                scale = float(scaler.get_scale())
                if scale <= MIN_LOSS_SCALE:
                    raise self._non_finite(what, step, f" with the fp16 loss scale down to {scale:g}")
                self.skipped_steps.append(step)
                if is_main_process():
                    print(f"step {step}: non-finite fp16 {what} at loss scale {scale:g}; "
                          f"the scaler skips the step and halves the scale")
            return grad_norm

        def _non_finite(self, what: str, step: int, detail: str = "") -> "NonFiniteError":
            last = newest_complete_checkpoint(self.args.output_dir)
            return NonFiniteError(
                f"non-finite {what} at step {step}{detail} (last good checkpoint: {last or 'none yet'})"
            )

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            kill_point("eval", self.state.global_step)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if self.is_fsdp_enabled:
                fsdp_save_optimizer_and_scheduler(self, output_dir)
            else:
                super()._save_optimizer_and_scheduler(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            if self.full_model:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_adapter(model or self.model, resume_from_checkpoint)

        def _load_best_model(self) -> None:
            if is_main_process():
                print(f"loading the best checkpoint {self.state.best_model_checkpoint} (eval loss {self.state.best_metric})")
            if self.full_model:
                return super()._load_best_model()
            load_adapter(self.model, self.state.best_model_checkpoint)

        def save_adapter(self, output_dir: str, **save_kwargs) -> None:
            """The final adapter (or, for full fine-tuning, model), written once (by process 0);
            every process calls this (FSDP gathers the state from all of them)."""
            if self.full_model:
                self.save_model(output_dir)
                return
            save_adapter(self.accelerator, self.model, output_dir, self.args.should_save, **save_kwargs)

    return AdapterTrainer
