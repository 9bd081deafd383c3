r"""The paper's weight-decomposition analysis (DoRA, sec. 2, Fig. 2), for FT, LoRA and DoRA runs.

Each fine-tuned ``nn.Linear`` weight W (out x in, the layout of this code; the paper writes
in x out with column norms, the same thing) is split into a magnitude per output row and a
direction, and compared with the pre-trained W0 row by row:

    m_n     = ||W[n, :]||
    Delta M = mean_n | m_n - m0_n |
    Delta D = mean_n ( 1 - cos(W[n, :], W0[n, :]) )

W is the weight the model applies at a step:

    FT    the fine-tuned weight itself
    LoRA  W0 + s B A                                  s = lora_alpha / r
    DoRA  m / ||W0 + s B A|| * (W0 + s B A)           (row-wise; V = W0 for magnitude-only layers)

The paper's finding: over (layer, step) points, LoRA's Delta M and Delta D correlate positively
(+0.83 on LLaMA's query matrices); FT's and DoRA's negatively (-0.62, -0.31).

Everything is float64 and reads one layer at a time: base and FT weights through safetensors'
lazy ``safe_open`` (or a memory-mapped ``.bin``), so a 7B base is never in memory at once; an
adapter (small) is read whole.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .full_finetune import FT_MARKER

METHODS = ("FT", "LoRA", "DoRA")
CSV_COLUMNS = ("run", "method", "step", "layer", "module", "delta_m", "delta_d")
FINAL = "final"


class DecompositionError(ValueError):
    """A run folder, base model or option the analysis cannot use."""


# ---- the measure -------------------------------------------------------------------------------
def magnitude_direction_change(weight: torch.Tensor, base: torch.Tensor) -> Tuple[float, float]:
    """(Delta M, Delta D) of ``weight`` against ``base`` (both out x in), in float64."""
    w, w0 = weight.double(), base.double()
    m, m0 = w.norm(dim=1), w0.norm(dim=1)
    delta_m = (m - m0).abs().mean().item()
    cos = (w * w0).sum(dim=1) / (m * m0).clamp_min(1e-300)
    delta_d = (1 - cos).mean().item()
    return delta_m, delta_d


def lora_weight(base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    return base.double() + scaling * (lora_B.double() @ lora_A.double())


def dora_weight(base: torch.Tensor, magnitude: torch.Tensor, lora_A: Optional[torch.Tensor],
                lora_B: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    v = base.double() if lora_A is None else lora_weight(base, lora_A, lora_B, scaling)
    return magnitude.double().reshape(-1, 1) / v.norm(dim=1, keepdim=True) * v


# ---- reading weights one tensor at a time --------------------------------------------------------
class WeightReader:
    """Named tensors of a model folder (safetensors or .bin, one file or sharded), read on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._files: Dict[str, Path] = {}
        self._open: Dict[Path, dict] = {}  # .bin files, memory-mapped
        for pattern in ("*.safetensors", "*.bin"):
            for path in sorted(self.folder.glob(pattern)):
                if path.name.startswith(("adapter_model", "training_args", "optimizer", "scheduler", "rng_state")):
                    continue
                for key in self._keys_of(path):
                    self._files.setdefault(key, path)
            if self._files:
                break  # safetensors found: ignore .bin copies
        if not self._files:
            raise DecompositionError(f"{folder}: no model weights (*.safetensors or *.bin)")

    def _keys_of(self, path: Path) -> List[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        # memory-mapped, kept for get(): only the pages read are loaded
        self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return list(self._open[path].keys())

    def keys(self) -> List[str]:
        return list(self._files)

    def get(self, key: str) -> torch.Tensor:
        path = self._files.get(key)
        if path is None:
            raise DecompositionError(f"{self.folder}: no tensor {key}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(key)
        return self._open[path][key]


_LAYER_KEY = re.compile(r"^(?P<path>.*\.layers\.(?P<layer>\d+)\..*?(?P<module>[A-Za-z0-9_]+))\.weight$")


def module_keys(reader: WeightReader, module: str) -> Dict[int, str]:
    """{layer index: weight key} of ``module`` (e.g. q_proj) in every decoder block."""
    found = {}
    for key in reader.keys():
        match = _LAYER_KEY.match(key)
        if match and match["module"] == module:
            found[int(match["layer"])] = key
    if not found:
        leaves = sorted({m["module"] for m in map(_LAYER_KEY.match, reader.keys()) if m})
        raise DecompositionError(f"module {module!r} is not in the base model; its per-layer weights are: "
                                 f"{', '.join(leaves)}")
    return dict(sorted(found.items()))


# ---- runs and their steps ------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    label: str  # "N" for checkpoint-N, "final" for the run folder's own weights
    folder: Path


def detect_method(folder: Path) -> Optional[str]:
    """FT, LoRA or DoRA from a folder's files; None when it holds no weights."""
    config_path = folder / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        peft_type = str(config.get("peft_type") or "").upper()
        if peft_type == "DORA" or (peft_type == "LORA" and config.get("use_dora")):
            return "DoRA"
        if peft_type == "LORA":
            return "LoRA"
        raise DecompositionError(f"{folder}: adapter type {peft_type or '(none)'} is not LoRA or DoRA")
    if (folder / FT_MARKER).is_file() or (
        (folder / "config.json").is_file() and (any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin")))
    ):
        return "FT"
    return None


def run_steps(folder) -> Tuple[str, List[Step]]:
    """(method, steps in order): a finetune.py output folder's checkpoint-N folders and its final
    weights, or a single adapter/model folder (one step). A checkpoint at the final step is the
    same weights as the final folder when there was no best-checkpoint reload; it is left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DecompositionError(f"run folder not found: {folder}")
    from .checkpoints import checkpoint_step

    found = []  # (step, method)
    for child in folder.iterdir():
        number = checkpoint_step(child.name)
        if number is not None and child.is_dir():
            method = detect_method(child)
            if method:
                found.append((Step(str(number), child), method))
    found.sort(key=lambda pair: step_order(pair[0].label))
    method = detect_method(folder)
    if method is not None:
        log_path = folder / "train_log.json"
        log = json.loads(log_path.read_text(encoding="utf-8")) if log_path.is_file() else {}
        if log.get("global_step") is not None and not log.get("best_model_checkpoint"):
            found = [pair for pair in found if int(pair[0].label) != log["global_step"]]
        found.append((Step(FINAL, folder), method))
    if not found:
        raise DecompositionError(f"{folder}: no weights (no adapter or model files, and no checkpoint-N folders with them)")
    methods = {m for _, m in found}
    if len(methods) != 1:
        raise DecompositionError(f"{folder}: its folders mix methods ({', '.join(sorted(methods))})")
    return methods.pop(), [step for step, _ in found]


# ---- the analysis -------------------------------------------------------------------------------
def adapter_layers(folder: Path) -> Tuple[dict, Dict[str, Dict[str, torch.Tensor]]]:
    """(config dict, {module path: {"A", "B", "m"}}) of an adapter folder in either format."""
    from peft.utils.hf_format import FILE_KEY_PREFIX, LORA_A, LORA_B, OUR_MAGNITUDE
    from peft.utils.save_and_load import read_adapter

    config, tensors = read_adapter(str(folder))
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix, name in ((LORA_A, "A"), (LORA_B, "B"), (OUR_MAGNITUDE, "m")):
            if key.endswith(suffix):
                path = key[: -len(suffix)]
                path = path[len(FILE_KEY_PREFIX):] if path.startswith(FILE_KEY_PREFIX) else path
                layers.setdefault(path, {})[name] = value
    return config.to_dict(), layers


def step_weights(method: str, step: Step, base: WeightReader,
                 keys: Dict[str, Dict[int, str]]) -> Iterator[Tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(module, layer, W at this step, W0), one layer at a time, in float64; the step's folder
    is opened once for all modules."""
    if method == "FT":
        reader = WeightReader(step.folder)
        for module, layer, key in _module_layer_keys(keys):
            yield module, layer, reader.get(key).double(), base.get(key).double()
        return
    config, layers = adapter_layers(step.folder)
    scaling = float(config["lora_alpha"]) / float(config["r"])
    for module, layer, key in _module_layer_keys(keys):
        path = key[: -len(".weight")]
        w0 = base.get(key).double()
        parts = layers.get(path)
        if parts is None:
            raise DecompositionError(f"{step.folder}: the adapter does not adapt {path} (it adapts e.g. "
                                     f"{', '.join(sorted(layers)[:2])})")
        a, b = parts.get("A"), parts.get("B")
        if a is not None and (a.shape[1] != w0.shape[1] or b.shape[0] != w0.shape[0]):
            raise DecompositionError(f"{step.folder}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not "
                                     f"fit the base model's weight {tuple(w0.shape)} (another base model?)")
        if method == "LoRA":
            yield module, layer, lora_weight(w0, a, b, scaling), w0
        else:
            m = parts.get("m")
            if m is None or m.numel() != w0.shape[0]:
                raise DecompositionError(f"{step.folder}: {path} has no magnitude of {w0.shape[0]} values")
            yield module, layer, dora_weight(w0, m, a, b, scaling if a is not None else 0.0), w0


def _module_layer_keys(keys: Dict[str, Dict[int, str]]) -> Iterator[Tuple[str, int, str]]:
    for module, by_layer in keys.items():
        for layer, key in by_layer.items():
            yield module, layer, key


def base_folder(base_model: str) -> Path:
    """A local folder with the base model's weights (hub ids are downloaded, weights files only)."""
    from .models import is_hub_id, resolve_base_model

    resolved = resolve_base_model(base_model)
    if Path(resolved).is_dir():
        return Path(resolved)
    if is_hub_id(resolved):
        from huggingface_hub import list_repo_files, snapshot_download

        try:  # the weights in one format only (LLaMA-1 repos such as yahma/llama-7b-hf have .bin shards)
            files = list_repo_files(resolved)
            weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        except Exception:  # noqa: BLE001 - offline: take what the cache has
            weights = ["*.safetensors", "*.bin"]
        return Path(snapshot_download(resolved, allow_patterns=["*.json", *weights]))
    raise DecompositionError(f"base model {base_model!r} is not a local folder")


def parse_runs(specs: Sequence[str]) -> List[Tuple[str, Path]]:
    runs, seen = [], set()
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise DecompositionError(f"--runs takes NAME=DIR, got {spec!r}")
        if name in seen:
            raise DecompositionError(f"run name {name!r} is used twice")
        seen.add(name)
        runs.append((name, Path(folder)))
    return runs


def analyze(base_model: str, runs: Sequence[str], modules: Sequence[str]) -> List[dict]:
    """The rows of decomposition.csv for every run, step, layer and module."""
    parsed = parse_runs(runs)
    plans = [(name, *run_steps(folder)) for name, folder in parsed]  # every folder checked before any work
    base = WeightReader(base_folder(base_model))
    keys = {module: module_keys(base, module) for module in modules}
    rows = []
    for name, method, steps in plans:
        for step in steps:
            for module, layer, weight, w0 in step_weights(method, step, base, keys):
                if weight.shape != w0.shape:
                    raise DecompositionError(f"run {name}: {step.folder} holds {module} of layer {layer} with shape "
                                             f"{tuple(weight.shape)}, the base model {tuple(w0.shape)}")
                delta_m, delta_d = magnitude_direction_change(weight, w0)
                rows.append(dict(run=name, method=method, step=step.label, layer=layer, module=module,
                                 delta_m=delta_m, delta_d=delta_d))
    return rows


def fit(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """(least-squares slope of Delta M on Delta D, Pearson r) over (delta_d, delta_m) points."""
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    if len(points) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    slope = (xc * yc).sum() / (xc * xc).sum()
    r = (xc * yc).sum() / (xc.norm() * yc.norm())
    return slope.item(), r.item()


def step_order(label: str) -> int:
    return 1 << 62 if label == FINAL else int(label)


def summary(rows: List[dict]) -> List[dict]:
    """Slope and Pearson r per (run, module), over all its (layer, step) points."""
    out = []
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for row in rows:
        groups.setdefault((row["run"], row["module"]), []).append(row)
    for (run, module), group in groups.items():
        slope, r = fit([(g["delta_d"], g["delta_m"]) for g in group])
        steps = sorted({g["step"] for g in group}, key=step_order)
        # Pooled over steps, both changes grow with training, which pulls r up; across the layers
        # of one step that growth is absent.
        within = [fit([(g["delta_d"], g["delta_m"]) for g in group if g["step"] == step])[1] for step in steps]
        within = [w for w in within if w == w]
        out.append(dict(run=run, method=group[0]["method"], module=module, points=len(group), steps=steps,
                        slope=slope, pearson_r=r,
                        within_step_r=sum(within) / len(within) if within else float("nan")))
    return out


def write_outputs(rows: List[dict], output_dir, peak_rss: Optional[int] = None) -> Dict[str, Path]:
    """decomposition.csv, decomposition.png, decomposition_layers.png and decomposition.md."""
    import csv
    import io as text_io

    from .io import atomic_write_json, atomic_write_text
    from .report import markdown_grid

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.9g}" if isinstance(row[k], float) else row[k]) for k in CSV_COLUMNS})
    atomic_write_text(out / "decomposition.csv", buffer.getvalue())
    fits = summary(rows)
    atomic_write_json(out / "decomposition_fit.json", {"fits": fits, "peak_rss_bytes": peak_rss}, indent=2)
    from .decomposition_plots import plot_layers, plot_scatter

    plot_scatter(rows, fits, out / "decomposition.png")
    plot_layers(rows, out / "decomposition_layers.png")
    table = markdown_grid(
        ["Run", "Method", "Module", "Points (layers x steps)", "Steps", "Slope dM/dD", "Pearson r",
         "Mean r within a step"],
        [[f["run"], f["method"], f["module"], str(f["points"]), ", ".join(f["steps"]), f"{f['slope']:.4g}",
          f"{f['pearson_r']:+.3f}", f"{f['within_step_r']:+.3f}"] for f in fits],
        right_from=3,
    )
    text = ("# Weight decomposition: magnitude and direction changes\n\n" + table + "\n\n"
            "Paper (LLaMA query matrices, Fig. 2): LoRA r = +0.83, FT r = -0.62, DoRA r = -0.31.\n")
    if peak_rss is not None:
        text += f"\nPeak resident memory of the analysis: {peak_rss / 2**20:.0f} MiB.\n"
    atomic_write_text(out / "decomposition.md", text)
    return {name: out / name for name in ("decomposition.csv", "decomposition.png", "decomposition_layers.png",
                                          "decomposition.md")}
