"""The paper's LoRA-vs-DoRA commonsense comparison as a grid: methods x ranks x lrs x seeds, over the GPUs.

Runs: ``--methods lora dora [ft] [base]`` at ``--ranks`` (alpha 2r), ``--lrs`` (default the seed's
rule in ``commonsense.recipe``: LoRA 3e-4, DoRA 2e-4 but r32 1e-4, FT 2e-5) and ``--seeds``
(finetune.py's --seed; the training data stays fixed by ``--data_seed``), or an explicit
``--runs`` list. The default is the recorded SmolLM2 comparison: base, LoRA r32, DoRA r16 and
DoRA r32 at 2e-4, seed 42 (``reproduce_smollm2.sh``). Every run is trained with the seed's recipe
(global batch 16, cutoff 256, dropout 0.05, targets q/k/v/up/down, AdamW with linear warmup and
decay) by the project's own ``finetune.py`` in a subprocess and evaluated on the eight test sets
by ``commonsense_evaluate.py`` in ``--modes`` generate and/or loglik.

Scale:
  * default (CPU): a fixed uniform random sample of ``--train_rows`` rows (data seed) of the full
    commonsense mix built from ``--source_dir`` (as ``python -m commonsense.data build``), one
    epoch, and the first ``--eval_limit_generate`` / ``--eval_limit_loglik`` rows of each test set;
  * ``--full`` (GPU): the whole mix, 3 epochs, the seed's validation split (120 rows, evaluated
    every 80 steps, best checkpoint kept) and the full test sets.

Scheduling: ``--gpus 0,1,2,3`` runs one training or evaluation per GPU at a time
(``--gpus_per_run N``: trainings over N GPUs with DDP); without it, one job at a time. A failed
job is retried once, then reported; a rerun skips what is done and resumes what was cut off;
``OUTPUT_DIR/grid_record.json`` records every attempt. ``--dry_run`` prints the plan and a
measured estimate of its time.

Outputs: per run, ``OUTPUT_DIR/<run>/`` (adapter, logs, evaluation files, ``summary.json``); then
``REPORT_DIR/reproduction.json`` (every number), ``reproduction.md`` (the rank table with mean ±
std over seeds beside the paper's, paired DoRA − LoRA differences, each run with its interval,
wall time and peak memory), ``reproduction_rank.png`` (average vs rank) and
``reproduction_loss.png``. ``--fresh`` starts over; ``--report_only`` rebuilds the report from
``reproduction.json`` alone. docs/grid.md has the GPU command.

The modules, in the order the data flows:

* ``plan``: one run (:class:`~.plan.RunSpec`), the settings a folder's runs share
  (:class:`~.plan.Settings`) and each run's ``finetune.py`` / ``commonsense_evaluate.py`` arguments;
* ``grid``: the axes as runs, the runs as jobs, the dry run's plan and estimate (pure);
* ``estimate``: the dry run's short measured step;
* ``training_data``: the mix and its seeded subset;
* ``measured``: a child process with its wall time and peak memory (DDP launch included);
* ``scheduler``: the jobs over the GPUs, retries and the grid record;
* ``runner``: the output folder, each run's training and evaluations as jobs, the report after each;
* ``stats``: the macro average's interval and the paired difference's;
* ``paper``, ``rank_table`` and ``report``: the paper's rows, the summaries over seeds, and the
  JSON, markdown and charts;
* ``cli``: the command line (``__main__`` runs it).
"""
