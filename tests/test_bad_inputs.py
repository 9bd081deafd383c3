"""The bad-input suite: every case gives one clear stderr line, a non-zero exit, no traceback
and no new file anywhere (outputs, inputs, the working directory).

Cases run the real entry points (finetune.py, commonsense_evaluate.py, python -m
commonsense.data) on a tiny local LLaMA, so nothing needs the hub. Starting Python with torch
and transformers costs 3-5 s a run, so the cases that fail before any model is loaded call the
CLI's main function in-process (stderr captured at the file-descriptor level, so warnings and
logging count too); the rest, and at least one case of each CLI, run as subprocesses.
``BAD_INPUTS_ALL_SUBPROCESS=1`` runs every case as a subprocess.

Also here: the security guarantees (weights_only loading, trust_remote_code off, output names
that cannot leave their folder).
"""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_SUBPROCESS = os.environ.get("BAD_INPUTS_ALL_SUBPROCESS") == "1"


# --------------------------------------------------------------------------- inputs

class PickledCode:
    """Unpickling this creates a file: what a malicious adapter_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@dataclass
class Inputs:
    root: Path
    tiny: Path
    train: Path
    adapter: Path  # a valid DoRA r=4 adapter (q_proj, v_proj) of `tiny`
    pickle_marker: Path

    def path(self, name: str) -> Path:
        return self.root / name


def save_adapter(folder: Path, base_model, r: int = 4) -> Path:
    from peft import DoraConfig, get_peft_model

    config = DoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base_model, config).save_pretrained(str(folder))
    return folder


def variant(inputs: Inputs, name: str, change: Callable[[Path], None]) -> None:
    """A copy of the valid adapter with one thing broken."""
    folder = inputs.path(name)
    shutil.copytree(inputs.adapter, folder)
    change(folder)


def edit_config(**changes):
    def change(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return change


def rename_keys(folder: Path) -> None:
    weights = torch.load(folder / "adapter_model.bin", weights_only=True)
    torch.save({k.replace("model.layers.", "transformer.h."): v for k, v in weights.items()},
               folder / "adapter_model.bin")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad_inputs")
    tiny = build_tiny_llama(root / "tiny")
    rows = [{"instruction": f"Is {n} even?", "input": "", "output": f"the correct answer is {a}", "answer": a}
            for n, a in ((int(x), ["true", "false"][int(x) % 2]) for x in torch.randint(0, 10**6, (8,)))]
    train = root / "train.json"
    train.write_text(json.dumps(rows))
    made = Inputs(root, tiny, train, save_adapter(root / "adapter", AutoModelForCausalLM.from_pretrained(tiny)),
                  root / "unpickled_code_ran")

    for name, text in {"not_json.json": "[{\"instruction\": ", "empty.json": "[]",
                       "no_instruction.json": json.dumps([{"input": "", "output": "x"}]),
                       "no_output.json": json.dumps([{"instruction": "x", "input": ""}])}.items():
        made.path(name).write_text(text)
    bad_answer = made.path("dataset_bad_answer") / "boolq"
    bad_answer.mkdir(parents=True)
    (bad_answer / "test.json").write_text(json.dumps([dict(rows[0], answer="maybe")]))

    variant(made, "adapter_no_config", lambda f: (f / "adapter_config.json").unlink())
    variant(made, "adapter_config_not_json", lambda f: (f / "adapter_config.json").write_text("{r: 4"))
    variant(made, "adapter_wrong_type", edit_config(peft_type="PREFIX_TUNING"))
    variant(made, "adapter_wrong_keys", rename_keys)
    variant(made, "adapter_wrong_r", edit_config(r=8))
    variant(made, "adapter_pickled_code",
            lambda f: torch.save({"w": PickledCode(made.pickle_marker)}, f / "adapter_model.bin"))
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    save_adapter(made.path("adapter_other_base"), wider)

    remote = made.path("model_with_code")
    shutil.copytree(tiny, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom.Model", "AutoConfig": "custom.Config"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "custom.py").write_text(f"open({str(made.path('remote_code_ran'))!r}, 'w')\n")

    incomplete = made.path("run_killed_in_save") / "checkpoint-2"
    shutil.copytree(made.adapter, incomplete)  # the adapter part only: no optimizer, no marker
    return made


def unwritable_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder / "out"
    # root writes anywhere; /proc/1 stays read-only even for root on Linux.
    if os.path.isdir("/proc/1") and not os.access("/proc/1", os.W_OK):
        return Path("/proc/1/dora_out")
    pytest.skip("no folder this user cannot write to")


# --------------------------------------------------------------------------- the cases

FINETUNE_DEFAULTS = {
    "adapter_name": "dora", "batch_size": "4", "micro_batch_size": "2", "lora_r": "4", "lora_alpha": "8",
    "target_modules": "q_proj,v_proj", "max_steps": "1", "val_set_size": "0", "cutoff_len": "512",
}
EVALUATE_DEFAULTS = {"model": "LLaMA-7B", "adapter": "DoRA", "dataset": "boolq", "limit": "1"}
OFFLINE = {"HF_HUB_OFFLINE": "1"}


@dataclass
class Case:
    id: str
    cli: str  # finetune | evaluate | data
    options: Callable  # (inputs, out) -> {flag: value} overriding the CLI's defaults (data: an argv list)
    message: str  # a fragment the error line must contain
    subprocess: bool = False  # run as a real subprocess (always with BAD_INPUTS_ALL_SUBPROCESS=1)
    env: dict = field(default_factory=dict)


CASES = [
    # data files
    Case("train data missing", "finetune", lambda i, o: {"data_path": i.path("nope.json")}, "file not found",
         subprocess=True),
    Case("train data not JSON", "finetune", lambda i, o: {"data_path": i.path("not_json.json")}, "not valid JSON"),
    Case("train data empty list", "finetune", lambda i, o: {"data_path": i.path("empty.json")}, "contains no rows"),
    Case("train row without instruction", "finetune", lambda i, o: {"data_path": i.path("no_instruction.json")},
         "row 0: missing required field 'instruction'"),
    Case("train row without output", "finetune", lambda i, o: {"data_path": i.path("no_output.json")},
         "row 0: missing required field 'output'"),
    Case("data CLI: not JSON", "data", lambda i, o: ["validate", i.path("not_json.json")], "not valid JSON",
         subprocess=True),
    Case("data CLI: row without output", "data", lambda i, o: ["validate", i.path("no_output.json")],
         "missing required field 'output'", subprocess=True),
    Case("test answer not a label", "evaluate", lambda i, o: {"dataset_dir": i.path("dataset_bad_answer")},
         "answer 'maybe' is not a boolq label"),
    Case("unknown dataset name", "evaluate", lambda i, o: {"dataset": "boolq,squad"}, "unknown dataset 'squad'",
         subprocess=True),
    # adapter folders
    Case("adapter folder missing", "evaluate", lambda i, o: {"lora_weights": i.path("no_adapter")},
         "adapter folder not found"),
    Case("adapter config missing", "evaluate", lambda i, o: {"lora_weights": i.path("adapter_no_config")},
         "no adapter_config.json"),
    Case("adapter config not JSON", "evaluate", lambda i, o: {"lora_weights": i.path("adapter_config_not_json")},
         "is not valid JSON"),
    Case("adapter wrong peft_type", "evaluate", lambda i, o: {"lora_weights": i.path("adapter_wrong_type")},
         "unknown peft_type 'PREFIX_TUNING'"),
    Case("adapter keys do not match the model", "evaluate",
         lambda i, o: {"lora_weights": i.path("adapter_wrong_keys")}, "missing key(s)"),
    Case("adapter shapes: wrong r", "evaluate", lambda i, o: {"lora_weights": i.path("adapter_wrong_r")},
         "shape mismatch"),
    Case("adapter shapes: other base model", "evaluate", lambda i, o: {"lora_weights": i.path("adapter_other_base")},
         "shape mismatch"),
    Case("adapter .bin holding code (weights_only)", "evaluate",
         lambda i, o: {"lora_weights": i.path("adapter_pickled_code")}, "cannot read adapter weights",
         subprocess=True),
    # training options
    Case("target modules match nothing", "finetune", lambda i, o: {"target_modules": '["query_key_value"]'},
         "matches no module"),
    Case("r zero", "finetune", lambda i, o: {"lora_r": "0"}, "r must be a positive integer"),
    Case("r negative", "finetune", lambda i, o: {"lora_r": "-4"}, "r must be a positive integer"),
    Case("alpha zero", "finetune", lambda i, o: {"lora_alpha": "0"}, "lora_alpha must be a positive"),
    Case("dropout 1", "finetune", lambda i, o: {"lora_dropout": "1.0"}, "lora_dropout must be in [0, 1)"),
    Case("dropout negative", "finetune", lambda i, o: {"lora_dropout": "-0.1"}, "lora_dropout must be in [0, 1)"),
    Case("batch not a multiple of micro batch", "finetune", lambda i, o: {"batch_size": "6", "micro_batch_size": "4"},
         "not a multiple of micro_batch_size"),
    Case("cutoff_len too small for the prompt", "finetune", lambda i, o: {"cutoff_len": "8"},
         "cutoff_len 8 is too small"),
    Case("resume from a checkpoint killed mid-save", "finetune",
         lambda i, o: {"resume_from_checkpoint": i.path("run_killed_in_save") / "checkpoint-2"}, "is incomplete"),
    # output locations
    Case("finetune output_dir not writable", "finetune", lambda i, o: {"output_dir": o["unwritable"]},
         "not writable"),
    Case("finetune output_dir inside a file", "finetune", lambda i, o: {"output_dir": i.train / "out"},
         "is not a folder"),
    Case("evaluate output_dir not writable", "evaluate", lambda i, o: {"output_dir": o["unwritable"]},
         "not writable"),
    # base models
    Case("unknown base model alias", "finetune", lambda i, o: {"base_model": "smollm2-999m"}, "unknown base model",
         env=OFFLINE),
    Case("hub id offline and not cached", "evaluate", lambda i, o: {"base_model": "yahma/llama-7b-hf"},
         "not in the local Hugging Face cache", env=OFFLINE),
    Case("model folder with custom code", "finetune", lambda i, o: {"base_model": i.path("model_with_code")},
         "trust_remote_code is off", subprocess=True),
]


def command_line(case: Case, inputs: Inputs, out: dict) -> list:
    if case.cli == "data":
        return [str(a) for a in case.options(inputs, out)]
    if case.cli == "finetune":
        options = {**FINETUNE_DEFAULTS, "base_model": inputs.tiny, "data_path": inputs.train,
                   "output_dir": out["dir"]}
    else:
        options = {**EVALUATE_DEFAULTS, "base_model": inputs.tiny, "lora_weights": inputs.adapter,
                   "output_dir": out["dir"]}
    options.update(case.options(inputs, out))
    return [str(part) for flag, value in options.items() for part in (f"--{flag}", value)]


def run_subprocess(case: Case, argv: list, cwd: Path):
    entry = {"finetune": [str(REPO_ROOT / "finetune.py")],
             "evaluate": [str(REPO_ROOT / "commonsense_evaluate.py")],
             "data": ["-m", "commonsense.data"]}[case.cli]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **case.env}
    done = subprocess.run([sys.executable, *entry, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr


def run_in_process(case: Case, argv: list, monkeypatch, capfd):
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.cli == "finetune":
        import finetune

        monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
        with pytest.raises(SystemExit) as stopped:
            finetune.main()
        code = stopped.value.code
    elif case.cli == "evaluate":
        import commonsense_evaluate

        code = commonsense_evaluate.main(argv)
    else:
        from commonsense import data

        code = data.main(argv)
    return code, capfd.readouterr().err


PROGRESS_BAR = re.compile(r"^[\w ]*: *\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]\s*$")  # tqdm's default layout


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, tmp_path, monkeypatch, capfd):
    work = tmp_path / "cwd"
    work.mkdir()
    out = {"dir": tmp_path / "out"}
    if "unwritable" in case.id or "not writable" in case.id:
        out["unwritable"] = unwritable_dir(tmp_path)
    argv = command_line(case, inputs, out)
    before = tree(tmp_path), tree(inputs.root)
    monkeypatch.chdir(work)
    if case.subprocess or ALL_SUBPROCESS:
        code, stderr = run_subprocess(case, argv, work)
    else:
        code, stderr = run_in_process(case, argv, monkeypatch, capfd)

    # Progress bars drawn before the failure (transformers' "Loading weights") are the one kind
    # of other stderr line allowed: they are not messages, and a real 7B load needs them.
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert code not in (0, None), stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and case.message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert (tree(tmp_path), tree(inputs.root)) == before  # nothing written, not even a temporary file
    assert not any(path.exists() for path in out.values())
    assert not inputs.pickle_marker.exists() and not inputs.path("remote_code_ran").exists()


def test_the_suite_covers_every_cli_as_a_subprocess():
    assert {c.cli for c in CASES if c.subprocess} == {"finetune", "evaluate", "data"}
    assert len(CASES) >= 20


# --------------------------------------------------------------------------- security

def test_trust_remote_code_is_off_by_default():
    from commonsense import eval_model, models, training

    for function in (training.train, eval_model.load_model_for_eval, models.load_base_model, models.load_tokenizer):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False, function


def test_bin_adapters_load_with_weights_only(tmp_path, monkeypatch):
    from peft.utils import save_and_load

    seen = []
    real_load = torch.load
    monkeypatch.setattr(save_and_load.torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or
                        real_load(*a, **k))
    torch.save({"x": torch.ones(2)}, tmp_path / "adapter_model.bin")
    assert save_and_load.load_adapter_weights(str(tmp_path))["x"].tolist() == [1.0, 1.0]
    assert seen == [True]


@pytest.mark.parametrize("model_name", ["../../escaped", "/tmp/abs", "a/b", "x\\..\\y"])
def test_output_names_cannot_leave_the_output_dir(tmp_path, model_name):
    from commonsense.evaluation import RunInfo, result_path
    from commonsense.io import OutputPathError, child_path

    assert result_path(tmp_path, RunInfo("LLaMA-7B", "DoRA"), "boolq").parent == tmp_path
    with pytest.raises(OutputPathError, match="not a plain file name"):
        result_path(tmp_path, RunInfo(model_name, "DoRA"), "boolq")
    for name in ("", ".", "..", model_name):
        with pytest.raises(OutputPathError):
            child_path(tmp_path, name)
    assert child_path(tmp_path, "..a").parent == tmp_path  # dots inside a name are fine


def test_task_log_names_cannot_leave_their_folder(tmp_path, monkeypatch):
    from commonsense import evaluation
    from commonsense.io import OutputPathError

    # A task registry name with a separator (e.g. from a plug-in) must not become a path.
    monkeypatch.setattr(evaluation, "get_task", lambda name: type("T", (), {"name": name})())
    monkeypatch.setattr(evaluation, "load_rows", lambda *a, **k: [])
    with pytest.raises(OutputPathError):
        evaluation.evaluate_tasks(None, None, ["../boolq"], run=evaluation.RunInfo(), dataset_dir=tmp_path,
                                  output_dir=tmp_path / "exp", task_log_dir=tmp_path / "logs")
    assert not (tmp_path / "boolq.txt").exists()
