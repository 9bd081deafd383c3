"""The bad-input suite: every case gives one clear stderr line, exit status 2, no traceback and
no new file anywhere (outputs, inputs, the working directory).

Cases run the real entry points (finetune.py, commonsense_evaluate.py, python -m
commonsense.data) on a tiny local LLaMA, so nothing needs the hub. Starting Python with torch
and transformers costs 3-5 s a run, so each case calls the CLI's main function in-process
(stderr captured at the file-descriptor level, so warnings and logging count too), with the
base-model loader replaced by a tripwire: a case not marked ``loads_model`` must be refused
before any weights load. One case runs as a real subprocess, for the entry script's own exit
path; ``BAD_INPUTS_ALL_SUBPROCESS=1`` runs every case as a subprocess.

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
from dataclasses import dataclass
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


def variant(inputs: Inputs, name: str, change: Callable[[Path], None], of: Path = None) -> None:
    """A copy of the valid adapter (or of the folder `of`) with one thing broken."""
    folder = inputs.path(name)
    shutil.copytree(of or inputs.adapter, folder)
    change(folder)


def edit_config(file="adapter_config.json", **changes):
    """Change keys of a folder's JSON config; a value of None removes the key."""
    def change(folder: Path) -> None:
        config = {**json.loads((folder / file).read_text()), **changes}
        (folder / file).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
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

    variant(made, "model_no_tokenizer", lambda f: [p.unlink() for p in f.glob("tokenizer*")], of=tiny)
    variant(made, "model_no_weights", lambda f: (f / "model.safetensors").unlink(), of=tiny)
    variant(made, "model_cut_weights", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:100]), of=tiny)
    variant(made, "model_no_config", lambda f: (f / "config.json").unlink(), of=tiny)
    variant(made, "model_config_not_json", lambda f: (f / "config.json").write_text("{oops"), of=tiny)
    variant(made, "model_no_model_type", edit_config("config.json", model_type=None), of=tiny)
    variant(made, "model_masked_lm", edit_config("config.json", model_type="bert", architectures=["BertForMaskedLM"]),
            of=tiny)
    made.path("empty_hub_cache").mkdir()
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
    options: Callable  # (inputs, out) -> {flag: value} over the CLI's defaults (data: an argv list)
    message: str  # a fragment the error line must contain
    loads_model: bool = False  # the error can only show once the base weights are loaded
    subprocess: bool = False  # run as a real subprocess (always with BAD_INPUTS_ALL_SUBPROCESS=1)
    env: Callable = lambda inputs: {}


def ft(options: dict, message: str, **kwargs) -> Case:
    """A finetune.py case: `options` are the flags that differ from FINETUNE_DEFAULTS."""
    return Case(f"finetune {' '.join(f'--{k} {v}' for k, v in options.items())}", "finetune",
                lambda i, o: options, message, **kwargs)


def folder(cli: str, flag: str, name: str, message: str, **kwargs) -> Case:
    """A case whose --flag names the broken folder `name` of the inputs."""
    return Case(f"{cli} --{flag} {name}", cli, lambda i, o: {flag: i.path(name)}, message, **kwargs)


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
    Case("data CLI: not JSON", "data", lambda i, o: ["validate", i.path("not_json.json")], "not valid JSON"),
    Case("data CLI: row without output", "data", lambda i, o: ["validate", i.path("no_output.json")],
         "missing required field 'output'"),
    Case("test answer not a label", "evaluate", lambda i, o: {"dataset_dir": i.path("dataset_bad_answer")},
         "answer 'maybe' is not a boolq label"),
    Case("unknown dataset name", "evaluate", lambda i, o: {"dataset": "boolq,squad"}, "unknown dataset 'squad'"),
    # adapter folders and names
    folder("evaluate", "lora_weights", "no_adapter", "adapter folder not found"),
    folder("evaluate", "lora_weights", "adapter_no_config", "no adapter_config.json"),
    folder("evaluate", "lora_weights", "adapter_config_not_json", "is not valid JSON"),
    folder("evaluate", "lora_weights", "adapter_wrong_type", "unknown peft_type 'PREFIX_TUNING'"),
    folder("evaluate", "lora_weights", "adapter_wrong_keys", "missing key(s)", loads_model=True),
    folder("evaluate", "lora_weights", "adapter_wrong_r", "shape mismatch", loads_model=True),
    folder("evaluate", "lora_weights", "adapter_other_base", "shape mismatch", loads_model=True),
    folder("evaluate", "lora_weights", "adapter_pickled_code", "cannot read adapter weights", loads_model=True),
    Case("adapter hub id, offline and not cached", "evaluate", lambda i, o: {"lora_weights": "some-org/some-adapter"},
         "adapter 'some-org/some-adapter' is not a local folder and could not be fetched from the hub "
         "(HF_HUB_OFFLINE is set and it is not in the local hub cache)",
         env=lambda i: {**OFFLINE, "HF_HUB_CACHE": str(i.path("empty_hub_cache"))}),
    Case("adapter type without --lora_weights", "evaluate", lambda i, o: {"adapter": "LoRA", "lora_weights": None},
         "--lora_weights is required unless --adapter none"),
    Case("--adapter none with --lora_weights", "evaluate", lambda i, o: {"adapter": "none"},
         "--lora_weights given with --adapter none"),
    Case("the original's bottleneck adapter", "evaluate", lambda i, o: {"adapter": "AdapterH"},
         "unknown adapter 'AdapterH'; choose from LoRA, DoRA, FT, none (the original also listed LLM-Adapters'"),
    Case("evaluate batch size 0", "evaluate", lambda i, o: {"batch_size": "0"},
         "argument --batch_size: expected a positive integer, got 0"),
    Case("evaluate limit 0", "evaluate", lambda i, o: {"limit": "0"}, "argument --limit: expected a positive integer"),
    Case("evaluate model name that is not a plain file-name part", "evaluate", lambda i, o: {"model": "../x"},
         "argument --model: model name '../x' is not a plain name for file names"),
    Case("evaluate 8-bit and 4-bit at once", "evaluate", lambda i, o: {"load_8bit": True, "load_4bit": True},
         "choose one of --load_8bit and --load_4bit"),
    # training options: flags, adapters, counts, sizes and rates that make no sense
    ft({"lora_target_modules": "3"}, "--lora_target_modules: the original accepted it but never read it"),
    ft({"bottleneck_size": "3"}, "--bottleneck_size: an option of LLM-Adapters' bottleneck adapter"),
    ft({"num_virtual_tokens": "3"}, "--num_virtual_tokens: an option of LLM-Adapters' prefix tuning"),
    ft({"no_such_flag": "3"}, "unknown flag --no_such_flag (finetune.py's flags: --base_model"),
    ft({"adapter_name": "prefix"}, "adapter_name must be lora, dora or ft (full fine-tuning), got 'prefix'"),
    ft({"base_model": ""}, "please specify a --base_model"),
    ft({"target_modules": '["query_key_value"]'}, "matches no module of the model; linear modules in this model: "
       "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj", loads_model=True),
    ft({"lora_r": "0"}, "r must be a positive integer"),
    ft({"lora_r": "-4"}, "r must be a positive integer"),
    ft({"lora_alpha": "0"}, "lora_alpha must be a positive"),
    ft({"lora_dropout": "1.0"}, "lora_dropout must be in [0, 1)"),
    ft({"lora_dropout": "-0.1"}, "lora_dropout must be in [0, 1)"),
    ft({"batch_size": "6", "micro_batch_size": "4"}, "batch_size 6 is not a multiple of micro_batch_size 4"),
    ft({"batch_size": "4", "micro_batch_size": "8"}, "micro_batch_size 8 is larger than batch_size 4"),
    ft({"batch_size": "0"}, "batch_size must be a positive integer, got 0"),
    ft({"num_epochs": "0", "max_steps": "-1"}, "num_epochs must be a positive number, got 0"),
    ft({"num_epochs": "nan", "max_steps": "-1"}, "num_epochs must be a positive number, got 'nan'"),
    ft({"max_steps": "0"}, "max_steps must be a positive integer, or -1 to train num_epochs epochs, got 0"),
    ft({"max_steps": "-5"}, "max_steps must be a positive integer, or -1 to train num_epochs epochs, got -5"),
    ft({"learning_rate": "0"}, "learning_rate must be a positive number, got 0"),
    ft({"learning_rate": "-1e-3"}, "learning_rate must be a positive number, got -0.001"),
    ft({"weight_decay": "-0.1"}, "weight_decay must be a number >= 0, got -0.1"),
    ft({"cutoff_len": "0"}, "cutoff_len must be a positive integer, got 0"),
    ft({"cutoff_len": "8"}, "cutoff_len 8 is too small: every training prompt is cut before its response"),
    ft({"val_set_size": "8"}, "val_set_size 8 leaves no training rows (the data has 8)"),
    ft({"val_set_size": "-1"}, "val_set_size must be an integer >= 0, got -1"),
    ft({"save_step": "0"}, "save_step must be a positive integer, got 0"),
    ft({"eval_step": "0", "val_set_size": "2"}, "eval_step must be a positive integer, got 0"),
    ft({"save_step": "3", "eval_step": "2", "val_set_size": "2"}, "save_step 3 must be a multiple of eval_step 2"),
    ft({"logging_steps": "0"}, "logging_steps must be a positive integer, got 0"),
    ft({"warmup_steps": "-1"}, "warmup_steps must be an integer >= 0, got -1"),
    ft({"save_total_limit": "0"}, "save_total_limit must be a positive integer, got 0"),
    ft({"load_8bit": "True", "load_4bit": "True"}, "choose one of --load_8bit and --load_4bit"),
    ft({"adapter_name": "ft", "load_8bit": "True"}, "cannot be 8-bit/4-bit"),
    ft({"adapter_name": "ft", "Wdecompose_target_modules": "o_proj"}, "is a DoRA option"),
    ft({"adapter_name": "ft", "target_modules": "nothing_here"}, "matches no decoder linear layer", loads_model=True),
    Case("resume from a checkpoint killed mid-save", "finetune",
         lambda i, o: {"resume_from_checkpoint": i.path("run_killed_in_save") / "checkpoint-2"}, "is incomplete"),
    Case("warm start from an adapter of another r", "finetune",
         lambda i, o: {"resume_from_checkpoint": i.adapter, "lora_r": "2"}, "shape mismatch", loads_model=True),
    # output locations
    Case("finetune output_dir not writable", "finetune", lambda i, o: {"output_dir": o["unwritable"]},
         "not writable"),
    Case("finetune output_dir inside a file", "finetune", lambda i, o: {"output_dir": i.train / "out"},
         "is not a folder"),
    Case("evaluate output_dir not writable", "evaluate", lambda i, o: {"output_dir": o["unwritable"]},
         "not writable"),
    # base models: each says what is wrong with which folder, before any weights load
    Case("unknown base model alias", "finetune", lambda i, o: {"base_model": "smollm2-999m"}, "unknown base model",
         env=lambda i: OFFLINE),
    Case("hub id offline and not cached", "evaluate", lambda i, o: {"base_model": "yahma/llama-7b-hf"},
         "not in the local Hugging Face cache", env=lambda i: OFFLINE),
    folder("finetune", "base_model", "model_with_code", "trust_remote_code is off"),
    folder("evaluate", "base_model", "model_no_tokenizer",
           "model_no_tokenizer: no tokenizer in the model folder (none of tokenizer.json, tokenizer.model"),
    folder("finetune", "base_model", "model_no_tokenizer", "model_no_tokenizer: no tokenizer"),
    folder("finetune", "base_model", "model_no_weights",
           "model_no_weights: no weights in the model folder (none of model.safetensors"),
    folder("evaluate", "base_model", "model_cut_weights",
           "model_cut_weights/model.safetensors cannot be read (a truncated or corrupt download?)"),
    folder("evaluate", "base_model", "model_no_config",
           "model_no_config' is a folder but not a model folder (no config.json)"),
    folder("finetune", "base_model", "model_config_not_json", "model_config_not_json/config.json is not valid JSON"),
    folder("evaluate", "base_model", "model_no_model_type",
           "model_no_model_type/config.json names no model_type: not a transformers model folder"),
    folder("finetune", "base_model", "model_masked_lm", "model_masked_lm holds a BertForMaskedLM, not a causal "
           "language model (this project trains and evaluates LLaMA-family decoders"),
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
    argv = []
    for flag, value in options.items():  # None: the flag left out; True: a switch without a value
        argv += [] if value is None else [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
    return argv


def run_subprocess(case: Case, argv: list, cwd: Path, env: dict):
    entry = {"finetune": [str(REPO_ROOT / "finetune.py")],
             "evaluate": [str(REPO_ROOT / "commonsense_evaluate.py")],
             "data": ["-m", "commonsense.data"]}[case.cli]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    done = subprocess.run([sys.executable, *entry, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr


class BaseModelLoaded(BaseException):
    """Raised by the tripwire loader (a BaseException, so no CLI turns it into an error line)."""


def run_in_process(case: Case, argv: list, env: dict, monkeypatch, capfd):
    from commonsense import eval_model, training

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "HF_HUB_OFFLINE" in env:  # huggingface_hub reads these once, at its import
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        if "HF_HUB_CACHE" in env:
            monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    if not case.loads_model:
        def tripwire(*args, **kwargs):
            raise BaseModelLoaded(f"{case.id}: the base model was loaded before the input was refused")

        monkeypatch.setattr(training, "load_base_model", tripwire)
        monkeypatch.setattr(eval_model, "load_base_model", tripwire)
    if case.cli == "finetune":
        import finetune

        monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
        main = finetune.main
    elif case.cli == "evaluate":
        import commonsense_evaluate

        main = lambda: commonsense_evaluate.main(argv)  # noqa: E731
    else:
        from commonsense import data

        main = lambda: data.main(argv)  # noqa: E731
    try:
        code = main()
    except SystemExit as stopped:
        code = stopped.code
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
    env = case.env(inputs)
    before = tree(tmp_path), tree(inputs.root)
    monkeypatch.chdir(work)
    if case.subprocess or ALL_SUBPROCESS:
        code, stderr = run_subprocess(case, argv, work, env)
    else:
        code, stderr = run_in_process(case, argv, env, monkeypatch, capfd)

    # Progress bars drawn before the failure (transformers' "Loading weights") are the one kind
    # of other stderr line allowed: they are not messages, and a real 7B load needs them.
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and case.message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert (tree(tmp_path), tree(inputs.root)) == before  # nothing written, not even a temporary file
    assert not any(path.exists() for path in out.values())
    assert not inputs.pickle_marker.exists() and not inputs.path("remote_code_ran").exists()


def test_one_exit_path_for_interrupts_and_bugs(capsys):
    """Ctrl-C is one line and status 130; a bug keeps its traceback (status 1 from Python itself)."""
    from commonsense.cli import run_or_exit

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_or_exit(interrupted, resume_hint="rerun the same command to resume")
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "error: interrupted; rerun the same command to resume\n"
    with pytest.raises(ZeroDivisionError):
        run_or_exit(lambda: 1 / 0)
    with pytest.raises(SystemExit) as stopped:  # a multi-line message is joined, not cut
        run_or_exit(lambda: (_ for _ in ()).throw(ValueError("first line:\n(1) second\n(2) third")))
    assert stopped.value.code == 2 and capsys.readouterr().err == "error: first line: (1) second (2) third\n"


def test_model_folders_of_other_causal_families_pass(inputs, tmp_path):
    from commonsense.model_folder import check_model_folder

    for model_type, architecture in (("gpt2", "GPT2LMHeadModel"), ("llama", "LLaMAForCausalLM"), ("mistral", None)):
        folder = tmp_path / model_type
        shutil.copytree(inputs.tiny, folder)
        edit_config("config.json", model_type=model_type,
                    architectures=[architecture] if architecture else None)(folder)
        check_model_folder(folder)


def test_sharded_model_folder_names_its_missing_shards(inputs, tmp_path):
    from commonsense.model_folder import check_model_folder
    from commonsense.models import ModelLoadError

    folder = tmp_path / "sharded"
    shutil.copytree(inputs.tiny, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"sharded: 1 of the 2 weight shards listed in model.safetensors.index"
                                             r".json are missing \(model-00002-of-00002.safetensors\)$"):
        check_model_folder(folder)
    shutil.copy(folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors")
    check_model_folder(folder)


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
