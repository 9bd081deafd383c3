"""Fine-tuning with LoRA or DoRA: the original finetune.py's recipe on ``transformers.Trainer``.

Recipe (as the original): the Alpaca-style training prompt, EOS appended when the prompt was
not truncated, labels = input ids (or the prompt part masked with -100 when
``train_on_inputs=False``), a seeded validation split, AdamW with 100 warmup steps and a
linear schedule, logging every 10 steps, evaluation and checkpoints every N steps (the 3
newest kept), and the best validation-loss adapter loaded at the end and saved in the fork's
format. Gradient accumulation = batch_size // micro_batch_size, divided by the world size
under DDP so the global batch stays ``batch_size``.
"""
from __future__ import annotations

import os
import time
from typing import Tuple

import torch

from .checkpoints import adapter_warm_start, resolve_resume
from .data import load_training_rows
from .distributed import check_fsdp_setup, is_main_process, load_adapter, world_size
from .full_finetune import FT, print_trainable, select_trainable
from .full_finetune import check_options as check_full_finetune_options
from .full_finetune import write_marker as write_full_finetune_marker
from .io import atomic_write_json
from .models import (
    configure_padding,
    cuda_bf16_supported,
    load_base_model,
    load_tokenizer,
    pick_device,
    quantization_config,
)
from .prompts import training_prompt, user_prompt
from .model_folder import check_model_folder
from .train_options import (
    FinetuneError,
    check_batch_sizes,
    check_counts_and_rates,
    check_output_dir,
    parse_module_list,
)
from .trainer import adapter_trainer_class


# ---- data -----------------------------------------------------------------------------------
def tokenize_prompt(tokenizer, prompt: str, cutoff_len: int, add_eos_token: bool = True) -> dict:
    """The original's tokenize(): truncate to cutoff_len; append EOS unless truncated."""
    result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    ids, mask = list(result["input_ids"]), list(result["attention_mask"])
    if add_eos_token and ids and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.copy()}


def tokenize_row(tokenizer, row: dict, cutoff_len: int, train_on_inputs: bool = True) -> dict:
    example = tokenize_prompt(tokenizer, training_prompt(row), cutoff_len)
    prompt_len = len(tokenize_prompt(tokenizer, user_prompt(row), cutoff_len, add_eos_token=False)["input_ids"])
    if not train_on_inputs:
        example["labels"] = [-100] * prompt_len + example["labels"][prompt_len:]
    example["response_kept"] = prompt_len < len(example["input_ids"])
    return example


def build_datasets(rows, tokenizer, cutoff_len: int, train_on_inputs: bool, val_set_size: int, seed: int = 42):
    """Seeded train/validation split (as the original), then tokenization."""
    from datasets import Dataset

    if val_set_size >= len(rows):
        raise FinetuneError(f"val_set_size {val_set_size} leaves no training rows (the data has {len(rows)})")
    data = Dataset.from_list([{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows])
    if val_set_size > 0:
        split = data.train_test_split(test_size=val_set_size, shuffle=True, seed=seed)
        train, val = split["train"].shuffle(seed=seed), split["test"]
    else:
        train, val = data.shuffle(seed=seed), None

    def encode(row):
        return tokenize_row(tokenizer, row, cutoff_len, train_on_inputs)

    columns = ["instruction", "input", "output"]
    train = train.map(encode, remove_columns=columns, desc="tokenizing train")
    kept = sum(train["response_kept"])
    if kept == 0:
        raise FinetuneError(
            f"cutoff_len {cutoff_len} is too small: every training prompt is cut before its response"
        )
    if kept < len(train):
        print(f"warning: cutoff_len {cutoff_len} cuts the response off {len(train) - kept} of {len(train)} rows")
    train = train.remove_columns(["response_kept"])
    if val is not None:
        val = val.map(encode, remove_columns=columns, desc="tokenizing validation").remove_columns(["response_kept"])
    return train, val


# ---- the run --------------------------------------------------------------------------------
def train(
    # model/data params
    base_model: str = "",
    data_path: str = "commonsense_170k.json",
    output_dir: str = "./lora-alpaca",
    adapter_name: str = "lora",
    load_8bit: bool = False,
    load_4bit: bool = False,
    # training hyperparams
    batch_size: int = 128,
    micro_batch_size: int = 4,
    num_epochs: float = 3,
    learning_rate: float = 3e-4,
    weight_decay: float = 0.0,
    cutoff_len: int = 256,
    val_set_size: int = 2000,
    use_gradient_checkpointing: bool = False,
    eval_step: int = 200,
    save_step: int = 200,
    # lora/dora hyperparams
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    target_modules=None,
    dora_simple: bool = True,
    Wdecompose_target_modules=None,
    # llm hyperparams
    train_on_inputs: bool = True,
    group_by_length: bool = False,
    # wandb params
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: str = "",
    wandb_log_model: str = "",
    resume_from_checkpoint=None,
    # additions to the original's flags
    seed: int = 42,
    warmup_steps: int = 100,
    logging_steps: int = 10,  # the original's; smaller gives a denser loss curve on short runs
    max_steps: int = -1,
    bf16: bool = False,
    safe_serialization: bool = False,
    save_total_limit: int = 3,  # the original's; more keeps the intermediate steps (e.g. for analysis)
    trust_remote_code: bool = False,
    debug: bool = False,
) -> str:
    """Fine-tune ``base_model`` with a LoRA or DoRA adapter; return the adapter folder."""
    from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

    from peft import DoraConfig, LoraConfig, get_peft_model, prepare_model_for_int8_training
    from peft.tuners.sharding import set_norm_caching

    if not base_model:
        raise FinetuneError("please specify a --base_model, e.g. --base_model=smollm2-135m or yahma/llama-7b-hf")
    adapter = str(adapter_name).lower()
    full_model = adapter == FT
    if adapter not in ("lora", "dora", FT):
        raise FinetuneError(
            f"adapter_name must be lora, dora or ft (full fine-tuning), got {adapter_name!r} (the original "
            "finetune.py also had LLM-Adapters' bottleneck and prefix-tuning adapters; the DoRA paper compares "
            "FT, LoRA and DoRA, so only those are carried)"
        )
    check_counts_and_rates(locals())
    processes = world_size()
    ddp = processes != 1
    accumulation_steps = check_batch_sizes(batch_size, micro_batch_size, processes)
    adapter_config_cls = DoraConfig if adapter == "dora" else LoraConfig
    adapter_kwargs = dict(
        r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=parse_module_list(target_modules),
        lora_dropout=lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,  # what the user named (hub id, folder or alias), not a cache path
    )
    if adapter == "dora":
        adapter_kwargs.update(
            dora_simple=bool(dora_simple), Wdecompose_target_modules=parse_module_list(Wdecompose_target_modules)
        )
    if full_model:
        check_full_finetune_options(load_8bit, load_4bit, Wdecompose_target_modules)
        peft_config = None
    else:
        peft_config = adapter_config_cls(**adapter_kwargs)  # validates r, alpha, dropout before any loading
    check_output_dir(output_dir)
    rows = load_training_rows(data_path)
    check_model_folder(base_model)
    if load_8bit or load_4bit:
        quantization_config(load_8bit, load_4bit, torch.float32)  # both flags, or no bitsandbytes: said now
    warm_start = None if full_model else adapter_warm_start(resume_from_checkpoint)
    resume = None if warm_start else resolve_resume(resume_from_checkpoint, output_dir)
    if warm_start:
        print(f"{warm_start} is an adapter, not a checkpoint: starting from its weights at step 0 "
              "(fresh optimizer and schedule, as the original)")
    elif resume_from_checkpoint:
        print(f"resuming from {resume}" if resume else f"no complete checkpoint in {output_dir}: starting from step 0")

    use_wandb = bool(wandb_project) or bool(os.environ.get("WANDB_PROJECT"))
    for key, value in (("WANDB_PROJECT", wandb_project), ("WANDB_WATCH", wandb_watch), ("WANDB_LOG_MODEL", wandb_log_model)):
        if value:
            os.environ[key] = value

    if is_main_process():
        print(
            f"Training {adapter.upper()} model with params:\n"
            + "\n".join(f"  {k}: {v}" for k, v in locals_summary(locals()).items())
        )
    set_seed(seed)
    # Tokenizer and data before the model: a bad tokenizer, cutoff_len or val_set_size fails in
    # seconds, not after minutes of loading the base weights.
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side="left")
    train_data, val_data = build_datasets(rows, tokenizer, cutoff_len, train_on_inputs, val_set_size, seed)
    device = pick_device()
    cuda = device == "cuda"
    fsdp = check_fsdp_setup(cuda, quantized=load_8bit or load_4bit)
    dtype, use_fp16, use_bf16 = training_precision(cuda, bf16, fsdp, full_model)
    device_map = {"": int(os.environ.get("LOCAL_RANK") or 0)} if (ddp and cuda) else None
    model = load_base_model(
        base_model,
        dtype=dtype,
        load_8bit=load_8bit,
        load_4bit=load_4bit,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    )
    configure_padding(tokenizer, model)
    model = prepare_model_for_int8_training(model, use_gradient_checkpointing=use_gradient_checkpointing)
    if full_model:
        trained_modules = select_trainable(model, parse_module_list(target_modules))
        if is_main_process():
            print_trainable(model, trained_modules)
    else:
        model = get_peft_model(model, peft_config)
        if warm_start:
            load_adapter(model, warm_start)  # strict: the adapter must fit this run's r and target modules
        if fsdp:
            set_norm_caching(model, False)  # see peft/src/peft/tuners/sharding.py
        if is_main_process():
            model.print_trainable_parameters()

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch_size,
        # The original left it at the Trainer's default, 8; the validation loss (which picks the best
        # checkpoint) averages per-batch mean losses, so the eval batch size is part of the recipe.
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=accumulation_steps,
        warmup_steps=warmup_steps,
        num_train_epochs=num_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        fp16=use_fp16,
        bf16=use_bf16,
        logging_steps=logging_steps,
        logging_first_step=True,
        # log a NaN as NaN (AdapterTrainer stops on it), except the steps an fp16 loss scaler skips
        logging_nan_inf_filter=use_fp16,
        optim="adamw_torch",
        eval_strategy="steps" if val_data is not None else "no",
        save_strategy="steps",
        eval_steps=eval_step if val_data is not None else None,
        save_steps=save_step,
        save_total_limit=save_total_limit,
        load_best_model_at_end=val_data is not None,
        metric_for_best_model="loss" if val_data is not None else None,
        ddp_find_unused_parameters=False if ddp else None,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        report_to="wandb" if use_wandb else "none",
        run_name=wandb_run_name or None,
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        remove_unused_columns=False,
    )
    keep_one_device(args, processes)
    trainer = adapter_trainer_class()(
        full_model=full_model,
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )
    model.config.use_cache = False
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - started
    trainer.save_adapter(output_dir, safe_serialization=safe_serialization)
    if trainer.args.should_save:
        if full_model:  # a plain model folder: the tokenizer beside the weights, and what was trained
            tokenizer.save_pretrained(output_dir)
            write_full_finetune_marker(output_dir, base_model, trained_modules)
        write_training_log(trainer, output_dir, elapsed)
        print(f"saved the {'fully fine-tuned model' if full_model else adapter.upper() + ' adapter'} to {output_dir}")
    return output_dir


def training_precision(cuda: bool, bf16: bool, fsdp: bool, full_model: bool = False) -> Tuple[str, bool, bool]:
    """(base weight dtype, Trainer fp16, Trainer bf16) for a run.

    CUDA: the seed's recipe, an fp16 base with fp16 autocast and loss scaling; ``--bf16`` loads
    the base in bf16 and autocasts to bf16 (no scaler needed), on GPUs that support it. Under
    FSDP the base loads in fp32 (FSDP1 flattens a block's base weights and fp32 adapter into one
    shard, which needs one dtype) and FSDP's mixed precision computes in fp16 or bf16. CPU: an
    fp32 base; ``--bf16`` trains through the Trainer's CPU bf16 autocast. The adapter is fp32
    in every case. Full fine-tuning trains the base itself, so it loads in fp32 everywhere
    (fp32 master weights) and autocast does the half-precision compute.
    """
    if bf16 and cuda and not cuda_bf16_supported():
        raise FinetuneError("--bf16: this GPU does not support bfloat16 (it needs compute capability 8.0+); "
                            "leave --bf16 out to train in fp16 with loss scaling")
    if not cuda:
        return "fp32", False, bool(bf16)
    if fsdp or full_model:
        return "fp32", not bf16, bool(bf16)
    return ("bf16" if bf16 else "fp16"), not bf16, bool(bf16)


def keep_one_device(args, processes: int) -> None:
    """One process trains on one device, so the global batch stays ``batch_size``.

    With several visible GPUs and no launcher, the Trainer would wrap the model in
    DataParallel and feed each step micro_batch_size x GPUs examples. The original kept one
    process on one device (it marked the model model-parallel); so does this, and it says how
    to use every GPU (one process each, same global batch).
    """
    if processes == 1 and args.n_gpu > 1:
        if is_main_process():
            print(f"note: {args.n_gpu} GPUs are visible but finetune.py runs as one process, so it trains on "
                  f"one GPU; to use all of them with the same global batch, launch one process per GPU: "
                  f"torchrun --standalone --nproc_per_node {args.n_gpu} finetune.py ... "
                  f"(or the seed scripts with a GPU list such as 0,1)")
        args._n_gpu = 1


def locals_summary(values: dict) -> dict:
    hidden = {"debug"}
    return {k: v for k, v in values.items() if k in TRAIN_FLAGS and k not in hidden}


def write_training_log(trainer, output_dir: str, elapsed: float) -> None:
    """Loss curve, wall time and peak memory, next to the adapter (for reports)."""
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    atomic_write_json(
        os.path.join(output_dir, "train_log.json"),
        {
            "log_history": trainer.state.log_history,
            "best_model_checkpoint": trainer.state.best_model_checkpoint,
            "global_step": trainer.state.global_step,
            "train_seconds": round(elapsed, 2),
            "skipped_steps": trainer.skipped_steps,  # by the fp16 loss scaler (overflow)
            "peak_gpu_memory_bytes": peak,
            "device": pick_device(),
            "world_size": world_size(),
        },
        indent=2,
    )


import inspect as _inspect  # noqa: E402  (after train() so the flag list is read from its signature)

TRAIN_FLAGS = tuple(_inspect.signature(train).parameters)
