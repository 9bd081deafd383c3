"""Merge a LoRA/DoRA adapter into its base model: a plain Hugging Face model folder for serving.

    python merge_adapter.py --base_model yahma/llama-7b-hf --lora_weights ./finetuned_result/dora_r32 \
        --output_dir ./merged/llama-7b-dora-r32 --dtype fp16

The folder loads with transformers alone (no peft) and serves in vLLM (`vllm serve OUT`); see
docs/merging.md. The library code is commonsense/merge.py. Bad input (a quantized base, an
adapter that does not fit the base, a non-empty output folder without --overwrite) prints one
"error: ..." line and exits with status 2; --debug shows the traceback instead.
"""
import sys

from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit

add_repo_paths()  # the vendored PEFT fork must shadow any pip-installed peft


def parse_args(argv=None):
    from commonsense.merge import AUTO, DEFAULT_MAX_SHARD_SIZE, DTYPES

    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", required=True, help="hub id, local model folder or smollm2-135m")
    parser.add_argument("--lora_weights", required=True,
                        help="adapter folder (this repository's, the released adapters' or HF peft's format) or hub id")
    parser.add_argument("--output_dir", required=True, help="merged model folder (new or empty unless --overwrite)")
    parser.add_argument("--dtype", choices=(*DTYPES, AUTO), default=AUTO,
                        help="weights of the merged folder; auto = the base's own dtype (the merge itself runs in fp32)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors file; bigger models are sharded (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--trust_remote_code", action="store_true", help="run a base folder's own model code")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def merge() -> int:
        from commonsense.merge import merge_adapter

        print(merge_adapter(args.base_model, args.lora_weights, args.output_dir, dtype=args.dtype,
                            overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                            trust_remote_code=args.trust_remote_code))
        return 0

    return run_or_exit(merge, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
