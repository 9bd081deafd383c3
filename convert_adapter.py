"""Convert a LoRA/DoRA adapter folder between this repository's format and HF peft's.

    python convert_adapter.py --to hf ./finetuned_result/dora_r32 ./dora_r32_hf
    python convert_adapter.py --to original ./some_hf_peft_adapter ./some_adapter

--to hf writes what HF peft's PeftModel.from_pretrained loads (peft_type LORA, use_dora,
lora_magnitude_vector, adapter_model.safetensors). --to original writes the original
NVlabs/DoRA fork's format (peft_type DORA or LORA, weight_m_wdecomp, adapter_model.bin),
which the original code and this repository load. The conversion is in
peft/src/peft/utils/hf_format.py.

Bad input (missing folder, not an adapter, magnitude-only DoRA layers, HF options this fork
cannot represent, a non-empty output folder without --overwrite) prints one "error: ..." line
to stderr and exits with status 2; --debug shows the traceback instead.
"""
import sys
import warnings

from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit

add_repo_paths()  # the vendored PEFT fork must shadow any pip-installed peft


def parse_args(argv=None):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, choices=["hf", "original"],
                        help="hf: HF peft's format; original: the original NVlabs fork's (and this repository's)")
    parser.add_argument("source", help="adapter folder to convert")
    parser.add_argument("destination", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the adapter in a non-empty output folder")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    def convert():
        from peft.utils.save_and_load import convert_adapter_folder

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = convert_adapter_folder(args.source, args.destination, args.to, overwrite=args.overwrite)
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        print(summary)

    run_or_exit(convert, debug=args.debug)


if __name__ == "__main__":
    main()
