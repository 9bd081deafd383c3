"""Fold a LoRA/DoRA adapter into its base model and write a plain Hugging Face model folder.

The folder (config.json, safetensors weights, sharded when large, the base's tokenizer when it
has one, generation_config.json) loads with ``AutoModelForCausalLM.from_pretrained`` and no
peft at all, so serving engines (vLLM, TGI, llama.cpp's converter) take it as any model.

The merge runs in fp32 on the CPU whatever the output dtype, so the only rounding is the final
cast: LoRA W <- W + sBA; DoRA W <- m (W + sBA) / ||W + sBA|| row-wise, magnitude-only layers
(``Wdecompose_target_modules``) included, by the fork's ``merge_and_unload``. The adapter
loads as evaluation loads it: this fork's / the released adapters' format, HF peft's format,
or a hub repo id. The folder is built beside the output and renamed into place, so an
interrupted merge leaves no half folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from commonsense.embedded_model import build_atomically
from commonsense.eval_model import _import_peft_model, check_adapter_folder
from commonsense.io import check_writable_dir, fsync_files
from commonsense.model_folder import TOKENIZER_FILES, check_model_folder
from commonsense.models import DTYPE_NAMES, load_base_model, refuse_remote_code, resolve_base_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
AUTO = "auto"  # the base model's own dtype (its config.json), fp32 when it names none
DEFAULT_MAX_SHARD_SIZE = "5GB"


class MergeError(ValueError):
    """The merge cannot be done as asked (quantized base, mismatched adapter, output in use); one line."""


def check_output_dir(output_dir, overwrite: bool, inputs=()) -> Path:
    """The output folder may be new or empty; a non-empty one only with ``overwrite``.

    It must never be (or hold) one of the inputs: replacing it would delete them.
    """
    out = Path(output_dir).expanduser()
    if not str(output_dir).strip():
        raise MergeError("--output_dir is empty")
    check_writable_dir(out, "--output_dir")
    for given in inputs:
        path = Path(given).expanduser()
        if path.exists() and (out.resolve() == path.resolve() or out.resolve() in path.resolve().parents):
            raise MergeError(f"--output_dir {out} is or contains the input {given}; write the merged model elsewhere")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output folder {out} is not empty; pass --overwrite to replace it")
    return out


def requested_dtype(dtype: str):
    """torch dtype for fp16, bf16 or fp32; None for auto (the base's own, known once its config is read)."""
    name = str(dtype).strip().lower()
    if name == AUTO:
        return None
    if name not in DTYPES:
        raise MergeError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)} or {AUTO}")
    return DTYPES[name]


def output_dtype(requested, base_config) -> torch.dtype:
    """The requested dtype, or for auto (None) the base's own (fp32 when its config names none)."""
    if requested is not None:
        return requested
    saved = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    return DTYPE_NAMES.get(str(saved).replace("torch.", ""), torch.float32)


def check_shard_size(max_shard_size):
    """"5GB", "500MB" or a byte count, returned as save_pretrained takes it; said now, not after the merge."""
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(max_shard_size, str) and max_shard_size.strip().isdigit():
        max_shard_size = int(max_shard_size)
    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size < 1:
        raise MergeError(f"--max_shard_size {max_shard_size!r} is not a size such as 5GB, 500MB or a byte count")
    return max_shard_size


def load_base_config(base_path: str, trust_remote_code: bool = False):
    """The base's config, refusing a quantized base: its weights cannot absorb an adapter exactly."""
    from transformers import AutoConfig

    refuse_remote_code(base_path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MergeError(f"cannot read the config of base model {base_path}: {err}") from err
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        raise MergeError(f"base model {base_path} is quantized ({method}); merge into the unquantized base "
                         "(its fp16/bf16/fp32 weights), then quantize the merged folder if needed")
    return config


def base_tokenizer(base_path: str, trust_remote_code: bool = False):
    """The base's tokenizer, unchanged (no pad-token edits), or None when the base has none."""
    from transformers import AutoTokenizer

    folder = Path(base_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if folder.is_dir():
            raise MergeError(f"cannot load the tokenizer of base model {base_path}: {err}") from err
        return None  # a hub repository without a tokenizer


def merge_adapter(
    base_model,
    lora_weights,
    output_dir,
    *,
    dtype: str = AUTO,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    trust_remote_code: bool = False,
) -> str:
    """Merge ``lora_weights`` into ``base_model`` and write the folder ``output_dir``; return a summary line."""
    requested = requested_dtype(dtype)  # refused before anything loads
    max_shard_size = check_shard_size(max_shard_size)
    out = check_output_dir(output_dir, overwrite, inputs=(base_model, lora_weights))
    adapter_dir = check_adapter_folder(lora_weights)
    base_path = resolve_base_model(base_model)
    check_model_folder(base_path, need_tokenizer=False)
    config = load_base_config(base_path, trust_remote_code)
    target_dtype = output_dtype(requested, config)
    tokenizer = base_tokenizer(base_path, trust_remote_code)

    model = load_base_model(base_path, dtype="fp32", device="cpu", trust_remote_code=trust_remote_code)
    base_keys = set(model.state_dict())
    PeftModel = _import_peft_model()
    try:
        adapted = PeftModel.from_pretrained(model, str(adapter_dir))
    except ValueError as err:  # strict loading: missing target modules, wrong shapes, wrong layer count
        raise MergeError(f"adapter {lora_weights} does not fit base model {base_model}: {err}") from err
    peft_type = adapted.peft_config.peft_type.value
    layers = len(adapted.base_model.adapter_layers())
    merged = adapted.merge_and_unload()
    leftover = set(merged.state_dict()) ^ base_keys
    if leftover:  # a wrapper left behind would make the folder unloadable without peft
        raise RuntimeError(f"merge left adapter tensors in the model: {sorted(leftover)[:3]}")

    merged.to(target_dtype)
    merged.config.dtype = target_dtype
    merged.eval()

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        fsync_files(folder)

    build_atomically(out, write, replace=overwrite)
    shards = sum(name.endswith(".safetensors") for name in os.listdir(out))
    dtype_name = str(target_dtype).replace("torch.", "")
    return (f"merged the {peft_type} adapter ({layers} layers) into {base_model}: wrote {out} "
            f"({dtype_name}, {shards} safetensors file(s){', tokenizer' if tokenizer is not None else ', no tokenizer'})")
