"""The paper's weight-decomposition analysis (magnitude vs direction change) of FT, LoRA and DoRA runs.

    python analyze_decomposition.py --base_model B --runs NAME=DIR [NAME=DIR ...] \
        --modules q_proj v_proj --output_dir D

DIR: a finetune.py output folder (its checkpoint-N folders and final weights are the steps) or a
single adapter or model folder. Writes D/decomposition.{csv,png,md} and D/decomposition_layers.png.
All logic lives in commonsense/decomposition.py.
"""
import sys

from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit

add_repo_paths()


def parse_args(argv=None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", required=True, help="hub id, local model folder or smollm2-135m")
    parser.add_argument("--runs", required=True, nargs="+", metavar="NAME=DIR")
    parser.add_argument("--modules", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def run(args) -> int:
    from commonsense.decomposition import analyze, write_outputs
    from commonsense.io import check_writable_dir
    from commonsense.measure import peak_rss_bytes

    check_writable_dir(args.output_dir, "--output_dir")
    rows = analyze(args.base_model, args.runs, args.modules)
    paths = write_outputs(rows, args.output_dir, peak_rss=peak_rss_bytes())
    print((paths["decomposition.md"]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_or_exit(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
