"""Calibration sources: prompt files, folders, saved datasets, data files, cached Hub datasets."""

import json

import datasets
import pytest

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs.sources import read_expert_prompts
from mergekit_prodistill.recipe import ExpertParameters

from helpers import cache_hub_dataset, write_jsonl

QUESTIONS = ["What is 2 + 3?", "Name a prime above 10.", "How many legs has a cat?"]


def prompts_of(**params):
    return read_expert_prompts(ExpertParameters(**params), "model m")


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """An empty datasets cache, and no way to reach the Hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path / "datasets-cache"


def test_jsonl_takes_the_named_field_or_the_first_known_one(tmp_path):
    records = [{"question": q, "answer": f"answer {i}"} for i, q in enumerate(QUESTIONS)]
    path = write_jsonl(tmp_path / "p.jsonl", records + ["a bare string", {"question": "  "}])
    assert prompts_of(calibration=path).texts == QUESTIONS + ["a bare string"]
    path = write_jsonl(tmp_path / "q.jsonl", records)
    assert prompts_of(calibration=path, field="answer").texts == [r["answer"] for r in records]
    with pytest.raises(ProDistillError, match=r"q\.jsonl:1: .*'prompt_text' field"):
        prompts_of(calibration=path, field="prompt_text")


def test_a_field_for_a_text_file_is_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(QUESTIONS))
    assert prompts_of(calibration=str(path)).texts == QUESTIONS
    with pytest.raises(ProDistillError, match=r"^model m: 'field' names a column or JSON key, "
                       r"and .*p\.txt is a text file of one prompt per line; remove it$"):
        prompts_of(calibration=str(path), field="question")


def test_text_file_and_folder_of_prompt_files(tmp_path):
    folder = tmp_path / "prompts"
    (folder / "more").mkdir(parents=True)
    (folder / "b.txt").write_text("second\n\nthird\n", encoding="utf-8")
    write_jsonl(folder / "a.jsonl", [{"text": "first"}])
    (folder / "more" / "c.txt").write_text("fourth\n", encoding="utf-8")
    (folder / "README.md").write_text("not a prompt\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("not a prompt either\n", encoding="utf-8")
    source = prompts_of(calibration=str(folder))
    assert source.texts == ["first", "second", "third", "fourth"]
    assert source.source == str(folder) and source.hub_dataset is None
    assert prompts_of(calibration=str(folder / "b.txt")).texts == ["second", "third"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(ProDistillError, match="holds no prompt files"):
        prompts_of(calibration=str(tmp_path / "empty"))
    with pytest.raises(ProDistillError, match="does not exist"):
        prompts_of(calibration=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ProDistillError, match="'split' applies to datasets"):
        prompts_of(calibration=str(folder), split="test")


def test_datasets_saved_to_disk(tmp_path):
    datasets.Dataset.from_dict({"prompt": QUESTIONS}).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"instruction": QUESTIONS[:2], "n": [1, 2]}),
        "test": datasets.Dataset.from_dict({"instruction": ["held out"], "n": [3]}),
    }).save_to_disk(tmp_path / "dict")

    assert prompts_of(calibration=str(tmp_path / "one")).texts == QUESTIONS
    assert prompts_of(dataset=str(tmp_path / "dict")).texts == QUESTIONS[:2]
    local = prompts_of(dataset=str(tmp_path / "dict"), split="test")
    assert local.texts == ["held out"] and local.hub_dataset is None
    with pytest.raises(ProDistillError, match=r"no split 'validation'.*splits: train, test"):
        prompts_of(calibration=str(tmp_path / "dict"), split="validation")
    with pytest.raises(ProDistillError, match="column 'n' holds int values, not text"):
        prompts_of(calibration=str(tmp_path / "dict"), field="n")


def test_local_data_files(tmp_path, offline_datasets):
    frame = datasets.Dataset.from_dict({"id": [1, 2, 3], "problem": QUESTIONS})
    frame.to_parquet(tmp_path / "p.parquet")
    frame.to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": q} for q in QUESTIONS]))
    for name in ("p.parquet", "p.csv", "p.json"):
        assert prompts_of(calibration=str(tmp_path / name)).texts == QUESTIONS, name
    frame.select_columns(["id"]).to_parquet(tmp_path / "ids.parquet")
    with pytest.raises(ProDistillError, match=r"has no 'text' / .* column; name the prompt "
                                              r"column with 'field:' \(columns: id\)"):
        prompts_of(calibration=str(tmp_path / "ids.parquet"))


def test_hub_dataset_from_the_local_cache_offline(tmp_path, offline_datasets):
    records = [{"question": q, "answer": "42"} for q in QUESTIONS]
    cache_hub_dataset(offline_datasets, tmp_path, "someuser/tiny_maths", "main", records)
    source = prompts_of(dataset="someuser/tiny_maths", subset="main", field="question")
    assert source.texts == QUESTIONS
    assert source.hub_dataset == "someuser/tiny_maths"
    assert source.source == "someuser/tiny_maths (main, question)"
    # The default column list finds "question" too.
    assert prompts_of(dataset="someuser/tiny_maths").texts == QUESTIONS


def test_unreachable_dataset_is_one_clear_error(offline_datasets):
    with pytest.raises(ProDistillError) as err:
        prompts_of(dataset="someuser/not_downloaded", field="question")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("dataset someuser/not_downloaded is not in the local cache and "
                              "the Hugging Face Hub cannot be reached")
