"""analyze_decomposition.py / commonsense.decomposition against float64 brute force on a tiny LLaMA."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonsense.decomposition import (
    DecompositionError,
    analyze,
    fit,
    magnitude_direction_change,
    run_steps,
    write_outputs,
)
from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "peft" / "tests"))
from hf_peft_subprocess import hf_peft_available, run_hf_script  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("decomp_base"))


def brute_force(w, w0):
    """Delta M and Delta D row by row, in Python floats over float64 rows."""
    dm, dd = [], []
    for row, row0 in zip(w.double(), w0.double()):
        m, m0 = row.norm().item(), row0.norm().item()
        dm.append(abs(m - m0))
        dd.append(1 - (row @ row0).item() / (m * m0))
    return sum(dm) / len(dm), sum(dd) / len(dd)


def base_weight(base_dir, layer, module="q_proj"):
    from safetensors.torch import load_file

    return load_file(str(base_dir / "model.safetensors"))[f"model.layers.{layer}.self_attn.{module}.weight"]


def save_ft(base_dir, out, edit):
    """An FT 'checkpoint': the base model with its q_proj weights changed by ``edit``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.copy_(edit(layer.self_attn.q_proj.weight))
    model.save_pretrained(out)
    return out


def test_the_measure_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    w = w0 + 0.3 * torch.randn(7, 5, generator=gen, dtype=torch.float64)
    ours = magnitude_direction_change(w, w0)
    assert ours == pytest.approx(brute_force(w, w0), rel=1e-12)


def test_scaling_rows_changes_magnitude_only(base_dir, tmp_path):
    scale = torch.linspace(0.5, 1.5, 32).unsqueeze(1)  # q_proj is 32 x 32 in the tiny model
    save_ft(base_dir, tmp_path / "scaled", lambda w: w * scale)
    rows = analyze(str(base_dir), [f"S={tmp_path / 'scaled'}"], ["q_proj"])
    assert [r["layer"] for r in rows] == [0, 1] and {r["method"] for r in rows} == {"FT"}
    for row in rows:
        w0 = base_weight(base_dir, row["layer"])
        expected_dm, _ = brute_force(w0 * scale, w0)
        assert row["delta_d"] == pytest.approx(0, abs=1e-6)  # fp32 storage of the scaled rows
        assert row["delta_m"] == pytest.approx(expected_dm, rel=1e-5) and row["delta_m"] > 0.1 * w0.norm(dim=1).mean()


def test_rotating_rows_at_equal_norm_changes_direction_only(base_dir, tmp_path):
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    save_ft(base_dir, tmp_path / "rotated", lambda w: (w.double() @ q).float())  # each row rotated: norm kept
    rows = analyze(str(base_dir), [f"R={tmp_path / 'rotated'}"], ["q_proj"])
    for row in rows:
        w0 = base_weight(base_dir, row["layer"])
        _, expected_dd = brute_force((w0.double() @ q).float(), w0)
        assert row["delta_m"] == pytest.approx(0, abs=1e-6 * w0.norm(dim=1).mean().item())
        assert row["delta_d"] == pytest.approx(expected_dd, rel=1e-5) and row["delta_d"] > 0.1


def fork_adapter(base_dir, out, method, hf_format=False, magnitude_only=False):
    """An adapter written by the fork (the original fork's format, or HF peft's), moved off its
    initialisation, and the merged q_proj weights from the layers' own merge, in float64."""
    from transformers import AutoModelForCausalLM

    from peft import DoraConfig, LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if method == "LoRA":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    elif magnitude_only:
        config = DoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], Wdecompose_target_modules=["q_proj"])
    else:
        config = DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
            if "weight_m_wdecomp" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(out), hf_format=hf_format)
    model.double()  # the layers' own merge, in float64, of the fp32 values just saved
    merged = {}
    for layer, block in enumerate(model.base_model.model.model.layers):
        adapted = block.self_attn.q_proj
        adapted.invalidate_norm_cache() if hasattr(adapted, "invalidate_norm_cache") else None
        adapted.merge()
        merged[layer] = adapted.base_layer.weight.detach().clone()
    return merged


@pytest.mark.parametrize("method,hf_format,magnitude_only", [
    ("LoRA", False, False), ("DoRA", False, False), ("DoRA", False, True), ("LoRA", True, False), ("DoRA", True, False),
])
def test_adapter_weights_equal_the_layers_own_merge(base_dir, tmp_path, method, hf_format, magnitude_only):
    merged = fork_adapter(base_dir, tmp_path / "adapter", method, hf_format, magnitude_only)
    rows = analyze(str(base_dir), [f"A={tmp_path / 'adapter'}"], ["q_proj"])
    assert {r["method"] for r in rows} == {method} and {r["step"] for r in rows} == {"final"}
    for row in rows:
        w0 = base_weight(base_dir, row["layer"])
        expected = brute_force(merged[row["layer"]], w0)
        assert (row["delta_m"], row["delta_d"]) == pytest.approx(expected, rel=1e-9)
        assert row["delta_m"] > 0


HF_DORA_SCRIPT = r'''
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
work = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(work / "base")
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
gen = torch.Generator().manual_seed(3)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
model.save_pretrained(work / "hf_adapter")
merged = model.merge_and_unload()
save_file({f"q{i}": b.self_attn.q_proj.weight.detach().contiguous() for i, b in enumerate(merged.model.layers)},
          str(work / "hf_merged.safetensors"))
'''


@pytest.mark.skipif(not hf_peft_available(), reason="HF peft is not installed")
def test_an_adapter_written_by_hf_peft(base_dir, tmp_path):
    """HF peft (in its own process) writes a DoRA adapter and merges it; the tool's float64
    weights match HF's fp32 merge."""
    shutil.copytree(base_dir, tmp_path / "base")
    run = run_hf_script(HF_DORA_SCRIPT, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    hf_merged = load_file(str(tmp_path / "hf_merged.safetensors"))
    rows = analyze(str(base_dir), [f"HF={tmp_path / 'hf_adapter'}"], ["q_proj"])
    assert {r["method"] for r in rows} == {"DoRA"}
    for row in rows:
        expected = brute_force(hf_merged[f"q{row['layer']}"], base_weight(base_dir, row["layer"]))
        assert (row["delta_m"], row["delta_d"]) == pytest.approx(expected, rel=2e-3, abs=1e-7)


def test_checkpoint_steps_come_out_in_order(base_dir, tmp_path):
    run = tmp_path / "run"
    fork_adapter(base_dir, run, "DoRA")
    for step in (10, 2, 4):  # created out of order; 10 sorts after 4 only numerically
        shutil.copytree(run, run / f"checkpoint-{step}", ignore=shutil.ignore_patterns("checkpoint-*"))
    (run / "train_log.json").write_text(json.dumps({"global_step": 10, "best_model_checkpoint": None}))
    method, steps = run_steps(run)
    assert method == "DoRA" and [s.label for s in steps] == ["2", "4", "final"]  # checkpoint-10 is the final
    rows = analyze(str(base_dir), [f"D={run}"], ["q_proj"])
    assert [r["step"] for r in rows] == ["2", "2", "4", "4", "final", "final"]


def test_outputs_and_fit(base_dir, tmp_path):
    fork_adapter(base_dir, tmp_path / "dora", "DoRA")
    fork_adapter(base_dir, tmp_path / "lora", "LoRA")
    rows = analyze(str(base_dir), [f"DoRA={tmp_path / 'dora'}", f"LoRA={tmp_path / 'lora'}"], ["q_proj", "v_proj"])
    paths = write_outputs(rows, tmp_path / "out", peak_rss=123 * 2**20)
    lines = paths["decomposition.csv"].read_text().splitlines()
    assert lines[0] == "run,method,step,layer,module,delta_m,delta_d" and len(lines) == 1 + 2 * 2 * 2
    assert all(paths[name].stat().st_size > 1000 for name in ("decomposition.png", "decomposition_layers.png"))
    text = paths["decomposition.md"].read_text()
    assert "| DoRA | DoRA | q_proj | 2 |" in text and "123 MiB" in text
    slope, r = fit([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)])
    assert slope == pytest.approx(2.0) and r == pytest.approx(1.0)
    assert fit([(0.0, 1.0), (1.0, 0.0)])[1] == pytest.approx(-1.0)


@pytest.mark.parametrize("case,message", [
    ("twice", "run name 'A' is used twice"),
    ("empty", "no weights"),
    ("module", "module 'q_projj' is not in the base model"),
    ("mismatch", "do not fit the base model's weight"),
    ("syntax", "--runs takes NAME=DIR"),
])
def test_bad_input_is_one_line(base_dir, tmp_path, case, message):
    fork_adapter(base_dir, tmp_path / "ok", "DoRA")
    (tmp_path / "empty").mkdir()
    runs, modules = [f"A={tmp_path / 'ok'}"], ["q_proj"]
    if case == "twice":
        runs = runs * 2
    elif case == "empty":
        runs = [f"A={tmp_path / 'empty'}"]
    elif case == "module":
        modules = ["q_projj"]
    elif case == "mismatch":  # an adapter trained on a wider model
        other = build_tiny_llama(tmp_path / "wide", hidden_size=64)
        fork_adapter(other, tmp_path / "wide_adapter", "DoRA")
        runs = [f"A={tmp_path / 'wide_adapter'}"]
    elif case == "syntax":
        runs = [str(tmp_path / "ok")]
    cli = subprocess.run([sys.executable, str(REPO_ROOT / "analyze_decomposition.py"), "--base_model", str(base_dir),
                          "--runs", *runs, "--modules", *modules, "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr[-2000:]
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()
    with pytest.raises(DecompositionError):
        raise DecompositionError(message)  # the error type the library raises for these


def test_within_step_correlation_separates_growth_over_steps():
    """Pooled over steps, both changes grow together (r > 0); within each step they fall (r = -1)."""
    from commonsense.decomposition import summary

    rows = [dict(run="R", method="FT", module="q_proj", step=step, layer=layer,
                 delta_d=base + 0.1 * layer, delta_m=base - 0.1 * layer)
            for step, base in (("1", 1.0), ("2", 2.0), ("final", 3.0)) for layer in range(3)]
    (fit_row,) = summary(rows)
    assert fit_row["pearson_r"] > 0.9 and fit_row["within_step_r"] == pytest.approx(-1.0)
    assert fit_row["steps"] == ["1", "2", "final"]


def test_bin_weights_are_read_too(base_dir, tmp_path):
    """A model folder with pytorch_model.bin (LLaMA-1 era repos) is read memory-mapped, tensor by tensor."""
    from safetensors.torch import load_file

    folder = tmp_path / "bin_model"
    folder.mkdir()
    shutil.copy(base_dir / "config.json", folder / "config.json")
    state = load_file(str(base_dir / "model.safetensors"))
    state = {k: (v * 2 if k.endswith("q_proj.weight") else v) for k, v in state.items()}
    torch.save(state, folder / "pytorch_model.bin")
    rows = analyze(str(base_dir), [f"B={folder}"], ["q_proj"])
    for row in rows:
        w0 = base_weight(base_dir, row["layer"])
        assert row["delta_d"] == pytest.approx(0, abs=1e-7)
        assert row["delta_m"] == pytest.approx(w0.double().norm(dim=1).mean().item(), rel=1e-6)
