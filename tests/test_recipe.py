"""The recipe contract: what ``parameters:`` accept, and one clear line for what they don't."""

import os
import re

import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_prodistill import preflight
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.output import output_folder
from mergekit_prodistill.recipe import parse_recipe

from helpers import recipe, refused, with_expert_parameters


def parsed(families, **params):
    fam = families("llama", 2)
    return parse_recipe(MergeConfiguration.model_validate(
        yaml.safe_load(fam.recipe("prodistill", **params))))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d["parameters"].update(epoch=3),
         r"recipe parameters: unknown parameter 'epoch' \(did you mean 'epochs'\?\)"),
        (lambda d: d["models"][0]["parameters"].update(templat="alpaca"),
         r"unknown parameter 'templat' \(did you mean 'template'\?\)"),
        (lambda d: d["parameters"].update(lr=0), r"parameter 'lr' = 0: .*greater than 0"),
        (lambda d: d["parameters"].update(lr=-0.1), r"parameter 'lr' = -0.1: .*greater than 0"),
        (lambda d: d["parameters"].update(epochs=-1), r"parameter 'epochs' = -1: .*must be auto or a whole number"),
        (lambda d: d["parameters"].update(shots=0), r"parameter 'shots' = 0: .*greater than or equal to 1"),
        (lambda d: d["parameters"].update(init=float("nan")), r"parameter 'init' = nan: .*finite"),
        (lambda d: d["parameters"].update(init=float("inf")), r"parameter 'init' = inf: .*finite"),
        (lambda d: d["parameters"].update(lr=[0.1, 0.01]), r"parameter 'lr' must be a single value"),
        (lambda d: d["models"][1].pop("parameters"), r"name the calibration prompts with exactly one of 'calibration:'"),
        (lambda d: d.pop("base_model"), r"prodistill needs 'base_model:'"),
        (lambda d: d.update(dtype="bf16"), r"dtype 'bf16' is not one of bfloat16, float16, float32"),
        (lambda d: d.update(out_dtype="fp8"), r"out_dtype 'fp8' is not one of"),
        (lambda d: d["parameters"].update(lr=float("inf")),
         r"^recipe parameters: parameter 'lr' = inf: must be a finite number$"),
        (lambda d: d["parameters"].update(head_epochs=True),
         r"^recipe parameters: parameter 'head_epochs' = True: must be a number, not true or "
         r"false$"),
        (lambda d: d.update(chat_template="chatml2"),
         r"^recipe: chat_template 'chatml2' is not auto, one of mergekit's presets \(alpaca, "
         r"chatml, [a-z0-9, ]+\) or a Jinja template$"),
        (lambda d: d["parameters"].update(activation_placement="cpu", activation_dir="streams"),
         r"^recipe parameters: activation_dir holds disk-backed activation streams, and "
         r"'activation_placement: cpu' keeps them in CPU memory; set activation_placement: "
         r"disk or auto, or remove activation_dir$"),
        (lambda d: d.update(chat_template="chatml"),
         r"^recipe: chat_template is set on a tokenizer the merge builds, and this recipe "
         r"builds none \(no tokenizer_source or tokenizer:, one vocabulary size\), so the "
         r"base's tokenizer would be copied without it; add 'tokenizer_source: base', or "
         r"remove chat_template$"),
    ],
    ids=["unknown-key", "unknown-expert-key", "lr-zero", "lr-negative", "epochs-negative",
         "shots-zero", "init-nan", "init-inf", "gradient", "no-calibration", "no-base",
         "dtype", "out-dtype", "lr-inf", "number-as-switch", "chat-template-unknown",
         "activation-dir-without-disk", "chat-template-dropped"],
)
def test_recipe_errors(families, tmp_path, no_weight_reads, change, match):
    doc = recipe(families("llama", 2), epochs=1)
    change(doc)
    refused(doc, tmp_path / "out", match)


@pytest.mark.parametrize("params,error", [
    ({"template": "alpaca"}, "exactly one of 'calibration:'"),
    ({"calibration": "a.jsonl", "dataset": "x/y"}, "exactly one of 'calibration:'"),
    ({"calibration": "a.jsonl", "subset": "main"}, "'subset' applies to 'dataset:' sources"),
    ({"dataset": "x/y", "colum": "q"}, "unknown parameter 'colum'"),
    ({"dataset": "x/y", "template": "vicuña"}, "must contain {prompt}"),
])
def test_recipe_source_errors_name_the_expert(families, params, error):
    fam = families("llama", 2)
    text = with_expert_parameters(fam.recipe("prodistill"), params)
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    with pytest.raises(ProDistillError, match=f"^model {fam.experts[0]}: .*") as err:
        parse_recipe(config)
    assert error in str(err.value)


def test_float16_activations_are_refused_with_the_reason(families):
    with pytest.raises(ProDistillError, match="float16 cannot carry the merging coefficients"):
        parsed(families, activation_dtype="float16")


def test_head_training_needs_the_merged_stream(families):
    with pytest.raises(ProDistillError, match="head_epochs trains the head on the merged"):
        parsed(families, inputs="expert", head_epochs=5)
    parsed(families, inputs="merged", head_epochs=5)


def test_head_training_needs_the_block_loop(families):
    with pytest.raises(ProDistillError, match="'epochs: 0' runs no block loop") as err:
        parsed(families, epochs=0, head_epochs=5)
    assert "\n" not in str(err.value)
    parsed(families, epochs=0)


def test_patience_needs_held_out_prompts(families):
    with pytest.raises(ProDistillError, match="'holdout: 0' holds none out") as err:
        parsed(families, patience=3, holdout=0)
    assert "\n" not in str(err.value)
    parsed(families, patience=3)


def test_an_activation_dir_that_is_a_file_is_refused(families, tmp_path):
    taken = tmp_path / "streams"
    taken.write_text("")
    with pytest.raises(ProDistillError, match="is a file, not a folder") as err:
        parsed(families, activation_placement="disk", activation_dir=str(taken))
    assert "\n" not in str(err.value)
    parsed(families, activation_placement="disk", activation_dir=str(tmp_path / "new"))


def test_auto_epochs_give_few_shots_as_many_steps_as_64(families):
    assert parsed(families).params.epochs_for(16) == 30  # 64 shots, batch_size 4
    assert parsed(families).params.epochs_for(4) == 120  # 16 shots: 480 steps too
    assert parsed(families).params.epochs_for(1) == 480  # 4 shots
    assert parsed(families, epochs=7).params.epochs_for(1) == 7


def test_an_activation_dir_below_a_file_is_refused(families, tmp_path, no_weight_reads):
    taken = tmp_path / "streams"
    taken.write_text("")
    below = taken / "run-1"
    doc = recipe(families("llama", 2), epochs=1, activation_placement="disk",
                 activation_dir=str(below))
    refused(doc, tmp_path / "out", "^" + re.escape(
        f"recipe parameters: parameter 'activation_dir' = '{below}': {below} cannot be a "
        f"folder: {taken} is a file; name a folder (it is created if missing)") + "$")


def test_activation_dir_is_for_disk_streams(families, tmp_path):
    for placement, where in (("device", "on the compute device"), ("cpu", "in CPU memory")):
        with pytest.raises(ProDistillError, match=f"'activation_placement: {placement}' "
                                                  f"keeps them {where}; set"):
            parsed(families, activation_placement=placement, activation_dir=str(tmp_path))
    for placement in ("auto", "disk"):  # auto may put the streams on disk
        parsed(families, activation_placement=placement, activation_dir=str(tmp_path))


def test_an_activation_dir_the_merge_cannot_write_is_refused(families, tmp_path, no_weight_reads,
                                                             monkeypatch):
    # Root writes anywhere whatever the mode, so simulate the answer the OS would give.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(output_folder.os, "access",
                        lambda path, mode: path != str(locked) and real_access(path, mode))
    doc = recipe(families("llama", 2), epochs=1, activation_dir=str(locked / "streams"))
    refused(doc, tmp_path / "out", "^" + re.escape(
        f"recipe parameters: activation_dir {locked / 'streams'} cannot be created: {locked} "
        "is not writable; name a folder this merge can write") + "$")
    assert os.listdir(locked) == []


def test_chat_template_goes_to_a_built_tokenizer(families, tmp_path):
    doc = recipe(families("llama", 2), epochs=0)
    doc.update(chat_template="chatml", tokenizer_source="base")
    config = MergeConfiguration.model_validate(doc)
    checked = preflight.check_before_merge(parse_recipe(config), config, MergeOptions(),
                                           str(tmp_path / "out"))
    assert len(checked.models) == 3  # accepted: the base and both experts were checked
    assert not (tmp_path / "out").exists()
