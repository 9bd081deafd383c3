"""Fine-tune a causal LM with LoRA or DoRA on the commonsense mix (the original's CLI, via fire).

    python finetune.py --base_model yahma/llama-7b-hf --data_path commonsense_170k.json \
        --output_dir ./finetuned_result/dora_r32 --adapter_name dora --lora_r 32 --lora_alpha 64 ...

All logic lives in commonsense/ (training.py: the run; train_options.py: its checks). Bad input
prints one "error: ..." line and exits with status 2 (commonsense/cli.py lists the exit codes).
"""
import sys

from commonsense.cli import add_repo_paths, run_or_exit

add_repo_paths()


def main() -> None:
    import fire

    from commonsense.train_options import check_flags
    from commonsense.training import TRAIN_FLAGS, train

    debug = "--debug" in sys.argv or any(a.startswith("--debug=") and a != "--debug=False" for a in sys.argv)
    run_or_exit(lambda: (check_flags(sys.argv[1:], TRAIN_FLAGS), fire.Fire(train)), debug=debug,
                resume_hint="rerun with --resume_from_checkpoint auto to continue from the last checkpoint")


if __name__ == "__main__":
    main()
