"""Alpaca-style prompt templates, byte-identical to the original DoRA/LLM-Adapters code.

Training (finetune.py: generate_prompt) and evaluation (commonsense_evaluate.py:
generate_prompt) use slightly different templates, and the differences matter for
exact reproduction, so both are kept verbatim:

* training, no input:   two spaces after "request.", blank lines hold 16 spaces;
* training, with input: one space after "request.", blank lines hold 16 spaces;
* evaluation, no input: one space after "request.", blank lines are empty;
* evaluation, with input: no space after "request.", blank lines are empty.

The literals below are written with explicit "\n" escapes so that every trailing
space is visible and cannot be lost by an editor.
"""
from array import array


_INDENT = " " * 16  # the originals are f-strings whose continuation lines sit 16 columns in

TRAIN_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)

TRAIN_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Input:\n"
    "                {input}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)

EVAL_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Response:\n"
    "                "
)

EVAL_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Input:\n"
    "                {input}\n"
    "\n"
    "                ### Response:\n"
    "                "
)

RESPONSE_MARKER = "### Response:"


def training_prompt(row: dict) -> str:
    """Full training text (prompt + answer) for a row with instruction/input/output."""
    # str.format substitutes values without re-parsing them, so braces inside the
    # data are safe, just as in the original f-strings.
    if row.get("input"):  # truthiness, as in the original: "" means "no input"
        return TRAIN_TEMPLATE_WITH_INPUT.format(
            instruction=row["instruction"], input=row["input"], output=row["output"]
        )
    return TRAIN_TEMPLATE_NO_INPUT.format(instruction=row["instruction"], output=row["output"])


generate_prompt = training_prompt  # the original's name in finetune.py


def user_prompt(row: dict) -> str:
    """Training prompt with an empty output: the part masked out when train_on_inputs=False."""
    return training_prompt({**row, "output": ""})


def evaluation_prompt(instruction: str, input: str = None) -> str:
    """Prompt fed to generate() at evaluation time (the original always passes input=None)."""
    if input:
        return EVAL_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    return EVAL_TEMPLATE_NO_INPUT.format(instruction=instruction)


def evaluation_prompt_ids(tokenizer, instructions) -> dict:
    """{instruction: its evaluation prompt's token ids}, each distinct instruction tokenized once.

    The ids are kept as array("l"): a whole test set's prompts as Python ints would take
    several times the memory.
    """
    distinct = list(dict.fromkeys(instructions))
    encoded = tokenizer([evaluation_prompt(instruction) for instruction in distinct])["input_ids"] if distinct else []
    return {instruction: array("l", ids) for instruction, ids in zip(distinct, encoded)}


def split_response(decoded_text: str) -> str:
    """The generated answer: text after the LAST "### Response:", stripped.

    Same as the original's `o.split("### Response:")[-1].strip()`; when the marker
    is absent that expression already yields the whole text, stripped.
    """
    return decoded_text.rsplit(RESPONSE_MARKER, 1)[-1].strip()
