#!/usr/bin/env bash
# The built-in example, fully offline: build a tiny Llama-style base model and three
# "experts" fine-tuned from it (with unlabeled prompt files), merge them with
# `mergekit-yaml` and merge_method: prodistill, then load the result and generate.
#
#   bash examples/tiny/run.sh [OUT_DIR]      (default: ./tiny-example)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(mkdir -p "${1:-tiny-example}" && cd "${1:-tiny-example}" && pwd)"
bash "$repo/scripts/bootstrap.sh"
py="$repo/.venv/bin/python"
export HF_HUB_OFFLINE=1

"$py" -m mergekit_prodistill.tiny "$out" --arch llama --experts 3
"$repo/.venv/bin/mergekit-yaml" "$out/recipe.yml" "$out/merged" --random-seed 0 --out-shard-size 100K
"$py" - "$out/merged" <<'PY'
import json, sys
import transformers
path = sys.argv[1]
model = transformers.AutoModelForCausalLM.from_pretrained(path)
tok = transformers.AutoTokenizer.from_pretrained(path)
ids = tok("What is two plus three?", return_tensors="pt").input_ids
print("generated:", tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0]))
for b in json.load(open(f"{path}/prodistill_report.json"))["blocks"]:
    print(f"block {b['block']}: loss {b['loss_before']:.3g} -> {b['loss_after']:.3g}")
print("merged model written to", path)
PY
