"""What tests share besides fixtures: reading checkpoints, caching calibration data, running
recipes in-process and commands in a child."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_prodistill.errors import ProDistillError

BIN = Path(sys.executable).parent


def load_tensors(path: Path) -> dict:
    """Every tensor of the checkpoint in ``path`` (one file or an index of shards)."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(path / name))
    return out


def write_jsonl(path, records):
    """``records`` written to ``path`` one JSON value a line; the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def cache_hub_dataset(cache, tmp_path, repo_id, subset, records):
    """Put ``records`` into the datasets cache as the Hub would leave ``repo_id`` there."""
    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[-1]
    source = write_jsonl(tmp_path / f"{name}.jsonl", records)
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name=name, config_name=subset,
                   data_files={"train": source})
    builder.download_and_prepare()
    built = glob.glob(str(tmp_path / "build" / name / f"{subset}-*" / "0.0.0"))[0]
    # Hub datasets are cached as NAMESPACE___NAME/SUBSET/VERSION/COMMIT.
    shutil.copytree(built, cache / repo_id.replace("/", "___") / subset / "0.0.0" / "0123abcd")


def merge(recipe_text: str, out: Path, **options) -> Path:
    """Run a recipe in-process through mergekit's own entry point (as mergekit-yaml does)."""
    options.setdefault("quiet", True)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    run_merge(config, str(out), options=MergeOptions(**options), config_source=recipe_text)
    return out


def recipe(fam, **params) -> dict:
    """The family's prodistill recipe as a dict, to change before running it."""
    return yaml.safe_load(fam.recipe("prodistill", **params))


def refused(doc: dict, out: Path, match: str, **options) -> str:
    """Run the recipe, expect a one-line ProDistillError matching ``match``, nothing written."""
    with pytest.raises(ProDistillError, match=match) as info:
        merge(yaml.safe_dump(doc), out, **options)
    message = str(info.value)
    assert "\n" not in message, message
    assert not out.exists()
    return message


def run_cli(*args, cwd=None, check=True, env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def with_expert_parameters(recipe_text: str, *updates: dict) -> str:
    """The recipe with each expert's ``parameters:`` replaced by the matching dict."""
    doc = yaml.safe_load(recipe_text)
    for entry, params in zip(doc["models"], updates):
        entry["parameters"] = params
    return yaml.safe_dump(doc, sort_keys=False)


def nan_on_first_training_call(loss_function):
    """``loss_function`` whose first call during training (its first input takes a
    gradient; evaluation passes do not) returns NaN: a non-finite loss, once."""
    calls = {"n": 0}

    def first_call_nan(out, *args):
        loss = loss_function(out, *args)
        if out.requires_grad:
            calls["n"] += 1
            if calls["n"] == 1:
                return loss * float("nan")
        return loss

    return first_call_nan


def refuse_to_generate(*args, **kwargs):
    """In place of continuation.loaded where no model may be loaded to generate (the
    continuations and the written prompts are saved)."""
    raise AssertionError("the continuations were generated again")
