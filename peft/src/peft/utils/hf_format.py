"""Hugging Face peft's adapter format <-> the original fork's, as pure dict conversions.

The two formats, as written by HF peft 0.21.2 (checked by saving a tiny model with it) and by
this fork:

    HF peft                                           this fork (the original NVlabs fork's)
    adapter_config.json  peft_type "LORA",            peft_type "DORA" (DoraConfig) or "LORA"
                         use_dora true / false        (no use_dora key)
    <p>.lora_A.weight           [r, in]               <p>.lora_A.weight           [r, in]
    <p>.lora_B.weight           [out, r]              <p>.lora_B.weight           [out, r]
    <p>.lora_magnitude_vector   [out]  (DoRA only)    <p>.weight_m_wdecomp.weight [out, 1]

with ``<p>`` = ``base_model.model.<module path>`` in both. The DoRA maths is the same; HF peft
always treats the weight norm as a constant in backward, which is ``dora_simple=True`` here.

What does not convert is refused with one error naming it: this fork's magnitude-only modules
(``Wdecompose_target_modules``), and HF peft options this fork cannot represent
(``use_rslora``, ``rank_pattern``, ``layers_to_transform``, ``lora_bias``, ...).
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Tuple

import torch

from ..config import AdapterConfigError

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
OUR_MAGNITUDE = ".weight_m_wdecomp.weight"
HF_MAGNITUDE = ".lora_magnitude_vector"
FILE_KEY_PREFIX = "base_model.model."

# Keys that HF peft's LoraConfig writes (every version that has them) and that no config of
# this fork or of the original fork has. A "LORA" config with any of them is an HF one.
HF_MARKER_KEYS = ("use_dora", "peft_version", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern")

# HF config keys whose values map onto this fork's config.
HF_REPRESENTED_KEYS = (
    "peft_type", "task_type", "base_model_name_or_path", "inference_mode",
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "bias",
)
# HF config keys that are bookkeeping, or only matter together with an option that is refused
# unless off (qalora_group_size needs use_qalora; megatron_core needs megatron_config).
HF_IGNORED_KEYS = ("peft_version", "auto_mapping", "revision", "megatron_core", "qalora_group_size")
HF_ALL_LINEAR = "all-linear"


class HfFormatError(AdapterConfigError):
    """An adapter that cannot be converted between HF peft's format and this fork's."""


# ---- detection ------------------------------------------------------------------------
def is_hf_config(config: dict) -> bool:
    """True for an HF peft LoRA/DoRA adapter_config dict: peft_type "LORA" and a key that only
    HF peft writes (``use_dora``, ``peft_version``, ``use_rslora``, ``init_lora_weights``,
    ``rank_pattern`` or ``alpha_pattern``). This fork's and the original fork's configs have none."""
    peft_type = str(config.get("peft_type") or "").upper()
    return peft_type == "LORA" and any(key in config for key in HF_MARKER_KEYS)


# ---- this fork -> HF peft -------------------------------------------------------------------
def config_to_hf(config: dict, tensors: Dict[str, torch.Tensor]) -> dict:
    """HF peft's adapter_config for this fork's config dict (``PeftConfig.to_dict()``).

    ``tensors`` (this fork's file keys) supply target_modules when the config leaves them to
    the model type's default, so the export never depends on HF peft's own defaults.
    """
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type not in ("LORA", "DORA"):
        raise HfFormatError(f"cannot export peft_type {config.get('peft_type')!r} to HF peft format")
    if config.get("Wdecompose_target_modules"):
        raise HfFormatError(
            "cannot export to HF peft format: magnitude-only DoRA modules (Wdecompose_target_modules="
            f"{config['Wdecompose_target_modules']!r}) have no HF peft equivalent"
        )
    if config.get("bias", "none") != "none":
        raise HfFormatError(f"cannot export bias={config['bias']!r} to HF peft format (only bias='none')")
    if config.get("modules_to_save"):
        raise HfFormatError(f"cannot export modules_to_save={config['modules_to_save']!r} to HF peft format")
    if peft_type == "DORA" and config.get("dora_simple") is False:
        warnings.warn(
            "dora_simple=False: HF peft always treats the DoRA weight norm as a constant in backward "
            "(dora_simple=True); the exported adapter computes the same outputs, but training it further "
            "in HF peft uses the other gradient",
            stacklevel=2,
        )
    target_modules = config.get("target_modules") or leaf_names(adapted_modules(tensors))
    return {
        "peft_type": "LORA",
        "use_dora": peft_type == "DORA",
        "task_type": config.get("task_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "inference_mode": True,
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "lora_dropout": config.get("lora_dropout", 0.0),
        "target_modules": target_modules,
        # Written out so the adapter does not depend on HF peft's defaults for them.
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def tensors_to_hf(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF peft's tensor dict for this fork's file-key tensors (magnitude [out, 1] -> [out])."""

    def refusal(key: str, value: torch.Tensor) -> str:
        if key.endswith(OUR_MAGNITUDE):
            return (f"cannot export to HF peft format: {module_path(key[: -len(OUR_MAGNITUDE)])} is a magnitude-only "
                    "DoRA module (no lora_A/lora_B), which HF peft has no equivalent for")
        return f"cannot export tensor {key} to HF peft format (only lora_A, lora_B and the magnitude)"

    return rename_magnitudes(tensors, OUR_MAGNITUDE, HF_MAGNITUDE, (-1,), refusal)


def to_hf(config: dict, tensors: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(HF config dict, HF tensors) for this fork's (config dict, file-key tensors)."""
    hf_config = config_to_hf(config, tensors)
    hf_tensors = tensors_to_hf(tensors)
    check_ranks(tensors, config["r"])
    return hf_config, hf_tensors


# ---- HF peft -> this fork -------------------------------------------------------------------
def unsupported_hf_options(config: dict) -> List[str]:
    """``option=value`` for each HF option set to something this fork cannot represent.

    Any key not mapped or ignored must hold its "off" value (null, false, {} or []), so options
    added by later HF peft versions are refused rather than silently dropped.
    """
    found = []
    for key, value in sorted(config.items()):
        if key == "bias":
            off = value == "none"
        elif key == "init_lora_weights":
            # These only pick the starting A and B (overwritten by the saved ones); pissa, olora,
            # loftq, eva, corda, ... also change the base weights the adapter was trained against.
            off = value is True or value is False or value == "gaussian"
        elif key in HF_REPRESENTED_KEYS or key in HF_IGNORED_KEYS:
            continue
        else:
            off = value is None or value is False or value == {} or value == []
        if not off:
            found.append(f"{key}={value!r}")
    return found


def config_from_hf(config: dict, adapted: Iterable[str]) -> dict:
    """This fork's config dict (for ``DoraConfig`` / ``LoraConfig``) for an HF peft config dict.

    ``adapted`` (the adapted module paths, from the weights) resolves target_modules
    "all-linear" to the adapted modules' names.
    """
    unsupported = unsupported_hf_options(config)
    if unsupported:
        raise HfFormatError(f"HF peft adapter option(s) not supported by this fork: {', '.join(unsupported)}")
    target_modules = config.get("target_modules")
    if target_modules == HF_ALL_LINEAR:
        target_modules = leaf_names(adapted)
    elif isinstance(target_modules, (list, tuple)):
        target_modules = list(target_modules)
    out = {key: config[key] for key in ("task_type", "base_model_name_or_path", "inference_mode", "r", "lora_alpha",
                                        "lora_dropout") if key in config}
    out.update(target_modules=target_modules, bias="none")
    if config.get("use_dora"):
        out.update(peft_type="DORA", dora_simple=True, Wdecompose_target_modules=None)
    else:
        out.update(peft_type="LORA")
    return out


def tensors_from_hf(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This fork's file-key tensors for HF peft's tensor dict (magnitude [out] -> [out, 1])."""

    def refusal(key: str, value: torch.Tensor) -> str:
        if key.endswith(HF_MAGNITUDE):
            return f"HF peft tensor {key} {tuple(value.shape)} is not a DoRA magnitude of a LoRA module"
        return f"HF peft tensor {key} is not supported by this fork (only lora_A, lora_B and lora_magnitude_vector)"

    return rename_magnitudes(tensors, HF_MAGNITUDE, OUR_MAGNITUDE, (-1, 1), refusal)


def from_hf(config: dict, tensors: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(this fork's config dict, file-key tensors) for HF peft's (config dict, tensors)."""
    ours = config_from_hf(config, adapted_modules(tensors))
    our_tensors = tensors_from_hf(tensors)
    check_ranks(our_tensors, ours.get("r", 8))  # 8: HF peft's default r
    has_magnitude = any(key.endswith(OUR_MAGNITUDE) for key in our_tensors)
    if has_magnitude != (ours["peft_type"] == "DORA"):
        raise HfFormatError(
            f"HF peft adapter says use_dora={bool(config.get('use_dora'))} but its weights "
            f"{'have' if has_magnitude else 'have no'} lora_magnitude_vector"
        )
    return ours, our_tensors


# ---- shared ---------------------------------------------------------------------------
def rename_magnitudes(
    tensors: Dict[str, torch.Tensor], suffix: str, new_suffix: str, new_shape: tuple, refusal
) -> Dict[str, torch.Tensor]:
    """lora_A / lora_B as they are; each ``<p><suffix>`` of a module with a lora_A and one row per
    output becomes ``<p><new_suffix>`` of ``new_shape``; anything else is refused with
    ``refusal(key, value)``."""
    with_lora = set(adapted_modules(tensors))
    out = {}
    for key, value in tensors.items():
        module = key[: -len(suffix)] if key.endswith(suffix) else None
        if key.endswith((LORA_A, LORA_B)):
            out[key] = value
        elif module in with_lora and value.dim() >= 1 and value.numel() == value.shape[0]:
            out[module + new_suffix] = value.reshape(new_shape)
        else:
            raise HfFormatError(refusal(key, value))
    return out


def adapted_modules(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The ``base_model.model.<path>`` prefixes that carry a lora_A (the same in both formats)."""
    return [key[: -len(LORA_A)] for key in tensors if key.endswith(LORA_A)]


def leaf_names(paths: Iterable[str]) -> List[str]:
    """``["down_proj", "q_proj"]`` for ``[".../mlp.down_proj", ".../self_attn.q_proj", ...]``."""
    return sorted({path.rsplit(".", 1)[-1] for path in paths})


def module_path(prefix: str) -> str:
    return prefix[len(FILE_KEY_PREFIX):] if prefix.startswith(FILE_KEY_PREFIX) else prefix


def check_ranks(tensors: Dict[str, torch.Tensor], r) -> None:
    """Every lora_A is [r, in] and every lora_B [out, r]: the config's single r fits the weights."""
    for key, value in tensors.items():
        if not key.endswith((LORA_A, LORA_B)):
            continue
        rank_dim = 0 if key.endswith(LORA_A) else 1
        if value.dim() != 2 or value.shape[rank_dim] != r:
            raise HfFormatError(f"adapter tensor {key} {tuple(value.shape)} does not have the config's rank r={r}")
