"""The recipe contract: what ``parameters:`` accept, and one clear line for what they don't."""

import pytest
import yaml
from mergekit.config import MergeConfiguration

from helpers import recipe, refused, with_expert_parameters
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.recipe import parse_recipe


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
    ],
    ids=["unknown-key", "unknown-expert-key", "lr-zero", "lr-negative", "epochs-negative",
         "shots-zero", "init-nan", "init-inf", "gradient", "no-calibration", "no-base",
         "dtype", "out-dtype"],
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
