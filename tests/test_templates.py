"""Prompt templates: presets, the tokenizer's chat template, one BOS, shared token ids."""

import json

import pytest
import transformers
import yaml
from mergekit.config import MergeConfiguration

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs.calibration import load_for_experts, tokenize
from mergekit_prodistill.inputs.templates import PRESETS, format_prompts
from mergekit_prodistill.recipe import parse_recipe
from mergekit_prodistill.tiny import BOS_ID, build_tiny_family

from helpers import merge, with_expert_parameters

# Llama-2 style: the template writes the BOS text itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    "{% if add_generation_prompt %} Sure:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_family(tmp_path_factory):
    """One expert identical to its base, whose tokenizer has a chat template."""
    fam = build_tiny_family(tmp_path_factory.mktemp("chat"), "llama", 1, expert_scale=0.0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(fam.experts[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(fam.experts[0])
    return fam


def test_presets_and_custom_templates_wrap_the_prompt():
    tokenizer = object()  # only 'chat' needs a tokenizer
    (wrapped,) = format_prompts("alpaca-cot", ["Add {x} and 2."], tokenizer, "model m")
    assert wrapped == PRESETS["alpaca-cot"].replace("{prompt}", "Add {x} and 2.")
    assert wrapped.endswith("### Response: Let's think step by step.")
    assert format_prompts("Q: {prompt}\nA:", ["hi"], tokenizer, "m") == ["Q: hi\nA:"]


def test_chat_uses_the_tokenizer_template_and_needs_one(chat_family):
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_family.experts[0])
    assert format_prompts("chat", ["hi"], tokenizer, "m") == ["<s>[INST] hi [/INST] Sure:"]
    plain = transformers.AutoTokenizer.from_pretrained(chat_family.base)
    with pytest.raises(ProDistillError, match="^model m: template 'chat' needs a chat template"):
        format_prompts("chat", ["hi"], plain, "model m")


def test_a_template_that_writes_bos_gets_exactly_one(chat_family):
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_family.base)
    with_bos, without = tokenize(["<s>USER: hi ASSISTANT:", "USER: hi ASSISTANT:"], tokenizer, 64)
    assert with_bos == without
    assert with_bos[0] == BOS_ID and with_bos[1] != BOS_ID


def recipe_for(fam, **expert_params):
    return with_expert_parameters(
        # continue_tokens 0: the templated prompts themselves are checked.
        fam.recipe("prodistill", epochs=2, shots=8, batch_size=4, max_length=64,
                   continue_tokens=0),
        {"calibration": str(fam.calibration[0]), **expert_params},
    )


def test_chat_prompts_reach_both_streams_as_the_same_ids(chat_family, tmp_path):
    recipe = recipe_for(chat_family, template="chat")
    parsed = parse_recipe(MergeConfiguration.model_validate(yaml.safe_load(recipe)))
    calib = load_for_experts(parsed, False, seed=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_family.experts[0])
    for batch in calib.batches[0]:
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist()):
            real = ids[: sum(mask)]
            assert real[0] == BOS_ID and real[1] != BOS_ID
            text = tokenizer.decode(real)
            assert text.startswith("<s>[INST] ") and text.endswith(" [/INST] Sure:")

    # The expert equals its base, so the merged model equals it too: if the merged stream
    # and the expert stream saw different ids anywhere, some loss would not be exactly 0.
    out = merge(recipe, tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert report["calibration"][0]["template"] == "chat"
    assert [(b["loss_before"], b["loss_after"]) for b in report["blocks"]] == [(0.0, 0.0)] * 2
