"""Calibration on the experts' own continuations: the greedy tokens each expert generates,
and where the expert is placed to generate them."""

import json
import math

import pytest
import torch
import transformers
import yaml
from mergekit.common import ModelReference

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs import continuation, expert_placement
from mergekit_prodistill.inputs.calibration import tokenize
from mergekit_prodistill.inputs.sources import read_prompts

from helpers import load_tensors, merge, recipe, refuse_to_generate


def test_cut_at_stop_keeps_tokens_before_end_or_padding():
    assert continuation.cut_at_stop([5, 6, 2, 7], {2}, 3) == [5, 6]
    assert continuation.cut_at_stop([5, 3, 3], {2}, 3) == [5]
    assert continuation.cut_at_stop([5, 6], {2}, 3) == [5, 6]


def greedy_alone(model, tokenizer, seq, new_tokens):
    """``seq`` and the model's greedy continuation of it, generated on its own (no padding)."""
    ids = torch.tensor([seq])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=tokenizer.pad_token_id)[0].tolist()
    return seq + continuation.cut_at_stop(want[len(seq):], {tokenizer.eos_token_id},
                                          tokenizer.pad_token_id)


def continued(expert, sequences, tokenizer, free):
    """``sequences`` continued by 6 tokens by the expert, loaded as the merge loads it."""
    with continuation.loaded(expert, [len(s) for s in sequences], 6, tokenizer,
                             dtype="float32", device=torch.device("cpu"), free=free) as m:
        return continuation.continued_greedily(m, sequences, 6)


def spy_on_loads(monkeypatch):
    """Every expert :func:`continued` loads, as loaded; ``model.batches`` lists the prompts
    of each of its generate calls."""
    loaded = []
    load = continuation.load_expert

    def spy(*args, **kwargs):
        model = load(*args, **kwargs)
        generate, model.batches = model.generate, []

        def counted(**kwargs):
            model.batches.append(len(kwargs["input_ids"]))
            return generate(**kwargs)

        model.generate = counted
        loaded.append(model)
        return model

    monkeypatch.setattr(continuation, "load_expert", spy)
    return loaded


def test_continuations_are_the_experts_greedy_tokens_even_offloaded_to_disk(families, monkeypatch):
    fam = families("llama", 2)
    expert = str(fam.experts[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(expert)
    sequences = tokenize(read_prompts(str(fam.calibration[0]))[:3], tokenizer, 64)
    assert len({len(s) for s in sequences}) > 1, "prompts of different lengths get left-padded"

    # Room for the largest module and two sequences only: the rest is read from disk.
    shape = expert_placement.expert_shape(transformers.AutoConfig.from_pretrained(expert), 4)
    tight = shape.largest_bytes + 2 * shape.sequence_bytes(max(map(len, sequences)), 6)
    loaded = spy_on_loads(monkeypatch)
    out = continued(expert, sequences, tokenizer,
                    {"cpu": int(tight / expert_placement.MEMORY_SHARE) + 1})
    assert "disk" in loaded[0].hf_device_map.values()

    model = transformers.AutoModelForCausalLM.from_pretrained(expert)
    for seq, got in zip(sequences, out):
        assert got == greedy_alone(model, tokenizer, seq, 6)
        assert len(seq) < len(got) <= len(seq) + 6


def test_an_expert_that_fits_is_loaded_whole_without_offload_hooks(families, monkeypatch):
    fam = families("llama", 2)
    expert = str(fam.experts[1])
    tokenizer = transformers.AutoTokenizer.from_pretrained(expert)
    sequences = tokenize(read_prompts(str(fam.calibration[1]))[:5], tokenizer, 64)
    loaded = spy_on_loads(monkeypatch)
    out = continued(expert, sequences, tokenizer, {"cpu": 10**11})
    model = loaded[0]
    assert not hasattr(model, "hf_device_map") or set(model.hf_device_map.values()) == {"cpu"}
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert model.batches == [5]  # every prompt in one batch
    alone = transformers.AutoModelForCausalLM.from_pretrained(expert)
    assert out == [greedy_alone(alone, tokenizer, seq, 6) for seq in sequences]


SHAPE = expert_placement.ExpertShape(
    weight_bytes=10_000, largest_bytes=1_000, layers=4, kv_bytes_per_token=1,
    work_bytes_per_token=0, score_bytes_per_pair=0, flops_per_token=1, head_flops=1,
    attention_width=1)


def room_for(nbytes):
    """Free bytes that leave ``nbytes`` usable by the pass."""
    return math.ceil(nbytes / expert_placement.MEMORY_SHARE)


def test_placement_keeps_the_expert_whole_and_fills_the_rest_with_prompts():
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    lengths = [90] * 64  # 100 bytes of KV cache per sequence with 10 new tokens
    unknown = expert_placement.place_expert(SHAPE, lengths, 10, cuda, {"cuda:0": None, "cpu": None})
    assert (unknown.rows, unknown.batches, unknown.offloaded) == (64, 1, False)
    roomy = expert_placement.place_expert(SHAPE, lengths, 10, cpu, {"cpu": room_for(20_000)})
    assert (roomy.rows, roomy.batches, roomy.offloaded) == (64, 1, False)
    some = expert_placement.place_expert(SHAPE, lengths, 10, cpu, {"cpu": room_for(12_000)})
    assert (some.rows, some.batches, some.offloaded, some.max_memory) == (20, 4, False, None)
    assert some.device_bytes + some.generation_bytes <= 12_000


def test_placement_offloads_what_does_not_fit_and_reads_the_least():
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    lengths = [90] * 8
    # 6000 usable: all 8 prompts (800) leave 5200 of weights budget, 4200 of weights
    # resident beside the largest module's room; 5800 are read per forward, once.
    disk = expert_placement.place_expert(SHAPE, lengths, 10, cpu, {"cpu": room_for(6_000)})
    assert disk.offloaded and disk.rows == 8 and disk.batches == 1
    assert disk.max_memory == {"cpu": 5_200} and disk.disk_bytes == 5_800
    assert disk.fits and disk.device_bytes + disk.generation_bytes <= 6_000
    gpu = expert_placement.place_expert(SHAPE, lengths, 10, cuda,
                                    {"cuda:0": room_for(6_000), "cpu": room_for(3_000)})
    assert gpu.max_memory == {0: 5_200, "cpu": 3_000}
    assert (gpu.host_bytes, gpu.disk_bytes) == (2_000, 3_800)
    hopeless = expert_placement.place_expert(SHAPE, lengths, 10, cpu, {"cpu": room_for(1_050)})
    assert hopeless.rows == 1 and not hopeless.fits


def test_continue_tokens_extend_every_calibration_prompt(families, tmp_path):
    fam = families("llama", 2)
    common = dict(epochs=1, shots=4, batch_size=4, lr=0.05, head_epochs=0)
    plain = merge(fam.recipe("prodistill", continue_tokens=0, **common), tmp_path / "plain")
    longer = merge(fam.recipe("prodistill", continue_tokens=5, **common), tmp_path / "longer")
    before = json.loads((plain / "prodistill_report.json").read_text())["calibration"]
    after = json.loads((longer / "prodistill_report.json").read_text())["calibration"]
    for a, b in zip(before, after):
        assert a["prompts"] == b["prompts"] == 4
        assert a["tokens"] < b["tokens"] <= a["tokens"] + 5 * 4
    assert "own greedy continuation (up to 5 tokens)" in (longer / "README.md").read_text()
    assert "greedy continuation" not in (plain / "README.md").read_text()


@pytest.mark.parametrize("key,value", [("continue_tokens", -1), ("head_epochs", -2)])
def test_new_parameters_are_validated(families, tmp_path, key, value):
    fam = families("llama", 2)
    with pytest.raises(ProDistillError, match=rf"parameter '{key}' = {value}"):
        merge(fam.recipe("prodistill", **{key: value}), tmp_path / "out")


def test_an_expert_generates_in_the_dtype_the_merge_and_plan_read_it_in(families, tmp_path,
                                                                        monkeypatch):
    # A bfloat16 checkpoint whose config still says float32 (common after conversion): the
    # merge reads its weights as stored, the plan sizes them so, and generation must too.
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    fam = families("llama", 2)
    expert = tmp_path / "expert_bf16"
    shutil.copytree(fam.experts[0], expert)
    for shard in expert.glob("*.safetensors"):
        save_file({n: t.to(torch.bfloat16) for n, t in load_file(shard).items()}, shard,
                  metadata={"format": "pt"})
    assert json.loads((expert / "config.json").read_text())["dtype"] == "float32"
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=1, shots=2, continue_tokens=2))
    del doc["dtype"]  # weights read as stored
    (entry,) = [m for m in doc["models"] if m["model"] == str(fam.experts[0])]
    entry["model"] = str(expert)
    dtypes = {}
    load = continuation.load_expert
    monkeypatch.setattr(continuation, "load_expert", lambda path, dtype, *a, **kw:
                        dtypes.setdefault(path, dtype) and load(path, dtype, *a, **kw))
    merge(yaml.safe_dump(doc, sort_keys=False), tmp_path / "out")
    assert dtypes == {str(expert): torch.bfloat16, str(fam.experts[1]): torch.float32}


def test_untrained_merge_generates_no_continuations(families, tmp_path, monkeypatch):
    fam = families("llama", 2)
    plain = load_tensors(merge(fam.recipe("prodistill", epochs=0, shots=4, continue_tokens=0),
                               tmp_path / "plain"))
    monkeypatch.setattr(continuation, "loaded", refuse_to_generate)
    out = merge(fam.recipe("prodistill", epochs=0, shots=4, continue_tokens=16),
                tmp_path / "out")
    got = load_tensors(out)
    assert all(torch.equal(plain[k], got[k]) for k in plain)
    assert "greedy continuation" not in (out / "README.md").read_text()


def test_a_lora_expert_continues_its_prompts_with_its_adapter_merged(families, tmp_path,
                                                                     monkeypatch):
    """A LoRA expert generates its continuations as the merge reads its blocks: merged
    into its base by mergekit, in --lora-merge-cache; not as the base alone."""
    peft = pytest.importorskip("peft")
    fam = families("llama", 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(fam.experts[0])
    adapter = tmp_path / "adapter"
    peft.get_peft_model(model, peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).save_pretrained(adapter)
    doc = recipe(fam, epochs=1, shots=4, continue_tokens=4)
    doc["models"][0]["model"] = f"{fam.experts[0]}+{adapter}"
    folders, generate = [], continuation.loaded
    monkeypatch.setattr(continuation, "loaded",
                        lambda folder, *a, **k: folders.append(folder) or generate(folder, *a, **k))
    cache = tmp_path / "lora-cache"
    merge(yaml.safe_dump(doc), tmp_path / "out", lora_merge_cache=str(cache))
    merged_lora = ModelReference.parse(doc["models"][0]["model"]).merged(cache_dir=str(cache))
    assert folders == [merged_lora.model.path, str(fam.experts[1])]
    assert merged_lora.model.path.startswith(str(cache))
