"""Adapter type -> config class and tuner class."""
from __future__ import annotations

from .config import PeftType, parse_peft_type
from .tuners.dora import DoraConfig, DoraModel
from .tuners.lora import LoraConfig, LoraModel

PEFT_TYPE_TO_CONFIG = {PeftType.LORA: LoraConfig, PeftType.DORA: DoraConfig}
PEFT_TYPE_TO_TUNER = {PeftType.LORA: LoraModel, PeftType.DORA: DoraModel}


def config_class_for(peft_type) -> type:
    """The config class of ``peft_type`` (a PeftType or its name); a clear error for others."""
    return PEFT_TYPE_TO_CONFIG[parse_peft_type(peft_type)]
