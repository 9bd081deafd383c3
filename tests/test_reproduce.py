"""The one-command LoRA-vs-DoRA comparison (commonsense.reproduce) and the seed recipe it reads
(commonsense.recipe): its pieces on synthetic data.

No real SmolLM2 run here: the subset, the schedule, the statistics, the per-run report and the
command lines are checked directly; the child-process measurement with a stand-in script; the
whole pipeline end to end with a tiny random LLaMA (slow-marked). The grid's own parts (axes,
scheduler, seeds' table) are in tests/test_grid.py.
"""
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from commonsense import recipe
from commonsense.recipe import TARGET_MODULES, format_lr, scaled_warmup_steps, training_steps
from commonsense.reproduce import cli, measured, report
from commonsense.reproduce.plan import (
    ReproductionError,
    RunSpec,
    Settings,
    evaluate_args,
    finetune_args,
    parse_runs,
)
from commonsense.reproduce.report import render_markdown
from commonsense.reproduce.runner import check_or_record_settings
from commonsense.reproduce.stats import macro_average_ci, paired_difference_ci
from commonsense.reproduce.training_data import prepare_training_data
from commonsense.tasks import TASK_NAMES, TASKS

REPO_ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA"]
SEED_LAYOUT = ["Model", "r", "lr", *COLUMNS, "Average"]


# ---- synthetic data ---------------------------------------------------------------------------
def write_source(folder: Path, sizes: dict) -> Path:
    """DIR/<task>/train.json with `sizes[task]` unique rows labelled with their task.

    Short enough that the tiny model's byte-level tokens keep part of the response within the
    seed's cutoff of 256 (the prompt template alone is about 220 bytes).
    """
    for task, size in sizes.items():
        label = TASKS[task].labels[0]
        tag = uuid.uuid4().hex[:4]
        rows = [{"instruction": f"{task} {i} {tag}", "input": "",
                 "output": f"the correct answer is {label}", "answer": label} for i in range(size)]
        (folder / task).mkdir(parents=True, exist_ok=True)
        (folder / task / "train.json").write_text(json.dumps(rows, indent=4))
    return folder


def random_sizes(rng) -> dict:
    return {task: rng.randint(20, 400) for task in TASK_NAMES}


def subset_settings(source: Path, train_rows: int, seed: int) -> Settings:
    return Settings(base_model="smollm2-135m", source_dir=str(source), full=False, train_rows=train_rows,
                    num_epochs=1, eval_limit_generate=25, eval_limit_loglik=150, data_seed=seed, micro_batch_size=4)


# ---- the subset ---------------------------------------------------------------------------------
def test_subset_is_deterministic_counts_its_tasks_and_keeps_proportions(tmp_path):
    rng = random.Random()
    sizes = random_sizes(rng)
    source = write_source(tmp_path / "source", sizes)
    total = sum(sizes.values())
    n = total // 2
    seed = rng.randint(0, 10_000)

    first = prepare_training_data(tmp_path / "a", subset_settings(source, n, seed))
    again = prepare_training_data(tmp_path / "b", subset_settings(source, n, seed))
    other = prepare_training_data(tmp_path / "c", subset_settings(source, n, seed + 1))
    rows = json.loads(Path(first["path"]).read_text())
    assert rows == json.loads(Path(again["path"]).read_text())
    assert rows != json.loads(Path(other["path"]).read_text())
    assert len(rows) == n == first["rows"]
    assert len({r["instruction"] for r in rows}) == n  # a sample without replacement

    # The recorded per-task counts are the true ones (each instruction starts with its task).
    true_counts = {task: sum(r["instruction"].startswith(f"{task} ") for r in rows) for task in TASK_NAMES}
    assert first["per_task"] == true_counts
    assert first["mix_per_task"] == sizes and first["mix_rows"] == total
    assert first["hellaswag_train_is_approximate"] is False

    # Proportions: each task's count is within 4.5 standard deviations of its share (hypergeometric).
    for task, size in sizes.items():
        p = size / total
        sd = math.sqrt(n * p * (1 - p) * (total - n) / (total - 1))
        assert abs(true_counts[task] - n * p) <= 4.5 * sd + 1, (task, true_counts[task], n * p)


def test_subset_reuses_its_record_and_refuses_too_many_rows(tmp_path):
    source = write_source(tmp_path / "source", {task: 10 for task in TASK_NAMES})
    out = tmp_path / "out"
    record = prepare_training_data(out, subset_settings(source, 16, 1))
    Path(record["mix_path"]).unlink()  # a rerun reads the record, not the mix
    assert prepare_training_data(out, subset_settings(source, 16, 1)) == record
    with pytest.raises(ReproductionError, match="--train_rows 81 exceeds the 80 rows"):
        prepare_training_data(tmp_path / "other", subset_settings(source, 81, 1))


def test_settings_of_a_folder_must_match(tmp_path):
    settings = subset_settings(tmp_path, 384, 42)
    check_or_record_settings(tmp_path / "out", settings)
    check_or_record_settings(tmp_path / "out", settings)  # same settings: fine
    changed = Settings(**{**settings.__dict__, "train_rows": 16})
    with pytest.raises(ReproductionError, match="train_rows 384 -> 16.*--fresh"):
        check_or_record_settings(tmp_path / "out", changed)


# ---- the schedule -----------------------------------------------------------------------------------
def test_training_steps_match_the_trainer():
    assert training_steps(384, 16, 4, 1) == 24
    assert training_steps(100, 16, 4, 1) == 7  # 25 micro batches = 6 full steps + 1 partial
    assert training_steps(100, 16, 4, 3) == 21
    assert training_steps(170_300, 16, 4, 1) == training_steps(170_300, 16, 16, 1) == 10_644
    assert recipe.TOTAL_STEPS == 31_932  # 3 epochs x ceil(170,300 / 16)


def test_warmup_is_the_seeds_share_and_at_least_one_step():
    assert scaled_warmup_steps(31_932) == 100
    assert scaled_warmup_steps(3_193) == 10
    assert scaled_warmup_steps(10_644) == 33
    assert scaled_warmup_steps(24) == 1 and scaled_warmup_steps(1) == 1


def test_format_lr():
    assert [format_lr(x) for x in (3e-4, 2e-4, 1e-4, 2.5e-5, 0.01)] == ["3e-4", "2e-4", "1e-4", "2.5e-5", "1e-2"]


# ---- statistics -------------------------------------------------------------------------------------
def test_macro_average_ci_by_hand():
    per_task = [(50, 100), (80, 100), (30, 60), (9, 10), (0, 20), (20, 20), (45, 90), (1, 4)]
    mean, low, high = macro_average_ci(per_task)
    # accuracies .5 .8 .5 .9 0 1 .5 .25 -> mean 4.45 / 8
    assert mean == pytest.approx(0.55625)
    # p(1-p)/n per task: .25/100 .16/100 .25/60 .09/10 0 0 .25/90 .1875/4
    variance = (0.0025 + 0.0016 + 0.25 / 60 + 0.009 + 0 + 0 + 0.25 / 90 + 0.046875) / 64
    assert variance == pytest.approx(0.0010456163)
    assert high - mean == pytest.approx(mean - low) == pytest.approx(1.959964 * math.sqrt(variance))
    assert (low, high) == pytest.approx((0.49287, 0.61963), abs=1e-5)


def test_macro_average_ci_stays_within_0_and_1():
    mean, low, high = macro_average_ci([(1, 16)] + [(0, 16)] * 7)  # 0.78%: the normal interval dips below 0
    assert low == 0.0 and high == pytest.approx(mean + 1.959964 * math.sqrt(1 / 16 * 15 / 16 / 16) / 8)
    assert macro_average_ci([(16, 16)] * 7 + [(15, 16)])[2] == 1.0


def test_paired_difference_ci_by_hand():
    # task 1: d = 0, -1, +1, 0 -> mean 0, var(d) = 0.5, var of the mean 0.5 / 4
    # task 2: d = -1, -1      -> mean -1, var 0
    mean, low, high = paired_difference_ci([("1100", "1010"), ("11", "00")])
    assert mean == pytest.approx(-0.5)
    assert high - mean == pytest.approx(1.959964 * math.sqrt(0.125) / 2)
    with pytest.raises(ValueError, match="same examples"):
        paired_difference_ci([("110", "11")])


# ---- the recipe ----------------------------------------------------------------------------------------
def test_recipe_is_what_the_seed_script_and_finetune_defaults_use(tmp_path):
    """commonsense.recipe against smollm2_135M_DoRA.sh (checked flag by flag against the original in
    test_scripts.py) and finetune.py's defaults for what the scripts leave out."""
    import inspect
    import shlex

    from commonsense.training import train

    env = dict(os.environ, DRY_RUN="1", PYTHON="python")
    printed = subprocess.run(["bash", str(REPO_ROOT / "smollm2_135M_DoRA.sh"), "16", "32", str(tmp_path / "o"), "0"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    words = shlex.split(printed.stdout.splitlines()[0])
    words = words[words.index("finetune.py") + 1:]
    flags = {word: value for word, value in zip(words, words[1:] + [""]) if word.startswith("--")}
    assert json.loads(flags["--target_modules"]) == recipe.TARGET_MODULES
    assert (int(flags["--batch_size"]), int(flags["--cutoff_len"]), int(flags["--num_epochs"])) == (
        recipe.BATCH_SIZE, recipe.CUTOFF_LEN, recipe.EPOCHS)
    assert (int(flags["--val_set_size"]), int(flags["--eval_step"])) == (recipe.VAL_SET_SIZE, recipe.EVAL_STEP)
    assert flags["--learning_rate"] == format_lr(recipe.LEARNING_RATE["dora"])
    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    assert "--lora_dropout" not in flags and defaults["lora_dropout"] == recipe.LORA_DROPOUT
    assert "--warmup_steps" not in flags and defaults["warmup_steps"] == recipe.WARMUP_STEPS
    assert "--logging_steps" not in flags and defaults["logging_steps"] == recipe.LOGGING_STEPS


# ---- runs and command lines -----------------------------------------------------------------------
def test_runs_parse_to_the_seed_settings():
    base, lora, dora16, dora32, dora32_slow, ft = parse_runs("base, lora_r32,dora_r16,dora_r32_lr2e-4,dora_r32,ft")
    assert (base.name, base.adapter, base.r, base.learning_rate, base.seed) == ("base", None, None, None, None)
    assert (lora.name, lora.adapter, lora.r, lora.alpha, lora.learning_rate, lora.seed) == (
        "lora_r32_lr3e-4_s42", "lora", 32, 64, 3e-4, 42)
    assert (dora16.name, dora16.alpha, dora16.learning_rate) == ("dora_r16_lr2e-4_s42", 32, 2e-4)
    assert (dora32.name, dora32.alpha, dora32.learning_rate) == ("dora_r32_lr2e-4_s42", 64, 2e-4)
    # Without _lr, the seed's rule: the LLaMA-7B rank table trains DoRA r32 at 1e-4.
    assert (dora32_slow.name, dora32_slow.learning_rate) == ("dora_r32_lr1e-4_s42", 1e-4)
    assert (ft.name, ft.adapter, ft.r, ft.alpha, ft.learning_rate) == ("ft_lr2e-5_s42", "ft", None, None, 2e-5)
    assert [s.label("smollm2-135m") for s in (base, lora, dora16, ft)] == [
        "SmolLM2-135M (base)", "SmolLM2-135M-LoRA", "SmolLM2-135M-DoRA", "SmolLM2-135M-FT"]
    assert lora.label("yahma/llama-7b-hf") == "LLaMA-7B-LoRA" and lora.label("/m/tiny") == "tiny-LoRA"
    assert [s.name for s in parse_runs("base,dora_r8", seeds=[0, 1])] == ["base", "dora_r8_lr2e-4_s0",
                                                                        "dora_r8_lr2e-4_s1"]


@pytest.mark.parametrize("text,message", [("", "empty"), ("base,base", "twice"), ("lora32", "unknown run"),
                                          ("dora_r0", "unknown run"), ("qlora_r8", "unknown run"),
                                          ("ft_r8", "unknown run"), ("dora_r8_lr0", "must be positive"),
                                          ("dora_r32,dora_r32_lr1e-4", "twice")])
def test_bad_runs(text, message):
    with pytest.raises(ReproductionError, match=message):
        parse_runs(text)


def flag_dict(args: list) -> dict:
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return dict(zip(args[::2], args[1::2]))


@pytest.mark.parametrize("name,adapter,r,alpha,lr", [("lora_r32", "lora", "32", "64", "3e-4"),
                                                     ("dora_r16", "dora", "16", "32", "2e-4"),
                                                     ("dora_r32_lr2e-4", "dora", "32", "64", "2e-4"),
                                                     ("dora_r32", "dora", "32", "64", "1e-4")])
def test_finetune_command_has_the_seed_flags(tmp_path, name, adapter, r, alpha, lr):
    from commonsense.training import TRAIN_FLAGS

    (spec,) = parse_runs(name)
    settings = subset_settings(tmp_path, 384, 42)
    flags = flag_dict(finetune_args(spec, settings, tmp_path / "d.json", tmp_path / "a", total_steps=24))
    assert json.loads(flags.pop("--target_modules")) == TARGET_MODULES == ["q_proj", "k_proj", "v_proj", "up_proj",
                                                                         "down_proj"]
    assert flags == {
        "--base_model": "smollm2-135m", "--data_path": str(tmp_path / "d.json"), "--output_dir": str(tmp_path / "a"),
        "--adapter_name": adapter, "--lora_r": r, "--lora_alpha": alpha, "--learning_rate": lr,
        "--batch_size": "16", "--micro_batch_size": "4", "--num_epochs": "1", "--cutoff_len": "256",
        "--lora_dropout": "0.05", "--seed": "42", "--val_set_size": "0", "--eval_step": "80", "--save_step": "10",
        "--warmup_steps": "1", "--logging_steps": "1", "--resume_from_checkpoint": "auto",
    }
    assert all(flag[2:] in TRAIN_FLAGS for flag in flags)  # finetune.py (fire) accepts every one

    full = Settings(**{**settings.__dict__, "full": True, "train_rows": None})
    full_args = finetune_args(spec, full, "mix.json", "a", total_steps=10_644)
    assert full_args[-1] == "--use_gradient_checkpointing"  # as the seed's scripts
    full_flags = flag_dict(full_args[:-1])
    assert (full_flags["--val_set_size"], full_flags["--warmup_steps"], full_flags["--eval_step"],
            full_flags["--save_step"], full_flags["--logging_steps"]) == ("120", "100", "80", "80", "10")
    # Over 8 GPUs the accumulation (16 / 4 = 4) cannot split: the micro batch drops to 2, the global batch stays.
    ddp = flag_dict(finetune_args(spec, settings, "d.json", "a", total_steps=24, processes=8))
    assert (ddp["--micro_batch_size"], ddp["--batch_size"]) == ("2", "16")


def test_ft_command_trains_every_linear_and_evaluates_as_its_own_base(tmp_path):
    import commonsense_evaluate
    from commonsense.training import TRAIN_FLAGS

    (ft,) = parse_runs("ft", seeds=[3])
    settings = subset_settings(tmp_path, 384, 42)
    flags = flag_dict(finetune_args(ft, settings, tmp_path / "d.json", tmp_path / "a", total_steps=24))
    assert flags["--adapter_name"] == "ft" and flags["--learning_rate"] == "2e-5" and flags["--seed"] == "3"
    assert not {"--lora_r", "--lora_alpha", "--target_modules"} & set(flags)
    assert all(flag[2:] in TRAIN_FLAGS for flag in flags)
    args = commonsense_evaluate.parse_args(evaluate_args(ft, settings, "loglik", ["piqa"], tmp_path / ft.name, 8))
    assert (args.adapter, args.base_model, args.lora_weights) == ("FT", str(tmp_path / ft.name / "adapter"), None)


def test_evaluation_commands_parse_with_the_evaluation_cli(tmp_path):
    import commonsense_evaluate

    base, dora = parse_runs("base,dora_r16")
    settings = subset_settings(tmp_path, 384, 42)
    llama = Settings(**{**settings.__dict__, "base_model": "yahma/llama-7b-hf"})
    assert commonsense_evaluate.parse_args(evaluate_args(dora, llama, "loglik", ["piqa"], tmp_path, 8)).model == "LLaMA-7B"
    run_dir = tmp_path / "dora_r16"
    args = commonsense_evaluate.parse_args(evaluate_args(dora, settings, "loglik", TASK_NAMES, run_dir, 8))
    assert (args.adapter, args.lora_weights, args.mode, args.limit, args.dataset) == (
        "DoRA", str(run_dir / "adapter"), "loglik", 150, ",".join(TASK_NAMES))
    assert (args.model, args.base_model, args.output_dir) == ("SmolLM2-135M", "smollm2-135m", str(run_dir / "eval"))
    args = commonsense_evaluate.parse_args(evaluate_args(base, settings, "generate", ["piqa"], run_dir, 8))
    assert (args.adapter, args.lora_weights, args.mode, args.limit) == ("none", None, "generate", 25)
    full = Settings(**{**settings.__dict__, "full": True, "train_rows": None, "eval_limit_generate": None,
                       "eval_limit_loglik": None})
    assert commonsense_evaluate.parse_args(evaluate_args(base, full, "generate", ["piqa"], run_dir, 8)).limit is None


# ---- the report -------------------------------------------------------------------------------------
def flags_for(correct: int, n: int, rng) -> str:
    flags = ["1"] * correct + ["0"] * (n - correct)
    rng.shuffle(flags)
    return "".join(flags)


def synthetic_run(spec: RunSpec, rng, n_by_mode, trained=True) -> dict:
    summary = {"run": spec.name, "method": spec.method, "adapter": spec.adapter, "r": spec.r, "alpha": spec.alpha,
               "learning_rate": spec.learning_rate, "seed": spec.seed, "model_label": spec.label("smollm2-135m"),
               "eval": {}}
    for mode, n in n_by_mode.items():
        corrects = rng.sample(range(n + 1), 8)  # distinct per task: a swapped column cannot go unnoticed
        summary["eval"][mode] = {
            "wall_s": rng.uniform(10, 500), "max_rss_bytes": rng.randint(2**29, 2**32), "cuda_peak_bytes": None,
            "resumed": False,
            "tasks": {task: {"correct": c, "n": n, "accuracy": c / n, "flags": flags_for(c, n, rng)}
                      for task, c in zip(TASK_NAMES, corrects)}}
    if trained:
        summary["train"] = {"global_step": 24, "warmup_steps": 1, "wall_s": rng.uniform(100, 900),
                            "max_rss_bytes": rng.randint(2**30, 2**32), "cuda_peak_bytes": None, "resumed": False,
                            "loss": [[step, 3 / step] for step in range(1, 25)]}
    return summary


def synthetic_collected(rng, specs, modes=("generate", "loglik")) -> dict:
    n_by_mode = {mode: {"generate": 25, "loglik": 150}[mode] for mode in modes}
    settings = Settings(base_model="smollm2-135m", source_dir="/data", full=False, train_rows=384, num_epochs=1,
                        eval_limit_generate=25, eval_limit_loglik=150, data_seed=42, micro_batch_size=4)
    data = {"rows": 384, "mix_rows": 170_420, "per_task": {t: 48 for t in TASK_NAMES},
            "mix_per_task": {t: 21_302 for t in TASK_NAMES}, "hellaswag_train_is_approximate": True}
    machine = {"cpu": "Test CPU", "cpu_cores": 2, "gpu": None, "torch": "2.x", "transformers": "5.x", "python": "3.11"}
    runs = [synthetic_run(spec, rng, n_by_mode, trained=spec.adapter is not None) for spec in specs]
    return report.collect(settings, data, runs, machine, "bash reproduce_smollm2.sh", {"modes": list(modes)})


def tables(markdown: str) -> list:
    """Every markdown table as (header, rows), rows as dicts keyed by the header."""
    found, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif block:
            header, rows = block[0], block[2:]
            assert all(len(row) == len(header) for row in rows), block
            found.append((header, [dict(zip(header, row)) for row in rows]))
            block = []
    return found


def test_report_shows_each_run_with_its_interval_and_the_papers_rank_table():
    rng = random.Random()
    specs = parse_runs("base,lora_r32,dora_r16,dora_r32_lr2e-4")
    collected = synthetic_collected(rng, specs)
    markdown = render_markdown(collected)
    per_run = [t for t in tables(markdown) if t[0][0] == "Run" and "95% CI" in t[0]]
    assert len(per_run) == 2  # generate, then loglik
    for (header, rows), mode in zip(per_run, ["generate", "loglik"]):
        assert header == ["Run", *COLUMNS, "Average", "95% CI", "n"]
        assert [row["Run"] for row in rows] == ["base", "lora_r32_lr3e-4_s42", "dora_r16_lr2e-4_s42",
                                                "dora_r32_lr2e-4_s42"]
        for row, run in zip(rows, collected["runs"]):
            tasks = run["eval"][mode]["tasks"]
            for column, task in zip(COLUMNS, TASK_NAMES):
                assert row[column] == f"{100 * tasks[task]['accuracy']:.1f}", (mode, run["run"], column)
            mean, low, high = macro_average_ci([(tasks[t]["correct"], tasks[t]["n"]) for t in TASK_NAMES])
            assert row["Average"] == f"{100 * mean:.1f}"
            assert row["95% CI"] == f"[{100 * low:.1f}, {100 * high:.1f}]"
            assert row["n"] == str(8 * tasks["boolq"]["n"])

    ranked = [t for t in tables(markdown) if t[0][:3] == ["Model", "r", "lr"]]
    assert len(ranked) == 2 and all(header == SEED_LAYOUT + ["seeds"] for header, _ in ranked)
    rows = ranked[0][1]
    assert [(row["Model"], row["r"], row["lr"], row["seeds"]) for row in rows[:4]] == [
        ("SmolLM2-135M (base)", "–", "–", "–"), ("SmolLM2-135M-LoRA", "32", "3e-4", "1"),
        ("SmolLM2-135M-DoRA", "16", "2e-4", "1"), ("SmolLM2-135M-DoRA", "32", "2e-4", "1")]
    readme = [row for row in rows if row["Model"].endswith("(README)")]
    assert [(row["Model"], row["r"]) for row in readme] == [("LLaMA-7B-LoRA (README)", r) for r in "4 8 16 32 64".split()] \
        + [("LLaMA-7B-DoRA (README)", r) for r in "4 8 16 32 64".split()]
    lora32 = readme[3]
    assert [lora32[c] for c in COLUMNS + ["Average"]] == ["67.5", "80.8", "78.2", "83.4", "80.4", "78.0", "62.6",
                                                          "79.1", "76.3"]
    assert (readme[8]["lr"], readme[8]["Average"]) == ("1e-4", "78.4")
    table15 = [row for row in rows if "Table 15" in row["Model"]]
    assert [(row["Model"], row["r"], row["Average"], row["BoolQ"]) for row in table15] == [
        ("LLaMA-7B-LoRA (paper, Table 15)", "32", "74.7", "–"), ("LLaMA-7B-DoRA (paper, Table 15)", "64", "72.1", "–")]
    assert "per-task values are not available here" in markdown

    # Costs: a fine-tune row per trained run, two evaluation rows per run.
    (costs,) = [rows for header, rows in tables(markdown) if header[:2] == ["Run", "Step"]]
    assert [(row["Run"], row["Step"]) for row in costs][:5] == [
        ("base", "evaluate (generate)"), ("base", "evaluate (loglik)"), ("lora_r32_lr3e-4_s42", "fine-tune"),
        ("lora_r32_lr3e-4_s42", "evaluate (generate)"), ("lora_r32_lr3e-4_s42", "evaluate (loglik)")]
    assert len(costs) == 11 and all(row["Wall time"] != "–" and row["Peak RSS"].endswith("GiB") for row in costs)
    assert "approximate rebuild" in markdown and "384" in markdown and "data seed 42" in markdown
    assert "reproduction_loss.png" in markdown and "reproduction_rank.png" in markdown


def test_paper_rows_averages_match_their_tasks():
    from commonsense.reproduce.paper import LLAMA7B_RANK_ROWS, TABLE15_AVERAGES

    assert len(LLAMA7B_RANK_ROWS) == 10
    for method, r, lr, values, average in LLAMA7B_RANK_ROWS:
        assert len(values) == 8
        assert abs(sum(values) / 8 - average) < 0.1, (method, r)  # the README rounds the tasks and the mean
    readme = {(m, r): average for m, r, _, _, average in LLAMA7B_RANK_ROWS}
    assert all(readme[key] == theirs for key, (_, theirs) in TABLE15_AVERAGES.items())


def test_report_files_are_written_and_rebuilt_from_the_json(tmp_path):
    collected = synthetic_collected(random.Random(), parse_runs("base,dora_r16,lora_r16", seeds=[0, 1]))
    paths = report.write_report(collected, tmp_path)
    for png in ("png", "rank_png"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[png].stat().st_size > 5000
    markdown = paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(collected))
    paths["markdown"].unlink()
    report.rebuild_report(tmp_path)
    assert paths["markdown"].read_text() == markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reproduction.json", "reproduction.md",
                                                          "reproduction_loss.png", "reproduction_rank.png"]


# ---- child processes ----------------------------------------------------------------------------------
def test_run_measured_reports_the_childs_own_peak_memory_and_status(tmp_path):
    script = tmp_path / "child.py"
    megabytes = random.randint(300, 400)
    script.write_text(f"import sys\nblock = bytearray({megabytes} * 2**20)\nblock[::4096] = b'x' * len(block[::4096])\n"
                      "print('child says', sys.argv[1:])\nsys.exit(int(sys.argv[1]))\n")
    log, peaks = tmp_path / "logs" / "child.log", tmp_path / "peaks.json"
    ballast = bytearray(300 * 2**20)  # this process is big too: a child must not report our size
    ballast[::4096] = b"y" * len(ballast[::4096])
    result = measured.run_measured(measured.measured_command(peaks, str(script), ["3"]), log, peaks, echo=False)
    assert result["returncode"] == 3 and result["wall_s"] >= 0 and result["cuda_peak_bytes"] is None
    assert megabytes * 2**20 <= result["max_rss_bytes"] < (megabytes + 150) * 2**20
    text = log.read_text()
    assert text.startswith("$ ") and "child says ['3']" in text
    script.write_text("print('small')\n")
    small = measured.run_measured(measured.measured_command(peaks, str(script), []), log, peaks, echo=False)
    assert small["returncode"] == 0 and small["max_rss_bytes"] < 150 * 2**20
    assert log.read_text().count("$ ") == 2  # appended
    del ballast


def test_measure_runs_a_script_as_main_and_keeps_its_exit_status(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text("import sys\nif __name__ == '__main__':\n    print('argv', sys.argv)\n    sys.exit(5)\n")
    peak = tmp_path / "peak.json"
    result = subprocess.run(measured.measured_command(peak, str(script), ["--flag", "x y"]), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 5
    assert f"argv ['{script}', '--flag', 'x y']" in result.stdout
    peaks = json.loads(peak.read_text())
    assert peaks["cuda_peak_bytes"] is None and 5 * 2**20 < peaks["peak_rss_bytes"] < 500 * 2**20


# ---- the command line ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--train_rows", "0"], "--train_rows must be a positive integer"),
    (["--eval_limit_loglik", "-3"], "--eval_limit_loglik must be a positive integer"),
    (["--num_epochs", "0"], "--num_epochs must be positive"),
    (["--micro_batch_size", "3"], "must divide the global batch 16"),
    (["--runs", "lora"], "unknown run 'lora'"),
    (["--train_rows", "many"], "invalid int value"),
])
def test_argument_errors_are_one_line(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + ["--output_dir", str(tmp_path / "out"), "--report_dir", str(tmp_path / "report")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()


def test_missing_data_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    import commonsense.data

    monkeypatch.setattr(commonsense.data, "SHARED_SOURCE_DIR", tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--output_dir", str(tmp_path / "out"), "--report_dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "--source_dir DIR" in err and "train.json" in err
    with pytest.raises(SystemExit):
        cli.main(["--source_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])
    assert "--source_dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fresh_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    source = write_source(tmp_path / "source", {task: 4 for task in TASK_NAMES})
    with pytest.raises(SystemExit):
        cli.main(["--fresh", "--output_dir", str(precious), "--source_dir", str(source)])
    assert "not a reproduction output folder" in capsys.readouterr().err
    assert (precious / "keep.txt").exists()


def test_report_only_without_a_report(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--report_only", "--report_dir", str(tmp_path)])
    assert "reproduction.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "does not hold a reproduction record"),
    ('{"runs": []}', "lacks command, settings, data, machine, seed_total_steps, grid, settings.base_model"),
])
def test_report_only_on_a_file_it_cannot_render(tmp_path, capsys, content, message):
    (tmp_path / "reproduction.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--report_only", "--report_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_report_only_on_the_committed_pre_grid_record_is_one_line(tmp_path):
    """experiment/reproduction.json predates the grid: refused with what it lacks, not a KeyError."""
    shutil.copy(REPO_ROOT / "experiment" / "reproduction.json", tmp_path / "reproduction.json")
    result = subprocess.run([sys.executable, "-m", "commonsense.reproduce", "--report_only", "--report_dir", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "lacks grid" in result.stderr and "rerun the comparison" in result.stderr


def test_the_module_cli_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "commonsense.reproduce", "--eval_limit_generate", "0"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr


# ---- end to end on a tiny model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_whole_comparison_on_a_tiny_model_then_a_rerun_skips_everything(tmp_path):
    from tiny_models import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny")
    source = write_source(tmp_path / "source", {task: 12 for task in TASK_NAMES})
    out, report = tmp_path / "runs", tmp_path / "report"
    command = [sys.executable, "-m", "commonsense.reproduce", "--base_model", str(tiny), "--source_dir", str(source),
               "--runs", "base,dora_r4", "--train_rows", "16", "--eval_limit_generate", "1",
               "--eval_limit_loglik", "2", "--output_dir", str(out), "--report_dir", str(report)]
    # From another folder, as the wrapper script runs it (the repository on PYTHONPATH).
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    collected = json.loads((report / "reproduction.json").read_text())
    base, dora = collected["runs"]
    assert dora["train"]["global_step"] == 1 and dora["train"]["warmup_steps"] == 1
    assert dora["train"]["loss"] and dora["train"]["max_rss_bytes"] > 100 * 2**20
    run_dir = out / "dora_r4_lr2e-4_s42"
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "DORA"
    assert not list((run_dir / "adapter").glob("checkpoint-*"))
    for run in (base, dora):
        assert {t: r["n"] for t, r in run["eval"]["generate"]["tasks"].items()} == {t: 1 for t in TASK_NAMES}
        assert {t: r["n"] for t, r in run["eval"]["loglik"]["tasks"].items()} == {t: 2 for t in TASK_NAMES}
    markdown = (report / "reproduction.md").read_text()
    assert "| tiny-DoRA | 4 | 2e-4 |" in markdown

    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipping") == 5  # one training, four evaluations
    assert json.loads((report / "reproduction.json").read_text())["runs"] == collected["runs"]

    changed = subprocess.run(command + ["--train_rows", "32"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env=env)
    assert changed.returncode == 2 and re.search(r"train_rows 16 -> 32", changed.stderr)
