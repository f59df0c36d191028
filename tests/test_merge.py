"""The merge itself: exactness against mergekit, block forward, and that training helps."""

import json
import shutil

import pytest
import torch
import transformers
import yaml
from mergekit.architecture import ConfiguredModelArchitecture, get_architecture_info
from mergekit.architecture.conversion import can_convert_checkpoint_keys
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import save_file
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from mergekit_prodistill.inputs.calibration import make_batches, tokenize
from mergekit_prodistill.inputs.sources import read_prompts
from mergekit_prodistill.models.blocks import (BlockRunner, decoder_of, layer_weight_names,
                                               loading_attention)
from mergekit_prodistill.models.families import load_model
from mergekit_prodistill.models.weight_units import WeightUnits
from mergekit_prodistill.tiny import ARCH_CLASS, ARCHITECTURES, ModelSpec, make_prompts
from mergekit_prodistill.training.head import HeadForward

from helpers import load_tensors, merge


def test_supported_families_are_the_tested_ones():
    from mergekit_prodistill import tiny
    from mergekit_prodistill.models.families import FAMILIES

    # The equality tests below run on every tiny family: exactly the accepted ones.
    assert set(FAMILIES) == {tiny._ARCH_CLASS[arch] for arch in ARCHITECTURES}


# How the multimodal tiny families store their language model's tensors: under mergekit's
# layout prefix, or as the multimodal model registers them.
def _under_prefix(name):
    return "language_model." + name


def _registered(name):
    return name.replace("model.", "model.language_model.", 1)


TEXT_NAMES = {"gemma3_vl": _under_prefix, "mistral3_vl": _under_prefix,
              "llama4_vl": _under_prefix, "gemma4_vl": _registered, "gemma4_e2b_vl": _registered,
              "qwen3_5_vl": _registered, "qwen3_5_moe_vl": _registered,
              "qwen2_5_vl": lambda name: name, "qwen3_vl": _registered,
              "qwen3_moe_vl": _registered}


def text_names(arch, config):
    """The language model's tensor names of an ``arch`` checkpoint with ``config``, as
    stored (the text model's own for a text family)."""
    named = TEXT_NAMES.get(arch, lambda name: name)
    text = config.get_text_config()
    if type(text) in MODEL_FOR_CAUSAL_LM_MAPPING:
        names = transformers.AutoModelForCausalLM.from_config(text).state_dict()
    else:  # no causal LM of its own (Qwen2.5-VL's): its decoder, and the head beside it
        names = [*("model." + n for n in transformers.AutoModel.from_config(text).state_dict()),
                 "lm_head.weight"]
    return [named(n) for n in names]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_units_are_the_embedding_each_block_and_the_head(families, arch):
    """Whether mergekit's list has the family (llama) or mergekit infers its tensors
    (olmo3, exaone4, ...), the merge walks the input embedding, then each block, then the
    final norm and LM head, in an order that does not change between processes."""
    fam = families(arch, 2)
    doc = yaml.safe_load(fam.recipe("task_arithmetic", weight=0.5))
    info = get_architecture_info(MergeConfiguration.model_validate(doc), MergeOptions())
    config = transformers.AutoConfig.from_pretrained(fam.base)
    stored = load_tensors(fam.base)
    units = WeightUnits(ConfiguredModelArchitecture(info=info, config=config), stored)
    # A multimodal checkpoint's language model is stored under its own names: under
    # mergekit's layout prefix (Gemma 3), or as its model registers it (Gemma 4).
    named = TEXT_NAMES.get(arch, lambda name: name)
    text = text_names(arch, config)
    pre = [w.name for w in units.pre_weights()]
    assert pre[0] == named("model.embed_tokens.weight")
    # What computes the per-layer inputs (Gemma 4 E2B) and a multimodal checkpoint's other
    # tensors (vision tower, projector) follow the embedding.
    towers = set(stored) - set(text) if arch.endswith("_vl") else set()
    per_layer = {named(f"model.{m}.weight") for m in ("embed_tokens_per_layer",
                 "per_layer_model_projection", "per_layer_projection_norm")
                 } if arch.startswith("gemma4_e2b") else set()
    assert set(pre[1:]) == towers | per_layer and bool(towers) == arch.endswith("_vl")
    after = [w.name for w in units.post_weights() if w.name in stored]
    assert named("model.norm.weight") in after
    assert set(after) <= {named("model.norm.weight"), named("lm_head.weight")}
    model = [n for n in text if n.startswith(named("model.layers.1."))]
    # Optional tensors the family does not store (Granite's biases) left out; fused
    # tensors (a mixture of experts') are read converted from the stored ones.
    held = [w.name for w in units.layer_weights(1) if not w.optional or w.name in stored
            or can_convert_checkpoint_keys(config.model_type, set(stored), w.name)]
    assert held == model
    assert not units.dropped(stored)


@pytest.mark.parametrize("arch,n_experts",
                         [(arch, 3 if arch == "llama" else 2) for arch in ARCHITECTURES])
def test_zero_epochs_equals_mergekit_task_arithmetic(families, tmp_path, arch, n_experts):
    fam = families(arch, n_experts)
    ta = merge(fam.recipe("task_arithmetic", weight=0.5), tmp_path / "ta")
    pd = merge(fam.recipe("prodistill", epochs=0, init=0.5, shots=8), tmp_path / "pd")
    a, b = load_tensors(ta), load_tensors(pd)
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    # mergekit's inferred layout of DeepSeek-V3 leaves out the fused experts of its sparse
    # blocks (and writes none): ours holds them, as theta_0 + init * sum of tau.
    dropped_by_mergekit = sorted(set(b) - set(a))
    assert set(a) <= set(b) and (arch == "deepseek_v3") == bool(dropped_by_mergekit)
    if dropped_by_mergekit:
        models = [transformers.AutoModelForCausalLM.from_pretrained(m).state_dict()
                  for m in (fam.base, *fam.experts)]
        for k in dropped_by_mergekit:
            tau = sum(m[k].double() - models[0][k].double() for m in models[1:])
            torch.testing.assert_close(b[k].double(), models[0][k].double() + 0.5 * tau,
                                       rtol=0, atol=1e-7)
    # A multimodal checkpoint's tensors outside its language model (vision tower,
    # projector) are written, and the merge really is different from the base (the
    # comparison can fail).
    base = load_tensors(fam.base)
    if arch.endswith("_vl"):
        towers = set(base) - set(text_names(arch, transformers.AutoConfig.from_pretrained(
            fam.base)))
        assert towers and towers <= set(b)
    (o_proj,) = [k for k in base if k.endswith("model.layers.1.self_attn.o_proj.weight")]
    assert not torch.equal(base[o_proj], b[o_proj])


def full_forward(path, batch):
    """The model at ``path``, every block's output and its next-token log-probabilities."""
    config = transformers.AutoConfig.from_pretrained(path)
    # Its own class: the one its config names (a multimodal model's, not its text model's).
    model = load_model(path, config, attn_implementation=loading_attention(config))
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in decoder_of(model).layers]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for h in hooks:
        h.remove()
    return model, outputs, torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_by_block_forward_equals_full_model(families, arch):
    fam = families(arch, 2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(fam.base)
    # Prompts of different lengths, longer than the sliding windows, padded in one batch.
    sequences = tokenize(read_prompts(str(fam.calibration[0]))[:6], tokenizer, 64)
    (batch,) = make_batches(sequences, 8)
    assert batch.attention_mask.min() == 0, "the batch should contain padding"
    model, captured, full_log_probs = full_forward(fam.base, batch)

    # A multimodal model's blocks are its language model's, run as its causal LM.
    runner = BlockRunner(model.config, torch.device("cpu"))
    state = decoder_of(model).state_dict()
    with torch.no_grad():
        stream = runner.start(state, batch.input_ids)  # with what blocks read beside it
    ctx = runner.context(batch.attention_mask, stream.dtype)
    real = batch.attention_mask.bool()
    for index, expected in enumerate(captured):
        layer = runner.layer(index)
        names = layer_weight_names(layer, [f"layers.{index}.{n}" for n in layer.state_dict()])
        weights = {own: state[full] for full, own in names.items()}
        with torch.no_grad():
            stored = {}
            hidden = runner.forward(index, layer, weights, stream, ctx, stored)
            runner.layout.write(stream, stream, hidden, stored, index)
        torch.testing.assert_close(hidden[real], expected[real], rtol=0, atol=1e-5)

    # The head training's path from the last block to the next-token distribution.
    with torch.no_grad():
        log_probs = HeadForward(model.config)(state["norm.weight"],
                                              model.get_output_embeddings().weight, hidden)
    torch.testing.assert_close(log_probs[real], full_log_probs[real], rtol=0, atol=1e-5)


def final_hidden(path, prompts, tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    (batch,) = make_batches(tokenize(prompts, tokenizer, 64), len(prompts))
    with torch.no_grad():
        out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.last_hidden_state[batch.attention_mask.bool()]


def test_training_lowers_every_block_loss_and_moves_toward_experts(families, tmp_path):
    fam = families("llama", 2, model=ModelSpec(num_layers=3))
    pd = merge(fam.recipe("prodistill", epochs=20, lr=0.05, shots=16, batch_size=8,
                          continue_tokens=8), tmp_path / "pd")
    ta = merge(fam.recipe("task_arithmetic", weight=0.5), tmp_path / "ta")

    report = json.loads((pd / "prodistill_report.json").read_text())
    assert len(report["blocks"]) == 3
    for block in report["blocks"]:
        assert block["loss_after"] < 0.9 * block["loss_before"], block

    tokenizer = transformers.AutoTokenizer.from_pretrained(fam.base)
    for i, expert in enumerate(fam.experts):
        held_out = make_prompts(i, 8, seed=12345)  # not calibration prompts
        target = final_hidden(expert, held_out, tokenizer)
        err_pd = (final_hidden(pd, held_out, tokenizer) - target).pow(2).mean()
        err_ta = (final_hidden(ta, held_out, tokenizer) - target).pow(2).mean()
        assert err_pd < err_ta, (i, float(err_pd), float(err_ta))


@pytest.mark.parametrize("granularity", ["tensor", "task"])
@pytest.mark.parametrize("inputs", ["dual", "merged", "expert"])
def test_ablations_run_and_train(families, tmp_path, granularity, inputs):
    fam = families("qwen2", 2)
    out = merge(fam.recipe("prodistill", epochs=3, lr=0.05, shots=8, continue_tokens=0,
                           granularity=granularity, inputs=inputs), tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    # No block is written worse than task arithmetic on the held-out prompts.
    assert all(b["heldout_loss_after"] <= b["heldout_loss_before"] for b in report["blocks"])
    assert report["parameters"]["granularity"] == granularity


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3", "granite", "cohere2"])
def test_merge_losses_equal_the_models_own_forward(families, tmp_path, arch):
    """With coefficients kept at init (a vanishing lr), the merged stream is the task
    arithmetic model's own forward and the expert stream the expert's: every block's
    loss and the head's KL before training must be what the full models give."""
    fam = families(arch, 2, prompts_per_expert=6)
    out = merge(fam.recipe("prodistill", epochs=1, lr=1e-12, init=0.5, shots=6, batch_size=3,
                           continue_tokens=0, head_epochs=1), tmp_path / "pd")
    ta = merge(fam.recipe("task_arithmetic", weight=0.5), tmp_path / "ta")
    report = json.loads((out / "prodistill_report.json").read_text())

    tokenizer = transformers.AutoTokenizer.from_pretrained(fam.base)
    block_losses, head_kl = [], []
    for i, expert in enumerate(fam.experts):
        (batch,) = make_batches(tokenize(read_prompts(str(fam.calibration[i])), tokenizer, 512), 6)
        real = batch.attention_mask.bool()
        _, merged, merged_logp = full_forward(ta, batch)
        _, target, target_logp = full_forward(expert, batch)
        block_losses.append([float((m - t)[real].pow(2).mean()) for m, t in zip(merged, target)])
        kl = (target_logp.exp() * (target_logp - merged_logp)).sum(-1)
        head_kl.append(float(kl[real].mean()))
    expected = torch.tensor(block_losses).mean(0)
    got = torch.tensor([b["loss_before"] for b in report["blocks"]])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    # The KL is small (about 1e-6 for granite), so float32 rounding shows at 1e-4.
    torch.testing.assert_close(report["head"]["loss_before"], sum(head_kl) / len(head_kl),
                               rtol=1e-3, atol=0)


def next_token_kl(teacher, student, batch) -> float:
    """Mean KL(teacher || student) of the next-token distributions at real tokens, each
    model run by its own transformers class from its folder."""
    _, _, target = full_forward(teacher, batch)
    _, _, got = full_forward(student, batch)
    kl = (target.exp() * (target - got)).sum(-1)
    return float(kl[batch.attention_mask.bool()].mean())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_trained_merge_loads_whole_and_is_closer_to_each_expert(families, tmp_path, arch):
    """Under the family's own full forward, on prompts never calibrated on, a trained merge
    is closer to every expert than task arithmetic (its epochs: 0), and it loads with no
    missing or unexpected weights."""
    fam = families(arch, 2)
    trained = merge(fam.recipe("prodistill", epochs=10, lr=0.05, shots=16, batch_size=4,
                               continue_tokens=0, holdout=0), tmp_path / "trained")
    untrained = merge(fam.recipe("prodistill", epochs=0, shots=16), tmp_path / "untrained")
    _, info = load_model(trained, transformers.AutoConfig.from_pretrained(trained),
                         output_loading_info=True)
    assert not any(info.values()), info
    tokenizer = transformers.AutoTokenizer.from_pretrained(fam.base)
    for i, expert in enumerate(fam.experts):
        (batch,) = make_batches(tokenize(make_prompts(i, 8, seed=12345), tokenizer, 64), 8)
        kl_trained, kl_untrained = (next_token_kl(expert, m, batch) for m in (trained, untrained))
        assert kl_trained < kl_untrained, (i, kl_trained, kl_untrained)


@pytest.mark.parametrize("arch", ["gemma3_vl", "gemma4_vl", "gemma4_e2b_vl", "mistral3_vl",
                                  "qwen3_5_vl", "qwen3_5_moe_vl", "qwen2_5_vl", "qwen3_vl",
                                  "qwen3_moe_vl", "llama4_vl"])
def test_a_multimodal_merge_says_what_task_arithmetic_merged_and_keeps_its_processor(
        families, tmp_path, arch):
    fam = families(arch, 2)
    processor = '{"processor_class": "TinyProcessor"}'
    (fam.base / "preprocessor_config.json").write_text(processor)
    try:
        out = merge(fam.recipe("prodistill", epochs=1, shots=4, continue_tokens=4),
                    tmp_path / "out", write_model_card=True)
    finally:
        (fam.base / "preprocessor_config.json").unlink()
    assert (out / "preprocessor_config.json").read_text() == processor
    towers = json.loads((out / "prodistill_report.json").read_text())["towers"]
    assert towers == ({"gemma3_vl": ["multi_modal_projector", "vision_tower"],
                       "gemma4_vl": ["embed_vision", "vision_tower"],
                       "gemma4_e2b_vl": ["audio_tower", "embed_audio", "embed_vision",
                                         "vision_tower"],
                       "mistral3_vl": ["multi_modal_projector", "vision_tower"],
                       "llama4_vl": ["multi_modal_projector", "vision_model"],
                       "qwen3_5_vl": ["visual"], "qwen3_5_moe_vl": ["visual"],
                       "qwen2_5_vl": ["visual"], "qwen3_vl": ["visual"],
                       "qwen3_moe_vl": ["visual"]}[arch])
    assert (f"The parts outside the language model ({', '.join(towers)}) were merged by task "
            "arithmetic with weight 0.5") in (out / "README.md").read_text()
    # Loaded with its own class, nothing missing or unexpected.
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        out, output_loading_info=True)
    assert type(model).__name__ == ARCH_CLASS[arch] and not any(info.values()), info


def with_tensors(source, folder, extra):
    """A copy of the model at ``source`` in ``folder`` that also stores ``extra``."""
    shutil.copytree(source, folder)
    save_file(extra, str(folder / "extra.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "extra.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_blocks_stored_tensors_the_model_does_not_load_are_kept_by_task_arithmetic(
        families, tmp_path):
    """Gemma 4 E2B's checkpoints may store keys and values for the blocks that reuse
    others' (transformers ignores them on load): they are merged by task arithmetic and
    written; the blocks are distilled without them."""
    fam = families("gemma4_e2b", 2)
    recipe = fam.recipe("prodistill", epochs=2, lr=0.05, shots=8, continue_tokens=0)
    # Blocks 2 and 3 reuse the keys and values of blocks 0 and 1: stored like theirs.
    like = {f"model.layers.{reuse}.self_attn.{n}.weight":
            f"model.layers.{store}.self_attn.{n}.weight"
            for reuse, store in ((2, 0), (3, 1)) for n in ("k_proj", "v_proj", "k_norm")}
    unloaded, stored = list(like), []
    for i, source in enumerate([fam.base, *fam.experts]):
        own = load_tensors(source)
        extra = {name: own[like[name]] * (1 + 0.1 * i) for name in unloaded}
        copy = with_tensors(source, tmp_path / source.name, extra)
        recipe = recipe.replace(str(source), str(copy))
        stored.append(extra)
    out = merge(recipe, tmp_path / "out")
    merged = load_tensors(out)
    for name in unloaded:
        tau = sum(e[name].double() - stored[0][name].double() for e in stored[1:])
        torch.testing.assert_close(merged[name].double(), stored[0][name].double() + 0.5 * tau)
    _, info = load_model(out, transformers.AutoConfig.from_pretrained(out),
                         output_loading_info=True)
    assert not any(info.values()), info
