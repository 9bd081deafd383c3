"""The model an evaluation scores: adapter names and folders checked, base loaded, adapter merged.

The adapter type (LoRA or DoRA) comes from the folder's adapter_config.json; ``--adapter``
only says whether there is one (the original's DoRA eval scripts pass ``--adapter LoRA``).
"""
from pathlib import Path

import torch

from commonsense.model_folder import check_model_folder
from commonsense.models import configure_padding, load_base_model, load_tokenizer, quantization_config

# FT: a fully fine-tuned model (finetune.py --adapter_name ft), given as --base_model; no adapter.
ADAPTERS = ("LoRA", "DoRA", "FT", "none")
NO_ADAPTER = ("FT", "none")


class EvaluationError(ValueError):
    """Bad evaluation input (adapter name, adapter folder, output location...); one-line message."""


def normalize_adapter(name: str) -> str:
    """Canonical adapter name (LoRA, DoRA or none) for any capitalisation."""
    canonical = {a.lower(): a for a in ADAPTERS}
    try:
        return canonical[str(name).strip().lower()]
    except KeyError:
        why = ""
        if str(name).strip().lower() in ("adapterp", "adapterh", "parallel"):
            why = " (the original also listed LLM-Adapters' bottleneck adapters, which are not carried here)"
        raise EvaluationError(f"unknown adapter {name!r}; choose from {', '.join(ADAPTERS)}{why}") from None


def _import_peft_model():
    # The vendored fork must win over any pip-installed peft; entry scripts already
    # put it first, this covers library use (e.g. from a notebook).
    from commonsense.cli import add_repo_paths

    add_repo_paths()
    from peft import PeftModel

    return PeftModel


def check_adapter_folder(lora_weights) -> Path:
    """The adapter folder must exist and hold a valid adapter_config.json (checked before loading the base).

    A hub repo id ("org/name", as the original accepted) is downloaded first, adapter files only,
    into the hub cache (the fork's resolve_adapter_dir, which PeftModel.from_pretrained uses too).
    """
    if lora_weights is None or not str(lora_weights).strip():
        raise EvaluationError("--lora_weights is required unless --adapter none")
    folder = Path(lora_weights).expanduser()
    _import_peft_model()
    if not folder.is_dir():
        from peft.utils.hub import looks_like_hub_repo, resolve_adapter_dir

        if not looks_like_hub_repo(str(lora_weights)):
            raise EvaluationError(f"adapter folder not found: {lora_weights}")
        folder = Path(resolve_adapter_dir(str(lora_weights)))
    if not (folder / "adapter_config.json").is_file():
        raise EvaluationError(f"{lora_weights}: not an adapter folder (no adapter_config.json)")
    from peft import PeftConfig

    PeftConfig.from_pretrained(str(folder))  # not JSON, unknown peft_type, bad r...: fail before the base loads
    return folder


def check_adapter_args(adapter, lora_weights) -> str:
    """Canonical adapter name; an adapter needs a folder, "none" and "FT" must not get one."""
    adapter = normalize_adapter(adapter)
    if adapter in NO_ADAPTER:
        if lora_weights:
            # Probably a mistake either way: refuse rather than guess which one was meant.
            hint = " (a fully fine-tuned model is the --base_model folder)" if adapter == "FT" else ""
            raise EvaluationError(f"--lora_weights given with --adapter {adapter}; drop one of them{hint}")
    else:
        check_adapter_folder(lora_weights)
    return adapter


def load_model_for_eval(
    base_model,
    lora_weights=None,
    adapter="DoRA",
    load_8bit=False,
    load_4bit=False,
    device=None,
    dtype="auto",
    trust_remote_code=False,
):
    """Load base model + tokenizer, attach the adapter and merge it; return (model, tokenizer).

    fp16 on CUDA (as the original), fp32 on CPU. The adapter type (LoRA or DoRA)
    comes from adapter_config.json; `adapter` only says whether there is one
    (the original's DoRA eval scripts pass --adapter LoRA for DoRA weights).
    With `load_8bit` / `load_4bit` the adapter is kept unmerged: quantized weights cannot absorb it.
    """
    adapter = check_adapter_args(adapter, lora_weights)
    check_model_folder(base_model)
    if load_8bit or load_4bit:
        quantization_config(load_8bit, load_4bit, torch.float32)  # both flags, or no bitsandbytes: said now
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side="left")
    model = load_base_model(
        base_model,
        dtype=dtype,
        device=device,
        load_8bit=load_8bit,
        load_4bit=load_4bit,
        trust_remote_code=trust_remote_code,
    )
    if adapter not in NO_ADAPTER:
        PeftModel = _import_peft_model()
        model = PeftModel.from_pretrained(model, str(lora_weights))
        if load_8bit or load_4bit:
            print("quantized base weights: the adapter is kept unmerged")
        else:
            print("Merge LoRA/DoRA weights into the original weights")
            model = model.merge_and_unload()
    configure_padding(tokenizer, model)
    model.eval()
    return model, tokenizer


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device

