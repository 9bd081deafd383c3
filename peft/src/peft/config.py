"""Adapter configuration: the base class, the adapter types, and adapter_config.json I/O.

The JSON layout is the original DoRA fork's, byte for byte:
``json.dumps(config, indent=2, sort_keys=True)`` with ``inference_mode`` set to true,
so adapters written here load in the original code and the released adapters load here.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from .utils.io import atomic_write_text

CONFIG_NAME = "adapter_config.json"


class PeftType(str, enum.Enum):
    LORA = "LORA"
    DORA = "DORA"


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"


class AdapterConfigError(ValueError):
    """An adapter_config.json (or config argument) that cannot describe a valid adapter."""


@dataclass
class PeftConfig:
    """Fields every adapter type has. Subclasses add the tuner's own hyper-parameters."""

    peft_type: Optional[Union[str, PeftType]] = None
    task_type: Optional[Union[str, TaskType]] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.peft_type is not None:
            try:
                self.peft_type = PeftType(str(getattr(self.peft_type, "value", self.peft_type)).upper())
            except ValueError:
                raise AdapterConfigError(
                    f"unknown peft_type {self.peft_type!r}; expected one of {[t.value for t in PeftType]}"
                ) from None

    # ---- dict / JSON -------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str) -> str:
        os.makedirs(save_directory, exist_ok=True)
        saved = dataclasses.replace(self, inference_mode=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        atomic_write_text(path, saved.to_json_string())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "PeftConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown adapter_config keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str) -> "PeftConfig":
        """Read ``directory/adapter_config.json`` into the config class its peft_type names.

        An HF peft LoRA/DoRA config is converted to this fork's (see ``utils/hf_format.py``).
        """
        from .utils.hf_format import config_from_hf, is_hf_config  # hf_format imports this module

        data = read_config_dict(directory)
        if is_hf_config(data):
            data = config_from_hf(data)
        config_cls = cls
        if cls is PeftConfig:
            from .mapping import config_class_for

            config_cls = config_class_for(data.get("peft_type"))
        return config_cls.from_dict(data)


def read_config_dict(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise AdapterConfigError(f"adapter folder not found: {directory}")
    if not os.path.isfile(path):
        raise AdapterConfigError(f"no {CONFIG_NAME} in adapter folder {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data
