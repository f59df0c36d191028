"""The model card: Hub metadata parsed back by huggingface_hub, loss table and plot, run facts."""

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id
from mergekit.config import MergeConfiguration

from mergekit_prodistill.output import card
from mergekit_prodistill.output.report import Report
from mergekit_prodistill.tiny import ModelSpec, build_tiny_family

from helpers import cache_hub_dataset, merge, with_expert_parameters

BASE_ID, EXPERT_IDS = "someuser/tiny-base", ["someuser/tiny-maths", "otheruser/tiny-code"]


def snapshot(hub_cache, repo_id, model_dir):
    """Move a model into the Hugging Face cache layout, as `hf download` leaves it."""
    target = hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    target.parent.mkdir(parents=True)
    shutil.move(str(model_dir), str(target))
    return str(target)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A merge of cached Hub models, one expert calibrated on a cached Hub dataset."""
    root = tmp_path_factory.mktemp("card")
    fam = build_tiny_family(root / "fam", "llama", 2, model=ModelSpec(num_layers=3))
    hub_cache = root / "hub"
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=2, lr=0.05, shots=8, batch_size=4))
    doc["base_model"] = snapshot(hub_cache, BASE_ID, fam.base)
    for entry, repo_id, expert in zip(doc["models"], EXPERT_IDS, fam.experts):
        entry["model"] = snapshot(hub_cache, repo_id, expert)
    recipe = with_expert_parameters(
        yaml.safe_dump(doc, sort_keys=False),
        {"dataset": "someuser/tiny_maths", "subset": "main", "template": "alpaca-cot"},
        {"calibration": str(fam.calibration[1]), "template": "Task | {prompt}\nCode:"},
    )

    datasets_cache = root / "datasets-cache"
    records = [{"question": json.loads(line)["text"]}
               for line in fam.calibration[0].read_text().splitlines()]
    cache_hub_dataset(datasets_cache, root, "someuser/tiny_maths", "main", records)
    with pytest.MonkeyPatch.context() as mp:
        import datasets

        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(datasets_cache))
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        out = merge(recipe, root / "merged")
    return out, recipe


def test_metadata_is_valid_hub_metadata(merged):
    out, _ = merged
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == [BASE_ID, *EXPERT_IDS]
    for repo_id in data.base_model:
        validate_repo_id(repo_id)
    assert data.base_model_relation == "merge"
    assert data.datasets == ["someuser/tiny_maths"]
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"mergekit", "merge", "prodistill"} <= set(data.tags)


def test_card_shows_sources_loss_plot_and_run(merged):
    out, recipe = merged
    text = ModelCard.load(out / "README.md").text
    report = json.loads((out / "prodistill_report.json").read_text())

    assert "[ProDistill](https://arxiv.org/abs/2502.12706)" in text
    # Cached models are shown by their Hub ids, not by cache paths (the recipe keeps those).
    assert "snapshots" not in text.split("### Configuration")[0]
    assert ("| [someuser/tiny-maths](https://huggingface.co/someuser/tiny-maths) "
            "| [someuser/tiny_maths](https://huggingface.co/datasets/someuser/tiny_maths) "
            "(main) | alpaca-cot | 8 |") in text
    assert "| `Task \\| {prompt}\\nCode:` | 8 |" in text  # a custom template cannot break the row

    assert "![Distillation loss per block, before and after training](prodistill_loss.png)" in text
    assert (out / "prodistill_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in text.splitlines() if line[:3] in {f"| {b}" for b in range(10)}]
    assert len(rows) == len(report["blocks"]) == 3
    for row, block in zip(rows, report["blocks"]):
        assert row.startswith(f"| {block['block']} | {block['loss_before']:.4g} | "
                              f"{block['loss_after']:.4g} | -")

    # What the merge kept of each expert, on its held-out prompts.
    for kept in report["fidelity"]:
        assert (f"| {100 * kept['prodistill']['agreement']:.1f}% "
                f"| {100 * kept['task_arithmetic']['agreement']:.1f}% |") in text
    assert "Kept of each expert's next-token choices on held-out prompts: **ProDistill" in text

    assert "| time |" in text and "| peak memory (process RSS) |" in text
    assert "| epochs | 2 |" in text and "| seed | 0 |" in text
    # The recipe, after the ProDistill section.
    assert text.index("### ProDistill") < text.index("### Configuration")
    assert recipe.strip() in text


def test_report_of_a_merge_reads_back_key_for_key(merged):
    out, recipe = merged
    data = json.loads((out / "prodistill_report.json").read_text())
    assert Report.from_dict(data).to_dict() == data
    assert data["recipe"] == recipe  # the folder says which recipe made it


def test_without_matplotlib_the_card_has_no_plot(merged, tmp_path, monkeypatch, caplog):
    out, recipe = merged
    report = Report.read(str(out))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe))
    with caplog.at_level(logging.INFO, logger="mergekit_prodistill"):
        card.write_card(str(tmp_path), config, "merged", report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    text = (tmp_path / "README.md").read_text()
    assert "![" not in text and "| block | loss before | loss after | change |" in text
    assert "matplotlib cannot be imported" in caplog.text
    assert "pip install matplotlib" in caplog.text


def test_the_loss_plot_comes_with_a_plain_install():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["dependencies"])
    assert "plot" in project["optional-dependencies"]  # `pip install '...[plot]'` still works
