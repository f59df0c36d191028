"""The run's report reads back exactly as it was written; absent parts stay out of the file."""

import json

import pytest

from mergekit_prodistill.output.report import BlockReport, CalibrationEntry, HeadReport, Report

TRAINED = dict(loss_before=0.5, loss_after=0.25, epoch_losses=[0.4, 0.3],
               coefficient_mean=[0.31, 0.29], coefficient_std=[0.02, 0.03],
               coefficient_range=[[0.2, 0.4], [0.1, 0.5]], small_gradient_share=0.125)


def report(**changes) -> Report:
    """A report with every part present, the optional ones included."""
    fields = dict(
        parameters={"epochs": "auto", "lr": 0.01, "init": 0.3},
        seed=3,
        device="cuda:0",
        activation_dtype="bfloat16",
        epochs=4,
        continuation_seconds=12.5,
        calibration=[
            CalibrationEntry("org/maths", "org/maths_prompts (main)", "org/maths_prompts",
                             "alpaca", 8, 410),
            CalibrationEntry("/models/code", "/data/code.jsonl", None, "Q: {prompt}\nA:", 8, 380),
        ],
        vocabulary="tokenizer_source: union; 2 tokens added",
        blocks=[BlockReport(block=i, seconds=1.5 + i, **TRAINED) for i in range(2)],
        head=HeadReport(**TRAINED),
        seconds=42.0,
        peak_rss_bytes=2**30,
        peak_device_bytes=2**31,
        versions={"mergekit-prodistill": "0.1.0", "torch": "2.5.0"},
        recipe="merge_method: prodistill\nbase_model: org/base\n",
        files=["config.json", "model.safetensors", "prodistill_report.json"],
    )
    return Report(**{**fields, **changes})


def test_a_report_reads_back_equal(tmp_path):
    written = report()
    written.write(str(tmp_path))
    assert Report.read(str(tmp_path)) == written
    data = json.loads((tmp_path / "prodistill_report.json").read_text())
    assert list(data)[:3] == ["method", "version", "parameters"]
    assert list(data["blocks"][0])[0] == "block"
    assert data["calibration"][1] == {"model": "/models/code", "source": "/data/code.jsonl",
                                      "hub_dataset": None, "template": "Q: {prompt}\nA:",
                                      "prompts": 8, "tokens": 380}


def test_absent_parts_are_left_out_of_the_file(tmp_path):
    # A merge without training, on the CPU: no training facts, head or accelerator memory.
    written = report(activation_dtype=None, epochs=None, continuation_seconds=None, blocks=[],
                     head=None, peak_device_bytes=None, vocabulary=None)
    written.write(str(tmp_path))
    data = json.loads((tmp_path / "prodistill_report.json").read_text())
    assert not {"activation_dtype", "epochs", "continuation_seconds", "head",
                "peak_device_bytes"} & set(data)
    assert data["vocabulary"] is None and data["blocks"] == []
    assert Report.read(str(tmp_path)) == written


def test_a_report_without_recipe_or_files_still_reads(tmp_path):
    data = report().to_dict()
    del data["recipe"], data["files"]
    data["from_a_later_version"] = 1  # unknown keys are ignored
    (tmp_path / "prodistill_report.json").write_text(json.dumps(data))
    read = Report.read(str(tmp_path))
    assert read.recipe is None and read.files is None and read.blocks == report().blocks


@pytest.mark.parametrize("text", [
    "[]", "{}", "not json", json.dumps({**report().to_dict(), "calibration": 3}),
    json.dumps({**report().to_dict(), "blocks": [{"block": 0}]}),
])
def test_what_is_not_a_report_is_a_value_error(tmp_path, text):
    (tmp_path / "prodistill_report.json").write_text(text)
    with pytest.raises(ValueError):
        Report.read(str(tmp_path))
