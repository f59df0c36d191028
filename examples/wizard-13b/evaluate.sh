#!/usr/bin/env bash
# Score the ProDistill merge of examples/wizard-13b/recipe.yml and its three experts on
# the benchmarks of their skills, with EleutherAI's lm-evaluation-harness (`lm_eval`):
#
#   GSM8K (maths)           gsm8k          5-shot, exact match of the final number
#   MATH (maths)            minerva_math   4-shot, the 7 MATH subjects (needs lm_eval[math])
#   HumanEval (code)        humaneval      0-shot, pass@1 (runs the generated code)
#   MBPP (code)             mbpp           3-shot, pass@1 (runs the generated code)
#
#   pip install "lm_eval[hf,math]==0.4.12"
#   bash examples/wizard-13b/evaluate.sh ./wizard-prodistill-13b [RESULTS_DIR]
#
# Task names and flags are those of lm-evaluation-harness v0.4.12. Each model is scored
# in turn on one GPU (a 13B model in float16 takes about 26 GB); the first run downloads
# the experts and the four test sets. The merge is scored on every run; an expert whose
# folder under RESULTS_DIR already holds results is skipped, so each expert is scored once
# (delete its folder to score it again). At the end a table of every model's scores is
# printed and written to RESULTS_DIR/summary.md.
#
# HumanEval and MBPP execute the code the models write: run this in a container or VM
# you do not mind losing. Environment overrides: DTYPE (float16), BATCH_SIZE (auto),
# DEVICE (cuda:0), TASKS (gsm8k,minerva_math,humaneval,mbpp), LIMIT (unset; e.g. 20
# scores only the first 20 problems of each task, for a quick check of the setup; those
# results go to RESULTS_DIR-limit20, apart from full runs).
set -euo pipefail
merged="${1:?usage: bash examples/wizard-13b/evaluate.sh MERGED_MODEL_DIR [RESULTS_DIR]}"
results="${2:-wizard-13b-eval}${LIMIT:+-limit$LIMIT}"
dtype="${DTYPE:-float16}"
batch_size="${BATCH_SIZE:-auto}"
device="${DEVICE:-cuda:0}"
tasks="${TASKS:-gsm8k,minerva_math,humaneval,mbpp}"

# The code tasks score with Hugging Face evaluate's code_eval metric, which refuses to
# run generated code unless this is set; --confirm_run_unsafe_code is lm_eval's own gate.
export HF_ALLOW_CODE_EVAL=1

names=(prodistill wizardlm wizardmath code-alpaca)
models=("$merged" WizardLMTeam/WizardLM-13B-V1.2 WizardLMTeam/WizardMath-13B-V1.0
        layoric/llama-2-13b-code-alpaca)

for i in "${!names[@]}"; do
    out="$results/${names[$i]}"
    if [ "$i" -gt 0 ] && compgen -G "$out/*/results_*.json" > /dev/null; then
        echo "${names[$i]}: results in $out already, skipped"
        continue
    fi
    echo "${names[$i]}: scoring ${models[$i]} on $tasks"
    lm_eval --model hf \
        --model_args "pretrained=${models[$i]},dtype=$dtype" \
        --tasks "$tasks" \
        --batch_size "$batch_size" \
        --device "$device" \
        --confirm_run_unsafe_code \
        --output_path "$out" \
        --log_samples \
        ${LIMIT:+--limit "$LIMIT"}
done

# One row per model, one column per task metric (MATH's subjects folded into its group),
# from each model's newest results file.
python3 - "$results" "$tasks" "${names[@]}" <<'PY' | tee "$results/summary.md"
import glob, json, os, sys

root, tasks, names = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
rows, columns = {}, []
for name in names:
    found = glob.glob(os.path.join(root, name, "*", "results_*.json"))
    if not found:
        continue
    newest = max(found, key=os.path.basename)  # results_<ISO date>.json
    results = json.load(open(newest))["results"]
    for task in tasks:
        for key, value in results.get(task, {}).items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            column = f"{task} {key}"
            columns += [column] if column not in columns else []
            rows.setdefault(name, {})[column] = value
print("| model | " + " | ".join(columns) + " |")
print("|---" * (len(columns) + 1) + "|")
for name, scores in rows.items():
    cells = [f"{100 * scores[c]:.1f}" if c in scores else "" for c in columns]
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
