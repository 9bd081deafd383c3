"""download_dora_weights.py / commonsense.released: the released DoRA adapters without the hub.

The hub cannot be reached here, so the download is tested with snapshot_download replaced by
a fake hub that serves a hand-built folder through huggingface_hub's own pattern filter, and
for real only in offline mode (the error path). The released folders' format is built by hand
from the original fork's key spec (never with our save_pretrained), so a change in what our
loader accepts shows up here as a failure.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import download_dora_weights
from commonsense import released
from commonsense.eval_model import load_model_for_eval

from released_format import SEED_TARGETS, merged_reference, write_released_adapter
from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=int(torch.randint(0, 10_000, ()).item()))


@pytest.fixture(scope="module")
def tiny_config(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


@pytest.fixture
def released_tiny(tmp_path, tiny_config):
    """A released-format r=4 adapter for the tiny LLaMA, with fresh random tensors."""
    folder = tmp_path / "dora_r4"
    tensors = write_released_adapter(folder, tiny_config, r=4, alpha=8, seed=int(torch.randint(0, 10_000, ()).item()))
    return folder, tensors


def run_main(capsys, *argv):
    """download_dora_weights.main in-process: (exit code, stdout, stderr)."""
    try:
        code = download_dora_weights.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- arguments and registry

def test_list_prints_every_released_folder(capsys):
    code, out, _ = run_main(capsys, "--list")
    assert code == 0
    assert released.HF_REPO_ID in out and released.HUB_ROOT in out
    for model in released.RELEASED.values():
        row = next(line for line in out.splitlines() if line.startswith(model.key + " "))
        assert ", ".join(map(str, model.ranks)) in row
        assert model.hub_folder in row and model.base_model in row and model.eval_script in row


def test_registry_holds_the_folders_nvlabs_links():
    # NVlabs/DoRA commonsense_reasoning/README.md links exactly these folders.
    linked = {"LLama-7B": (4, 8, 16, 32, 64), "LLama2-7B": (16, 32), "LLama3-8B": (16, 32)}
    assert {m.hub_folder: m.ranks for m in released.RELEASED.values()} == linked
    assert released.released_model("llama3-8b").subfolder(16) == "llama_dora_commonsense_checkpoints/LLama3-8B/dora_r16"
    assert released.released_model("LLaMA2-7B").key == "llama2-7b"  # the eval name works too


@pytest.mark.parametrize("model", list(released.RELEASED))
def test_eval_script_uses_the_adapters_base_model(model, tmp_path):
    """docs/released_adapters.md's `sh <eval script> DIR 0` must load the base model the adapter was trained on."""
    spec = released.RELEASED[model]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "EVAL_BATCH_SIZE")}
    result = subprocess.run(["bash", str(REPO_ROOT / spec.eval_script), "released/x", "0"], cwd=tmp_path,
                            env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.split("|")[0])
    flags = dict(zip(argv[3::2], argv[4::2]))  # after CUDA_VISIBLE_DEVICES=0 python commonsense_evaluate.py
    assert flags["--base_model"] == spec.base_model and flags["--model"] == spec.eval_name
    assert flags["--lora_weights"] == str(tmp_path / "released" / "x")


def test_unknown_model_is_one_line_listing_the_choices(capsys, tmp_path):
    code, _, err = run_main(capsys, "--model", "llama-13b", "--rank", "32", "--output_dir", tmp_path / "out")
    line = assert_one_error_line(code, err)
    assert "'llama-13b'" in line and all(key in line for key in released.RELEASED)
    assert not (tmp_path / "out").exists()


def test_rank_not_released_lists_the_ranks(capsys, tmp_path):
    code, _, err = run_main(capsys, "--model", "llama3-8b", "--rank", "64", "--output_dir", tmp_path / "out")
    line = assert_one_error_line(code, err)
    assert "r=64" in line and "16, 32" in line and "--subfolder" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    ((), "--model and --rank"),
    (("--model", "llama-7b"), "--model and --rank"),
    (("--rank", "x"), "invalid int"),
    (("--list", "--check", "d"), "not allowed with"),
    (("--subfolder", "a/b"), "--output_dir"),
    (("--check", "d"), "--check needs --model"),
])
def test_bad_argument_combinations(capsys, argv, needle):
    code, _, err = run_main(capsys, *argv)
    assert needle in assert_one_error_line(code, err)


# --------------------------------------------------------------------------- downloading

class FakeHub:
    """snapshot_download for a fake sliuau/DoRA-weights, filtered by huggingface_hub's own matcher."""

    def __init__(self, files: dict, fail_after: int = None, error: Exception = None):
        self.files = files  # repo path -> bytes
        self.fail_after, self.error = fail_after, error
        self.calls = []

    def __call__(self, repo_id, *, allow_patterns=None, ignore_patterns=None, local_dir=None, revision=None, **kw):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(dict(repo_id=repo_id, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                               revision=revision, **kw))
        wanted = list(filter_repo_objects(sorted(self.files), allow_patterns=allow_patterns,
                                          ignore_patterns=ignore_patterns))
        for count, path in enumerate(wanted):
            if self.fail_after is not None and count == self.fail_after:
                (Path(local_dir) / path).write_bytes(self.files[path][: len(self.files[path]) // 2])
                raise self.error
            (Path(local_dir) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / path).write_bytes(self.files[path])
        return local_dir


def fake_repo(tmp_path, tiny_config, subfolder, r=32, **overrides) -> dict:
    """The repo's files under ``subfolder`` (plus a nested checkpoint and a sibling rank) as bytes."""
    source = tmp_path / "source"
    write_released_adapter(source, tiny_config, r=r, alpha=2 * r, seed=int(torch.randint(0, 10_000, ()).item()))
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(overrides)
    files = {f"{subfolder}/adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
             f"{subfolder}/adapter_model.bin": (source / "adapter_model.bin").read_bytes(),
             f"{subfolder}/checkpoint-80/optimizer.pt": b"not wanted",
             f"{subfolder.rsplit('_r', 1)[0]}_r16/adapter_model.bin": b"another rank"}
    return files


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_download_leaves_a_verified_folder(monkeypatch, capsys, tmp_path, tiny_config):
    subfolder = "llama_dora_commonsense_checkpoints/LLama-7B/dora_r32"
    files = fake_repo(tmp_path, tiny_config, subfolder)
    hub = FakeHub(files)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    out = tmp_path / "released" / "llama-7b-dora_r32"
    code, stdout, err = run_main(capsys, "--model", "llama-7b", "--rank", "32", "--output_dir", out)
    assert code == 0, err
    assert hub.calls == [dict(repo_id="sliuau/DoRA-weights", allow_patterns=[f"{subfolder}/*"],
                              ignore_patterns=[f"{subfolder}/*/*"], revision=None)]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    for name in ("adapter_config.json", "adapter_model.bin"):
        assert (out / name).read_bytes() == files[f"{subfolder}/{name}"]
    assert f"evaluate it with: sh llama_7B_Dora_eval.sh {out} 0" in stdout
    assert leftovers(tmp_path) == [] and leftovers(out.parent) == []


def test_default_output_dir_and_raw_subfolder(monkeypatch, capsys, tmp_path, tiny_config):
    raw = "some/other/folder_r8"
    monkeypatch.setattr("huggingface_hub.snapshot_download", FakeHub(fake_repo(tmp_path, tiny_config, raw, r=8)))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--model", "llama-7b", "--rank", "8", "--subfolder", raw)
    assert code == 0, err
    assert json.loads((tmp_path / "released" / "llama-7b-dora_r8" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("case, needle", [
    ("network drops mid-file", "the hub is unreachable"),
    ("folder not in the repo", "has no folder llama_dora_commonsense_checkpoints/LLama3-8B/dora_r32"),
    ("other rank inside", "has r=16, but r=32 was asked for"),
    ("a LoRA adapter", "peft_type 'LORA', not 'DORA'"),
])
def test_failed_download_leaves_no_folder(monkeypatch, capsys, tmp_path, tiny_config, case, needle):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    subfolder = "llama_dora_commonsense_checkpoints/LLama3-8B/dora_r32"
    hub = {
        "network drops mid-file": lambda: FakeHub(fake_repo(tmp_path, tiny_config, subfolder), fail_after=1,
                                                  error=LocalEntryNotFoundError("connection reset\nmore")),
        "folder not in the repo": lambda: FakeHub(fake_repo(tmp_path, tiny_config, "elsewhere/dora_r32")),
        "other rank inside": lambda: FakeHub(fake_repo(tmp_path, tiny_config, subfolder, r=16)),
        "a LoRA adapter": lambda: FakeHub(fake_repo(tmp_path, tiny_config, subfolder, peft_type="LORA")),
    }[case]()
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    out = tmp_path / "new" / "deeper" / "llama3"
    code, _, err = run_main(capsys, "--model", "llama3-8b", "--rank", "32", "--output_dir", out)
    assert needle in assert_one_error_line(code, err)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_existing_output_folder_is_refused_untouched(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_main(capsys, "--model", "llama-7b", "--rank", "16", "--output_dir", out)
    assert "already exists" in assert_one_error_line(code, err)
    assert (out / "notes.txt").read_text() == "keep me"


def test_offline_download_is_one_line_and_leaves_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = tmp_path / "released" / "llama2-7b-dora_r16"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "download_dora_weights.py"), "--model", "llama2-7b",
                             "--rank", "16", "--output_dir", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    line = assert_one_error_line(result.returncode, result.stderr)
    for needle in ("HF_HUB_OFFLINE", "sliuau/DoRA-weights", "llama_dora_commonsense_checkpoints/LLama2-7B/dora_r16",
                   "--check DIR --model llama2-7b"):
        assert needle in line
    assert not (tmp_path / "released").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a local copy

def test_check_accepts_a_released_folder_and_prints_the_eval_command(capsys, released_tiny, tiny_dir):
    folder, tensors = released_tiny
    code, out, err = run_main(capsys, "--check", folder, "--model", "llama-7b", "--rank", "4",
                              "--base_model", tiny_dir)
    assert code == 0, err
    assert f"{len(tensors)} tensors" in out and "float32" in out and "r=4" in out
    command = out.strip().splitlines()[-1].removeprefix("evaluate it with: ")
    assert shlex.split(command) == ["python", "commonsense_evaluate.py", "--model", "LLaMA-7B", "--adapter", "DoRA",
                                    "--dataset", "all", "--base_model", str(tiny_dir), "--lora_weights", str(folder)]


def _drop_one_magnitude(tensors):
    key = next(k for k in tensors if k.endswith("weight_m_wdecomp.weight"))
    return {k: v for k, v in tensors.items() if k != key}


def _hf_peft_names(tensors):  # HF peft's DoRA layout, which the original fork never wrote
    return {k.replace("weight_m_wdecomp.weight", "lora_magnitude_vector"): v.flatten() if "wdecomp" in k else v
            for k, v in tensors.items()}


def _half_rank(tensors):
    return {k: (v[:2] if "lora_A" in k else v[:, :2] if "lora_B" in k else v) for k, v in tensors.items()}


def _nan_in_one(tensors):
    key = next(iter(tensors))
    return {**tensors, key: torch.full_like(tensors[key], float("nan"))}


@pytest.mark.parametrize("corrupt, needle", [
    (_drop_one_magnitude, "1 missing key(s)"),
    (_hf_peft_names, "unexpected key(s)"),
    (_half_rank, "shape mismatch"),
    (_nan_in_one, "NaN or inf"),
])
def test_check_rejects_a_damaged_folder(capsys, released_tiny, tiny_dir, corrupt, needle):
    folder, tensors = released_tiny
    torch.save(corrupt(tensors), folder / "adapter_model.bin")
    code, _, err = run_main(capsys, "--check", folder, "--model", "llama-7b", "--base_model", tiny_dir)
    assert needle in assert_one_error_line(code, err)


def test_check_without_base_model_uses_the_released_shapes(capsys, tmp_path, released_tiny):
    llama3 = released.RELEASED["llama3-8b"].shapes
    folder = tmp_path / "llama3_r1"
    write_released_adapter(folder, llama3, r=1, alpha=2, seed=0, base_model="meta-llama/Meta-Llama-3-8B")
    code, out, err = run_main(capsys, "--check", folder, "--model", "llama3-8b")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"evaluate it with: sh llama3_8B_DoRA_eval.sh {folder} 0"
    # LLaMA-1 shapes differ (MLP 11008, no GQA); the 2-layer tiny adapter lacks 30 layers.
    for model, adapter, needle in (("llama-7b", folder, "shape mismatch"),
                                   ("llama3-8b", released_tiny[0], "450 missing key(s)")):
        code, _, err = run_main(capsys, "--check", adapter, "--model", model)
        assert needle in assert_one_error_line(code, err)


def test_check_notes_an_adapter_named_for_another_base(capsys, tmp_path, tiny_dir, tiny_config):
    folder = tmp_path / "llama2_named"
    write_released_adapter(folder, tiny_config, r=2, alpha=4, seed=1, base_model="meta-llama/Llama-2-7b-hf")
    code, out, _ = run_main(capsys, "--check", folder, "--model", "llama-7b", "--base_model", tiny_dir)
    assert code == 0 and "note: adapter_config.json names base model 'meta-llama/Llama-2-7b-hf'" in out


# --------------------------------------------------------------------------- evaluating it

def test_released_format_adapter_is_applied_exactly(released_tiny, tiny_dir, tiny_config):
    """Evaluation's loader merges W' = m * (W + s B A) / ||W + s B A|| (row norms) for every target."""
    folder, tensors = released_tiny
    model, _ = load_model_for_eval(str(tiny_dir), lora_weights=str(folder), adapter="DoRA")
    base, _ = load_model_for_eval(str(tiny_dir), adapter="none")
    scaling = 8 / 4
    checked = 0
    for name, module in base.named_modules():
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" not in tensors:
            continue
        W = module.weight.double()
        expected = merged_reference(W, tensors, key, scaling)
        merged = model.get_submodule(name).weight.double()
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged, W, atol=1e-3)
        checked += 1
    assert checked == len(SEED_TARGETS) * tiny_config["num_hidden_layers"]


def test_printed_eval_command_runs_on_a_released_folder(capsys, tmp_path, released_tiny, tiny_dir):
    """--check's command, narrowed to 2 BoolQ rows, evaluates the hand-built adapter end to end."""
    folder, _ = released_tiny
    code, out, err = run_main(capsys, "--check", folder, "--model", "llama-7b", "--base_model", tiny_dir)
    assert code == 0, err
    argv = shlex.split(out.strip().splitlines()[-1].removeprefix("evaluate it with: "))
    argv[argv.index("all")] = "boolq"
    argv[0] = sys.executable
    results = tmp_path / "experiment"
    result = subprocess.run(argv + ["--limit", "2", "--output_dir", str(results)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((results / "LLaMA-7B-DoRA-boolq.summary.json").read_text())
    assert summary["n"] == 2 and summary["lora_weights"] == str(folder)
    predictions = json.loads((results / "LLaMA-7B-DoRA-boolq.json").read_text())
    assert len(predictions) == 2 and all("pred" in row and "flag" in row for row in predictions)
