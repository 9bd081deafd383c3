"""Adapter state dicts and files.

Keys are the original fork's: ``base_model.model.<module path>.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r], ``...weight_m_wdecomp.weight`` [out, 1], plus the biases that
``bias`` makes trainable and the ``modules_to_save`` parameters. Inside this fork the frozen
linear sits at ``<module path>.base_layer``; the files never show that level.

Loading is strict: a missing or unexpected key or a wrong shape is an error naming the first
offenders (the original loaded with strict=False and silently kept random adapters).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from ..config import CONFIG_NAME, AdapterConfigError, PeftConfig, read_config_dict
from ..mapping import config_class_for
from ..tuners.tuners_utils import AdapterLayer, module_matches
from .hf_format import LORA_A, from_hf, is_hf_config, to_hf
from .io import atomic_save, atomic_write_text

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PARAM_MARKERS = ("lora_A.", "lora_B.", "weight_m_wdecomp.")


class AdapterWeightsError(ValueError):
    """Adapter weights that are missing, unreadable, or do not fit the model."""


def to_file_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


def get_peft_model_state_dict(model, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The adapter's tensors of a ``PeftModel``, under the file keys."""
    config = model.peft_config
    if state_dict is None:
        state_dict = model.state_dict()
    adapted = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    out = {}
    for key, value in state_dict.items():
        module_path = key.rsplit(".", 1)[0]
        is_adapter = any(marker in key for marker in ADAPTER_PARAM_MARKERS)
        is_bias = key.endswith(".bias") and (
            config.bias == "all"
            or (config.bias == "lora_only" and any(module_path == f"{n}.base_layer" for n in adapted))
        )
        saved_module = bool(config.modules_to_save) and _in_modules_to_save(key, config.modules_to_save)
        if is_adapter or is_bias or saved_module:
            out[to_file_key(key)] = value
    return out


def _in_modules_to_save(key: str, modules_to_save) -> bool:
    parts = key.split(".")
    prefix = "base_model.model."
    names = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(n.startswith(prefix) and module_matches(n[len(prefix):], modules_to_save) for n in names)


def set_peft_model_state_dict(model, peft_model_state_dict: Dict[str, torch.Tensor]):
    """Load adapter tensors into ``model`` strictly (keys and shapes must match exactly)."""
    expected = get_peft_model_state_dict(model)
    missing = [k for k in expected if k not in peft_model_state_dict]
    unexpected = [k for k in peft_model_state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:3])}")
    if problems:
        raise AdapterWeightsError("adapter weights do not match the model: " + "; ".join(problems))
    wrong_shape = [
        f"{k} is {tuple(v.shape)} in the file but {tuple(expected[k].shape)} in the model"
        for k, v in peft_model_state_dict.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong_shape:
        raise AdapterWeightsError(
            f"adapter weights do not match the model ({len(wrong_shape)} shape mismatch(es), wrong r or wrong "
            f"base model?): {'; '.join(wrong_shape[:3])}"
        )
    internal = {_internal_key(model, k): v for k, v in peft_model_state_dict.items()}
    result = model.load_state_dict(internal, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # guarded above; a bug if reached
    return model


def _internal_key(model, file_key: str) -> str:
    """Map a file key back to the module tree (re-inserting ``base_layer`` for adapted biases)."""
    module_path, _, param = file_key.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return file_key
    if isinstance(module, AdapterLayer) and param in ("weight", "bias"):
        return f"{module_path}.base_layer.{param}"
    return file_key


# ---- files ---------------------------------------------------------------------------
def save_adapter_weights(state_dict: Dict[str, torch.Tensor], directory: str, safe_serialization: bool = False) -> str:
    """Write fp32 adapter tensors atomically; remove the other format's stale file."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    name, stale = (
        (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if safe_serialization else (WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME)
    )
    path = os.path.join(directory, name)
    if safe_serialization:
        from safetensors.torch import save_file

        atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        atomic_save(path, lambda tmp: torch.save(tensors, tmp))
    stale_path = os.path.join(directory, stale)
    if os.path.exists(stale_path):
        os.unlink(stale_path)
    return path


def load_adapter_weights(directory: str) -> Dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` (weights_only)."""
    st_path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    bin_path = os.path.join(directory, WEIGHTS_NAME)
    try:
        if os.path.isfile(st_path):
            from safetensors.torch import load_file

            return load_file(st_path)
        if os.path.isfile(bin_path):
            data = torch.load(bin_path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
                raise AdapterWeightsError(f"{bin_path} does not hold a dict of tensors")
            return data
    except AdapterWeightsError:
        raise
    except Exception as err:  # corrupt or foreign file: say which and why, in one line
        path = st_path if os.path.isfile(st_path) else bin_path
        raise AdapterWeightsError(f"cannot read adapter weights {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    raise AdapterWeightsError(f"no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in adapter folder {directory}")


# ---- whole adapter folders, either format -------------------------------------------------
def read_adapter(directory: str, load_weights: bool = True):
    """(config, file-key tensors) of an adapter folder, in this fork's layout; the tensors are
    None when ``load_weights`` is False. The one reader of adapter folders: ``PeftModel`` and
    ``PeftConfig.from_pretrained`` both come here.

    The folder may be in this fork's (the original fork's) format or in HF peft's
    (``hf_format.is_hf_config``); an HF adapter is converted on the way in, weights included
    even for the config alone, since they name the modules of HF's ``target_modules:
    "all-linear"`` and must fit the config.
    """
    data = read_config_dict(directory)
    if is_hf_config(data):
        data, tensors = from_hf(data, load_adapter_weights(directory))
        return config_class_for(data["peft_type"]).from_dict(data), tensors if load_weights else None
    config = config_class_for(data.get("peft_type")).from_dict(data)  # a bad config fails before the weights load
    return config, load_adapter_weights(directory) if load_weights else None


def read_adapter_config(directory: str) -> PeftConfig:
    """The config of an adapter folder, in either format (``read_adapter``)."""
    return read_adapter(directory, load_weights=False)[0]


PeftConfig.folder_reader = read_adapter_config  # PeftConfig.from_pretrained (see config.py)


def write_adapter(config, tensors: Dict[str, torch.Tensor], directory: str, hf_format: bool = False,
                  safe_serialization: bool = False) -> None:
    """Write ``adapter_config.json`` and the weights, each file atomically, weights first.

    ``hf_format=True`` writes HF peft's format (always ``adapter_model.safetensors``); it is
    converted, and refused if it cannot be, before anything is written.
    """
    if os.path.isfile(directory):
        raise ValueError(f"adapter output must be a folder, {directory} is a file")
    if hf_format:
        hf_config, hf_tensors = to_hf(config.to_dict(), tensors)
        os.makedirs(directory, exist_ok=True)
        save_adapter_weights(hf_tensors, directory, safe_serialization=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(hf_config, indent=2, sort_keys=True))
    else:
        os.makedirs(directory, exist_ok=True)
        save_adapter_weights(tensors, directory, safe_serialization=safe_serialization)
        config.save_pretrained(directory)


def convert_adapter_folder(source: str, destination: str, to: str, overwrite: bool = False) -> str:
    """Convert the adapter folder ``source`` to ``to`` = "hf" (HF peft) or "original" (this
    fork's format, which the original NVlabs code loads: ``adapter_model.bin``).

    Refuses a source already in the target format, ``destination`` == ``source``, and a
    non-empty ``destination`` unless ``overwrite``. Returns a one-line summary.
    """
    if to not in ("hf", "original"):
        raise ValueError(f"unknown target format {to!r}; expected 'hf' or 'original'")
    source_is_hf = is_hf_config(read_config_dict(source))
    if source_is_hf == (to == "hf"):
        names = {True: "HF peft", False: "the original fork's"}
        raise AdapterConfigError(f"{source} is already in {names[source_is_hf]} format")
    if os.path.exists(destination):
        if not os.path.isdir(destination):
            raise ValueError(f"output {destination} exists and is not a folder")
        if os.path.samefile(source, destination):
            raise ValueError("the output folder is the input folder; write the conversion to another folder")
        if os.listdir(destination) and not overwrite:
            raise ValueError(f"output folder {destination} is not empty; pass --overwrite to replace its adapter")
    config, tensors = read_adapter(source)
    write_adapter(config, tensors, destination, hf_format=(to == "hf"))
    layers = sum(key.endswith(LORA_A) for key in tensors)
    target = "HF peft" if to == "hf" else "the original fork's"
    kind = config.peft_type.value
    return f"wrote the {kind} adapter (r={config.r}, {layers} layers) in {target} format to {destination}"
