"""Experts whose vocabularies differ from the base's (WizardMath-13B's extra [PAD] row)."""

import json

import pytest
import torch
import transformers
import yaml
from mergekit.config import MergeConfiguration

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs import calibration
from mergekit_prodistill.models.vocab import build_vocabulary
from mergekit_prodistill.recipe import parse_recipe

from helpers import load_tensors, merge

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def pad_family(families):
    """Expert 1 adds one token, as WizardMath adds [PAD]."""
    return families("llama", 2, extra_tokens=((), ("[PAD]",)))


def with_prompt(fam, tmp_path, index, text):
    """Eight prompts: seven of the family's calibration file for expert ``index`` and ``text``."""
    path = tmp_path / f"calibration_{index}.jsonl"
    lines = fam.calibration[index].read_text().splitlines()[:7]
    path.write_text("\n".join([*lines, json.dumps({"text": text})]) + "\n")
    return str(path)


def test_tiny_family_with_an_added_token(families):
    plain, fam = families("llama", 2), pad_family(families)
    for model in (fam.base, fam.experts[0]):
        assert len(transformers.AutoTokenizer.from_pretrained(model)) == 768
    tokenizer = transformers.AutoTokenizer.from_pretrained(fam.experts[1])
    assert len(tokenizer) == 769 and tokenizer.convert_tokens_to_ids("[PAD]") == 768
    assert json.loads((fam.experts[1] / "config.json").read_text())["vocab_size"] == 769
    grown, same = load_tensors(fam.experts[1]), load_tensors(plain.experts[1])
    for name in VOCAB_TENSORS:
        assert grown[name].shape == (769, 64)
        assert torch.equal(grown[name][:768], same[name][:768])
        assert grown[name][768].std() > 0
    # Everything else is exactly the family without the extra token.
    assert all(torch.equal(grown[k], same[k]) for k in same if k not in VOCAB_TENSORS)
    assert load_tensors(fam.base).keys() == load_tensors(plain.base).keys()


def test_an_added_token_keeps_its_per_layer_embedding_row_too(families, tmp_path):
    # Gemma 4 E2B's per-layer embeddings are indexed by token, as its embedding is.
    fam = families("gemma4_e2b", 2, extra_tokens=((), ("[PAD]",)))
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=2, lr=0.05, shots=8, batch_size=8,
                                    continue_tokens=0))
    doc["models"][1]["parameters"]["calibration"] = with_prompt(fam, tmp_path, 1, "Hi [PAD] there")
    out = merge(yaml.safe_dump(doc), tmp_path / "pd")
    merged, expert = load_tensors(out), load_tensors(fam.experts[1])
    name = "model.embed_tokens_per_layer.weight"
    assert merged[name].shape[0] == 769 and torch.equal(merged[name][768], expert[name][768])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.config.vocab_size_per_layer_input == 769


def tokens_setting(fam):
    """mergekit's per-token settings: a forced zero row, and a row from a chosen model."""
    return {"tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
        "<s>": {"source": {"kind": "zero"}, "force": True},
        "[PAD]": {"source": str(fam.experts[1])},
    }}}


@pytest.mark.parametrize(
    "settings,rows",
    [({}, 769), ({"tokenizer_source": "union"}, 769), ({"tokenizer_source": "base"}, 768),
     ({"tokenizer": {"source": "union"}}, 769), (tokens_setting, 784)],  # 769 padded to 16
    ids=["default", "union", "base", "tokenizer-config", "tokens-and-padding"],
)
def test_untrained_merge_equals_mergekit_with_the_same_vocabulary(families, tmp_path, settings, rows):
    fam = pad_family(families)
    settings = settings(fam) if callable(settings) else settings
    ta = yaml.safe_load(fam.recipe("task_arithmetic", weight=0.5))
    # Without settings mergekit stops on the size mismatch; ours behaves as union.
    ta.update(settings or {"tokenizer_source": "union"})
    pd = yaml.safe_load(fam.recipe("prodistill", epochs=0, init=0.5, shots=8))
    pd.update(settings)
    a = load_tensors(merge(yaml.safe_dump(ta), tmp_path / "ta"))
    out = merge(yaml.safe_dump(pd), tmp_path / "pd")
    b = load_tensors(out)
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert b["model.embed_tokens.weight"].shape[0] == rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == min(rows, 769)


def test_added_token_keeps_its_own_row_and_the_merge_trains(families, tmp_path, caplog):
    fam = pad_family(families)
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=2, lr=0.05, shots=8, batch_size=8))
    # Expert 1's prompts use its added token, so the merged stream must find its row.
    doc["models"][1]["parameters"]["calibration"] = with_prompt(fam, tmp_path, 1, "Hi [PAD] there")
    out = merge(yaml.safe_dump(doc), tmp_path / "pd")

    merged, expert, base = load_tensors(out), load_tensors(fam.experts[1]), load_tensors(fam.base)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (769, 64)
        assert torch.equal(merged[name][768], expert[name][768])  # only expert 1 has it
        assert not torch.equal(merged[name][:768], base[name])  # shared rows are merged
    assert "vocabularies differ in size" in caplog.text and "'[PAD]' from" in caplog.text

    report = json.loads((out / "prodistill_report.json").read_text())
    assert "tokenizer_source: union" in report["vocabulary"]
    assert all(b["loss_after"] < b["loss_before"] for b in report["blocks"])
    assert "'[PAD]' from" in (out / "README.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Hi [PAD] there", return_tensors="pt").input_ids
    assert 768 in ids[0].tolist()
    assert torch.isfinite(model(ids).logits).all()


def test_same_size_vocabularies_have_no_vocabulary_note(families, tmp_path):
    out = merge(families("llama", 2).recipe("prodistill", epochs=0, shots=4), tmp_path / "pd")
    assert json.loads((out / "prodistill_report.json").read_text())["vocabulary"] is None


def test_calibration_ids_follow_the_merged_vocabulary(families, tmp_path):
    # Two experts add different tokens at the same id: the union gives them two ids.
    fam = families("llama", 2, extra_tokens=(("<a>",), ("<b>",)))
    doc = yaml.safe_load(fam.recipe("prodistill", shots=8, continue_tokens=0))  # prompts alone
    doc["models"][0]["parameters"]["calibration"] = with_prompt(fam, tmp_path, 0, "x <a> y")
    doc["models"][1]["parameters"]["calibration"] = with_prompt(fam, tmp_path, 1, "x <b> y")
    config = MergeConfiguration.model_validate(doc)
    recipe = parse_recipe(config)
    rows = {recipe.base: 768, **{e.model: 769 for e in recipe.experts}}
    vocabulary = build_vocabulary(recipe, config, False, rows)
    calib = calibration.load_for_experts(recipe, False, seed=0)
    merged_ids = vocabulary.calibration_ids(calib.batches, calib.sources)

    out_tok = vocabulary.tokenizer
    assert out_tok.convert_tokens_to_ids(["<a>", "<b>"]) == [768, 769]
    for i, text in enumerate(["x <a> y", "x <b> y"]):
        own = transformers.AutoTokenizer.from_pretrained(fam.experts[i])(text).input_ids
        expected = out_tok(text).input_ids
        found = False
        for batch, ids in zip(calib.batches[i], merged_ids[i]):
            for row, mask, mapped in zip(batch.input_ids, batch.attention_mask, ids):
                n = int(mask.sum())
                if row[:n].tolist() == own:
                    assert mapped[:n].tolist() == expected
                    found = True
                else:  # ordinary tokens keep their ids
                    assert torch.equal(mapped[:n], row[:n])
        assert found and 768 in own


def test_unusable_token_setting_is_refused_before_reading_weights(families, tmp_path, monkeypatch):
    from mergekit_prodistill.training.weights import ModelTensors

    monkeypatch.setattr(ModelTensors, "load", lambda *a: pytest.fail("a weight was read"))
    fam = pad_family(families)
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=1, shots=8))
    doc["tokenizer"] = {"source": "union", "tokens": {"[PAD]": {"source": str(fam.experts[0])}}}
    with pytest.raises(ProDistillError, match=r"recipe: the tokenizer settings cannot be applied: "
                                              r"Token '\[PAD\]' not found in model .*expert_0"):
        merge(yaml.safe_dump(doc), tmp_path / "pd")
    assert not (tmp_path / "pd").exists()


def test_token_missing_from_the_merged_vocabulary_is_refused(families, tmp_path):
    fam = pad_family(families)
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=1, shots=8))
    doc["tokenizer_source"] = "base"  # the merged model has no [PAD]
    doc["models"][1]["parameters"]["calibration"] = with_prompt(fam, tmp_path, 1, "Hi [PAD]")
    with pytest.raises(ProDistillError, match=r"calibration_1.jsonl: token '\[PAD\]' \(id 768\) "
                                              r"of model .* has no row in the merged model's "
                                              r"vocabulary"):
        merge(yaml.safe_dump(doc), tmp_path / "pd")
    assert not (tmp_path / "pd").exists()
