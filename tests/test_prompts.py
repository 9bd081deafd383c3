"""Prompt templates must be byte-identical to the original finetune.py / commonsense_evaluate.py."""
import hashlib

from commonsense.prompts import (evaluation_prompt, generate_prompt, split_response,
                                 training_prompt, user_prompt)

ROW = {"instruction": "Q?\n\nAnswer format: true/false", "input": "",
       "output": "the correct answer is true", "answer": "true"}

# Expected texts written out independently of the module's template literals.
S16 = " " * 16
EXPECTED_TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.  \n\n"
    + S16 + "### Instruction:\n" + S16 + "Q?\n\nAnswer format: true/false\n"
    + S16 + "\n"
    + S16 + "### Response:\n" + S16 + "the correct answer is true"
)
EXPECTED_TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n"
    + S16 + "### Instruction:\n" + S16 + "I\n"
    + S16 + "\n"
    + S16 + "### Input:\n" + S16 + "X\n"
    + S16 + "\n"
    + S16 + "### Response:\n" + S16 + "O"
)
EXPECTED_EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    + S16 + "### Instruction:\n" + S16 + "I\n"
    "\n"
    + S16 + "### Response:\n" + S16
)
EXPECTED_EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    + S16 + "### Instruction:\n" + S16 + "I\n"
    "\n"
    + S16 + "### Input:\n" + S16 + "X\n"
    "\n"
    + S16 + "### Response:\n" + S16
)


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_training_prompt_no_input_exact():
    assert training_prompt(ROW) == EXPECTED_TRAIN_NO_INPUT
    assert generate_prompt(ROW) == EXPECTED_TRAIN_NO_INPUT
    assert "request.  \n\n" in training_prompt(ROW)  # two spaces, as in the original


def test_training_prompt_with_input_exact():
    assert training_prompt({"instruction": "I", "input": "X", "output": "O"}) == EXPECTED_TRAIN_WITH_INPUT


def test_training_prompt_missing_input_key_means_no_input():
    row = {k: v for k, v in ROW.items() if k != "input"}
    assert training_prompt(row) == EXPECTED_TRAIN_NO_INPUT


def test_evaluation_prompt_no_input_exact():
    assert evaluation_prompt("I") == EXPECTED_EVAL_NO_INPUT
    assert evaluation_prompt("I", "") == EXPECTED_EVAL_NO_INPUT
    assert evaluation_prompt("I", None) == EXPECTED_EVAL_NO_INPUT


def test_evaluation_prompt_with_input_exact():
    assert evaluation_prompt("I", "X") == EXPECTED_EVAL_WITH_INPUT


def test_known_hashes():
    # sha256 pins of the four variants for fixed rows, so that an edit to both the module
    # and the expected strings above cannot go unnoticed.
    cases = [
        (training_prompt(ROW), 277,
         "be25af91ac2d15c563153dcd393e8df559e77c4fde156be67cc9d2112ebd5812"),
        (training_prompt({"instruction": "I", "input": "X", "output": "O"}), 337,
         "c0309921be9bade5cef3dd38021446b0017cc4785f71e437e3d17fbfd222d686"),
        (evaluation_prompt("I"), 206,
         "bff7a74147c77f0f9d1c2289ab9dfce3a19fffb3f12fdfe78f667f4d741c9056"),
        (evaluation_prompt("I", "X"), 303,
         "2cf9a99a51a8b220243249dd84e309de7d143922bc6d7c9c491a38e4b608f5ad"),
    ]
    for text, length, digest in cases:
        assert (len(text), sha(text)) == (length, digest)


def test_braces_in_data_are_kept_verbatim():
    row = {"instruction": "{output} {0} }{", "input": "", "output": "{x}"}
    text = training_prompt(row)
    assert "{output} {0} }{" in text and text.endswith("{x}")
    assert "{input}" in evaluation_prompt("I", "{input}")


def test_user_prompt_is_prefix_of_training_prompt():
    for row in (ROW, {"instruction": "I", "input": "X", "output": "O"}):
        prefix = user_prompt(row)
        full = training_prompt(row)
        assert full.startswith(prefix)
        assert full[len(prefix):] == row["output"]
        assert prefix.endswith("### Response:\n" + S16)


def test_split_response():
    decoded = evaluation_prompt("I") + "the correct answer is true "
    assert split_response(decoded) == "the correct answer is true"
    # The original uses split(...)[-1]: the text after the LAST marker.
    assert split_response("a ### Response: b ### Response:  c ") == "c"
    assert split_response("  no marker here \n") == "no marker here"
    assert split_response("### Response:") == ""
