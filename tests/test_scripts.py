"""The fine-tune / evaluation shell scripts at the repository root, checked through DRY_RUN=1.

Each script prints its commands (one per line, shell-quoted) instead of running them; the
tests parse those lines with shlex and compare them with the original NVlabs/DoRA
commonsense_reasoning scripts' flags. Every script runs from a temporary cwd, which
proves it does not depend on being started from the repository root.
"""
import inspect
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The original scripts' task order (also the README's table order).
SEED_TASKS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"]
QKVUD = '["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]'

# The original's finetune.py flags shared by all LLaMA training scripts (r, alpha, output dir,
# learning rate, model and module lists are added per script).
SEED_TRAIN_FLAGS = {
    "--data_path": "commonsense_170k.json",
    "--batch_size": "16",
    "--micro_batch_size": "16",
    "--num_epochs": "3",
    "--cutoff_len": "256",
    "--val_set_size": "120",
    "--eval_step": "80",
    "--save_step": "80",
    "--adapter_name": "dora",
    "--target_modules": QKVUD,
    "--use_gradient_checkpointing": True,
}

TRAIN_SCRIPTS = {
    "llama_7B_Dora.sh": dict(model="LLaMA-7B", base="yahma/llama-7b-hf", flags={"--learning_rate": "2e-4"}),
    "llama_7B_Dora_qkv.sh": dict(model="LLaMA-7B", base="yahma/llama-7b-hf", flags={
        "--learning_rate": "2e-4",
        "--target_modules": '["q_proj", "k_proj", "v_proj"]',
        "--Wdecompose_target_modules": '["o_proj", "gate_proj", "up_proj", "down_proj"]',
    }),
    "llama2_7B_DoRA.sh": dict(model="LLaMA2-7B", base="meta-llama/Llama-2-7b-hf", flags={"--learning_rate": "2e-4"}),
    "llama3_8B_DoRA.sh": dict(model="LLaMA3-8B", base="meta-llama/Meta-Llama-3-8B", flags={"--learning_rate": "1e-4"}),
    "smollm2_135M_DoRA.sh": dict(model="SmolLM2-135M", base="smollm2-135m", flags={
        "--learning_rate": "2e-4", "--micro_batch_size": "4",
    }),
}
EVAL_SCRIPTS = {
    "llama_7B_Dora_eval.sh": dict(model="LLaMA-7B", base="yahma/llama-7b-hf"),
    "llama2_7B_DoRA_eval.sh": dict(model="LLaMA2-7B", base="meta-llama/Llama-2-7b-hf"),
    "llama3_8B_DoRA_eval.sh": dict(model="LLaMA3-8B", base="meta-llama/Meta-Llama-3-8B"),
}
# The seed README's names for four of the original repository's scripts: thin aliases here.
ALIASES = {
    "llama2_7B_DoRA_r.sh": "llama2_7B_DoRA.sh",
    "llama3_8B_DoRA_r.sh": "llama3_8B_DoRA.sh",
    "llama2_7B_Dora_eval.sh": "llama2_7B_DoRA_eval.sh",
    "llama3_8B_Dora_eval.sh": "llama3_8B_DoRA_eval.sh",
}
TRAIN_SCRIPTS.update({alias: TRAIN_SCRIPTS[real] for alias, real in ALIASES.items() if real in TRAIN_SCRIPTS})
EVAL_SCRIPTS.update({alias: EVAL_SCRIPTS[real] for alias, real in ALIASES.items() if real in EVAL_SCRIPTS})
# As in the original, the LLaMA-7B training scripts only train; the LLaMA2/3 ones also evaluate.
TRAIN_ONLY_SCRIPTS = ["llama_7B_Dora.sh", "llama_7B_Dora_qkv.sh"]
LLAMA_TRAIN_SCRIPTS = [name for name in TRAIN_SCRIPTS if name.startswith("llama")]
TRAIN_AND_EVAL_SCRIPTS = [name for name in LLAMA_TRAIN_SCRIPTS if name not in TRAIN_ONLY_SCRIPTS]
ALL_SCRIPTS = sorted(TRAIN_SCRIPTS) + sorted(EVAL_SCRIPTS)
# Set-up wrappers: syntax-checked here; demo.sh and the test scripts also run for real by .ci/run and
# tests/test_demo.py (reproduce_smollm2.sh's module by tests/test_reproduce.py).
SETUP_SCRIPTS = ["demo.sh", "reproduce_smollm2.sh", "scripts/setup_env.sh", "scripts/test.sh", ".ci/run"]


# ---- helpers ---------------------------------------------------------------------------------
def run_script(script, *args, cwd, dry_run=True, shell="bash", **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "PYTHON", "TORCHRUN", "DATA_PATH")}
    env["PYTHON"] = "python"
    if dry_run:
        env["DRY_RUN"] = "1"
    env.update(env_overrides)
    return subprocess.run([shell, str(REPO_ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def dry_run(script, *args, cwd, **env):
    result = run_script(script, *args, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    return [Command.parse(line) for line in result.stdout.splitlines() if line.strip()]


class Command:
    """One printed line: `VAR=value ... program args... [| tee -a FILE]`."""

    def __init__(self, env, argv, tee):
        self.env, self.argv, self.tee = env, argv, tee

    @classmethod
    def parse(cls, line):
        tokens = shlex.split(line)
        tee = None
        if "|" in tokens:
            at = tokens.index("|")
            tokens, pipe = tokens[:at], tokens[at + 1:]
            assert pipe[:2] == ["tee", "-a"] and len(pipe) == 3, line
            tee = pipe[2]
        env = {}
        while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
            key, value = tokens.pop(0).split("=", 1)
            env[key] = value
        return cls(env, tokens, tee)

    def script_index(self, name):
        return self.argv.index(name)

    def flags(self, after):
        """--flag value pairs (a flag without a value maps to True) after the `after` word."""
        words = self.argv[self.script_index(after) + 1:]
        flags, i = {}, 0
        while i < len(words):
            assert words[i].startswith("--"), f"stray word {words[i]!r} in {self.argv}"
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                flags[words[i]] = words[i + 1]
                i += 2
            else:
                flags[words[i]] = True
                i += 1
        return flags


def expected_train_flags(script, out_dir):
    spec = TRAIN_SCRIPTS[script]
    flags = dict(SEED_TRAIN_FLAGS, **spec["flags"])
    flags.update({"--base_model": spec["base"], "--output_dir": str(out_dir), "--lora_r": "32", "--lora_alpha": "64"})
    return flags


def split_train_eval(commands):
    train = [c for c in commands if "finetune.py" in c.argv]
    evals = [c for c in commands if "commonsense_evaluate.py" in c.argv]
    assert len(train) + len(evals) == len(commands)
    return train, evals


# ---- training commands -----------------------------------------------------------------------
@pytest.mark.parametrize("script", sorted(TRAIN_SCRIPTS))
def test_training_command_has_the_seed_flags(script, tmp_path):
    commands = dry_run(script, 32, 64, "out", 0, cwd=tmp_path)
    train, _ = split_train_eval(commands)
    assert commands[0] is train[0] and len(train) == 1  # trains first, once
    cmd = train[0]
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert cmd.argv[:2] == ["python", "finetune.py"]
    assert cmd.tee is None
    # Relative OUTPUT_DIR is taken from the caller's cwd (the script itself cds to the repo root).
    assert cmd.flags("finetune.py") == expected_train_flags(script, tmp_path / "out")


@pytest.mark.parametrize("script", sorted(TRAIN_SCRIPTS))
def test_training_flags_exist_in_finetune(script, tmp_path):
    from commonsense.training import train

    params = inspect.signature(train).parameters
    train_cmd, _ = split_train_eval(dry_run(script, 8, 16, "out", 0, cwd=tmp_path))
    for flag in train_cmd[0].flags("finetune.py"):
        assert flag[2:] in params, f"{script} passes {flag}, which finetune.py does not take"


@pytest.mark.parametrize("script", sorted(TRAIN_SCRIPTS))
def test_absolute_output_dir_is_kept(script, tmp_path):
    out = tmp_path / "some where" / "dora_r8"
    commands = dry_run(script, 8, 16, out, 0, cwd=tmp_path)
    train, evals = split_train_eval(commands)
    assert train[0].flags("finetune.py")["--output_dir"] == str(out)
    assert bool(evals) == (script not in TRAIN_ONLY_SCRIPTS)
    assert {c.flags("commonsense_evaluate.py")["--lora_weights"] for c in evals} <= {str(out)}


def test_python_env_var_picks_the_interpreter(tmp_path):
    commands = dry_run("llama_7B_Dora.sh", 32, 64, "out", 0, cwd=tmp_path, PYTHON="/opt/py 3/bin/python3")
    assert {c.argv[0] for c in commands} == {"/opt/py 3/bin/python3"}


# ---- GPUs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", sorted(TRAIN_SCRIPTS))
def test_several_gpus_train_with_torchrun_and_evaluate_on_the_first(script, tmp_path):
    train, evals = split_train_eval(dry_run(script, 32, 64, "out", "0,1", cwd=tmp_path))
    cmd = train[0]
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert cmd.argv[:5] == ["torchrun", "--standalone", "--nproc_per_node", "2", "finetune.py"]
    flags = cmd.flags("finetune.py")
    # The global batch stays 16; finetune.py splits the accumulation steps over the 2 processes.
    assert flags["--batch_size"] == "16"
    micro = int(flags["--micro_batch_size"])
    assert (16 // micro) % 2 == 0
    assert micro == (8 if script.startswith("llama") else 4)
    expected = expected_train_flags(script, tmp_path / "out")
    expected["--micro_batch_size"] = flags["--micro_batch_size"]
    assert flags == expected
    assert bool(evals) == (script not in TRAIN_ONLY_SCRIPTS)
    assert {c.env["CUDA_VISIBLE_DEVICES"] for c in evals} <= {"0"}
    assert all(c.argv[0] == "python" for c in evals)


def test_gpu_ids_are_passed_through(tmp_path):
    train, evals = split_train_eval(dry_run("llama3_8B_DoRA.sh", 16, 32, "out", "4,6,2,3", cwd=tmp_path))
    assert train[0].env["CUDA_VISIBLE_DEVICES"] == "4,6,2,3"
    assert train[0].argv[:4] == ["torchrun", "--standalone", "--nproc_per_node", "4"]
    assert train[0].flags("finetune.py")["--micro_batch_size"] == "4"
    assert {c.env["CUDA_VISIBLE_DEVICES"] for c in evals} == {"4"}


def test_torchrun_env_var(tmp_path):
    train, _ = split_train_eval(dry_run("smollm2_135M_DoRA.sh", 8, 16, "out", "0,1", cwd=tmp_path,
                                        TORCHRUN="/venv/bin/torchrun"))
    assert train[0].argv[0] == "/venv/bin/torchrun"


def test_gpu_count_that_cannot_split_the_batch_is_refused(tmp_path):
    result = run_script("llama_7B_Dora.sh", 32, 64, "out", "0,1,2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "3 GPUs" in lines[0]


@pytest.mark.parametrize("gpus", ["", "a", "0, 1", "0,", ",1", "0;1", "cuda:0"])
def test_bad_gpu_ids_are_refused(gpus, tmp_path):
    for script, args in (("llama_7B_Dora.sh", (32, 64, "out", gpus)), ("llama_7B_Dora_eval.sh", ("w", gpus))):
        result = run_script(script, *args, cwd=tmp_path)
        assert result.returncode == 2, (script, gpus)
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "GPU" in lines[0]


# ---- evaluation ------------------------------------------------------------------------------
def check_eval_loop(commands, model, base, weights, gpu="0"):
    """One process evaluates all eight tasks (the model loads once); per-task logs as the seed's tee."""
    assert len(commands) == 1
    cmd = commands[0]
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": gpu}
    assert cmd.argv[:2] == ["python", "commonsense_evaluate.py"]
    assert cmd.flags("commonsense_evaluate.py") == {
        "--model": model, "--adapter": "DoRA", "--dataset": "all", "--base_model": base,
        "--batch_size": "1", "--lora_weights": str(weights), "--task_log_dir": str(weights),
    }
    assert cmd.tee == str(Path(weights) / "all.txt")


def test_all_means_the_eight_seed_tasks():
    from commonsense.evaluation import resolve_task_names

    assert sorted(resolve_task_names("all")) == sorted(SEED_TASKS)  # run in the paper's table order


@pytest.mark.parametrize("script", TRAIN_ONLY_SCRIPTS)
def test_llama_7b_training_scripts_only_train(script, tmp_path):
    """As the original's: the seed README evaluates afterwards with llama_7B_Dora_eval.sh."""
    commands = dry_run(script, 32, 64, "out", 0, cwd=tmp_path)
    assert len(commands) == 1 and commands[0].argv[1] == "finetune.py"


@pytest.mark.parametrize("script", TRAIN_AND_EVAL_SCRIPTS)
def test_training_scripts_evaluate_the_eight_tasks(script, tmp_path):
    spec = TRAIN_SCRIPTS[script]
    _, evals = split_train_eval(dry_run(script, 32, 64, "finetuned_result/x", 0, cwd=tmp_path))
    check_eval_loop(evals, spec["model"], spec["base"], tmp_path / "finetuned_result" / "x")


@pytest.mark.parametrize("script", sorted(EVAL_SCRIPTS))
def test_eval_scripts_evaluate_the_eight_tasks(script, tmp_path):
    spec = EVAL_SCRIPTS[script]
    commands = dry_run(script, "./weights/dora_r32", "1,3", cwd=tmp_path)
    check_eval_loop(commands, spec["model"], spec["base"], tmp_path / "weights" / "dora_r32", gpu="1")


def test_smollm2_evaluates_all_tasks_in_one_process(tmp_path):
    _, evals = split_train_eval(dry_run("smollm2_135M_DoRA.sh", 8, 16, "out", 0, cwd=tmp_path))
    assert len(evals) == 1
    assert evals[0].env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert evals[0].flags("commonsense_evaluate.py") == {
        "--model": "SmolLM2-135M", "--adapter": "DoRA", "--dataset": "all", "--base_model": "smollm2-135m",
        "--batch_size": "8", "--lora_weights": str(tmp_path / "out"),
    }
    assert evals[0].tee == str(tmp_path / "out" / "all.txt")


def test_smollm2_data_path_from_env(tmp_path):
    train, _ = split_train_eval(dry_run("smollm2_135M_DoRA.sh", 8, 16, "out", 0, cwd=tmp_path,
                                        DATA_PATH="data/mix.json"))
    assert train[0].flags("finetune.py")["--data_path"] == str(tmp_path / "data" / "mix.json")


def test_smollm2_missing_data_says_how_to_build_it(tmp_path):
    # Not a dry run: the script must stop before launching anything.
    result = run_script("smollm2_135M_DoRA.sh", 8, 16, "out", 0, cwd=tmp_path, dry_run=False,
                        DATA_PATH=str(tmp_path / "missing.json"))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.json" in lines[0] and "commonsense.data build" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", sorted(EVAL_SCRIPTS))
def test_eval_scripts_refuse_a_missing_weights_folder(script, tmp_path):
    result = run_script(script, tmp_path / "nope", 0, cwd=tmp_path, dry_run=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0]


def test_task_order_and_model_names_match_the_package():
    from commonsense.evaluation import MODEL_NAMES
    from commonsense.tasks import TASK_NAMES

    assert sorted(SEED_TASKS) == sorted(TASK_NAMES)
    models = {spec["model"] for spec in list(TRAIN_SCRIPTS.values()) + list(EVAL_SCRIPTS.values())}
    assert models <= set(MODEL_NAMES)


def test_eval_commands_parse_with_commonsense_evaluate(tmp_path):
    import commonsense_evaluate

    commands = dry_run("llama2_7B_DoRA.sh", 32, 64, "out", 0, cwd=tmp_path)
    commands += dry_run("smollm2_135M_DoRA.sh", 8, 16, "out", 0, cwd=tmp_path)
    for cmd in split_train_eval(commands)[1]:
        args = commonsense_evaluate.parse_args(cmd.argv[cmd.script_index("commonsense_evaluate.py") + 1:])
        assert args.batch_size in (1, 8)


# ---- against the original's commands ------------------------------------------------------------
# NVlabs/DoRA commonsense_reasoning at 7e2f10a: each training script's finetune.py flags, in order
# ($1 = r, $2 = alpha, $3 = output dir), and each evaluation's commonsense_evaluate.py flags per task,
# in order, piped to `tee -a $W/<task>.txt` ($W = the weights folder). The LLaMA2/3 training
# scripts evaluate $3 after training, the LLaMA-7B ones do not.
def _original_train(base, lr, targets, wdecompose=None):
    flags = [("--base_model", base), ("--data_path", "commonsense_170k.json"), ("--output_dir", "$3"),
             ("--batch_size", "16"), ("--micro_batch_size", "16"), ("--num_epochs", "3"),
             ("--learning_rate", lr), ("--cutoff_len", "256"), ("--val_set_size", "120"),
             ("--eval_step", "80"), ("--save_step", "80"), ("--adapter_name", "dora"), ("--target_modules", targets)]
    if wdecompose:
        flags.append(("--Wdecompose_target_modules", wdecompose))
    return flags + [("--lora_r", "$1"), ("--lora_alpha", "$2"), ("--use_gradient_checkpointing", True)]


def _original_eval(model, adapter, base):
    return [[("--model", model), ("--adapter", adapter), ("--dataset", task), ("--base_model", base),
             ("--batch_size", "1"), ("--lora_weights", "$W")] for task in SEED_TASKS]


ORIGINAL = {
    "llama_7B_Dora.sh": (_original_train("yahma/llama-7b-hf", "2e-4", QKVUD), None),
    "llama_7B_Dora_qkv.sh": (_original_train("yahma/llama-7b-hf", "2e-4", '["q_proj", "k_proj", "v_proj"]',
                                             '["o_proj", "gate_proj", "up_proj", "down_proj"]'), None),
    "llama2_7B_DoRA.sh": (_original_train("meta-llama/Llama-2-7b-hf", "2e-4", QKVUD),
                          _original_eval("LLaMA2-7B", "LoRA", "meta-llama/Llama-2-7b-hf")),
    "llama3_8B_DoRA.sh": (_original_train("meta-llama/Meta-Llama-3-8B", "1e-4", QKVUD),
                          _original_eval("LLaMA3-8B", "DoRA", "meta-llama/Meta-Llama-3-8B")),
    "llama_7B_Dora_eval.sh": (None, _original_eval("LLaMA-7B", "DoRA", "yahma/llama-7b-hf")),
    "llama2_7B_DoRA_eval.sh": (None, _original_eval("LLaMA2-7B", "LoRA", "meta-llama/Llama-2-7b-hf")),
    "llama3_8B_DoRA_eval.sh": (None, _original_eval("LLaMA3-8B", "DoRA", "meta-llama/Meta-Llama-3-8B")),
}
# What ours do differently in evaluation, on purpose (docs/differences.md): one process
# for the eight tasks (--dataset all, the model loads once) instead of eight, each task's log still
# in $W/<task>.txt (--task_log_dir); --adapter DoRA where the original's LLaMA2 scripts say LoRA
# (the weights are DoRA; the flag only names output files).


def _substitute(value, out):
    return {"$1": "32", "$2": "64", "$3": str(out), "$W": str(out)}.get(value, value)


@pytest.mark.parametrize("script", sorted(set(ORIGINAL) | {a for a, r in ALIASES.items() if r in ORIGINAL}))
def test_commands_match_the_original_scripts(script, tmp_path):
    original_train, original_evals = ORIGINAL[ALIASES.get(script, script)]
    out = tmp_path / "out"
    args = (32, 64, out, 0) if original_train else (out, 0)
    train, evals = split_train_eval(dry_run(script, *args, cwd=tmp_path))
    if original_train is None:
        assert not train
    else:
        assert len(train) == 1
        assert list(train[0].flags("finetune.py").items()) == [(f, _substitute(v, out)) for f, v in original_train]
    if original_evals is None:
        assert not evals
        return
    assert len(evals) == 1
    ours = evals[0].flags("commonsense_evaluate.py")
    assert ours.pop("--dataset") == "all" and ours.pop("--task_log_dir") == str(out)
    for original in original_evals:  # every task's command, less its --dataset, is ours, flag for flag
        flags = [(f, _substitute(v, out)) for f, v in original if f != "--dataset"]
        flags = [(f, "DoRA") if f == "--adapter" else (f, v) for f, v in flags]
        assert list(ours.items()) == flags
    assert evals[0].tee == str(out / "all.txt")


@pytest.mark.parametrize("alias,real", sorted(ALIASES.items()))
def test_seed_readme_names_run_the_same_commands(alias, real, tmp_path):
    args = (16, 32, "out", "0,1") if real in TRAIN_SCRIPTS else ("w", "1")
    assert run_script(alias, *args, cwd=tmp_path).stdout == run_script(real, *args, cwd=tmp_path).stdout
    lines = [line for line in (REPO_ROOT / alias).read_text().splitlines() if line and not line.startswith("#")]
    assert lines == [f'SCRIPT_ALIAS=$(basename "$0") exec bash "$(dirname "$0")/{real}" "$@"']  # a thin alias
    bad = run_script(alias, "x", cwd=tmp_path)  # the real script's checks, under the name the user typed
    assert bad.returncode == 2 and bad.stderr.startswith(f"usage: {alias} ")


# ---- module lists ------------------------------------------------------------------------------
@pytest.mark.parametrize("script,flag,expected", [
    ("llama_7B_Dora.sh", "--target_modules", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ("llama2_7B_DoRA.sh", "--target_modules", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ("llama3_8B_DoRA.sh", "--target_modules", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ("smollm2_135M_DoRA.sh", "--target_modules", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ("llama_7B_Dora_qkv.sh", "--target_modules", ["q_proj", "k_proj", "v_proj"]),
    ("llama_7B_Dora_qkv.sh", "--Wdecompose_target_modules", ["o_proj", "gate_proj", "up_proj", "down_proj"]),
])
def test_module_lists_parse(script, flag, expected, tmp_path):
    from commonsense.train_options import parse_module_list

    train, _ = split_train_eval(dry_run(script, 32, 64, "out", 0, cwd=tmp_path))
    value = train[0].flags("finetune.py")[flag]
    assert parse_module_list(value) == expected
    fire_parser = pytest.importorskip("fire.parser")
    # fire turns the JSON-looking string into a list before train() sees it; same result.
    assert parse_module_list(fire_parser.DefaultParseValue(value)) == expected


# ---- argument checking -------------------------------------------------------------------------
@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_wrong_argument_count_prints_one_usage_line(script, tmp_path):
    wanted = 4 if script in TRAIN_SCRIPTS else 2
    for args in ([], ["1"] * (wanted - 1), ["1"] * (wanted + 1)):
        result = run_script(script, *args, cwd=tmp_path)
        assert result.returncode == 2, (script, args)
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"usage: {script} "), result.stderr


@pytest.mark.parametrize("script", sorted(TRAIN_SCRIPTS))
@pytest.mark.parametrize("position,bad", [(0, "abc"), (0, "0"), (0, "-8"), (0, "3.5"), (0, "8x"),
                                          (1, "sixteen"), (1, "0"), (1, "")])
def test_rank_and_alpha_must_be_positive_integers(script, position, bad, tmp_path):
    args = ["32", "64", "out", "0"]
    args[position] = bad
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "error" in lines[0] and "positive integer" in lines[0]
    assert ("rank" if position == 0 else "ALPHA") in lines[0]


def test_empty_output_dir_is_refused(tmp_path):
    result = run_script("llama_7B_Dora.sh", 32, 64, "", 0, cwd=tmp_path)
    assert result.returncode == 2 and "OUTPUT_DIR" in result.stderr


# ---- the files themselves ----------------------------------------------------------------------
@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_scripts_are_executable_bash(script):
    path = REPO_ROOT / script
    assert path.stat().st_mode & stat.S_IXUSR
    assert path.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("path", ALL_SCRIPTS + SETUP_SCRIPTS + ["scripts/common.sh"])
def test_bash_syntax(path):
    result = subprocess.run(["bash", "-n", str(REPO_ROOT / path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_sh_invocation_reexecs_bash(tmp_path):
    # The README's `sh llama_7B_Dora.sh ...` (sh may be dash) must behave as under bash.
    via_bash = run_script("llama_7B_Dora.sh", 32, 64, "out", "0,1", cwd=tmp_path)
    via_sh = run_script("llama_7B_Dora.sh", 32, 64, "out", "0,1", cwd=tmp_path, shell="sh")
    assert via_sh.returncode == 0, via_sh.stderr
    assert via_sh.stdout == via_bash.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    paths = [str(REPO_ROOT / p) for p in ALL_SCRIPTS + SETUP_SCRIPTS + ["scripts/common.sh"]]
    result = subprocess.run(["shellcheck", "-x", *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_root_script_is_covered():
    assert sorted(p.name for p in REPO_ROOT.glob("*.sh")) == sorted(ALL_SCRIPTS + ["demo.sh", "reproduce_smollm2.sh"])


# ---- real mode, with stand-in programs -----------------------------------------------------------
def fake_program(tmp_path, name, exit_code=0):
    """An executable that logs CUDA_VISIBLE_DEVICES and its argv, one call per line, and prints a line."""
    log = tmp_path / "calls.log"
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n"
                    f'printf "%s %s\\n" "$CUDA_VISIBLE_DEVICES" "$*" >> {shlex.quote(str(log))}\n'
                    f'echo "output of $*"\nexit {exit_code}\n')
    path.chmod(0o755)
    return path, log


def test_real_run_executes_the_same_commands(tmp_path):
    python, log = fake_program(tmp_path, "python")
    torchrun, _ = fake_program(tmp_path, "torchrun")
    data = tmp_path / "mix.json"
    data.write_text("[]")
    out = tmp_path / "out"
    result = run_script("smollm2_135M_DoRA.sh", 8, 16, out, "2,3", cwd=tmp_path, dry_run=False,
                        PYTHON=str(python), TORCHRUN=str(torchrun), DATA_PATH=str(data))
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    assert calls[0].startswith("2,3 --standalone --nproc_per_node 2 finetune.py --base_model smollm2-135m ")
    assert calls[1].startswith("2 commonsense_evaluate.py --model SmolLM2-135M ")
    assert (out / "all.txt").read_text() == f"output of {calls[1][2:]}\n"


def test_real_eval_run_and_failure_status(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    python, log = fake_program(tmp_path, "python")
    result = run_script("llama3_8B_DoRA_eval.sh", weights, 0, cwd=tmp_path, dry_run=False, PYTHON=str(python))
    assert result.returncode == 0, result.stderr
    assert len(log.read_text().splitlines()) == 1
    assert "--dataset all " in (weights / "all.txt").read_text()
    # A failing evaluation stops the script with its status, despite the pipe into tee.
    failing, failing_log = fake_program(tmp_path / "w", "python", exit_code=3)
    result = run_script("llama3_8B_DoRA_eval.sh", weights, 0, cwd=tmp_path, dry_run=False, PYTHON=str(failing))
    assert result.returncode == 3
    assert len(failing_log.read_text().splitlines()) == 1