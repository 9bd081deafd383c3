"""Adapter type -> config class and tuner class; ``get_peft_model``."""
from __future__ import annotations

from .config import AdapterConfigError, PeftConfig, PeftType
from .tuners.dora import DoraConfig, DoraModel
from .tuners.lora import LoraConfig, LoraModel

PEFT_TYPE_TO_CONFIG = {PeftType.LORA: LoraConfig, PeftType.DORA: DoraConfig}
PEFT_TYPE_TO_TUNER = {PeftType.LORA: LoraModel, PeftType.DORA: DoraModel}


def config_class_for(peft_type) -> type:
    try:
        return PEFT_TYPE_TO_CONFIG[PeftType(str(getattr(peft_type, "value", peft_type)).upper())]
    except ValueError:
        raise AdapterConfigError(
            f"unknown peft_type {peft_type!r}; this fork supports {[t.value for t in PEFT_TYPE_TO_CONFIG]}"
        ) from None


def get_peft_model(model, peft_config: PeftConfig):
    """Wrap ``model`` with the adapter ``peft_config`` describes (only the adapter trains)."""
    from .peft_model import PeftModel

    return PeftModel(model, peft_config)
