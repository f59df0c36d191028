"""Reading a model folder: headers, shards, dtype and config, and the one Hub id rule."""

import json

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs import sources
from mergekit_prodistill.models import model_files
from mergekit_prodistill.recipe import ExpertParameters

from helpers import recipe, refused


@pytest.mark.parametrize("path,expected", [
    ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf"),
    ("gpt2", "gpt2"),
    ("/cache/hub/models--meta-llama--Llama-2-13b-hf/snapshots/abc123",
     "meta-llama/Llama-2-13b-hf"),
    ("/cache/hub/models--gpt2/snapshots/abc123/", "gpt2"),
    ("/cache/hub/datasets--org--data/snapshots/abc123", None),  # not a model
    ("/models/llama-2-13b", None),
    ("./models/x", None),
    ("~/models/x", None),
    ("a/b/c", None),
    ("not a repo id", None),
])
def test_hub_ids_are_only_what_is_known(path, expected):
    assert model_files.hub_id(path) == expected


def test_an_existing_local_folder_has_no_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_files.hub_id("org/model") is None
    assert model_files.hub_id("org/model", kind="dataset") is None


@pytest.fixture
def offline_hub(monkeypatch):
    import huggingface_hub.constants

    # Read once at import; set it here so no test ever waits on a network timeout.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("path,match", [
    # A valid Hub id without an owner is asked of the Hub, as mergekit's loader does.
    ("gpt2", r"model gpt2: no folder gpt2 here, and the Hugging Face Hub could not provide it"),
    ("./org/name", r"model ./org/name: folder ./org/name does not exist"),
    ("a/b/c", r"model a/b/c: folder a/b/c does not exist"),
])
def test_a_missing_model_folder_is_fetched_only_when_it_is_a_hub_id(
        families, tmp_path, no_weight_reads, offline_hub, monkeypatch, path, match):
    monkeypatch.chdir(tmp_path)
    doc = recipe(families("llama", 2))
    doc["base_model"] = path
    refused(doc, tmp_path / "out", match)


def test_a_dataset_in_the_hub_cache_is_named_by_its_hub_id(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    snapshot = tmp_path / "hub" / "datasets--someuser--tiny_maths" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "train.jsonl").write_text(json.dumps({"question": "What is 2 + 3?"}) + "\n")
    local = tmp_path / "local"
    local.mkdir()
    (local / "train.jsonl").write_text((snapshot / "train.jsonl").read_text())

    def hub_dataset(path):
        return sources.read_expert_prompts(ExpertParameters(dataset=str(path)), "m").hub_dataset

    assert hub_dataset(snapshot) == "someuser/tiny_maths"
    assert hub_dataset(local) is None


def test_a_model_folder_read_from_headers(families):
    fam = families("llama", 2)
    files = model_files.read_model(ModelReference.parse(str(fam.base)), MergeOptions())
    index = json.loads((fam.base / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"].values())
    assert files.shards == sorted(str(fam.base / s) for s in names) and not files.pickled
    assert files.total_bytes == sum((fam.base / s).stat().st_size for s in names)
    assert set(files.tensors) == set(index["weight_map"])
    assert files.dtype == "float32"
    assert files.config.architectures == ["LlamaForCausalLM"]
    embed = files.tensors["model.embed_tokens.weight"]
    assert (embed.dtype, embed.itemsize) == ("float32", 4)
    assert embed.shape == (files.config.vocab_size, files.config.hidden_size)


def test_stored_dtype_comes_from_the_headers(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(3, 2, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    files = model_files.read_checkpoint("m", str(tmp_path), trust_pickles=False)
    assert files.dtype == "bfloat16" and files.shards == [str(tmp_path / "model.safetensors")]
    assert files.tensors["b"] == model_files.TensorInfo((3, 2), "bfloat16", 2)


def test_an_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(ProDistillError, match=r"^model .*: cannot read its config.json") as err:
        model_files.model_config(str(tmp_path))
    assert "\n" not in str(err.value)
