"""Results table, CSV and chart built from synthetic evaluation summaries."""
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from commonsense.report import (ReportError, build_report, chance_accuracy, chance_levels,
                                collect_runs, evaluated_rows, load_summaries, markdown_table)
from commonsense.tasks import TASKS, answer_options

REPO_ROOT = Path(__file__).resolve().parent.parent
FULL_RUN = {"boolq": 0.70, "piqa": 0.80, "social_i_qa": 0.75, "hellaswag": 0.85,
            "winogrande": 0.65, "ARC-Easy": 0.80, "ARC-Challenge": 0.60, "openbookqa": 0.77}
PARTIAL_RUN = {"boolq": 0.5, "piqa": 0.25}


def write_summary(folder: Path, model, adapter, dataset, accuracy, n=100, finished_at="2024-01-01T00:00:00+00:00",
                  mode="generate"):
    summary = {"model": model, "adapter": adapter, "dataset": dataset, "task": TASKS[dataset].display_name,
               "mode": mode, "accuracy": accuracy, "correct": round(accuracy * n), "n": n, "limit": None,
               "batch_size": 1, "base_model": "b", "lora_weights": "w", "elapsed_s": 1.0, "finished_at": finished_at}
    suffix = "" if mode == "generate" else f"-{mode}"  # as commonsense.evaluation.result_path
    (folder / f"{model}-{adapter}-{dataset}{suffix}.summary.json").write_text(json.dumps(summary, indent=4))


@pytest.fixture
def experiment(tmp_path):
    folder = tmp_path / "experiment"
    folder.mkdir()
    for dataset, acc in FULL_RUN.items():
        write_summary(folder, "LLaMA-7B", "DoRA", dataset, acc)
    for dataset, acc in PARTIAL_RUN.items():
        write_summary(folder, "SmolLM2-135M", "none", dataset, acc, n=10)
    (folder / "LLaMA-7B-DoRA-boolq.json").write_text("[]")  # a results file, not a summary
    (folder / "junk.summary.json").write_text("{not json")
    return folder


def table_rows(markdown: str) -> dict:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return header, {(r["Model"], r["Adapter"]): r for r in rows}


def test_markdown_table_values_missing_and_average(experiment):
    paths = build_report(experiment)
    header, rows = table_rows(paths["markdown"].read_text())
    assert header == ["Model", "Adapter", "Mode", "n", "BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande",
                      "ARC-e", "ARC-c", "OBQA", "Average"]
    full = rows[("LLaMA-7B", "DoRA")]
    assert (full["BoolQ"], full["ARC-c"], full["OBQA"], full["Mode"], full["n"]) == ("70.0", "60.0", "77.0",
                                                                                      "generate", "800")
    assert full["Average"] == f"{100 * sum(FULL_RUN.values()) / 8:.1f}" == "74.0"  # complete: no mark
    partial = rows[("SmolLM2-135M", "none")]
    assert partial["BoolQ"] == "50.0" and partial["PIQA"] == "25.0" and partial["HellaSwag"] == "–"
    assert partial["Average"] == "37.5*" and partial["n"] == "20"  # over present tasks only, marked
    assert "average over the evaluated tasks only" in paths["markdown"].read_text()


def test_csv_and_png(experiment):
    paths = build_report(experiment, experiment.parent / "report")
    assert all(p.parent == experiment.parent / "report" for p in paths.values())
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [(r["model"], r["adapter"]) for r in rows] == [("LLaMA-7B", "DoRA"), ("SmolLM2-135M", "none")]
    assert float(rows[0]["ARC-e"]) == 80.0 and rows[0]["complete"] == "True"
    assert rows[1]["SIQA"] == "" and float(rows[1]["average"]) == 37.5 and rows[1]["tasks"] == "2"
    png = paths["png"].read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert not [p for p in paths["png"].parent.iterdir() if p.name.endswith(".tmp")]


def test_latest_duplicate_wins_and_junk_is_skipped(experiment, capsys):
    # Same run and task under another file name (e.g. copied from another machine), finished later.
    summary = json.loads((experiment / "LLaMA-7B-DoRA-boolq.summary.json").read_text())
    summary.update(accuracy=0.9, finished_at="2025-01-01T00:00:00+00:00")
    (experiment / "copy.summary.json").write_text(json.dumps(summary))
    runs = collect_runs(load_summaries(experiment))
    assert "junk.summary.json" in capsys.readouterr().err
    assert len(runs) == 2 and runs[0].accuracy("boolq") == 0.9


def test_table_without_missing_tasks_has_no_footnote(tmp_path):
    for dataset, acc in FULL_RUN.items():
        write_summary(tmp_path, "LLaMA-7B", "LoRA", dataset, acc)
    assert "*" not in markdown_table(collect_runs(load_summaries(tmp_path)))


def test_empty_folder_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ReportError):
        build_report(tmp_path)
    assert not list(tmp_path.iterdir())


def test_cli_rebuilds_from_files(experiment):
    result = subprocess.run([sys.executable, "-m", "commonsense.report", "--experiment_dir", str(experiment)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| LLaMA-7B | DoRA |" in result.stdout
    assert (experiment / "results.md").exists() and (experiment / "results.png").stat().st_size > 0

    missing = subprocess.run([sys.executable, "-m", "commonsense.report", "--experiment_dir",
                              str(experiment / "nope")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: ") and len(missing.stderr.strip().splitlines()) == 1


def test_loglik_runs_are_separate_labelled_rows(experiment):
    write_summary(experiment, "LLaMA-7B", "DoRA", "boolq", 0.9, mode="loglik")
    runs = collect_runs(load_summaries(experiment))
    assert [(r.model, r.adapter, r.mode) for r in runs] == [
        ("LLaMA-7B", "DoRA", "generate"), ("LLaMA-7B", "DoRA", "loglik"), ("SmolLM2-135M", "none", "generate")]
    assert runs[0].accuracy("boolq") == 0.70  # generate numbers untouched by the loglik file
    assert runs[1].label == "LLaMA-7B DoRA (loglik)" and runs[0].label == "LLaMA-7B DoRA"
    lines = [line for line in markdown_table(runs).splitlines() if line.startswith("| LLaMA-7B | DoRA |")]
    assert [line.split("|")[3].strip() for line in lines] == ["generate", "loglik"]
    assert "| LLaMA-7B | DoRA | loglik | 100 | 90.0 |" in markdown_table(runs)


# --------------------------------------------------------------------------- chance level

def example(options, answer=None):
    """A test row whose prompt ends with its options, as the shipped test sets' prompts do."""
    return {"instruction": f"Pick one.\n\nAnswer format: {'/'.join(options)}", "answer": answer or options[0]}


def answers(k):
    return [f"answer{i}" for i in range(1, k + 1)]


def test_chance_is_the_mean_of_one_over_each_examples_option_count():
    rows = [example(answers(3)), example(answers(4)), example(answers(5))]
    assert chance_accuracy(rows, "ARC-Easy") == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)
    # Tasks with a fixed number of choices take it from the registry, not the prompt.
    assert chance_accuracy(rows, "social_i_qa") == pytest.approx(1 / 3)
    assert chance_accuracy([example(["true", "false"])], "boolq") == pytest.approx(1 / 2)
    assert chance_accuracy([example(answers(4)), {"instruction": "no options given"}], "ARC-Challenge") is None
    assert chance_accuracy([], "boolq") is None


def test_chance_comes_from_the_evaluated_examples_in_the_results_file(tmp_path):
    rows = [example(answers(3)), example(answers(5)), example(answers(4)), example(answers(4))]
    (tmp_path / "M-DoRA-ARC-Easy.json").write_text(json.dumps(rows))
    write_summary(tmp_path, "M", "DoRA", "ARC-Easy", 0.5, n=4)
    summary_file = tmp_path / "M-DoRA-ARC-Easy.summary.json"
    summary = json.loads(summary_file.read_text())
    summary["output_file"] = "M-DoRA-ARC-Easy.json"
    summary_file.write_text(json.dumps(summary))
    runs = collect_runs(load_summaries(tmp_path))
    levels = chance_levels(runs, tmp_path)
    expected = (1 / 3 + 1 / 5 + 1 / 4 + 1 / 4) / 4
    assert levels == {"ARC-Easy": (pytest.approx(expected), 4)}
    table = markdown_table(runs, levels)
    assert f"| Chance | uniform guess | – | 4 | – | – | – | – | – | {100 * expected:.1f} | – | – | 25.8* |" in table
    assert "Chance: the accuracy expected from picking one of each example's answer options" in table


def test_chance_falls_back_to_the_shipped_test_sets(experiment):
    # The fixture's summaries name no results file: the first n rows of dataset/<task>/test.json.
    levels = chance_levels(collect_runs(load_summaries(experiment)), experiment)
    assert {name: round(100 * c, 1) for name, (c, _) in levels.items()} == {
        "boolq": 50.0, "piqa": 50.0, "social_i_qa": 33.3, "hellaswag": 25.0, "winogrande": 50.0,
        "ARC-Easy": 25.1, "ARC-Challenge": 25.0, "openbookqa": 25.0}  # one of ARC-e's first 100 has 3 options
    assert levels["ARC-Easy"][0] == pytest.approx((99 / 4 + 1 / 3) / 100)
    assert {n for _, n in levels.values()} == {100}  # the largest run of each task (LLaMA's n=100)
    # Whole ARC-Easy: 2365 items with 4 options, 7 with 3 and 4 with 5.
    summary = {"dataset": "ARC-Easy", "n": 2376}
    rows = evaluated_rows(experiment, summary)
    assert chance_accuracy(rows, "ARC-Easy") == pytest.approx((2365 / 4 + 7 / 3 + 4 / 5) / 2376)


def test_demo_style_table_has_a_chance_row(experiment):
    paths = build_report(experiment)
    header, rows = table_rows(paths["markdown"].read_text())
    chance = rows[("Chance", "uniform guess")]
    assert (chance["BoolQ"], chance["SIQA"], chance["HellaSwag"], chance["Average"]) == ("50.0", "33.3", "25.0",
                                                                                        "35.4")
    assert chance["n"] == "800"
    # The CSV stays one row per run.
    assert [r["model"] for r in csv.DictReader(io.StringIO(paths["csv"].read_text()))] == ["LLaMA-7B", "SmolLM2-135M"]


def test_the_registry_options_are_what_every_shipped_prompt_offers():
    # tasks.answer_options (loglik's choices, the chance level) against the options each
    # shipped prompt ends with ("Answer format: answer1/answer2/answer3"), and the gold answer.
    for name in TASKS:
        rows = json.loads((REPO_ROOT / "dataset" / name / "test.json").read_text())
        for row in rows:
            offered = re.search(r"Answer format:\s*(\S+)\s*$", row["instruction"]).group(1).split("/")
            assert answer_options(name, row["instruction"]) == offered, (name, row["instruction"][-120:])
            assert row["answer"] in offered