"""convert_adapter.py: adapter folders between this repository's format and HF peft's.

The folders are written directly (config + random tensors, no model): the CLI converts files
and never loads a model. peft/tests/test_hf_interop.py checks that the converted adapters
compute the same outputs, in this fork and in HF peft.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft import DoraConfig, LoraConfig
from peft.utils.save_and_load import load_adapter_weights, save_adapter_weights

import convert_adapter

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.down_proj": (32, 48)}  # path: (out, in)


def write_our_adapter(folder: Path, r: int = 4, dora: bool = True, **config_kwargs) -> dict:
    """An adapter folder in this repository's format with random tensors; returns the tensors."""
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    tensors = {}
    for path, (out_features, in_features) in MODULES.items():
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_features, generator=g)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, r, generator=g)
        if dora:
            tensors[f"{prefix}.weight_m_wdecomp.weight"] = torch.rand(out_features, 1, generator=g) + 0.5
    config_cls = DoraConfig if dora else LoraConfig
    config_cls(r=r, lora_alpha=2 * r, target_modules=["q_proj", "down_proj"], **config_kwargs).save_pretrained(folder)
    save_adapter_weights(tensors, str(folder))
    return tensors


def cli_result(capsys, *args):
    """convert_adapter.main in-process: (exit status, stdout, stderr)."""
    try:
        convert_adapter.main([str(a) for a in args])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("dora", [True, False])
def test_to_hf_and_back_to_original_keeps_every_tensor(tmp_path, capsys, dora):
    tensors = write_our_adapter(tmp_path / "ours", dora=dora)
    status, out, err = cli_result(capsys, "--to", "hf", tmp_path / "ours", tmp_path / "hf")
    assert (status, err) == (0, "")
    assert out.startswith(f"wrote the {'DORA' if dora else 'LORA'} adapter") and "HF peft format" in out
    assert out.count("\n") == 1
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert hf_config["peft_type"] == "LORA" and hf_config["use_dora"] is dora
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    status, out, err = cli_result(capsys, "--to", "original", tmp_path / "hf", tmp_path / "back")
    assert (status, err) == (0, "")
    # The original fork reads adapter_model.bin and a config with peft_type DORA / LORA.
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    back_config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert back_config["peft_type"] == ("DORA" if dora else "LORA") and "use_dora" not in back_config
    assert (back_config["r"], back_config["lora_alpha"]) == (4, 8)
    assert back_config["target_modules"] == ["q_proj", "down_proj"]
    back = load_adapter_weights(str(tmp_path / "back"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_dora_simple_false_converts_with_one_warning_line(tmp_path, capsys):
    write_our_adapter(tmp_path / "ours", dora_simple=False)
    status, out, err = cli_result(capsys, "--to", "hf", tmp_path / "ours", tmp_path / "hf")
    assert status == 0 and (tmp_path / "hf" / "adapter_model.safetensors").is_file()
    assert err.startswith("warning: dora_simple=False") and err.count("\n") == 1


def hf_adapter_with(tmp_path, **options) -> Path:
    """An HF peft adapter folder (converted from ours) with config ``options`` set."""
    write_our_adapter(tmp_path / "ours")
    convert_adapter.main(["--to", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")])
    config_path = tmp_path / "hf" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **options}))
    return tmp_path / "hf"


BAD_INPUTS = {  # case: the error line must contain this
    "missing folder": "adapter folder not found",
    "not an adapter": "no adapter_config.json",
    "magnitude-only layers": "magnitude-only",
    "unsupported HF option": "use_rslora=True",
    "already HF": "already in HF peft format",
    "already original": "already in the original fork's format",
    "bad --to": "invalid choice",
}


def bad_input_args(case: str, tmp: Path) -> list:
    if case == "missing folder":
        return ["--to", "hf", tmp / "nope", tmp / "out"]
    if case == "not an adapter":
        (tmp / "empty").mkdir()
        return ["--to", "hf", tmp / "empty", tmp / "out"]
    if case == "magnitude-only layers":
        write_our_adapter(tmp / "ours", Wdecompose_target_modules=["o_proj"])
        return ["--to", "hf", tmp / "ours", tmp / "out"]
    if case == "unsupported HF option":
        return ["--to", "original", hf_adapter_with(tmp, use_rslora=True), tmp / "out"]
    if case == "already HF":
        return ["--to", "hf", hf_adapter_with(tmp), tmp / "out"]
    if case == "already original":
        write_our_adapter(tmp / "ours")
        return ["--to", "original", tmp / "ours", tmp / "out"]
    assert case == "bad --to"
    return ["--to", "gguf", tmp, tmp / "out"]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_no_output(tmp_path, capsys, case):
    args = bad_input_args(case, tmp_path)
    capsys.readouterr()
    status, out, err = cli_result(capsys, *args)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and BAD_INPUTS[case] in err, err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_overwrite(tmp_path, capsys):
    tensors = write_our_adapter(tmp_path / "ours")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    status, _, err = cli_result(capsys, "--to", "hf", tmp_path / "ours", tmp_path / "out")
    assert status == 2 and "--overwrite" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]

    status, _, err = cli_result(capsys, "--to", "hf", tmp_path / "ours", tmp_path / "out", "--overwrite")
    assert (status, err) == (0, "")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    status, _, err = cli_result(capsys, "--to", "hf", tmp_path / "ours", tmp_path / "ours", "--overwrite")
    assert status == 2 and "is the input folder" in err
    assert load_adapter_weights(str(tmp_path / "ours")).keys() == tensors.keys()  # the source is untouched


def test_script_runs_as_a_command(tmp_path):
    write_our_adapter(tmp_path / "ours")
    ok = subprocess.run([sys.executable, str(REPO_ROOT / "convert_adapter.py"), "--to", "hf", str(tmp_path / "ours"),
                         str(tmp_path / "hf")], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote the DORA adapter (r=4, 2 layers) in HF peft format")
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "convert_adapter.py"), "--to", "hf", str(tmp_path / "hf"),
                          str(tmp_path / "again")], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
