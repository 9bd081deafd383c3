"""The DoRA reproduction's PEFT fork: LoRA and DoRA adapters for ``nn.Linear`` layers.

Import name ``peft``. Entry scripts put ``peft/src`` first on ``sys.path`` so this fork
wins over a pip-installed HF peft.
"""
__version__ = "0.3.0.dora"

from .config import AdapterConfigError, PeftConfig, PeftType, TaskType
from .peft_model import PeftMixedModel, PeftModel, get_peft_model
from .tuners.dora import DoraConfig, DoraLinear, DoraModel
from .tuners.lora import LoraConfig, LoraLinear, LoraModel
from .tuners.tuners_utils import TargetModulesError
from .utils.other import prepare_model_for_int8_training, prepare_model_for_kbit_training
from .utils.save_and_load import AdapterWeightsError, get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "AdapterConfigError",
    "AdapterWeightsError",
    "DoraConfig",
    "DoraLinear",
    "DoraModel",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "PeftType",
    "TargetModulesError",
    "TaskType",
    "get_peft_model",
    "get_peft_model_state_dict",
    "prepare_model_for_int8_training",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
