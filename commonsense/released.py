"""The released DoRA commonsense adapters: which exist, downloading one, checking a local copy.

    python download_dora_weights.py --list
    python download_dora_weights.py --model llama-7b --rank 32 --output_dir ./released/llama-7b-dora_r32
    python download_dora_weights.py --check ./released/llama-7b-dora_r32 --model llama-7b

Where the registry's facts come from (nothing here could reach the hub to list the repo):

* Folder names and ranks: NVlabs/DoRA ``commonsense_reasoning/README.md`` (commit d42420342b7b)
  links every released adapter as
  ``https://huggingface.co/sliuau/DoRA-weights/tree/main/llama_dora_commonsense_checkpoints/<Model>/dora_r<r>``
  with ``LLama-7B`` r = 4, 8, 16, 32, 64; ``LLama2-7B`` r = 16, 32; ``LLama3-8B`` r = 16, 32
  (note the capital-L "LLama"). The top-level README (commit 7ee98969) links the r = 16 and 32 ones.
  NVIDIA/TensorRT-LLM ``examples/dora/README.md`` uses ``.../LLama3-8B/dora_r32`` as well.
* Base models: the original evaluation scripts' ``--base_model`` (``llama_7B_Dora_eval.sh``
  yahma/llama-7b-hf, ``llama2_7B_DoRA_eval.sh`` meta-llama/Llama-2-7b-hf,
  ``llama3_8B_DoRA_eval.sh`` meta-llama/Meta-Llama-3-8B); ours pass the same ones.
* Layer shapes (for checking without the base model): the models' published config.json
  (LLaMA-1/2 7B: hidden 4096, MLP 11008, 32 layers, 32 heads; LLaMA-3 8B: MLP 14336, 8 KV heads).
* Folder content: the original fork's ``save_pretrained`` (adapter_config.json with peft_type
  "DORA", fp32 adapter_model.bin keyed ``base_model.model.<module>.lora_A.weight`` /
  ``.lora_B.weight`` / ``.weight_m_wdecomp.weight``); TensorRT-LLM's
  ``examples/dora/normalize_weights.py`` reads the same ``.weight_m_wdecomp.weight`` keys.
  What else the hub folders hold could not be listed; subfolders are not downloaded.

A folder not in the registry can be fetched with ``--subfolder``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

HF_REPO_ID = "sliuau/DoRA-weights"
HUB_ROOT = "llama_dora_commonsense_checkpoints"
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.bin", "adapter_model.safetensors")  # the release uses .bin


class ReleasedAdapterError(ValueError):
    """A released-adapter request or folder that cannot work (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ReleasedModel:
    key: str  # the name on our command line
    hub_folder: str  # <HUB_ROOT>/<hub_folder>/dora_r<r> in the hub repo
    eval_name: str  # commonsense_evaluate.py --model (names the output files)
    base_model: str  # hub id of the base model the adapter was trained on
    eval_script: str  # the root-level script that evaluates it on the 8 tasks
    ranks: tuple
    shapes: dict  # LlamaConfig fields that fix the adapted layers' shapes

    def subfolder(self, rank: int) -> str:
        return f"{HUB_ROOT}/{self.hub_folder}/dora_r{rank}"


_LLAMA_7B_SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
RELEASED = {
    model.key: model
    for model in (
        ReleasedModel("llama-7b", "LLama-7B", "LLaMA-7B", "yahma/llama-7b-hf", "llama_7B_Dora_eval.sh",
                      (4, 8, 16, 32, 64), _LLAMA_7B_SHAPES),
        ReleasedModel("llama2-7b", "LLama2-7B", "LLaMA2-7B", "meta-llama/Llama-2-7b-hf",
                      "llama2_7B_DoRA_eval.sh", (16, 32), _LLAMA_7B_SHAPES),
        ReleasedModel("llama3-8b", "LLama3-8B", "LLaMA3-8B", "meta-llama/Meta-Llama-3-8B",
                      "llama3_8B_DoRA_eval.sh", (16, 32),
                      dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    )
}


# --------------------------------------------------------------------------- the registry

def released_model(name: str) -> ReleasedModel:
    """Look up a model by our key or its evaluation name, any case (llama-7b, LLaMA-7B)."""
    wanted = str(name).strip().lower()
    for model in RELEASED.values():
        if wanted in (model.key, model.eval_name.lower()):
            return model
    raise ReleasedAdapterError(f"unknown model {name!r}; released DoRA adapters exist for: {', '.join(RELEASED)}")


def check_rank(model: ReleasedModel, rank: int) -> int:
    if rank not in model.ranks:
        ranks = ", ".join(map(str, model.ranks))
        raise ReleasedAdapterError(
            f"{model.eval_name} has no released DoRA adapter with r={rank}; released ranks: {ranks} "
            f"(--subfolder fetches any other folder of {HF_REPO_ID})"
        )
    return rank


def registry_table() -> str:
    """The registry as the --list text."""
    lines = [f"released DoRA adapters in the Hugging Face repo {HF_REPO_ID} (folder {HUB_ROOT}/<model>/dora_r<r>):",
             f"{'--model':<10} {'ranks':<16} {'hub folder':<11} {'base model':<27} eval script"]
    for model in RELEASED.values():
        ranks = ", ".join(map(str, model.ranks))
        lines.append(f"{model.key:<10} {ranks:<16} {model.hub_folder:<11} {model.base_model:<27} {model.eval_script}")
    return "\n".join(lines)


def eval_command(folder, model: ReleasedModel, base_model: Optional[str] = None) -> str:
    """The command that evaluates ``folder`` on the 8 tasks.

    The model's own script when the base model is the released one; otherwise (a local copy of
    the base model) commonsense_evaluate.py with that base model.
    """
    if base_model is None or base_model == model.base_model:
        return f"sh {model.eval_script} {shlex.quote(str(folder))} 0"
    return shlex.join(["python", "commonsense_evaluate.py", "--model", model.eval_name, "--adapter", "DoRA",
                       "--dataset", "all", "--base_model", str(base_model), "--lora_weights", str(folder)])


# --------------------------------------------------------------------------- checking a folder

def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else ""
        raise ReleasedAdapterError(f"{folder}: no {CONFIG_FILE} (the folder holds: {present or 'nothing'})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReleasedAdapterError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ReleasedAdapterError(f"{path} must hold a JSON object")
    return config


def check_adapter_files(folder, rank: Optional[int] = None) -> dict:
    """Cheap check of a released-format folder: config says DoRA (with r = ``rank``), weights exist.

    Returns the adapter config. :func:`check_against_base` checks the tensors themselves.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleasedAdapterError(f"adapter folder not found: {folder}")
    config = read_adapter_config(folder)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "DORA":
        raise ReleasedAdapterError(f"{folder}: {CONFIG_FILE} has peft_type {config.get('peft_type')!r}, not 'DORA'")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ReleasedAdapterError(f"{folder}: {CONFIG_FILE} has r={r!r}, not a positive integer")
    if rank is not None and r != rank:
        raise ReleasedAdapterError(f"{folder}: {CONFIG_FILE} has r={r}, but r={rank} was asked for")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ReleasedAdapterError(f"{folder}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    return config


def base_config(model: ReleasedModel, base_model: Optional[str] = None):
    """The base model's transformers config: from a local model folder, else the registry's shapes."""
    from transformers import AutoConfig, LlamaConfig

    if base_model is None:
        return LlamaConfig(**model.shapes)
    try:  # a local folder, or a hub id already in the local cache: never a download
        return AutoConfig.from_pretrained(base_model, local_files_only=True)
    except (OSError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ReleasedAdapterError(
            f"cannot read the config of base model {base_model!r} locally ({detail}); pass a local model "
            f"folder, or leave --base_model out to check against {model.eval_name}'s known layer shapes"
        ) from None


def check_against_base(folder, config) -> dict:
    """Load the adapter's tensors and match them, strictly, against ``config``'s model.

    The model is built on the meta device (no memory, no weights), wrapped by the fork exactly
    as evaluation wraps the real one, and the file goes through the fork's strict loader, so a
    missing, unexpected or mis-shaped tensor fails here as it would at evaluation time.
    Returns a summary of the tensors.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from commonsense.cli import add_repo_paths

    add_repo_paths()  # the vendored fork, not a pip-installed peft
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils.save_and_load import load_adapter_weights

    folder = str(folder)
    adapter_config = PeftConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, adapter_config)
    tensors = load_adapter_weights(folder)
    with warnings.catch_warnings():
        # Copying into meta parameters is a no-op that torch warns about once per tensor;
        # only the loader's key and shape checks matter here.
        warnings.simplefilter("ignore", UserWarning)
        set_peft_model_state_dict(peft_model, tensors)
    not_finite = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if not_finite:
        raise ReleasedAdapterError(f"{folder}: {len(not_finite)} tensor(s) hold NaN or inf, first: {not_finite[0]}")
    return {
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "magnitudes": sum(key.endswith(".weight_m_wdecomp.weight") for key in tensors),
    }


def check_local_copy(folder, model: ReleasedModel, rank: Optional[int] = None,
                     base_model: Optional[str] = None) -> str:
    """Validate a local released-adapter folder against the base model; return a report."""
    config = check_adapter_files(folder, rank)
    summary = check_against_base(folder, base_config(model, base_model))
    lines = [
        f"{folder}: a DoRA adapter that fits {base_model or model.eval_name} "
        f"(r={config['r']}, lora_alpha={config.get('lora_alpha')}, targets {config.get('target_modules')}, "
        f"magnitude-only {config.get('Wdecompose_target_modules')}; {summary['tensors']} tensors, "
        f"{summary['parameters']:,} parameters, {'/'.join(summary['dtypes'])})",
    ]
    named_base = config.get("base_model_name_or_path")
    other_bases = {m.base_model for m in RELEASED.values()} - {model.base_model}
    if named_base in other_bases:  # LLaMA-1 and -2 adapters have the same shapes: only the name tells
        lines.append(f"note: {CONFIG_FILE} names base model {named_base!r}, not {model.base_model!r}")
    lines.append(f"evaluate it with: {eval_command(folder, model, base_model)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- downloading

def _nearest_existing_dir(path: Path) -> Path:
    for candidate in (path.parent, *path.parent.parents):
        if candidate.is_dir():
            return candidate
    return Path(".")


def check_output_dir(output_dir: Path) -> None:
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        return  # an empty folder is replaced
    if output_dir.exists():
        raise ReleasedAdapterError(
            f"output folder {output_dir} already exists; remove it, pass another --output_dir, "
            f"or check it with --check {output_dir}"
        )


def _hub_failure(err: Exception, subfolder: str, local_hint: str) -> ReleasedAdapterError:
    """One line for a failed snapshot_download: what failed, the likely cause, the way around."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from commonsense.models import hub_offline

    what = f"cannot download {HF_REPO_ID}/{subfolder} from the Hugging Face hub"
    detail = (str(err).strip().splitlines() or [""])[0]
    if hub_offline():
        cause = "HF_HUB_OFFLINE=1 is set (unset it to download)"
    elif isinstance(err, LocalEntryNotFoundError):
        cause = f"the hub is unreachable ({detail}); check the network (HF_HUB_OFFLINE must be unset)"
    elif isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)):
        cause = f"the repository or revision is not accessible ({type(err).__name__})"
    else:
        cause = f"{type(err).__name__}: {detail}"
    return ReleasedAdapterError(f"{what}: {cause}; {local_hint}")


def download_released_adapter(model, rank: Optional[int], output_dir, subfolder: Optional[str] = None,
                              revision: Optional[str] = None) -> Path:
    """Download one released adapter folder into ``output_dir`` and verify it.

    ``model`` is a registry key (or None with ``subfolder``); ``subfolder`` replaces the
    registry's ``<HUB_ROOT>/<model>/dora_r<rank>`` path. The files go to a temporary folder
    next to the target and are renamed into place only once verified: an interrupted or failed
    download leaves no ``output_dir``.
    """
    registered = released_model(model) if model is not None else None
    if subfolder is None:
        if registered is None or rank is None:
            raise ReleasedAdapterError("give --model and --rank (or --subfolder)")
        subfolder = registered.subfolder(check_rank(registered, rank))
    subfolder = subfolder.strip("/")
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    check_hint = f"--check DIR --model {registered.key}" if registered else "--check DIR --model MODEL"
    local_hint = (f"without hub access, copy the folder {subfolder} of {HF_REPO_ID} from a machine that has it "
                  f"and check it with: python download_dora_weights.py {check_hint}")

    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.download-", dir=_nearest_existing_dir(output_dir)))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; this becomes an ordinary folder
        fetched = _fetch_into(staging, subfolder, revision, local_hint)
        check_adapter_files(fetched, rank)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(fetched, output_dir)
        except OSError as err:  # another process created output_dir meanwhile
            raise ReleasedAdapterError(f"cannot move the download to {output_dir}: {err.strerror}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _fetch_into(staging: Path, subfolder: str, revision: Optional[str], local_hint: str) -> Path:
    """snapshot_download the folder's files (not its subfolders) under ``staging``; return the folder."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(HF_REPO_ID, allow_patterns=[f"{subfolder}/*"],
                          # files only: a nested folder (e.g. an intermediate checkpoint) is not needed
                          ignore_patterns=[f"{subfolder}/*/*"],
                          revision=revision, local_dir=str(staging / "hub"))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one line with the way around it
        raise _hub_failure(err, subfolder, local_hint) from None
    fetched = staging / "hub" / subfolder
    if not fetched.is_dir() or not any(fetched.iterdir()):
        known = ", ".join(model.subfolder(r) for model in RELEASED.values() for r in model.ranks[-1:])
        raise ReleasedAdapterError(
            f"hub repo {HF_REPO_ID} has no folder {subfolder} (released folders look like {known}); "
            f"see --list, or pass the exact path with --subfolder"
        )
    return fetched
