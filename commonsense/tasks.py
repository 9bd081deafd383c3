"""Registry of the eight commonsense-reasoning tasks and their answer extraction.

Each task knows its dataset folder name (used by the CLIs and under dataset/),
the column name used in the paper's results table, and the label words a model
is trained to emit. Answer extraction reproduces the original
commonsense_evaluate.py exactly: the first (case-sensitive, substring) regex
match of the label alternation in the stripped generation, or "" if none.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # dataset name: CLI value and folder under dataset/
    display_name: str  # column header in the paper's table
    labels: tuple  # label words, in the order of the original regex alternation
    # The fine-tuning targets ("output" in the data) are this template filled with the
    # label word; loglik evaluation scores exactly these continuations.
    answer_template: str = "the correct answer is {label}"
    # How many of `labels` are this task's answers; None: each prompt lists its own (ARC: 3 to 5).
    choices: int | None = None

    def continuation(self, label: str) -> str:
        """The trained answer text for `label`, e.g. "the correct answer is answer2"."""
        return self.answer_template.format(label=label)

    @property
    def answer_pattern(self) -> "re.Pattern":
        # Plain alternation, no word boundaries and no IGNORECASE: that is what the
        # original does, so "answer12" yields "answer1" and "True" yields nothing.
        return re.compile("|".join(re.escape(label) for label in self.labels))


_ANSWER_1_TO_5 = ("answer1", "answer2", "answer3", "answer4", "answer5")

# Ordered as the columns of the paper's commonsense table.
TASKS = {
    task.name: task
    for task in (
        Task("boolq", "BoolQ", ("true", "false"), choices=2),
        Task("piqa", "PIQA", ("solution1", "solution2"), choices=2),
        # SIQA has 3 choices and OBQA 4, but the original regex accepts answer1..5
        # for all four "answerN" tasks; keep that so scores match.
        Task("social_i_qa", "SIQA", _ANSWER_1_TO_5, choices=3),
        Task("hellaswag", "HellaSwag", ("ending1", "ending2", "ending3", "ending4"), choices=4),
        Task("winogrande", "WinoGrande", ("option1", "option2"), choices=2),
        Task("ARC-Easy", "ARC-e", _ANSWER_1_TO_5),
        Task("ARC-Challenge", "ARC-c", _ANSWER_1_TO_5),
        Task("openbookqa", "OBQA", _ANSWER_1_TO_5, choices=4),
    )
}

TASK_NAMES = list(TASKS)


def get_task(task_or_name) -> Task:
    """Return the Task for a name (or pass a Task through); ValueError lists valid names."""
    if isinstance(task_or_name, Task):
        return task_or_name
    try:
        return TASKS[task_or_name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown task {task_or_name!r}; valid tasks: {', '.join(TASK_NAMES)}"
        ) from None


def answer_options(task_or_name, instruction: str) -> list:
    """The label words that answer this example: the task's fixed choices, or for ARC the
    answers its prompt lists ("Answer1: ... Answer5: ..."). ValueError when fewer than two.

    The one reader of an example's options: loglik scores these continuations and the
    report's chance level is the mean of 1 / len(options).
    """
    task = get_task(task_or_name)
    if task.choices is not None:
        return list(task.labels[:task.choices])
    present = {int(n) for n in re.findall(r"\banswer(\d)\b", instruction, flags=re.IGNORECASE)}
    labels = [label for label in task.labels if int(label[-1]) in present]
    if len(labels) < 2:
        raise ValueError(f"{task.name}: cannot find the answer choices in instruction {instruction[:80]!r}")
    return labels


def extract_answer(task_or_name, text: str) -> str:
    """First label word found in `text` (as the original's re.findall(...)[0]), else ""."""
    match = get_task(task_or_name).answer_pattern.search(text.strip())
    return match.group(0) if match else ""
