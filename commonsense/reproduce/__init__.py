"""The paper's LoRA-vs-DoRA commonsense comparison, rerun on SmolLM2-135M-Instruct with one command.

Runs (``--runs``, default all four): the base model alone; LoRA r=32 (alpha 64, lr 3e-4, as the
seed's LoRA rows); DoRA r=16 and r=32 (alpha 2r, lr 2e-4, as the seed's DoRA scripts). Every
adapter is trained with the seed's recipe (``commonsense.recipe``: global batch 16, cutoff 256,
dropout 0.05, targets q/k/v/up/down, AdamW with linear warmup and decay) by the project's own
``finetune.py`` in a subprocess, and every model is evaluated on the eight test sets by
``commonsense_evaluate.py`` in both modes (``generate``, the original protocol, and ``loglik``).

Scale:
  * default (CPU): a fixed uniform random sample of ``--train_rows`` rows (seeded) of the full
    commonsense mix built from ``--source_dir`` (as ``python -m commonsense.data build``), and
    the first ``--eval_limit_generate`` / ``--eval_limit_loglik`` rows of each test set;
  * ``--full`` (GPU): the whole mix, the full test sets, and the seed's validation split (120 rows,
    evaluated every 80 steps, best checkpoint kept).
The seed trained 3 epochs; ``--num_epochs`` defaults to 1 here (recorded in the report).

Outputs: per run, ``OUTPUT_DIR/<run>/`` (adapter, logs, evaluation files, ``summary.json``); then
``REPORT_DIR/reproduction.json`` (every number the report uses), ``reproduction.md`` (tables in
the seed's layout with the paper's rows, 95% intervals, wall time and peak memory) and
``reproduction_loss.png``. A finished step is skipped on rerun (interrupted training resumes from
its last checkpoint, an interrupted evaluation from its per-example log); ``--fresh`` starts over;
``--report_only`` rebuilds the report from ``reproduction.json`` alone.

    python -m commonsense.reproduce [--train_rows 256] [--eval_limit_generate 16] [--eval_limit_loglik 64]
    python -m commonsense.reproduce --full            # on a GPU machine

The modules, in the order the data flows:

* ``plan``: what to run -- the runs (:class:`~.plan.RunSpec`), the settings that change results
  (:class:`~.plan.Settings`) and each run's ``finetune.py`` / ``commonsense_evaluate.py`` arguments;
* ``training_data``: the mix and its seeded subset;
* ``measured``: a child process with its wall time and peak memory;
* ``runner``: the output folder, and each run trained and evaluated (skipping what is done);
* ``stats``: the macro average's interval and the paired difference's;
* ``paper`` and ``report``: the paper's rows, and the JSON, markdown and loss chart;
* ``cli``: the command line (``__main__`` runs it).
"""
