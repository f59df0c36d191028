"""Whether a merge may write its output folder: never over another model or a different
merge, and never without the free disk its result needs."""

import shutil

import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_prodistill import preflight
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.output import output_folder
from mergekit_prodistill.output.report import Report
from mergekit_prodistill.recipe import parse_recipe

from helpers import load_tensors, merge, recipe, refused


def test_output_folder_holding_another_model_is_refused(families, tmp_path, no_weight_reads):
    fam = families("llama", 2)
    before = {p.name: p.stat().st_mtime_ns for p in fam.base.iterdir()}
    with pytest.raises(ProDistillError, match=r"output folder .*base already holds "
                                              r"config.json, model-00001-of-"):
        merge(fam.recipe("prodistill"), fam.base)
    assert {p.name: p.stat().st_mtime_ns for p in fam.base.iterdir()} == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "mergekit_config.yml").write_text(fam.recipe("prodistill", epochs=3))
    (other / "model.safetensors").write_bytes(b"old")
    with pytest.raises(ProDistillError, match=r"output folder .*other already holds a different "
                                              r"merge \(its mergekit_config.yml is not this "
                                              r"recipe\); choose another folder, or delete"):
        merge(fam.recipe("prodistill", epochs=4), other)
    assert (other / "model.safetensors").read_bytes() == b"old"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ProDistillError, match=r"output path .*file exists and is not a folder"):
        merge(fam.recipe("prodistill"), a_file)


def why_refused(folder, config):
    """The error check_output_folder gives a merge of ``config`` into ``folder``; None when
    the merge may write there."""
    try:
        output_folder.check_output_folder(str(folder), config)
    except ProDistillError as error:
        return str(error)
    return None


def test_output_folder_rules(families, tmp_path):
    fam = families("llama", 2)
    config = MergeConfiguration.model_validate(recipe(fam, epochs=3))
    assert why_refused(tmp_path / "new", config) is None
    assert not (tmp_path / "new").exists()  # checking makes nothing
    (tmp_path / "empty").mkdir()
    assert why_refused(tmp_path / "empty", config) is None
    # The same recipe again (formatted differently) may replace its own earlier result.
    same = tmp_path / "same"
    same.mkdir()
    (same / "mergekit_config.yml").write_text(yaml.safe_dump(recipe(fam, epochs=3), indent=4))
    (same / "model.safetensors").write_bytes(b"old")
    assert why_refused(same, config) is None
    other = MergeConfiguration.model_validate(recipe(fam, epochs=4))
    assert "already holds a different merge" in str(why_refused(same, other))
    assert (same / "model.safetensors").read_bytes() == b"old"
    # Unrelated files are left alone and do not stop the merge.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert why_refused(tmp_path / "notes", config) is None
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"


def test_a_merge_without_its_card_can_replace_itself(families, tmp_path):
    # No card means no mergekit_config.yml: the recipe in the report names the merge.
    fam = families("llama", 2)
    out = tmp_path / "out"
    merge(fam.recipe("prodistill", epochs=0), out, write_model_card=False)
    assert not (out / "mergekit_config.yml").exists()
    merge(fam.recipe("prodistill", epochs=0), out, write_model_card=False)
    assert Report.read(str(out)).recipe == fam.recipe("prodistill", epochs=0)
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(ProDistillError, match=r"output folder .*out already holds a different "
                                              r"merge \(the recipe in its "
                                              r"prodistill_report.json is not this recipe\)"):
        merge(fam.recipe("prodistill", epochs=0, init=0.3), out, write_model_card=False)
    assert (out / "model.safetensors").read_bytes() == weights


def test_not_enough_disk(families, tmp_path, no_weight_reads, monkeypatch):
    fam = families("llama", 2)
    config = MergeConfiguration.model_validate(recipe(fam))
    checked = preflight.check_before_merge(parse_recipe(config), config, MergeOptions(),
                                           str(tmp_path / "out"))
    # The estimate is exactly the merged tensors' bytes (float32 like the base).
    base = load_tensors(fam.base)
    assert checked.output_bytes == sum(t.numel() * 4 for t in base.values())

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage._replace(free=checked.output_bytes // 2))
    refused(recipe(fam), tmp_path / "out",
            r"not enough free disk for the output: it needs about 67\.\d\d MB, and .* has "
            r"\d+\.\d\d kB free$")
    # Writing bfloat16 halves the estimate.
    doc = recipe(fam)
    doc["out_dtype"] = "bfloat16"
    config = MergeConfiguration.model_validate(doc)
    monkeypatch.undo()
    halved = preflight.check_before_merge(parse_recipe(config), config, MergeOptions(),
                                          str(tmp_path / "out"))
    assert halved.output_bytes * 2 == checked.output_bytes
