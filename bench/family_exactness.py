"""How far the block-by-block forward is from each supported family's own forward.

For every tiny family (mergekit_prodistill.tiny), runs the base model's own forward on a
padded batch of calibration prompts, then the merge's path: the model's embedding module
(BlockRunner.start, with the per-layer inputs of the families that have them), every
block through BlockRunner, and the head training's path to
log-probabilities (head.HeadForward). Prints, per family and dtype, the largest absolute
difference of any block's output (and the hidden RMS, for scale) and of the log-probs.

    PYTHONPATH=. python bench/family_exactness.py [--dtypes float32 bfloat16]
"""

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

from mergekit_prodistill.inputs.calibration import make_batches, tokenize
from mergekit_prodistill.inputs.sources import read_prompts
from mergekit_prodistill.models.blocks import (BlockRunner, decoder_of, layer_weight_names,
                                               loading_attention)
from mergekit_prodistill.models.families import load_model
from mergekit_prodistill.tiny import ARCHITECTURES, build_tiny_family
from mergekit_prodistill.training.head import HeadForward


@torch.no_grad()
def errors(base: Path, batch, dtype: torch.dtype):
    config = transformers.AutoConfig.from_pretrained(base)
    model = load_model(base, config, dtype=dtype,
                       attn_implementation=loading_attention(config))
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in decoder_of(model).layers]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for h in hooks:
        h.remove()

    runner = BlockRunner(model.config, torch.device("cpu"))
    state = decoder_of(model).state_dict()  # a multimodal model's: its language model's
    stream = runner.start(state, batch.input_ids)  # with what blocks read beside it
    ctx = runner.context(batch.attention_mask, dtype)
    real = batch.attention_mask.bool()
    block_error, rms = 0.0, 0.0
    for index, expected in enumerate(outputs):
        layer = runner.layer(index)
        names = layer_weight_names(layer, [f"layers.{index}.{n}" for n in layer.state_dict()])
        stored = {}
        hidden = runner.forward(index, layer, {o: state[f] for f, o in names.items()}, stream,
                                ctx, stored)
        runner.layout.write(stream, stream, hidden, stored, index)
        block_error = max(block_error, float((hidden - expected)[real].abs().max()))
        rms = max(rms, float(expected[real].float().pow(2).mean().sqrt()))
    log_probs = HeadForward(model.config)(state["norm.weight"], model.get_output_embeddings().weight,
                                          hidden)
    head_error = float((log_probs - torch.log_softmax(logits.float(), -1))[real].abs().max())
    return block_error, rms, head_error


def main():
    transformers.utils.logging.disable_progress_bar()  # one table, no loading bars
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    print(f"{'family':10} {'dtype':9} {'max block error':>16} {'hidden RMS':>11} {'max log-prob error':>19}")
    with tempfile.TemporaryDirectory() as root:
        for arch in ARCHITECTURES:
            fam = build_tiny_family(Path(root) / arch, arch=arch, n_experts=1)
            tokenizer = transformers.AutoTokenizer.from_pretrained(fam.base)
            (batch,) = make_batches(tokenize(read_prompts(str(fam.calibration[0]))[:8], tokenizer, 64), 8)
            for name in args.dtypes:
                block, rms, head = errors(fam.base, batch, getattr(torch, name))
                print(f"{arch:10} {name:9} {block:16.3g} {rms:11.3g} {head:19.3g}")


if __name__ == "__main__":
    main()
