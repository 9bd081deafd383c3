"""The DoRA paper's commonsense rows, shown under ours in the report for reference."""

# Accuracy % on BoolQ..OBQA and the Average, as published in NVlabs/DoRA
# commonsense_reasoning/README.md (the paper's Table 1 and its rank sweep): (model, r, lr, tasks, average).
PAPER_SOURCE = ("NVlabs/DoRA, commonsense_reasoning/README.md "
                "(https://github.com/NVlabs/DoRA/blob/main/commonsense_reasoning/README.md)")
PAPER_ROWS = [
    ("LLaMA-7B-LoRA", 32, "3e-4", (67.5, 80.8, 78.2, 83.4, 80.4, 78.0, 62.6, 79.1), 76.3),
    ("LLaMA-7B-DoRA", 16, "2e-4", (70.0, 82.6, 79.7, 83.2, 80.6, 80.6, 65.4, 77.6), 77.5),
    ("LLaMA-7B-DoRA", 32, "1e-4", (69.7, 83.4, 78.6, 87.2, 81.0, 81.9, 66.2, 79.2), 78.4),
    ("LLaMA2-7B-LoRA", 32, "3e-4", (69.8, 79.9, 79.5, 83.6, 82.6, 79.8, 64.7, 81.0), 77.6),
    ("LLaMA2-7B-DoRA", 16, "2e-4", (72.0, 83.1, 79.9, 89.1, 83.0, 84.5, 71.0, 81.2), 80.5),
    ("LLaMA2-7B-DoRA", 32, "2e-4", (71.8, 83.7, 76.0, 89.1, 82.6, 83.7, 68.2, 82.4), 79.7),
    ("LLaMA3-8B-LoRA", 32, "3e-4", (70.8, 85.2, 79.9, 91.7, 84.3, 84.2, 71.2, 79.0), 80.8),
    ("LLaMA3-8B-DoRA", 16, "1e-4", (74.5, 88.8, 80.3, 95.5, 84.7, 90.1, 79.1, 87.2), 85.0),
    ("LLaMA3-8B-DoRA", 32, "1e-4", (74.6, 89.3, 79.9, 95.5, 85.6, 90.5, 80.4, 85.8), 85.2),
]
PAPER_TEST_EXAMPLES = 22_419  # the eight full test sets
