"""Training at the scale users merge: real widths, task vectors of ~1e-3, 16-bit checkpoints."""

import json

from helpers import merge


def test_float16_checkpoint_trains_and_reports_its_dtype(families, tmp_path):
    fam = families("llama", 2)
    recipe = fam.recipe("prodistill", epochs=2, shots=4, continue_tokens=0)
    out = merge(recipe.replace("dtype: float32", "dtype: float16"), tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert report["activation_dtype"] == "float32"
    assert all(std > 0 for b in report["blocks"] for std in b["coefficient_std"])
    assert all(b["loss_after"] < b["loss_before"] for b in report["blocks"])


def test_a_block_that_training_makes_worse_keeps_task_arithmetic(families, tmp_path, caplog):
    fam = families("llama", 2)
    out = merge(fam.recipe("prodistill", epochs=2, lr=30.0, shots=4, continue_tokens=0),
                tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    kept = [b for b in report["blocks"] if b["loss_after"] == b["loss_before"]]
    assert kept and all(b["loss_after"] <= b["loss_before"] for b in report["blocks"])
    assert "keeping task arithmetic for this block" in caplog.text
    assert all(std == 0 for b in kept for std in b["coefficient_std"])
