"""merge_adapter.py: a LoRA/DoRA adapter folded into a plain HF model folder.

The merged folders are loaded in a child Python where peft cannot be imported (as on a serving
machine without it) by plain ``AutoModelForCausalLM.from_pretrained``; their logits must equal
the unmerged adapter's, computed here by the fork's adapter layers (a different code path:
the merge folds m (W + sBA) / ||W + sBA|| into W, the layers never build it).
"""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from peft import DoraConfig, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import merge_adapter
from commonsense import merge as merge_lib
from released_format import SEED_TARGETS, merged_reference, write_released_adapter
from tiny_models import build_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peft" / "tests"))
from tiny_llama import randomize_adapter  # noqa: E402  (peft/tests' helpers)

TOKENS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 60, 61, 62, 63, 64, 65, 66, 67]])

# The child: peft blocked (importlib.util.find_spec("peft") is None, import fails), repo not on sys.path (-I).
CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["peft"] = None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokens = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        dtype = str(next(model.parameters()).dtype)
        with torch.no_grad():
            logits = model(input_ids=tokens).logits.float()
        torch.save(logits, folder + ".logits.pt")
        ids = AutoTokenizer.from_pretrained(folder)("merged model")["input_ids"]
        out[folder] = {"dtype": dtype, "ids": ids}
    loaded = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "peft" and module)
    assert not loaded, loaded
    print(json.dumps(out))
""")


def load_in_plain_transformers(folders):
    """{folder: (logits, dtype, token ids)} from the peft-free child."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(TOKENS.tolist()), *map(str, folders)],
        cwd="/", capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return {Path(f): (torch.load(f"{f}.logits.pt"), info[str(f)]["dtype"], info[str(f)]["ids"]) for f in folders}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("base") / "tiny")


def save_adapter(base, folder, config, seed=0, hf_format=False):
    model = randomize_adapter(get_peft_model(AutoModelForCausalLM.from_pretrained(base), config),
                              torch.Generator().manual_seed(seed))
    model.save_pretrained(str(folder), hf_format=hf_format)
    return folder


def adapter_logits(base, adapter):
    """The unmerged adapter's logits, fp32, as the fork computes them."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def run_cli(capsys, *args):
    """(exit status, stdout, stderr without transformers' loading/writing progress bars)."""
    try:
        status = merge_adapter.main([str(a) for a in args])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    err = re.sub(r"\r?(Loading weights|Writing model shards)[^\r\n]*\n?", "", captured.err)
    return status, captured.out, err


ADAPTERS = {
    "dora_with_magnitude_only": (DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            Wdecompose_target_modules=["k_proj", "o_proj", "up_proj"]), False),
    "lora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
             False),
    "dora_hf_peft_format": (DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]), True),
}


def test_merged_folders_reproduce_the_adapter_logits_without_peft(base, tmp_path, capsys):
    from transformers import AutoTokenizer

    folders, expected = [], {}
    for seed, (name, (config, hf_format)) in enumerate(ADAPTERS.items()):
        adapter = save_adapter(base, tmp_path / f"{name}-adapter", config, seed=seed, hf_format=hf_format)
        if hf_format:
            assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
        out = tmp_path / name
        status, stdout, stderr = run_cli(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", out,
                                         "--dtype", "fp32")
        assert (status, stderr) == (0, ""), stderr
        assert stdout.startswith(f"merged the {'LORA' if name == 'lora' else 'DORA'} adapter")
        folders.append(out)
        expected[out] = adapter_logits(base, adapter)
    plain = load_in_plain_transformers(folders)
    base_ids = AutoTokenizer.from_pretrained(base)("merged model")["input_ids"]
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base)(input_ids=TOKENS).logits
    for out in folders:
        logits, dtype, ids = plain[out]
        assert dtype == "torch.float32" and ids == base_ids
        assert (expected[out] - base_logits).abs().max() > 1e-2  # the adapter does change the outputs
        torch.testing.assert_close(logits, expected[out], rtol=0, atol=2e-5)
        files = sorted(p.name for p in out.iterdir())
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert not any(name.startswith("adapter_") for name in files)
        config_text = (out / "config.json").read_text()
        assert "peft" not in config_text and "lora" not in config_text and "quantization" not in config_text
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "lora" in k or "wdecomp" in k or "base_layer" in k]


# Measured: fp16 3.5e-4, bf16 2.4e-3 off the fp32 adapter, whose effect on the logits is 0.28.
@pytest.mark.parametrize("dtype,atol", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_half_precision_output_is_saved_and_loads_in_that_dtype(base, tmp_path, capsys, dtype, atol):
    config, _ = ADAPTERS["dora_with_magnitude_only"]
    adapter = save_adapter(base, tmp_path / "adapter", config)
    out = tmp_path / "merged"
    status, _, stderr = run_cli(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", out,
                                "--dtype", dtype)
    assert (status, stderr) == (0, "")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).replace("torch.", "")
    logits, loaded_dtype, _ = load_in_plain_transformers([out])[out]
    assert loaded_dtype == str(torch_dtype)
    expected = adapter_logits(base, adapter)
    with torch.no_grad():
        assert (expected - AutoModelForCausalLM.from_pretrained(base)(input_ids=TOKENS).logits).abs().max() > 10 * atol
    torch.testing.assert_close(logits, expected, rtol=0, atol=atol)


def test_a_released_format_adapter_is_merged_as_the_formula(base, tmp_path, capsys):
    """The released adapters' format (adapter_model.bin, peft_type DORA, weight_m_wdecomp), built by hand:
    every target becomes m * (W + s B A) / ||W + s B A|| (row norms, float64 here), every other weight stays W."""
    config = json.loads((base / "config.json").read_text())
    adapter = tmp_path / "dora_r4"
    tensors = write_released_adapter(adapter, config, r=4, alpha=8, seed=int(torch.randint(0, 10_000, ()).item()))
    out = tmp_path / "merged"
    status, stdout, stderr = run_cli(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", out,
                                     "--dtype", "fp32")
    assert (status, stderr) == (0, ""), stderr
    assert stdout.startswith("merged the DORA adapter")
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        base_weights = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    assert merged.keys() == base_weights.keys()
    changed = 0
    for name, W in base_weights.items():
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" not in tensors:
            torch.testing.assert_close(merged[name], W, rtol=0, atol=0)
            continue
        expected = merged_reference(W, tensors, key, scaling=8 / 4)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(merged[name], W, atol=1e-3)
        changed += 1
    assert changed == len(SEED_TARGETS) * config["num_hidden_layers"]


def test_auto_dtype_keeps_the_bases_and_large_models_are_sharded(base, tmp_path, capsys):
    adapter = save_adapter(base, tmp_path / "adapter", ADAPTERS["lora"][0])
    out = tmp_path / "merged"
    status, stdout, stderr = run_cli(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", out,
                                     "--max_shard_size", "20KB")
    assert (status, stderr) == (0, "")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    assert f"{len(shards)} safetensors file(s)" in stdout
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(merged.parameters()).dtype == torch.float32  # the tiny base is saved in fp32
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, adapter_logits(base, adapter), rtol=0, atol=2e-5)


def test_a_base_without_tokenizer_gives_a_folder_without_one(base, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (bare / name).write_bytes((base / name).read_bytes())
    adapter = save_adapter(bare, tmp_path / "adapter", ADAPTERS["lora"][0])
    status, stdout, stderr = run_cli(capsys, "--base_model", bare, "--lora_weights", adapter,
                                     "--output_dir", tmp_path / "merged")
    assert (status, stderr) == (0, "") and "no tokenizer" in stdout
    assert not (tmp_path / "merged" / "tokenizer.json").exists()


# --------------------------------------------------------------------------- refusals

def refused(capsys, *args):
    status, stdout, stderr = run_cli(capsys, *args)
    assert status == 2, (stdout, stderr)
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr


def test_a_quantized_base_is_refused(base, tmp_path, capsys):
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    for path in base.iterdir():
        (quantized / path.name).write_bytes(path.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    adapter = save_adapter(base, tmp_path / "adapter", ADAPTERS["lora"][0])
    err = refused(capsys, "--base_model", quantized, "--lora_weights", adapter, "--output_dir", tmp_path / "out")
    assert "is quantized (bitsandbytes)" in err and str(quantized) in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_base_is_refused_naming_both(base, tmp_path, capsys):
    other = build_tiny_llama(tmp_path / "wider", hidden_size=48)
    adapter = save_adapter(other, tmp_path / "adapter", ADAPTERS["dora_with_magnitude_only"][0])
    err = refused(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", tmp_path / "out")
    assert "does not fit base model" in err and str(adapter) in err and str(base) in err and "shape" in err
    assert not (tmp_path / "out").exists()

    missing = tmp_path / "missing-targets"
    save_adapter(base, missing, LoraConfig(r=4, target_modules=["q_proj"]))
    config = json.loads((missing / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_proj"]  # a module this base does not have
    (missing / "adapter_config.json").write_text(json.dumps(config))
    err = refused(capsys, "--base_model", base, "--lora_weights", missing, "--output_dir", tmp_path / "out")
    assert "does not fit base model" in err and "qkv_proj" in err and str(base) in err


def test_a_non_empty_output_needs_overwrite_and_is_then_replaced(base, tmp_path, capsys):
    adapter = save_adapter(base, tmp_path / "adapter", ADAPTERS["lora"][0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    err = refused(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", out)
    assert "not empty" in err and "--overwrite" in err and (out / "old.txt").read_text() == "keep me"
    status, _, stderr = run_cli(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", out,
                                "--overwrite")
    assert (status, stderr) == (0, "")
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]  # no temp folders left
    # An empty output folder is fine without --overwrite; an input as output never is.
    (tmp_path / "empty").mkdir()
    assert run_cli(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", tmp_path / "empty")[0] == 0
    err = refused(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", adapter, "--overwrite")
    assert "is or contains the input" in err


@pytest.mark.parametrize("option,value,message", [
    ("--dtype", "fp8", "invalid choice: 'fp8'"),
    ("--max_shard_size", "lots", "is not a size"),
])
def test_bad_options_are_refused(base, tmp_path, capsys, option, value, message):
    adapter = save_adapter(base, tmp_path / "adapter", ADAPTERS["lora"][0])
    err = refused(capsys, "--base_model", base, "--lora_weights", adapter, "--output_dir", tmp_path / "out",
                  option, value)
    assert message in err and not (tmp_path / "out").exists()


def test_the_library_refuses_an_unknown_dtype(base, tmp_path):
    with pytest.raises(merge_lib.MergeError, match="unknown dtype 'int8'"):
        merge_lib.merge_adapter(base, tmp_path / "adapter", tmp_path / "out", dtype="int8")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_write_leaves_no_half_folder(base, tmp_path, capsys, monkeypatch, overwrite):
    from transformers import PreTrainedModel

    adapter = save_adapter(base, tmp_path / "adapter", ADAPTERS["lora"][0])
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("previous merge")
    real_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)  # the weights are on disk when the failure comes
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    args = ["--base_model", base, "--lora_weights", adapter, "--output_dir", out] + (["--overwrite"] if overwrite else [])
    err = refused(capsys, *args)
    assert "No space left on device" in err
    if overwrite:
        assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter"] + (["out"] if overwrite else []))
