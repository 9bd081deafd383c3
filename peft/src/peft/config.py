"""Adapter configuration: the base class, the adapter types, and adapter_config.json I/O.

The JSON layout is the original DoRA fork's, byte for byte:
``json.dumps(config, indent=2, sort_keys=True)`` with ``inference_mode`` set to true,
so adapters written here load in the original code and the released adapters load here.

A leaf: this module imports nothing else of the fork (but ``utils.io``), so every other
module may import it. Reading an adapter folder, in this fork's format or HF peft's, is
``utils.save_and_load.read_adapter``'s job; ``PeftConfig.from_pretrained`` goes through it.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Union

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


def parse_peft_type(value) -> PeftType:
    """``PeftType`` for a PeftType or its name in any case ("dora", "DORA"); a clear error otherwise."""
    try:
        return PeftType(str(getattr(value, "value", value)).upper())
    except ValueError:
        raise AdapterConfigError(
            f"unknown peft_type {value!r}; expected one of {[t.value for t in PeftType]}"
        ) from None


@dataclass
class PeftConfig:
    """Fields every adapter type has. Subclasses add the tuner's own hyper-parameters."""

    # peft_type when none is given (each adapter type's config class sets its own)
    DEFAULT_PEFT_TYPE: ClassVar[Optional[PeftType]] = None
    # The reader of adapter folders behind ``from_pretrained``: ``read_adapter_config``, which
    # utils/save_and_load.py installs here when ``import peft`` imports it. Reading needs the
    # HF conversion, the weight files and the tuners' config classes, which this leaf must not
    # import.
    folder_reader: ClassVar[Optional[Callable[[str], "PeftConfig"]]] = None

    peft_type: Optional[Union[str, PeftType]] = None
    task_type: Optional[Union[str, TaskType]] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self):
        if self.peft_type is None:
            self.peft_type = self.DEFAULT_PEFT_TYPE
        self.validate()

    def validate(self) -> None:
        if self.peft_type is not None:
            self.peft_type = parse_peft_type(self.peft_type)

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
        """The config of the adapter folder ``directory`` (this fork's format or HF peft's), read
        as ``PeftModel.from_pretrained`` reads it: by ``utils.save_and_load.read_adapter_config``.

        On a subclass, the folder must hold that kind of adapter (DoraConfig is a LoraConfig).
        """
        config = PeftConfig.folder_reader(directory)
        if not isinstance(config, cls):
            raise AdapterConfigError(f"{directory} holds a {type(config).__name__}, not a {cls.__name__}")
        return config


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
