"""The orchestrator's promise: every input is read once, and every decision made once is
the one the merge uses."""

from mergekit_prodistill.inputs import calibration, sources

from helpers import merge


def count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_merge_reads_each_calibration_source_and_tokenizer_once(families, tmp_path,
                                                                  monkeypatch):
    fam = families("llama", 2)
    reads = count_calls(monkeypatch, sources, "read_prompt_file")
    tokenizers = count_calls(monkeypatch, calibration, "load_tokenizer")
    merge(fam.recipe("prodistill", epochs=1, shots=4, continue_tokens=4), tmp_path / "out")
    assert len(reads) == 2  # one per expert: not again for the checks, the plan, the run
    assert len(tokenizers) == 2  # and the continuations reuse them
