"""Download a released DoRA commonsense adapter (Hugging Face repo sliuau/DoRA-weights), or check a local copy.

    python download_dora_weights.py --list
    python download_dora_weights.py --model llama-7b --rank 32 --output_dir ./released/llama-7b-dora_r32
    python download_dora_weights.py --check ./released/llama-7b-dora_r32 --model llama-7b [--base_model DIR]
    sh llama_7B_Dora_eval.sh ./released/llama-7b-dora_r32 0

Bad input or a failed download prints one "error: ..." line and exits with status 2 (--debug
shows the traceback); a failed download leaves no output folder. All logic is in
commonsense/released.py.
"""
import argparse
import sys

from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit

add_repo_paths()


def parse_args(argv=None):
    from commonsense.released import HF_REPO_ID

    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="print the released adapters and exit")
    action.add_argument("--check", metavar="DIR", help="validate a local copy of a released adapter folder "
                                                      "against the base model (no download)")
    parser.add_argument("--model", help="llama-7b, llama2-7b or llama3-8b (see --list)")
    parser.add_argument("--rank", type=int, help="the adapter's r (see --list)")
    parser.add_argument("--output_dir", help="where to put the adapter (default: released/<model>-dora_r<rank>)")
    parser.add_argument("--subfolder", help=f"a folder of {HF_REPO_ID} to fetch instead of the registry's "
                                            "<root>/<model>/dora_r<rank>")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) to download")
    parser.add_argument("--base_model", help="with --check: a local base-model folder to check against "
                                             "(default: the model's known layer shapes)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser, parser.parse_args(argv)


def download(args, parser: argparse.ArgumentParser) -> int:
    from commonsense.released import download_released_adapter, eval_command, released_model

    if args.subfolder is None and (args.model is None or args.rank is None):
        parser.error("give --model and --rank to download (or --list, or --check DIR)")
    if args.output_dir is None:
        if args.model is None or args.rank is None:
            parser.error("--subfolder needs --output_dir (or --model and --rank to name the default folder)")
        args.output_dir = f"released/{released_model(args.model).key}-dora_r{args.rank}"
    folder = download_released_adapter(args.model, args.rank, args.output_dir, subfolder=args.subfolder,
                                       revision=args.revision)
    print(f"saved the adapter to {folder}")
    if args.model is not None:
        print(f"evaluate it with: {eval_command(folder, released_model(args.model))}")
    return 0


def check(args, parser: argparse.ArgumentParser) -> int:
    from commonsense.released import check_local_copy, released_model

    if args.model is None:
        parser.error("--check needs --model (the base model it was trained on, see --list)")
    print(check_local_copy(args.check, released_model(args.model), rank=args.rank, base_model=args.base_model))
    return 0


def main(argv=None) -> int:
    parser, args = parse_args(argv)

    def run() -> int:
        if args.list:
            from commonsense.released import registry_table

            print(registry_table())
            return 0
        return check(args, parser) if args.check else download(args, parser)

    return run_or_exit(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
