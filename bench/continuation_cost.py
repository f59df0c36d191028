"""What the continuation pass costs next to a plain `model.generate` of the same tokens.

Builds a 12-layer family (random weights, float32) with two experts and 64 prompts each,
then times, side by side in one process:

* the merge's continuation pass: ``run._continued``, exactly as the merge runs it
  (placement from the free memory, loading each expert, generating, saving the result in
  a progress folder);
* a plain ``model.generate`` of the same prompts, in the same batches, with the same number
  of new tokens, on the expert already loaded (loading not timed).

Both run alternately, ``--rounds`` times each, after an untimed warm-up generation; the
fastest of each is kept. Their ratio is the pass's overhead (goal: <= 1.5). With ``--old`` it also times the pass
as it was placed before: two blocks' worth of weights in memory, the rest offloaded to
disk, ``batch_size`` prompts per batch, against a plain generate in those batches.

    python bench/continuation_cost.py [--hidden 384] [--layers 12] [--tokens 64] [--rounds 2]
                                      [--old]
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="continue_tokens")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--old", action="store_true",
                    help="also time the former placement (two blocks resident, the rest on disk)")
    ap.add_argument("--dir", help="where to write the models (default: a temporary folder)")
    args = ap.parse_args()

    import transformers
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill import preflight, run
    from mergekit_prodistill.inputs import calibration, continuation, expert_placement
    from mergekit_prodistill.output.progress import Progress
    from mergekit_prodistill.parallel import SINGLE
    from mergekit_prodistill.plan.context import RunContext
    from mergekit_prodistill.recipe import parse_recipe

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-continuation-"))
    heads = args.hidden // 64
    config = common.llama_config(args.layers, args.hidden, args.intermediate, heads, vocab=768)
    family = common.write_family(root / "family", config, 2, torch.float32, prompts=args.shots)
    recipe_path = common.write_recipe(family, root / "recipe.yml", dtype="float32", epochs=1,
                                      shots=args.shots, batch_size=args.batch_size,
                                      continue_tokens=args.tokens)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_path.read_text()))
    recipe = parse_recipe(config)
    options = MergeOptions(quiet=True)
    checked = preflight.check_before_merge(recipe, config, options, str(root / "out"))
    calib = calibration.load_for_experts(recipe, False, seed=0)
    ctx = RunContext.of(options)

    placements = []
    place = expert_placement.place_expert

    def recorded(*a, **kw):
        placements.append(place(*a, **kw))
        return placements[-1]

    def merge_pass(name):
        """Seconds of the merge's continuation pass, and its result."""
        folder = root / name
        folder.mkdir(exist_ok=True)
        checkpoint = Progress(str(folder), name)
        checkpoint.restore_or_reset()  # a fresh progress folder
        started = time.perf_counter()
        continued = run._continued(recipe, checked, calib, ctx, options, checkpoint, SINGLE)
        return time.perf_counter() - started, continued.sequences

    def plain_generate(rows):
        """Seconds of model.generate alone, in batches of ``rows`` sorted prompts."""
        seconds, out = 0.0, []
        for expert, prompts in zip(recipe.experts, calib.sequences):
            path = str(expert.model.model.path)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
            done = {}
            for start in range(0, len(order), rows):
                chunk = order[start:start + rows]
                ids, mask = continuation.left_pad([prompts[i] for i in chunk],
                                                  tokenizer.pad_token_id)
                started = time.perf_counter()
                new = model.generate(input_ids=ids, attention_mask=mask,
                                     max_new_tokens=args.tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                seconds += time.perf_counter() - started
                for i, seq in zip(chunk, new[:, ids.shape[1]:].tolist()):
                    done[i] = prompts[i] + continuation.cut_at_stop(
                        seq, {tokenizer.eos_token_id}, tokenizer.pad_token_id)
            out.append([done[i] for i in range(len(prompts))])
            del model
        return seconds, out

    # Untimed: one short generation, so that neither side pays the process's first-call
    # costs (imports, kernel set-up).
    warm = transformers.AutoModelForCausalLM.from_pretrained(
        str(recipe.experts[0].model.model.path), dtype=torch.float32)
    warm.generate(input_ids=torch.tensor([calib.sequences[0][0]]), max_new_tokens=2,
                  do_sample=False, pad_token_id=0)
    del warm

    expert_placement.place_expert = recorded
    print(f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"float32; 2 experts x {args.shots} prompts, continue_tokens {args.tokens}; "
          f"{torch.get_num_threads()} threads")
    merged_s = plain_s = math.inf
    for round in range(args.rounds):  # alternating; the fastest of each
        seconds, merged = merge_pass(f"new-{round}")
        merged_s = min(merged_s, seconds)
        rows = placements[-1].rows
        seconds, plain = plain_generate(rows)
        plain_s = min(plain_s, seconds)
    print(f"placement: {placements[-1].describe()}")
    print(f"merge's continuation pass {merged_s:8.2f} s")
    print(f"plain model.generate      {plain_s:8.2f} s   (same {rows}-prompt batches, "
          "model already loaded)")
    print(f"ratio                     {merged_s / plain_s:8.2f}   (goal <= 1.5); "
          f"identical tokens: {merged == plain}")

    if args.old:
        shape = expert_placement.expert_shape(transformers.AutoConfig.from_pretrained(
            str(recipe.experts[0].model.model.path)), 4)
        budget = 2 * shape.weight_bytes // args.layers  # the former two-block budget
        n, b = args.shots, args.batch_size
        old = expert_placement.Placement(
            b, math.ceil(n / b), budget, 0, shape.weight_bytes - budget, 0, None,
            {"cpu": budget})
        expert_placement.place_expert = lambda *a, **kw: old
        old_s, old_out = merge_pass("old")
        plain_old_s, plain_old = plain_generate(b)
        print(f"former placement: {old.describe()}")
        print(f"merge's continuation pass {old_s:8.2f} s")
        print(f"plain model.generate      {plain_old_s:8.2f} s   (same {b}-prompt batches)")
        print(f"ratio                     {old_s / plain_old_s:8.2f}; "
              f"identical tokens: {old_out == plain_old}")
        print(f"the pass now takes {merged_s:.2f} s instead of {old_s:.2f} s "
              f"({old_s / merged_s:.1f}x faster)")
    expert_placement.place_expert = place


if __name__ == "__main__":
    main()
