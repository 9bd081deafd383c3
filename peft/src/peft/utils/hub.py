"""Find an adapter folder: a local path, or a Hugging Face hub repo id (downloaded once)."""
from __future__ import annotations

import os
from typing import Optional

from ..config import AdapterConfigError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def looks_like_hub_repo(model_id: str) -> bool:
    """"org/name", not an existing path: what the hub would be asked for."""
    return model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")) and not os.path.exists(model_id)


def resolve_adapter_dir(model_id: str, subfolder: Optional[str] = None) -> str:
    """A local adapter folder, or a hub repo id downloaded (adapter files only) into the hub cache."""
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        return local
    if not looks_like_hub_repo(model_id):
        raise AdapterConfigError(f"adapter folder not found: {local}")
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/{f}" if subfolder else f for f in ADAPTER_FILES]
        root = snapshot_download(model_id, allow_patterns=patterns)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, no network: one line either way
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        cause = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else
                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}")
        raise AdapterConfigError(
            f"adapter {model_id!r} is not a local folder and could not be fetched from the hub ({cause}); "
            "pass a local adapter folder instead"
        ) from None
    directory = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(directory):
        raise AdapterConfigError(f"hub repo {model_id!r} has no adapter folder {subfolder!r}")
    return directory
