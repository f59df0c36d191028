"""patience: a block stops training once its held-out loss stops improving; the check runs
every 10 optimiser steps, and the report lists each check's loss."""

import json

import pytest

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.training.early_stop import EarlyStop

from helpers import merge


def stopper(losses, patience=2, steps_per_epoch=5):
    seen = iter(losses)
    return EarlyStop(patience, steps_per_epoch, lambda weights: next(seen))


def test_it_stops_after_patience_checks_without_a_one_percent_gain():
    stop = stopper([1.0, 0.5, 0.499, 0.3, 0.2999, 0.2998])  # checked every 2 epochs of 5 steps
    decisions = [stop(epoch, None) for epoch in range(1, 13)]
    # Checks at epochs 2, 4, ..., 12: 0.499 and 0.2999 are within 1% of the best so far.
    assert decisions == [False] * 11 + [True]
    assert stop.losses == [1.0, 0.5, 0.499, 0.3, 0.2999, 0.2998]


def test_a_retry_from_the_first_epoch_starts_the_checks_again():
    stop = stopper([1.0, 2.0, 0.9, 0.8], patience=1, steps_per_epoch=10)
    assert [stop(epoch, None) for epoch in (1, 2)] == [False, True]  # 2.0: no gain
    # Training starts again (a non-finite loss): the earlier best no longer counts.
    assert [stop(epoch, None) for epoch in (1, 2)] == [False, False]
    assert stop.losses == [0.9, 0.8]


def test_one_check_per_ten_steps_at_least_one_per_epoch():
    assert stopper([], steps_per_epoch=1).every == 10
    assert stopper([], steps_per_epoch=16).every == 1


def test_a_merge_with_patience_stops_blocks_early_and_reports_the_checks(families, tmp_path):
    fam = families("llama", 2)
    epochs = 400  # far more than these blocks need
    out = merge(fam.recipe("prodistill", epochs=epochs, shots=8, continue_tokens=0,
                           patience=1), tmp_path / "out")
    blocks = json.loads((out / "prodistill_report.json").read_text())["blocks"]
    for b in blocks:
        assert 0 < len(b["epoch_losses"]) < epochs, len(b["epoch_losses"])
        checks = b["heldout_checks"]
        # It stopped at the first check that did not gain 1% on the best before it.
        assert checks[-1] >= 0.99 * min(checks[:-1])
        assert all(later < 0.99 * min(checks[:i + 1])
                   for i, later in enumerate(checks[1:-1]))


def test_patience_is_refused_when_an_expert_has_no_prompts_to_hold_out(families, tmp_path):
    fam = families("llama", 2)  # 32 prompts per expert: none left beyond 32 shots
    with pytest.raises(ProDistillError, match=r"^model .*expert_0: 'patience' stops each block "
                       r"on the held-out prompts, and this expert's source holds none beyond "
                       r"its 32 shots; add prompts to it, lower 'shots', or set 'patience: 0'$"):
        merge(fam.recipe("prodistill", epochs=1, shots=32, patience=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()
