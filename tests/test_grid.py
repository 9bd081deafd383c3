"""The grid (commonsense.reproduce.grid, scheduler, rank_table): the runs a grid makes, the queue over
(simulated) GPUs with retries and reruns, the summaries over seeds, bad input; and one real tiny grid.

Several GPUs are simulated on a CPU: the GPU count is replaced, so the workers run in parallel
with CUDA_VISIBLE_DEVICES set, which a CPU-only torch ignores.
"""
import json
import os
import random
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from commonsense.reproduce import cli, scheduler
from commonsense.reproduce.grid import estimate_seconds, grid_jobs, grid_runs, plan_text
from commonsense.reproduce.plan import ReproductionError, Settings, parse_runs
from commonsense.reproduce.rank_table import mean_std, mean_std_cell, paired_rows, rank_rows
from commonsense.reproduce.runner import check_or_record_settings
from commonsense.reproduce.scheduler import GridRecord, Job, JobFailed, Scheduler, Slot
from commonsense.tasks import TASK_NAMES

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reproduce import synthetic_run, tables, write_source  # noqa: E402


def settings(**changes) -> Settings:
    values = dict(base_model="smollm2-135m", source_dir="/data", full=False, train_rows=100, num_epochs=1,
                  eval_limit_generate=3, eval_limit_loglik=5, data_seed=42, micro_batch_size=4)
    return Settings(**{**values, **changes})


# ---- the runs of a grid ------------------------------------------------------------------------
def test_grid_runs_take_the_seeds_lr_rule_per_method_and_rank():
    runs = grid_runs(["lora", "dora", "base"], [4, 32], [0, 1])
    assert [run.name for run in runs] == [
        "lora_r4_lr3e-4_s0", "lora_r4_lr3e-4_s1", "lora_r32_lr3e-4_s0", "lora_r32_lr3e-4_s1",
        "dora_r4_lr2e-4_s0", "dora_r4_lr2e-4_s1", "dora_r32_lr1e-4_s0", "dora_r32_lr1e-4_s1", "base"]
    assert [(run.r, run.alpha, run.seed) for run in runs[4:6]] == [(4, 8, 0), (4, 8, 1)]


def test_grid_lrs_apply_to_every_trained_method_and_ft_has_no_rank():
    runs = grid_runs(["ft", "dora"], [8], [5], lrs=[1e-4, 5e-5])
    assert [run.name for run in runs] == ["ft_lr1e-4_s5", "ft_lr5e-5_s5", "dora_r8_lr1e-4_s5", "dora_r8_lr5e-5_s5"]
    assert runs[0].r is None and runs[0].alpha is None


def test_jobs_evaluate_each_run_after_its_training():
    runs = grid_runs(["base", "dora"], [4], [0])
    jobs = grid_jobs(runs, ["generate", "loglik"])
    assert [(job.key, job.after) for job in jobs] == [
        ("train dora_r4_lr2e-4_s0", ()), ("eval generate base", ()), ("eval loglik base", ()),
        ("eval generate dora_r4_lr2e-4_s0", ("train dora_r4_lr2e-4_s0",)),
        ("eval loglik dora_r4_lr2e-4_s0", ("train dora_r4_lr2e-4_s0",))]


def test_steps_examples_and_the_estimate_by_hand():
    s = settings(train_rows=100)
    assert s.total_steps(100) == 7  # 25 micro batches of 4, 4 per step: 6 full + 1 partial
    assert settings(full=True, train_rows=None).total_steps(1_000) == 55  # 880 rows (120 held out) / 16
    runs = grid_runs(["lora", "dora", "base"], [4, 16], [0, 1])  # 8 trained + base
    timing = {"step_s": 2.0, "loglik_example_s": 0.5, "generate_example_s": 3.0, "device": "test", "rank": 16,
              "length": 100}
    eval_counts = {"loglik": 40, "generate": 24}
    # 8 runs x 7 steps x 2 s / 2 slots; (9 x 40 x 0.5 + 9 x 24 x 3) / (2 slots x 2 GPUs)
    got = estimate_seconds(runs, ["loglik", "generate"], 7, eval_counts, timing, slots=2, gpus_per_run=2)
    assert got["train_s"] == pytest.approx(8 * 7 * 2 / 2 / 2)
    assert got["eval_s"] == pytest.approx((9 * 40 * 0.5 + 9 * 24 * 3) / 4)
    text = plan_text(runs, ["loglik"], s, 100, {t: 3 if t == "boolq" else 50 for t in TASK_NAMES}, gpus=[0, 1, 2, 3],
                     gpus_per_run=2, timing=timing)
    assert "9 run(s), 8 to train, 9 evaluation(s) (loglik)" in text
    assert "7 optimizer steps per run" in text and "38 examples per loglik evaluation" in text  # 3 + 7 x 5
    assert "Totals: 56 optimizer steps, 342 evaluated examples." in text
    assert "2 training slot(s) of 2 GPU(s)" in text and "an estimate" in text
    run_lines = [line for line in text.splitlines() if line.startswith(("lora_", "dora_", "base "))]
    assert len(run_lines) == 9 and run_lines[-1].split()[:2] == ["base", "base"]


def test_dry_run_prints_the_plan_without_touching_anything(tmp_path, capsys):
    source = write_source(tmp_path / "source", {task: 4 for task in TASK_NAMES})
    out = tmp_path / "out"
    code = cli.main(["--methods", "dora", "ft", "base", "--ranks", "4", "16", "--seeds", "0", "1", "--modes", "loglik",
                     "--train_rows", "20", "--eval_limit_loglik", "2", "--source_dir", str(source),
                     "--output_dir", str(out), "--dry_run", "--no_measure"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "7 run(s), 6 to train, 7 evaluation(s) (loglik)" in text and "16 examples per loglik evaluation" in text
    assert "ft_lr2e-5_s1" in text and "FT has no rank: one run per lr and seed." in text
    assert "not measured (--no_measure)" in text


def test_the_default_preset_repeats_the_recorded_comparisons_commands():
    """reproduce_smollm2.sh (no options) is a preset of the grid: experiment/reproduction.json's commands again."""
    from commonsense.reproduce.plan import evaluate_args, finetune_args

    recorded = json.loads((REPO_ROOT / "experiment" / "reproduction.json").read_text())
    args = cli.parse_args([])
    specs = cli.runs_from_args(args)
    assert [spec.name for spec in specs] == ["base", "lora_r32_lr3e-4_s42", "dora_r16_lr2e-4_s42", "dora_r32_lr2e-4_s42"]
    was = dict(recorded["settings"])
    was["data_seed"] = was.pop("seed")  # then one seed for the data and the runs
    ours = cli.settings_from_args(args, Path(was["source_dir"]))
    assert ours == Settings(**was)
    runs = Path("experiment/reproduction_runs")
    for spec, run in zip(specs, recorded["runs"]):
        assert (spec.method, spec.r, spec.learning_rate) == (run["adapter"] or "base", run["r"], run["learning_rate"])
        run_dir = runs / run["run"]  # the recorded folder names: the grid names its folders in full now
        if spec.adapter:
            command = finetune_args(spec, ours, runs / "data" / "train_subset_256_seed42.json", run_dir / "adapter",
                                    ours.total_steps(recorded["data"]["rows"]))
            assert ["python", "finetune.py", *command] == run["train"]["command"]
        for mode in ("generate", "loglik"):
            command = evaluate_args(spec, ours, mode, TASK_NAMES, run_dir, 8)
            # Recorded when the evaluation stopped at EOS by default; it takes --eos_stop for that now.
            assert [word for word in command if word != "--eos_stop"] == run["eval"][mode]["command"][2:]
            assert ("--eos_stop" in command) == (mode == "generate")


def test_padded_length_is_the_mean_longest_row_of_a_micro_batch_rounded_to_8():
    from commonsense.reproduce.estimate import padded_length

    def tokenizer(text):  # a stub: "n=37" in the instruction makes a 37-token prompt
        return {"input_ids": [0] * int(text.split("n=")[1].split()[0])}

    rows = [{"instruction": f"n={n} ", "input": "", "output": "x"} for n in (37, 5, 20)]
    assert padded_length(tokenizer, rows, micro_batch_size=3) == 40  # 37 + EOS -> 38 -> 40
    assert padded_length(tokenizer, rows[:1] * 3 + [{"instruction": "n=400 ", "input": "", "output": "x"}], 4) == 256


@pytest.mark.slow
def test_the_estimates_measurement_runs_on_a_tiny_model(tmp_path, monkeypatch):
    from tiny_models import build_tiny_llama

    from commonsense.reproduce import estimate

    tiny = build_tiny_llama(tmp_path / "tiny")
    short = [{"instruction": f"Question {i}? Answer1: yes Answer2: no Answer format: answer1/answer2"} for i in range(3)]
    monkeypatch.setattr(estimate, "read_test_set", lambda task, dataset_dir=None: short)
    rows = [{"instruction": "word " * 20, "input": "", "output": "the correct answer is true"}] * 8
    timing = estimate.measure_timing(str(tiny), ["loglik", "generate"], 2, 2, rows)
    assert timing["step_s"] > 0 and timing["loglik_example_s"] > 0 and timing["generate_example_s"] > 0
    assert timing["rank"] == 16 and timing["device"].startswith("the CPU") and 100 < timing["length"] <= 256


# ---- the summaries over seeds -----------------------------------------------------------------
def test_mean_and_sample_std_by_hand():
    mean, std = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414213562)  # sqrt(((-.1)^2 + .1^2) / 1)
    assert mean_std_cell(mean, std) == "60.0 ± 14.1"
    assert mean_std([0.6]) == (0.6, None) and mean_std_cell(0.6, None) == "60.0"
    mean, std = mean_std([0.2, 0.4, 0.9])  # mean .5; deviations -.3 -.1 .4; sum of squares .26; / 2
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.36055513)


def runs_with_accuracies(spec_names, accuracies: dict, n=10, seeds=(0, 1)) -> list:
    """Synthetic summaries whose loglik accuracies are `accuracies[run name][task index]`."""
    rng = random.Random(1)
    runs = []
    for spec in parse_runs(spec_names, seeds=seeds):
        run = synthetic_run(spec, rng, {"loglik": n}, trained=spec.adapter is not None)
        for task, accuracy in zip(TASK_NAMES, accuracies[spec.name]):
            c = round(accuracy * n)
            run["eval"]["loglik"]["tasks"][task] = {"correct": c, "n": n, "accuracy": c / n,
                                                    "flags": "1" * c + "0" * (n - c)}
        runs.append(run)
    return runs


def test_rank_rows_mean_and_std_over_seeds_by_hand():
    accuracies = {"dora_r4_lr2e-4_s0": [0.5] * 8, "dora_r4_lr2e-4_s1": [0.7] * 7 + [0.3],
                  "lora_r4_lr3e-4_s0": [0.1] * 8, "lora_r4_lr3e-4_s1": [0.2] * 8}
    runs = runs_with_accuracies("dora_r4,lora_r4", accuracies)
    dora, lora = rank_rows(runs, "loglik")
    assert (dora["method"], dora["r"], dora["seeds"]) == ("dora", 4, [0, 1])
    assert dora["tasks"]["boolq"]["mean"] == pytest.approx(0.6)
    assert dora["tasks"]["boolq"]["std"] == pytest.approx(0.1414213562)
    assert dora["tasks"]["openbookqa"]["std"] == pytest.approx(0.1414213562)  # .5 and .3
    # Per-seed averages .5 and (7 x .7 + .3) / 8 = .65: mean .575, std .15 / sqrt 2.
    assert dora["average"]["per_seed"] == pytest.approx([0.5, 0.65])
    assert (dora["average"]["mean"], dora["average"]["std"]) == pytest.approx((0.575, 0.1060660172))

    # Paired DoRA - LoRA, same seed: seed 0 = .5 - .1 = .4, seed 1 = .65 - .2 = .45.
    (paired,) = paired_rows(runs, "loglik")
    assert (paired["r"], [p["seed"] for p in paired["seeds"]]) == (4, [0, 1])
    assert [p["difference"] for p in paired["seeds"]] == pytest.approx([0.4, 0.45])
    assert paired["mean"] == pytest.approx(0.425) and paired["std"] == pytest.approx(0.0353553391)


def test_rank_table_cells_in_the_report():
    from commonsense.reproduce import report

    accuracies = {"dora_r4_lr2e-4_s0": [0.5] * 8, "dora_r4_lr2e-4_s1": [0.7] * 8}
    runs = runs_with_accuracies("dora_r4", accuracies)
    collected = report.collect(settings(), {"rows": 100, "mix_rows": 1000, "per_task": {}, "mix_per_task": {}},
                               runs, {"cpu": "x", "cpu_cores": 2, "gpu": None, "torch": "t", "transformers": "t",
                                      "python": "3"}, "cmd", {"modes": ["loglik"]})
    markdown = report.render_markdown(collected)
    (header, rows), = [t for t in tables(markdown) if t[0][:3] == ["Model", "r", "lr"]]
    assert rows[0]["BoolQ"] == rows[0]["Average"] == "60.0 ± 14.1" and rows[0]["seeds"] == "2"
    assert "generate" not in [h for h, _ in tables(markdown)]  # a loglik-only grid has no generate section
    assert "## Results: log-likelihood" in markdown and "## Results: the original" not in markdown


# ---- the queue ------------------------------------------------------------------------------------
def sleeper(tmp_path, name, seconds=0.3, exit_code=0):
    """A job body: a child process that records the CUDA_VISIBLE_DEVICES it got, sleeps and exits."""
    def run(slot: Slot):
        seen = tmp_path / f"{name}.env"
        code = ("import os, sys, time; open(sys.argv[1], 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-')); "
                f"time.sleep({seconds}); sys.exit({exit_code})")
        result = subprocess.run([sys.executable, "-c", code, str(seen)], env={**os.environ, **slot.env()})
        if result.returncode:
            raise JobFailed(f"{name} exited {result.returncode}", result.returncode)
    return run


def fake_grid(tmp_path, runs=4, modes=("generate", "loglik"), seconds=0.3) -> list:
    jobs = []
    for i in range(runs):
        jobs.append(Job(f"train r{i}", "train", sleeper(tmp_path, f"train-r{i}", seconds), info={"run": f"r{i}"}))
        jobs += [Job(f"eval {mode} r{i}", "eval", sleeper(tmp_path, f"eval-{mode}-r{i}", seconds),
                     after=(f"train r{i}",), info={"run": f"r{i}", "mode": mode}) for mode in modes]
    return jobs


def intervals(record_path: Path) -> list:
    attempts = json.loads(record_path.read_text())["attempts"]
    return [(a["job"], a["slot"], datetime.fromisoformat(a["start_utc"]), datetime.fromisoformat(a["end_utc"]), a)
            for a in attempts]


def test_jobs_run_in_parallel_one_per_gpu_and_evaluations_wait_for_their_training(tmp_path):
    record_path = tmp_path / "grid_record.json"
    status = Scheduler(fake_grid(tmp_path), GridRecord(record_path), gpus=[0, 1, 2, 3], say=lambda line: None).run()
    assert set(status.values()) == {"done"} and len(status) == 12
    spans = intervals(record_path)
    assert len(spans) == 12 and all(a["returncode"] == 0 and a["attempt"] == 1 and a["host"] for *_, a in spans)
    # Each GPU runs one job at a time ...
    for gpu in range(4):
        mine = sorted((start, end) for _, slot, start, end, _ in spans if slot == f"gpu {gpu}")
        assert all(end <= next_start for (_, end), (next_start, _) in zip(mine, mine[1:])), gpu
    # ... and the GPUs work at once: some jobs overlap in time.
    overlapping = sum(1 for i, (_, _, s1, e1, _) in enumerate(spans) for (_, _, s2, e2, _) in spans[i + 1:]
                      if s1 < e2 and s2 < e1)
    assert overlapping >= 3
    ends = {job: end for job, _, _, end, _ in spans}
    for job, _, start, _, _ in spans:
        if job.startswith("eval"):
            assert start >= ends[f"train {job.split()[-1]}"], job
    # The child saw its own GPU.
    for job, slot, *_ in spans:
        name = job.replace(" ", "-") if job.startswith("train") else "eval-{}-{}".format(*job.split()[1:])
        assert (tmp_path / f"{name}.env").read_text() == slot.split()[-1]


def test_trainings_take_a_whole_group_and_evaluations_one_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    record_path = tmp_path / "grid_record.json"
    Scheduler(fake_grid(tmp_path, runs=3, modes=("loglik",), seconds=0.2), GridRecord(record_path),
              gpus=[0, 1, 2, 3], gpus_per_run=2, say=lambda line: None).run()
    spans = intervals(record_path)
    assert {slot for job, slot, *_ in spans if job.startswith("train")} <= {"gpus 0,1", "gpus 2,3"}
    assert {slot for job, slot, *_ in spans if job.startswith("eval")} <= {f"gpu {i}" for i in range(4)}
    assert (tmp_path / "train-r0.env").read_text() in ("0,1", "2,3")
    busy = []  # no GPU is in two jobs at once
    for job, slot, start, end, _ in spans:
        for gpu in slot.split()[-1].split(","):
            busy.append((gpu, start, end))
    for i, (gpu, s1, e1) in enumerate(busy):
        assert not any(gpu == g and s1 < e2 and s2 < e1 for g, s2, e2 in busy[i + 1:])


def test_a_child_sees_our_gpus_through_our_own_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert Slot((1,)).env() == {"CUDA_VISIBLE_DEVICES": "5"} and Slot((0, 2)).env() == {"CUDA_VISIBLE_DEVICES": "4,6"}
    assert Slot().env() == {} and Slot().label == "cpu"


def test_a_crash_is_retried_once_then_reported_and_the_grid_goes_on(tmp_path):
    flaky_marker = tmp_path / "flaky-failed-once"

    def flaky(slot):
        if not flaky_marker.exists():
            flaky_marker.write_text("x")
            raise RuntimeError("out of memory, once")

    jobs = fake_grid(tmp_path, runs=2, modes=("loglik",), seconds=0.05)
    jobs[0] = Job("train r0", "train", sleeper(tmp_path, "train-r0", 0.05, exit_code=3), info={"run": "r0"})
    jobs.append(Job("eval loglik flaky", "eval", flaky))
    record_path = tmp_path / "grid_record.json"
    said = []
    grid = Scheduler(jobs, GridRecord(record_path), gpus=[0, 1], say=said.append)
    status = grid.run()
    assert status == {"eval loglik flaky": "done", "train r0": "failed", "eval loglik r0": "blocked",
                      "train r1": "done", "eval loglik r1": "done"}
    attempts = [(a["job"], a["attempt"], a["returncode"]) for a in json.loads(record_path.read_text())["attempts"]]
    assert sorted(a for a in attempts if a[0] == "train r0") == [("train r0", 1, 3), ("train r0", 2, 3)]
    assert [a[1] for a in attempts if a[0] == "eval loglik flaky"] == [1, 2]
    assert not any(a[0] == "eval loglik r0" for a in attempts)
    assert grid.failures() == [("train r0", "train-r0 exited 3")]
    assert "skipping eval loglik r0: train r0 failed" in said


def test_a_rerun_skips_finished_jobs_and_appends_to_the_record(tmp_path):
    record_path = tmp_path / "grid_record.json"
    done = set()

    def job(key, kind, after=()):
        def run(slot):
            done.add(key)
        return Job(key, kind, run, finished=lambda: key in done, after=after)

    jobs = [job("train a", "train"), job("eval loglik a", "eval", ("train a",)), job("train b", "train")]
    assert set(Scheduler(jobs, GridRecord(record_path), say=lambda line: None).run().values()) == {"done"}
    assert len(json.loads(record_path.read_text())["attempts"]) == 3
    done.discard("eval loglik a")  # as if cut off
    status = Scheduler(jobs, GridRecord(record_path), say=lambda line: None).run()
    assert status == {"train a": "skipped", "train b": "skipped", "eval loglik a": "done"}
    attempts = json.loads(record_path.read_text())["attempts"]
    assert [a["job"] for a in attempts[3:]] == ["eval loglik a"] and attempts[3]["slot"] == "cpu"


def test_without_gpus_one_job_at_a_time(tmp_path):
    record_path = tmp_path / "grid_record.json"
    Scheduler(fake_grid(tmp_path, runs=2, modes=("loglik",), seconds=0.1), GridRecord(record_path),
              say=lambda line: None).run()
    spans = sorted((start, end) for _, _, start, end, _ in intervals(record_path))
    assert len(spans) == 4 and all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--methods", "lora", "qlora"], "unknown method 'qlora'"),
    (["--methods", "dora", "--ranks", "8", "0"], "--ranks must be positive integers, got 0"),
    (["--methods", "dora", "--ranks", "-4"], "--ranks must be positive integers, got -4"),
    (["--methods", "dora", "--seeds", "0", "1", "0"], "--seeds lists 0 twice"),
    (["--seeds", "1", "1"], "--seeds lists 1 twice"),
    (["--methods", "dora", "--seeds", "zero"], "invalid int value: 'zero'"),
    (["--methods", "dora", "--lrs", "1e-4", "0"], "--lrs must be positive, got 0"),
    (["--methods", "dora", "--lrs", "1e-4", "0.0001"], "--lrs lists 1e-4 twice"),
    (["--methods", "dora", "--ranks", "4", "4"], "--ranks lists 4 twice"),
    (["--ranks", "4"], "--ranks and --lrs need --methods"),
    (["--runs", "base", "--methods", "dora"], "--runs is an explicit list"),
    (["--modes", "beam"], "unknown mode 'beam'"),
    (["--gpus", "0,7"], "no GPU 7 on this machine (it has 2: ids 0-1)"),
    (["--gpus", "0,x"], "--gpus must be comma-separated GPU ids"),
    (["--gpus", "0,1", "--gpus_per_run", "3"], "--gpus_per_run 3 does not divide the 2 GPUs"),
    (["--gpus_per_run", "2"], "--gpus_per_run needs --gpus"),
    (["--no_measure"], "--no_measure goes with --dry_run"),
])
def test_bad_grid_input_is_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, "visible_gpu_count", lambda: 2)
    source = write_source(tmp_path / "source", {task: 4 for task in TASK_NAMES})
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + ["--source_dir", str(source), "--output_dir", str(tmp_path / "out"),
                         "--report_dir", str(tmp_path / "report")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()


def test_no_gpu_at_all_is_said_plainly(monkeypatch):
    monkeypatch.setattr(scheduler, "visible_gpu_count", lambda: 0)
    with pytest.raises(ReproductionError, match=r"no GPU 0 on this machine \(it has 0\)"):
        scheduler.check_gpus([0], 1)


def test_a_folder_made_with_other_settings_is_refused_but_its_grid_may_grow(tmp_path, capsys):
    source = write_source(tmp_path / "source", {task: 4 for task in TASK_NAMES})
    out = tmp_path / "out"
    common = ["--source_dir", str(source), "--output_dir", str(out), "--train_rows", "16", "--dry_run", "--no_measure"]
    check_or_record_settings(out, cli.settings_from_args(cli.parse_args(common), source.resolve()))
    assert cli.main(["--methods", "dora", "--ranks", "4", "8", "--seeds", "0", "1", "2", *common]) == 0  # more axes
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--methods", "dora", *common, "--train_rows", "32"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "holds runs made with other settings (train_rows 16 -> 32)" in err


# ---- a real tiny grid ------------------------------------------------------------------------------------
def tiny_model_on_two_simulated_gpus(tmp_path, monkeypatch) -> tuple:
    """(a tiny LLaMA folder, a training source) with this process seeing 2 GPUs."""
    from tiny_models import build_tiny_llama

    monkeypatch.setattr(scheduler, "visible_gpu_count", lambda: 2)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return build_tiny_llama(tmp_path / "tiny"), write_source(tmp_path / "source", {task: 4 for task in TASK_NAMES})


def test_the_base_model_evaluated_in_both_modes_at_once_on_two_simulated_gpus(tmp_path, monkeypatch):
    """The fast real one: two commonsense_evaluate.py children in parallel, then the report."""
    tiny, source = tiny_model_on_two_simulated_gpus(tmp_path, monkeypatch)
    out, report_dir = tmp_path / "runs", tmp_path / "report"
    assert cli.main(["--base_model", str(tiny), "--source_dir", str(source), "--methods", "base",
                     "--train_rows", "16", "--eval_limit_generate", "1", "--eval_limit_loglik", "1", "--gpus", "0,1",
                     "--output_dir", str(out), "--report_dir", str(report_dir)]) == 0
    attempts = json.loads((out / "grid_record.json").read_text())["attempts"]
    assert sorted((a["job"], a["slot"]) for a in attempts) in (
        [("eval generate base", "gpu 0"), ("eval loglik base", "gpu 1")],
        [("eval generate base", "gpu 1"), ("eval loglik base", "gpu 0")])
    summary = json.loads((out / "base" / "summary.json").read_text())
    assert set(summary["eval"]) == {"generate", "loglik"} and "train" not in summary  # both evaluations kept
    assert all(r["n"] == 1 for mode in ("generate", "loglik") for r in summary["eval"][mode]["tasks"].values())
    (row,) = json.loads((report_dir / "reproduction.json").read_text())["rank_table"]["loglik"]
    assert row["method"] == "base" and row["seeds"] == [None]


@pytest.mark.slow
def test_a_tiny_grid_over_two_simulated_gpus_then_a_rerun_skips_it(tmp_path, monkeypatch, capsys):
    """2 seeds x DoRA r4, loglik, on 2 simulated GPUs: real finetune.py and commonsense_evaluate.py children."""
    tiny, source = tiny_model_on_two_simulated_gpus(tmp_path, monkeypatch)
    out, report_dir = tmp_path / "runs", tmp_path / "report"
    args = ["--base_model", str(tiny), "--source_dir", str(source), "--methods", "dora", "--ranks", "4",
            "--seeds", "0", "1", "--modes", "loglik", "--train_rows", "16", "--eval_limit_loglik", "2",
            "--gpus", "0,1", "--output_dir", str(out), "--report_dir", str(report_dir)]
    assert cli.main(args) == 0
    capsys.readouterr()
    attempts = json.loads((out / "grid_record.json").read_text())["attempts"]
    assert sorted(a["job"] for a in attempts) == [
        "eval loglik dora_r4_lr2e-4_s0", "eval loglik dora_r4_lr2e-4_s1",
        "train dora_r4_lr2e-4_s0", "train dora_r4_lr2e-4_s1"]
    assert {a["slot"] for a in attempts} <= {"gpu 0", "gpu 1"} and all(a["returncode"] == 0 for a in attempts)
    for seed in (0, 1):
        summary = json.loads((out / f"dora_r4_lr2e-4_s{seed}" / "summary.json").read_text())
        assert summary["seed"] == seed and summary["train"]["global_step"] == 1
        assert "--seed" in summary["train"]["command"]
        assert summary["train"]["command"][summary["train"]["command"].index("--seed") + 1] == str(seed)
        assert {t: r["n"] for t, r in summary["eval"]["loglik"]["tasks"].items()} == {t: 2 for t in TASK_NAMES}
    collected = json.loads((report_dir / "reproduction.json").read_text())
    (row,) = collected["rank_table"]["loglik"]
    assert row["seeds"] == [0, 1] and len(row["average"]["per_seed"]) == 2
    assert "generate" not in collected["rank_table"]
    assert (report_dir / "reproduction_rank.png").stat().st_size > 5000

    assert cli.main(args) == 0  # the rerun: everything is done
    assert capsys.readouterr().out.count("already done; skipping") == 4
    assert len(json.loads((out / "grid_record.json").read_text())["attempts"]) == 4


@pytest.mark.slow
def test_a_training_over_a_group_of_two_simulated_gpus_runs_ddp(tmp_path, monkeypatch, capsys):
    """--gpus_per_run 2: finetune.py under torch.distributed.run with 2 processes (gloo on a CPU)."""
    tiny, source = tiny_model_on_two_simulated_gpus(tmp_path, monkeypatch)
    out = tmp_path / "runs"
    assert cli.main(["--base_model", str(tiny), "--source_dir", str(source), "--methods", "dora", "--ranks", "4",
                     "--seeds", "0", "--modes", "loglik", "--train_rows", "32", "--eval_limit_loglik", "1",
                     "--gpus", "0,1", "--gpus_per_run", "2", "--output_dir", str(out),
                     "--report_dir", str(tmp_path / "report")]) == 0
    summary = json.loads((out / "dora_r4_lr2e-4_s0" / "summary.json").read_text())
    assert summary["train"]["processes"] == 2 and summary["train"]["global_step"] == 2
    train_log = json.loads((out / "dora_r4_lr2e-4_s0" / "adapter" / "train_log.json").read_text())
    assert train_log["world_size"] == 2
    assert "torch.distributed.run" in (out / "dora_r4_lr2e-4_s0" / "train.log").read_text().splitlines()[0]
    slots = {a["job"]: a["slot"] for a in json.loads((out / "grid_record.json").read_text())["attempts"]}
    assert slots == {"train dora_r4_lr2e-4_s0": "gpus 0,1", "eval loglik dora_r4_lr2e-4_s0": "gpu 0"}
