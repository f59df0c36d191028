"""Calibration prompts written by a model (``written_prompts``): what a written prompt may
be, who writes it, and that the merge trains on, reports and resumes with them."""

import json
import math
import sys

import pydantic
import pytest
import torch
import transformers
import yaml
from test_resume import resumes_to, whole_and_stopped

from mergekit_prodistill.inputs import continuation, prompt_writing
from mergekit_prodistill.inputs.calibration import CalibrationSet, make_batches
from mergekit_prodistill.inputs.prompt_writing import Candidate, sample_prompts, shared_ends
from mergekit_prodistill.layout import STAGING
from mergekit_prodistill.plan import workload
from mergekit_prodistill.recipe import ProDistillParameters
from mergekit_prodistill.training.merger import training_epochs

from helpers import load_tensors, merge, recipe, refuse_to_generate, run_cli

REAL = [[1, 7, 3, 4, 9], [1, 7, 5, 9], [1, 7, 6, 6, 6, 9]]


def test_shared_ends_are_the_common_start_and_end_and_never_overlap():
    assert shared_ends(REAL) == ([1, 7], [9])
    assert shared_ends([[1, 2, 3], [1, 2, 3]]) == ([1, 2, 3], [])
    assert shared_ends([[1, 2, 9], [1, 2, 5, 9]]) == ([1, 2], [9])
    assert shared_ends([[4, 9], [5, 9]]) == ([], [9])


class Scripted:
    """A stand-in writer whose samples are the given rows, in turn."""

    def __init__(self, rows):
        self.rows, self.calls = list(rows), 0

    def generate(self, input_ids, **kwargs):
        self.calls += 1
        body = self.rows[:len(input_ids)]
        self.rows = self.rows[len(input_ids):]
        body += [[0]] * (len(input_ids) - len(body))  # then only padding
        width = max(len(r) for r in body)
        padded = [r + [0] * (width - len(r)) for r in body]
        return torch.cat([input_ids, torch.tensor(padded)], 1)


def test_a_written_prompt_runs_from_the_shared_start_to_the_shared_end():
    # Ends at the first shared end (the rest is dropped); no end, an end-of-sequence
    # before it, longer than the longest real prompt plus SLACK, or a repeat: dropped.
    rows = [[3, 3, 9, 5], [3, 3, 3], [3, 2, 9], [3] * 6 + [9], [5, 9], [3, 3, 9],
            [4, 4, 9]]
    got = sample_prompts(Scripted(rows), REAL, 5, 0, "cpu", 0, [2], rows=7)
    assert got == [[1, 7, 3, 3, 9], [1, 7, 4, 4, 9]]
    # Stops once it has enough.
    assert sample_prompts(Scripted(rows), REAL, 1, 0, "cpu", 0, [2], rows=7) == [[1, 7, 3, 3, 9]]


def test_without_a_shared_start_nothing_is_written():
    model = Scripted([[9]])
    assert sample_prompts(model, [[4, 9], [5, 9]], 3, 0, "cpu", 0, [2]) == []
    assert model.calls == 0


def test_real_sampling_is_seeded_and_keeps_to_the_frame():
    # A random model over 12 tokens, which writes the shared end (8) often enough.
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    real = [[1, 5, 6, 7, 8], [1, 5, 9, 8], [1, 5, 10, 11, 4, 8]]
    start, end = shared_ends(real)
    first = sample_prompts(model, real, 20, 3, "cpu", 0, [2], rows=16)
    again = sample_prompts(model, real, 20, 3, "cpu", 0, [2], rows=16)
    assert first == again and len(first) > 3  # the same seed writes the same prompts
    assert sample_prompts(model, real, 20, 4, "cpu", 0, [2], rows=16) != first
    for seq in first:
        assert seq[:2] == start and seq[-1:] == end and 8 not in seq[2:-1]
        assert not {0, 2} & set(seq) and len(seq) <= 6 + prompt_writing.SLACK
        assert seq not in real
    assert len({tuple(s) for s in first}) == len(first)


def test_the_writer_that_predicts_the_real_prompts_best_writes():
    chosen = prompt_writing.best([Candidate("expert", -3.0, [[1]], -3.0),
                                  Candidate("base", -0.5, [[2]], -0.6)], "model x")
    assert chosen.writer == "base" and chosen.prompts == [[2]]
    assert prompt_writing.best([], "model x").prompts == []


def test_prompts_far_likelier_to_their_writer_than_the_real_ones_are_dropped(caplog):
    # The best predictor of the real prompts still finds its own prompts 1.5 nats per
    # token likelier: it does not know the prompts' kind, and nothing is written.
    limit = prompt_writing.MAX_GAP
    junk = [Candidate("expert", -4.0, [[1]], -4.0 + limit + 1.0),
            Candidate("base", -5.0, [[2]], -5.0)]
    with caplog.at_level("WARNING", logger="mergekit_prodistill"):
        assert prompt_writing.best(junk, "model x").prompts == []
    assert "model x: no prompts written: the expert" in caplog.text
    near = Candidate("expert", -4.0, [[1]], -4.0 + limit - 0.01)
    assert prompt_writing.best([near], "model x").prompts == [[1]]
    assert prompt_writing.best([Candidate("base", -1.0, [])], "model x").prompts == []


def test_the_plan_counts_written_prompts_at_their_longest():
    p = ProDistillParameters(written_prompts=3, batch_size=2, continue_tokens=0)
    plain = workload.batched(ProDistillParameters(batch_size=2, continue_tokens=0),
                             [[4, 6]], [[5]], "tokenizer")
    counted = workload.batched(p, [[4, 6]], [[5]], "tokenizer")
    assert counted.tokens[0] == plain.tokens[0] + 3 * (6 + prompt_writing.SLACK)
    assert len(counted.prompt_lengths[0]) == 2 + 3 + 1


def offered_by_reversal(m, writer, real, count, seed, tokenizer):
    """In place of a writer's sampling: each real prompt reversed in its middle
    (deterministic), offered by the base as the better predictor."""
    start, end = shared_ends(real)
    body = [s[len(start):len(s) - len(end)][::-1] for s in real]
    return Candidate(writer, 0.0 if writer == "base" else -1.0,
                     [start + b + end for b in body][:count], 0.0)


def test_a_merge_trains_on_written_prompts_reports_them_and_resumes_without_writing(
        families, tmp_path, monkeypatch):
    fam = families("llama", 2)
    monkeypatch.setattr(prompt_writing, "offer", offered_by_reversal)
    doc = recipe(fam, epochs=1, shots=4, continue_tokens=3, written_prompts=2)
    out = merge(yaml.safe_dump(doc), tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert [c["prompts"] for c in report["calibration"]] == [6, 6]
    assert [c["written"] for c in report["calibration"]] == [2, 2]
    assert "4 + 2 written" in (out / "README.md").read_text()
    # Written prompts change what the merge trains on.
    doc["parameters"]["written_prompts"] = 0
    plain = load_tensors(merge(yaml.safe_dump(doc), tmp_path / "plain"))
    written = load_tensors(out)
    assert any(not torch.equal(plain[k], written[k]) for k in plain)


def test_written_prompts_are_saved_with_the_continuations(families, tmp_path, monkeypatch):
    """A resumed merge reads the written prompts back with the continuations: it neither
    writes nor generates again, and ends bit-identical."""
    fam = families("llama", 2)
    monkeypatch.setattr(prompt_writing, "offer", offered_by_reversal)
    text = fam.recipe("prodistill", epochs=3, lr=0.05, shots=6, batch_size=4,
                      continue_tokens=3, written_prompts=2)
    whole, out = whole_and_stopped(monkeypatch, tmp_path, text, "save_continuations")
    saved = json.loads((out / STAGING / ".progress" / "continuations.json").read_text())
    held = math.ceil(ProDistillParameters().holdout * 6)
    assert [len(s) for s in saved["sequences"]] == [6 + 2 + held] * 2
    monkeypatch.setattr(prompt_writing, "offer", refuse_to_generate)
    monkeypatch.setattr(continuation, "loaded", refuse_to_generate)
    assert resumes_to(whole, text, out)


def test_the_expert_and_the_base_are_both_asked_one_writes_and_each_loads_once(
        families, tmp_path, monkeypatch):
    fam = families("llama", 2)
    asked, choose = [], prompt_writing.best
    folders, load = [], continuation.loaded

    def spy(candidates, where):
        chosen = choose(candidates, where)
        asked.append(([c.writer for c in candidates], chosen))
        return chosen

    monkeypatch.setattr(prompt_writing, "best", spy)
    monkeypatch.setattr(continuation, "loaded",
                        lambda folder, *a, **k: folders.append(folder) or load(folder, *a, **k))
    out = merge(fam.recipe("prodistill", epochs=1, shots=4, continue_tokens=2,
                           written_prompts=3), tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert [names for names, _ in asked] == [["expert", "base"]] * 2
    assert [c.get("written", 0) for c in report["calibration"]] == [
        len(chosen.prompts) for _, chosen in asked]
    assert all(chosen.writer in ("expert", "base") and len(chosen.prompts) <= 3
               for _, chosen in asked)
    # The base once, for both experts; each expert once, to write and to continue.
    assert folders == [str(fam.base), *map(str, fam.experts)]


def test_written_prompts_spread_the_real_prompts_steps_rather_than_add_steps():
    p = ProDistillParameters()  # epochs: auto, batch_size 4
    assert p.epochs_for(16) == 30 and p.epochs_for(4) == 120  # 480 steps at least
    # 64 real prompts (16 steps an epoch) and 192 written (64 steps): 480 steps, 8 epochs.
    assert p.epochs_for(64, 16) == 8
    # 16 real and 48 written: 480 steps still, now 30 epochs.
    assert p.epochs_for(16, 4) == 30
    assert ProDistillParameters(epochs=5).epochs_for(64, 16) == 5


def test_the_epochs_follow_the_prompts_actually_written():
    def calib(real, written):
        seqs = [[[1, 2, 3]] * (real + written)]
        return CalibrationSet(["x"], [None], [make_batches(seqs[0], 4)], seqs,
                              written=[written])

    p = ProDistillParameters(written_prompts=192)
    # The plan counted 192 written prompts per expert (8 epochs); none were kept, so the
    # 64 real prompts train 30 epochs, as without written prompts.
    assert training_epochs(p, calib(64, 0), planned=8) == 30
    assert training_epochs(p, calib(64, 192), planned=8) == 8
    assert training_epochs(p, calib(64, 100), planned=8) == 12  # 480 steps over 41 a pass
    assert training_epochs(ProDistillParameters(), calib(64, 0), planned=30) == 30


def test_written_prompts_without_training_are_refused():
    with pytest.raises(pydantic.ValidationError, match="written_prompts are trained on"):
        ProDistillParameters(written_prompts=8, epochs=0)


def test_the_plan_says_it_counts_written_prompts(families, tmp_path):
    fam = families("llama", 2)
    recipe_file = tmp_path / "written.yml"
    recipe_file.write_text(fam.recipe("prodistill", shots=4, written_prompts=12))
    out = run_cli(sys.executable, "-m", "mergekit_prodistill", "plan", recipe_file).stdout
    assert "written prompts: up to 12 per expert" in out
