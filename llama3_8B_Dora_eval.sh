#!/usr/bin/env bash
# llama3_8B_Dora_eval.sh is the seed README's name for llama3_8B_DoRA_eval.sh, the file's name in the original
# repository. Both names work: this one runs that script with the same arguments.
SCRIPT_ALIAS=$(basename "$0") exec bash "$(dirname "$0")/llama3_8B_DoRA_eval.sh" "$@"
