"""Data loading/validation, the training-mix builder, the shipped test sets and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from commonsense.data import DataError, build_mix, load_rows
from commonsense.tasks import TASK_NAMES, get_task

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_SOURCE = REPO_ROOT.parent / "shared" / "data" / "commonsense"

EXPECTED_TEST_ROWS = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042,
                      "winogrande": 1267, "ARC-Challenge": 1172, "ARC-Easy": 2376, "openbookqa": 500}


def row(answer="true", **overrides):
    base = {"instruction": "Q?", "input": "", "output": f"the correct answer is {answer}", "answer": answer}
    base.update(overrides)
    return base


def write(path, payload):
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload), encoding="utf-8")
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "commonsense.data", *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ load_rows

def test_load_rows_ok_and_defaults_input(tmp_path):
    no_input = {k: v for k, v in row().items() if k != "input"}
    rows = load_rows(write(tmp_path / "d.json", [row(), no_input]), task="boolq")
    assert len(rows) == 2 and rows[1]["input"] == ""
    assert rows[0] == row()


def test_load_rows_jsonl(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps(row()) + "\n\n" + json.dumps(row("false")) + "\n")
    assert [r["answer"] for r in load_rows(path, task="boolq")] == ["true", "false"]


def test_training_rows_need_no_answer(tmp_path):
    assert load_rows(write(tmp_path / "d.json", [{"instruction": "I", "output": "O"}]))


@pytest.mark.parametrize("payload, needle", [
    ("{not json", "not valid JSON"),
    ({"instruction": "I", "output": "O"}, "expected a JSON list"),
    ([], "no rows"),
    ([row(), "just a string"], "row 1: expected an object"),
    ([row(), row(), {"input": "", "output": "O"}], "row 2: missing required field 'instruction'"),
    ([{"instruction": "I", "input": ""}], "row 0: missing required field 'output'"),
    ([{"instruction": 3, "output": "O"}], "row 0: field 'instruction' must be a string"),
    ([{"instruction": "I", "output": None}], "row 0: field 'output' must be a string"),
])
def test_load_rows_errors(tmp_path, payload, needle):
    path = write(tmp_path / "bad.json", payload)
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    assert str(path) in str(excinfo.value)
    assert needle in str(excinfo.value)


def test_load_rows_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as excinfo:
        load_rows(tmp_path / "nope.json")
    assert "nope.json" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("bad_row, needle", [
    (row("True"), "row 1: answer 'True' is not a boolq label (true, false)"),
    ({k: v for k, v in row().items() if k != "answer"}, "row 1: answer missing is not a boolq label"),
])
def test_load_rows_answer_must_be_a_label(tmp_path, bad_row, needle):
    path = write(tmp_path / "bad.json", [row(), bad_row, row("nonsense")])
    with pytest.raises(DataError) as excinfo:
        load_rows(path, task="boolq")
    assert needle in str(excinfo.value)  # reports the FIRST bad row


def test_load_rows_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="valid tasks"):
        load_rows(write(tmp_path / "d.json", [row()]), task="nope")


# ------------------------------------------------------------------ shipped test sets

@pytest.mark.parametrize("name", TASK_NAMES)
def test_shipped_test_set(name):
    path = REPO_ROOT / "dataset" / name / "test.json"
    rows = load_rows(path, task=name)
    assert len(rows) == EXPECTED_TEST_ROWS[name]
    labels = set(get_task(name).labels)
    assert {r["answer"] for r in rows} <= labels


@pytest.mark.skipif(not SHARED_SOURCE.is_dir(), reason="../shared data checkout not present")
@pytest.mark.parametrize("name", TASK_NAMES)
def test_shipped_test_set_is_byte_identical_to_source(name):
    shipped = (REPO_ROOT / "dataset" / name / "test.json").read_bytes()
    assert shipped == (SHARED_SOURCE / name / "test.json").read_bytes()


def test_shipped_demo_train():
    rows = load_rows(REPO_ROOT / "dataset" / "demo_train.json")
    assert len(rows) == 64 * 8
    # training rows keep the LLM-Adapters output format
    assert all(r["output"] == f"the correct answer is {r['answer']}" for r in rows)


# ------------------------------------------------------------------ build_mix

def make_source(root, sizes, hellaswag_file="train.json"):
    labels = {name: get_task(name).labels[0] for name in sizes}
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        filename = hellaswag_file if name == "hellaswag" else "train.json"
        rows = [row(labels[name], instruction=f"{name} question {i}") for i in range(n)]
        write(root / name / filename, rows)
    return root


SIZES = {"boolq": 5, "piqa": 7, "social_i_qa": 3, "hellaswag": 4, "winogrande": 6,
         "ARC-Easy": 2, "ARC-Challenge": 1, "openbookqa": 8}


def test_build_mix_counts_and_valid_json(tmp_path, capsys):
    source = make_source(tmp_path / "src", SIZES)
    out = tmp_path / "mix.json"
    counts = build_mix(source, out)
    assert counts == SIZES
    rows = json.loads(out.read_text())
    assert len(rows) == sum(SIZES.values()) == len(load_rows(out))
    assert sorted(r["instruction"] for r in rows) == sorted(
        f"{name} question {i}" for name, n in SIZES.items() for i in range(n))
    printed = capsys.readouterr().out
    assert "boolq: 5 rows" in printed and "total: 36 rows" in printed
    assert out.read_text().startswith("[\n    {\n        \"instruction\"")  # indent=4
    assert not list(tmp_path.glob(".mix.json.*"))  # no temp file left behind


def test_build_mix_is_deterministic_per_seed(tmp_path):
    source = make_source(tmp_path / "src", SIZES)
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    build_mix(source, a, seed=1)
    build_mix(source, b, seed=1)
    build_mix(source, c, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_build_mix_limit_per_task(tmp_path):
    source = make_source(tmp_path / "src", SIZES)
    out = tmp_path / "mix.json"
    counts = build_mix(source, out, limit_per_task=3, seed=0)
    assert counts == {name: min(n, 3) for name, n in SIZES.items()}
    assert len(json.loads(out.read_text())) == sum(counts.values())
    # A task's subset does not depend on which other tasks are included.
    build_mix(source, tmp_path / "only.json", tasks=["openbookqa"], limit_per_task=3, seed=0)
    pick = lambda path: {r["instruction"] for r in json.loads(path.read_text())
                         if r["instruction"].startswith("openbookqa")}
    assert pick(out) == pick(tmp_path / "only.json")


def test_build_mix_hellaswag_falls_back_to_approx(tmp_path, capsys):
    source = make_source(tmp_path / "src", {"boolq": 2, "hellaswag": 3},
                         hellaswag_file="train_approx_olmes.json")
    counts = build_mix(source, tmp_path / "mix.json", tasks=["boolq", "hellaswag"])
    assert counts == {"boolq": 2, "hellaswag": 3}
    assert "approximate" in capsys.readouterr().err.lower()


def test_build_mix_bad_task_file_writes_nothing(tmp_path):
    source = make_source(tmp_path / "src", SIZES)
    write(source / "winogrande" / "train.json", [row("option1"), {"instruction": "no output"}])
    out = tmp_path / "mix.json"
    with pytest.raises(DataError, match=r"winogrande.*row 1: missing required field 'output'"):
        build_mix(source, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]


# ------------------------------------------------------------------ CLI

def assert_cli_error(result, needle):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_validate_ok(tmp_path):
    path = write(tmp_path / "d.json", [row(), row("false")])
    result = run_cli("validate", path, "--task", "boolq")
    assert result.returncode == 0 and "2 valid rows" in result.stdout


@pytest.mark.parametrize("payload, args, needle", [
    (None, [], "file not found"),
    ("[1, 2", [], "not valid JSON"),
    ([], [], "no rows"),
    ([row("maybe")], ["--task", "boolq"], "row 0: answer 'maybe'"),
    ([row()], ["--task", "nope"], "valid tasks"),
])
def test_cli_validate_errors(tmp_path, payload, args, needle):
    path = tmp_path / "d.json"
    if payload is not None:
        write(path, payload)
    assert_cli_error(run_cli("validate", path, *args), needle)


def test_cli_build_bad_source_leaves_no_output(tmp_path):
    out = tmp_path / "out.json"
    assert_cli_error(run_cli("build", "--source", tmp_path / "missing", "--out", out), "source directory not found")
    assert not out.exists()


def test_cli_build_bad_rows_leaves_no_output(tmp_path):
    source = make_source(tmp_path / "src", SIZES)
    write(source / "piqa" / "train.json", "not json")
    out = tmp_path / "out.json"
    assert_cli_error(run_cli("build", "--source", source, "--out", out), "piqa")
    assert not out.exists() and not list(tmp_path.glob(".out.json*"))


def test_cli_usage_errors_are_one_line(tmp_path):
    assert_cli_error(run_cli("frobnicate"), "invalid choice")
    assert_cli_error(run_cli("build", "--source", tmp_path, "--out", tmp_path / "o.json",
                             "--limit_per_task", "abc"), "invalid int value")
    assert_cli_error(run_cli("build", "--source", tmp_path, "--out", tmp_path / "o.json",
                             "--limit_per_task", "0"), "positive")


def test_cli_build_and_demo_slice(tmp_path):
    source = make_source(tmp_path / "src", SIZES)
    out = tmp_path / "mix.json"
    result = run_cli("build", "--source", source, "--out", out, "--limit_per_task", "2", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert "total: 15 rows" in result.stdout
    assert len(load_rows(out)) == 15
    demo = tmp_path / "demo.json"
    result = run_cli("demo-slice", "--source", source, "--out", demo, "--per_task", "2", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert demo.read_bytes() == out.read_bytes()  # demo-slice = build with a per-task limit


@pytest.mark.skipif(not SHARED_SOURCE.is_dir(), reason="../shared data checkout not present")
def test_demo_train_is_reproducible(tmp_path):
    out = tmp_path / "demo_train.json"
    result = run_cli("demo-slice", "--source", SHARED_SOURCE, "--out", out, "--per_task", "64", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (REPO_ROOT / "dataset" / "demo_train.json").read_bytes()


def test_training_rows_from_a_dataset_name_as_the_original(tmp_path, monkeypatch):
    """Not a file: opened with datasets.load_dataset (here a local dataset folder; a hub id
    such as yahma/alpaca-cleaned takes the same path) and validated like a file."""
    from commonsense.data import DataError, load_training_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder needs no network (this machine has none)
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    (folder / "train.json").write_text(json.dumps(rows))
    assert load_training_rows(str(folder)) == rows
    (folder / "train.json").write_text(json.dumps([{"instruction": "q"}]))
    with pytest.raises(DataError, match="row 0: missing required field 'output'"):
        load_training_rows(str(folder))
    with pytest.raises(DataError) as err:
        load_training_rows("some-org/no-such-dataset")
    message = str(err.value)
    assert message.startswith("data_path some-org/no-such-dataset: no such file, and loading it as a dataset "
                              "(HF_HUB_OFFLINE is set) failed") and "\n" not in message
    with pytest.raises(DataError, match="file not found"):
        load_training_rows(str(tmp_path / "missing.json"))  # a .json path stays a file
