"""The DoRA paper's commonsense numbers, shown beside ours in the report for reference."""

PAPER_SOURCE = ("NVlabs/DoRA, commonsense_reasoning/README.md "
                "(https://github.com/NVlabs/DoRA/blob/main/commonsense_reasoning/README.md)")
# The seed README's "Accuracy comparison of LoRA and DoRA with varying ranks for LLaMA-7B" table:
# (method, r, lr, accuracy % on BoolQ..OBQA, Average), as published.
LLAMA7B_RANK_ROWS = [
    ("lora", 4, "3e-4", (2.3, 46.1, 18.3, 19.7, 55.2, 65.4, 51.9, 57.0), 39.5),
    ("lora", 8, "3e-4", (31.3, 57.0, 44.0, 11.8, 43.3, 45.7, 39.2, 53.8), 40.7),
    ("lora", 16, "3e-4", (69.9, 77.8, 75.1, 72.1, 55.8, 77.1, 62.2, 78.0), 70.9),
    ("lora", 32, "3e-4", (67.5, 80.8, 78.2, 83.4, 80.4, 78.0, 62.6, 79.1), 76.3),
    ("lora", 64, "3e-4", (66.7, 79.1, 75.7, 17.6, 78.8, 73.3, 59.6, 75.2), 65.8),
    ("dora", 4, "2e-4", (51.3, 42.2, 77.8, 25.4, 78.8, 78.7, 62.5, 78.6), 61.9),
    ("dora", 8, "2e-4", (69.9, 81.8, 79.7, 85.2, 80.1, 81.5, 65.7, 79.8), 77.9),
    ("dora", 16, "2e-4", (70.0, 82.6, 79.7, 83.2, 80.6, 80.6, 65.4, 77.6), 77.5),
    ("dora", 32, "1e-4", (69.7, 83.4, 78.6, 87.2, 81.0, 81.9, 66.2, 79.2), 78.4),
    ("dora", 64, "2e-4", (70.1, 82.0, 75.6, 85.9, 79.7, 79.1, 63.7, 78.4), 76.8),
]
# The paper's Table 15 (the same sweep) where its average differs from the README's:
# (method, r) -> (Table 15's average, the README's). Its per-task values are not carried here.
TABLE15_AVERAGES = {("lora", 32): (74.7, 76.3), ("dora", 64): (72.1, 76.8)}
