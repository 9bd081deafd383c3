"""A local base-model folder, checked before anything loads, so what is wrong is said in our words.

transformers' own errors for an incomplete folder run to several lines ("Couldn't instantiate
the backend tokenizer from one of: (1) ..."), name no folder, come only after the weights have
loaded, or do not come at all: a masked-LM folder loads as a "causal LM" with a freshly
initialised head. Each check here names the folder and the missing piece; a folder that passes
is loaded by transformers as before. Hub ids and the embedded alias are left to the loader.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .models import ModelLoadError, resolve_base_model

# One of these (a single file, or the index of a sharded checkpoint) holds the weights.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
# One of these holds a tokenizer's vocabulary: the fast tokenizer's file, SentencePiece (LLaMA-1/2),
# BPE (GPT-2 style), WordPiece.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_model_folder(name_or_path, need_tokenizer: bool = True) -> None:
    """Raise ModelLoadError naming the folder when a local model folder cannot be what it claims.

    ``need_tokenizer=False`` accepts a folder without tokenizer files (merge_adapter.py copies
    the tokenizer only when the base has one)."""
    path = resolve_base_model(name_or_path)  # no config.json, unknown alias, hub id offline: its own errors
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: transformers downloads (or finds in its cache) a complete repository
    config = _read_config(folder)
    _check_causal_lm(folder, config)
    _check_weights(folder)
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder}: no tokenizer in the model folder (none of {', '.join(TOKENIZER_FILES)}); "
                             "copy the tokenizer files from where the model came from")


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{folder}/config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelLoadError(f"{folder}/config.json names no model_type: not a transformers model folder")
    return config


def _check_causal_lm(folder: Path, config: dict) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    wanted = "a causal language model (this project trains and evaluates LLaMA-family decoders, e.g. LlamaForCausalLM)"
    if config["model_type"] not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"{folder}: model_type {config['model_type']!r} is not {wanted}")
    architectures = config.get("architectures") or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    # An encoder saved with its masked-LM head (BertForMaskedLM) would load as a decoder with a new head.
    if architectures and not any(a in causal or a.lower().endswith("forcausallm") for a in architectures):
        raise ModelLoadError(f"{folder} holds a {', '.join(architectures)}, not {wanted}")


def _check_weights(folder: Path) -> None:
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ModelLoadError(f"{folder}: no weights in the model folder (none of {', '.join(WEIGHT_FILES)})")
    name = present[0]
    if name.endswith(".index.json"):
        try:
            shards = set(json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{folder}/{name} is not a valid shard index (no weight_map)") from None
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise ModelLoadError(f"{folder}: {len(missing)} of the {len(shards)} weight shards listed in {name} "
                                 f"are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    elif name == "model.safetensors" and not _safetensors_header_readable(folder / name):
        raise ModelLoadError(f"{folder}/{name} cannot be read (a truncated or corrupt download?)")


def _safetensors_header_readable(path: Path) -> bool:
    """The file's 8-byte header length and JSON header are whole (a cut download fails here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return False
        try:
            json.loads(f.read(length))
        except ValueError:
            return False
    return True
