#!/usr/bin/env bash
# The built-in example, fully offline: build a tiny Llama base that is fair at three
# tasks and three experts, each fine-tuned from it to master one; merge the experts with
# mergekit's task_arithmetic and with ProDistill, both through `mergekit-yaml`; score
# every model on every task and print how much of each expert's skill each merge kept.
#
#   bash examples/tiny/run.sh [OUT_DIR]      (default: ./tiny-example)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(mkdir -p "${1:-tiny-example}" && cd "${1:-tiny-example}" && pwd)"
bash "$repo/scripts/bootstrap.sh"
py="$repo/.venv/bin/python"
export HF_HUB_OFFLINE=1
# One thread and the kernels the build pins (mergekit_prodistill/tiny/skills/kernels.py, run
# as a script so that it imports nothing): the merges and the scores, like the models, come
# out the same on any x86-64 CPU, and a busy CPU does not slow training down several times over.
pinned="$("$py" "$repo/mergekit_prodistill/tiny/skills/kernels.py")"
eval "$pinned"

"$py" -m mergekit_prodistill.tiny.skills build "$out"
for method in task_arithmetic prodistill; do
    echo "merging with $method"
    # mergekit's own methods set the config's deprecated torch_dtype, which transformers
    # warns about; that warning is mergekit's, and says nothing about this example.
    TRANSFORMERS_VERBOSITY=error \
        "$repo/.venv/bin/mergekit-yaml" "$out/$method.yml" "$out/$method" --random-seed 0 --quiet
done
"$py" -m mergekit_prodistill.tiny.skills table "$out"
