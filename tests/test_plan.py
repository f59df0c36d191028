"""The plan: offline for the 13B flagship recipe, exact where it can be, and enforced."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_prodistill import cli, parallel, preflight, run, tiny
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs import calibration, continuation, expert_placement
from mergekit_prodistill.inputs.calibration import Batch
from mergekit_prodistill.models import families, shapes
from mergekit_prodistill.models.blocks import BlockRunner
from mergekit_prodistill.plan import devices, fits, memory, planner
from mergekit_prodistill.plan.plan_table import render
from mergekit_prodistill.recipe import parse_recipe

from helpers import merge, run_cli

REPO = Path(__file__).resolve().parent.parent
LLAMA_13B = Path(__file__).parent / "data" / "llama-2-13b"
HIDDEN, INTERMEDIATE, HEADS = 5120, 13824, 40
BLOCK_13B = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN


@pytest.fixture
def wizard_13b(tmp_path):
    """examples/wizard-13b/recipe.yml, its models replaced by config-only copies of
    Llama-2-13B and its prompt datasets by local files of long prompts (every one cut at
    max_length)."""
    recipe = yaml.safe_load((REPO / "examples" / "wizard-13b" / "recipe.yml").read_text())
    for i, entry in enumerate([{"model": recipe["base_model"]}] + recipe["models"]):
        local = tmp_path / "models" / entry["model"].replace("/", "--")
        shutil.copytree(LLAMA_13B, local)
        if i == 0:
            recipe["base_model"] = str(local)
        else:
            entry["model"] = str(local)
            for key in ("dataset", "subset", "split", "field"):  # Hub datasets: offline here
                entry["parameters"].pop(key, None)
            prompts = tmp_path / "prompts" / f"expert{i}.jsonl"
            prompts.parent.mkdir(exist_ok=True)
            prompts.write_text("".join(json.dumps({"text": f"{i} " + "word " * 800}) + "\n"
                                       for _ in range(80)))
            entry["parameters"]["calibration"] = str(prompts)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def plan_for(recipe_path, available=None, **options):
    config = MergeConfiguration.model_validate(yaml.safe_load(Path(recipe_path).read_text()))
    return planner.make_plan(parse_recipe(config), MergeOptions(**options), available=available)


QWEN35_27B = Path(__file__).parent / "data" / "qwen3.5-27b-text"


def test_a_hybrid_27b_plans_every_kind_of_block(tmp_path):
    """Qwen3.5-27B's text model, config only: three gated delta-net blocks to each
    attention block. Memory is planned for the larger kind, FLOPs for the average block,
    with softmax attention in a quarter of them."""
    recipe = _config_only_recipe(QWEN35_27B, tmp_path)
    p = plan_for(recipe, {"cuda": None, "cpu": None}, device="cuda")
    # Its tokenizer class builds an empty vocabulary from a folder without tokenizer files.
    assert p.work.source.startswith("estimated")
    h, i, v = 5120, 17408, 248320
    mlp = 3 * h * i + 2 * h  # and the two norms
    # q (with its output gate), k, v, o; q/k norms over one head
    attention = h * 2 * 24 * 256 + 2 * h * 4 * 256 + 24 * 256 * h + 2 * 256
    keys, values = 16 * 128, 48 * 128
    # q/k/v and z, b and a, the causal convolution, dt bias and A, the gated norm, out
    delta_net = (h * (2 * keys + values) + h * values + 2 * h * 48
                 + (2 * keys + values) * 4 + 2 * 48 + 128 + values * h)
    assert p.shape.num_layers == 64 and p.shape.block_numel == mlp + delta_net
    assert p.shape.quadratic_share == 0.25
    total = 48 * (mlp + delta_net) + 16 * (mlp + attention) + 2 * h * v + h
    assert 26.5e9 < total < 27.5e9  # "27B"
    assert p.shape.matmul_numel == pytest.approx(
        (48 * (mlp + delta_net - 2 * h - 128 - 2 * 48 - (2 * keys + values) * 4)
         + 16 * (mlp + attention - 2 * h - 2 * 256)) / 64)
    assert p.total("cuda") > 2 * (1 + 2) * p.shape.block_numel  # base and task vectors, bf16


QWEN35_27B_MULTIMODAL = Path(__file__).parent / "data" / "qwen3.5-27b"


def test_a_multimodal_27b_plans_its_language_model(tmp_path):
    """Qwen3.5-27B as it ships (Qwen3_5ForConditionalGeneration, config only: the text
    model's config above, the vision encoder's defaults): the plan is its language
    model's, block for block; the vision encoder is merged by task arithmetic."""
    multimodal = plan_for(_config_only_recipe(QWEN35_27B_MULTIMODAL, tmp_path / "mm"),
                          {"cuda": None, "cpu": None}, device="cuda")
    text = plan_for(_config_only_recipe(QWEN35_27B, tmp_path / "text"),
                    {"cuda": None, "cpu": None}, device="cuda")
    same = ("num_layers", "hidden", "block_numel", "matmul_numel", "quadratic_share", "vocab")
    assert [getattr(multimodal.shape, k) for k in same] == [getattr(text.shape, k) for k in same]
    assert multimodal.flops == text.flops


GEMMA4_E2B = Path(__file__).parent / "data" / "gemma-4-e2b"


def test_gemma4_e2b_plans_what_its_streams_carry_beside_the_hidden_states(tmp_path):
    """Gemma 4 E2B as it ships (config only; vision and audio towers at their defaults):
    its streams carry each of its 35 blocks' 256-wide per-layer input, and the keys and
    values its last 20 blocks reuse (one head of 256 for sliding attention, of 512 for
    full attention); the per-layer embeddings start them beside the embedding."""
    p = plan_for(_config_only_recipe(GEMMA4_E2B, tmp_path), {"cuda": None, "cpu": None},
                 device="cuda")
    h, layers, per_layer, v = 1536, 35, 256, 262144
    width = h + layers * per_layer + 2 * (256 + 512)
    assert p.shape.stream_width == width == 12032
    assert p.shape.input_numel == v * h + v * layers * per_layer + h * layers * per_layer \
        + per_layer
    work, cache_b = p.work, shapes.dtype_bytes(p.dtypes["cache"])
    slots = memory.STREAMS * sum(work.slots(i) for i in range(2)) \
        + memory.HOLDOUT_STREAMS * work.holdout_slots()
    assert p.cache_bytes == slots * width * cache_b
    assert "streams carry 12032 values per token" in render(p)


QWEN3_30B_A3B = Path(__file__).parent / "data" / "qwen3-30b-a3b"


def test_a_mixture_of_experts_30b_plans_every_expert_and_the_routed_flops(tmp_path):
    """Qwen3-30B-A3B, config only: memory for all 128 experts of a block, FLOPs for the
    8 each token is routed to."""
    recipe = _config_only_recipe(QWEN3_30B_A3B, tmp_path)
    p = plan_for(recipe, {"cuda": None, "cpu": None}, device="cuda")
    h, experts, routed, v = 2048, 128, 8, 151936
    attention = h * 32 * 128 + 2 * h * 4 * 128 + 32 * 128 * h + 2 * 128
    expert = 3 * h * 768  # gate, up, down
    router, norms = experts * h, 2 * h
    assert p.shape.num_layers == 48
    assert p.shape.block_numel == attention + router + experts * expert + norms
    assert p.shape.matmul_numel == attention - 2 * 128 + router + routed * expert
    total = 48 * p.shape.block_numel + 2 * h * v + h
    active = 48 * (attention + router + routed * expert + norms) + 2 * h * v + h
    assert 30.0e9 < total < 31.0e9 and 3.0e9 < active < 3.6e9  # "30B-A3B"
    assert p.total("cuda") > 3 * 2 * p.shape.block_numel  # base and task vectors in bf16


def _config_only_recipe(config_folder, tmp_path):
    """A two-expert recipe over config-only copies of one model, with local prompts."""
    models = []
    for name in ("base", "expert0", "expert1"):
        shutil.copytree(config_folder, tmp_path / name)
        models.append(str(tmp_path / name))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(f"prompt {i} " + "word " * 200 for i in range(16)))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "prodistill", "base_model": models[0], "dtype": "bfloat16",
        "models": [{"model": m, "parameters": {"calibration": str(prompts)}} for m in models[1:]],
        "parameters": {"shots": 16}}))
    return recipe


def test_flagship_recipe_plans_offline_with_exact_sizes(wizard_13b):
    p = plan_for(wizard_13b, {"cuda": None, "cpu": None}, device="cuda")
    assert p.shape.num_layers == 40 and p.shape.block_numel == BLOCK_13B
    assert p.work.source.startswith("estimated")  # no tokenizer shipped
    # 3 x 64 prompts of max_length 512, plus room for continue_tokens 64 (the default)
    width = 512 + 64
    assert [b for bs in p.work.batches for b in bs] == [(4, width)] * 48
    train = p.phases["cuda"]["train"]
    # float16 checkpoints merged as float16: the base and task vectors as stored, the merged
    # block and its gradient in float32, which float16 never trains in (dtypes.py).
    fp16, fp32, experts, slots = 2, 4, 3, 64 * width
    assert p.dtypes["weights"] == p.dtypes["task_vectors"] == "float16"
    assert p.dtypes["compute"] == "float32"
    assert train[memory.LAMBDA] == 16 * experts * BLOCK_13B  # lambda, grad, Adam m and v
    assert train[memory.WEIGHTS] == (1 + experts) * BLOCK_13B * fp16 + 2 * BLOCK_13B * fp32
    assert p.cache_at == "cuda"
    held = 8 * width  # holdout 1/8 of 64 shots, from the prompts beyond them
    assert p.work.holdout_batches == (((4, width),) * 2,) * experts
    # The merged and expert streams; the held-out prompts' merged, task-arithmetic and
    # expert streams.
    assert train[memory.CACHE] == (2 * slots + 3 * held) * experts * HIDDEN * fp32
    # Finished units go to their own files; one shard (mergekit's default) is held only
    # while the shards are assembled, at the end.
    assert p.phases["cpu"]["train"][memory.OUTPUT] == 0
    assert p.phases["cpu"]["write"][memory.OUTPUT] == BLOCK_13B * fp16  # the block being saved
    assert p.phases["cpu"]["assemble"][memory.OUTPUT] == 5_000_000_000
    # 13B tensors are mapped by the C allocator and returned at once: next to no slack.
    assert p.phases["cpu"]["train"][memory.SLACK] < 10**6 and p.shape.heap_share < 1e-4

    matmuls = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE
    batch = 4 * width * (2 * matmuls + 4 * width * HEADS * 128)  # batch_size 4 (default)
    # 30 epochs of 16 steps (the defaults): 0.6 of the 50 epochs of 4 steps of 16 prompts
    # that the defaults planned before.
    assert p.flops["training"] == 40 * 30 * 16 * 3 * experts * batch
    assert p.flops["training"] == 0.6 * 40 * 50 * 4 * 3 * experts * (4 * batch)
    assert p.flops["forwards"] == 40 * 3 * experts * 16 * batch


def test_plan_command_prints_the_table(wizard_13b):
    out = run_cli(sys.executable, "-m", "mergekit_prodistill", "plan", wizard_13b, "--cuda",
                  "--out-shard-size", "2B").stdout
    assert "40 blocks of 317.2M parameters" in out
    assert "estimated at 3 characters per token" in out
    for row in (memory.WEIGHTS, memory.LAMBDA, memory.CACHE, memory.TRANSIENT, memory.OUTPUT):
        assert row in out
    # Free memory unknown: every expert whole on the GPU, all 64 prompts in one batch,
    # which is the GPU's peak.
    # 64 prompts and 8 held out (holdout 1/8), continued together
    assert "each expert whole on the device; 72 prompts per batch, 1 batch" in out
    expert = next(line for line in out.splitlines() if memory.EXPERT in line)
    assert expert.split()[-3:] == ["26.03", "GB", "-"]  # on cuda; nothing of it on the CPU
    assert "2.00 GB" in next(line for line in out.splitlines() if memory.OUTPUT in line)
    for cls in devices.DEVICE_CLASSES:
        assert cls.name in out
    assert "fits in 80 GB" in out


def test_plan_is_a_subcommand_beside_the_merge_usage(tmp_path):
    runner = CliRunner()
    usage = runner.invoke(cli.main, ["--help"]).output
    assert "CONFIG_FILE OUT_PATH" in usage and "plan [OPTIONS] CONFIG_FILE" in usage
    assert "--out-shard-size" in runner.invoke(cli.main, ["plan", "--help"]).output
    recipe = tmp_path / "ta.yml"
    recipe.write_text("merge_method: task_arithmetic\nmodels:\n  - model: a\n")
    result = runner.invoke(cli.main, ["plan", str(recipe)])
    assert result.exit_code == 2
    assert "merge_method is 'task_arithmetic'" in result.output


def test_plan_counts_the_continuation_pass(wizard_13b):
    expert_bytes = 13_015_864_320 * 2  # Llama-2-13B in bfloat16
    roomy = plan_for(wizard_13b, {"cuda": None, "cpu": None}, device="cuda")
    generating = roomy.phases["cuda"]["continuation"]
    assert generating[memory.EXPERT] == expert_bytes
    # Keys and values of 40 layers x 5120 for 512 + 64 positions, per prompt, and more.
    assert generating[memory.GENERATION] > 64 * 2 * 40 * 5120 * 2 * 576
    assert [(g.rows, g.batches, g.offloaded) for g in roomy.generation] == [(72, 1, False)] * 3
    # Forward FLOPs of 3 x 64 x 575 tokens through the non-embedding weights, give or take
    # attention and the head.
    tokens = 3 * 64 * (512 + 63)
    assert 1 < roomy.flops["continuation"] / (2 * 40 * BLOCK_13B * tokens) < 1.2
    without = yaml.safe_load(wizard_13b.read_text())
    without["parameters"]["continue_tokens"] = 0
    wizard_13b.write_text(yaml.safe_dump(without))
    plain = plan_for(wizard_13b, {"cuda": None, "cpu": None}, device="cuda")
    assert "continuation" not in plain.phases["cuda"] and plain.flops["continuation"] == 0
    h100 = next(c for c in devices.DEVICE_CLASSES if c.name == "h100-80gb")
    # About a minute: mostly reading the three experts once more (78 GB at 2 GB/s).
    assert 39 < roomy.continuation_seconds(h100) < 60 and plain.continuation_seconds(h100) == 0
    assert roomy.seconds(h100) > plain.seconds(h100) + roomy.continuation_seconds(h100)


def test_the_plan_counts_the_prompt_writers(wizard_13b):
    """With written_prompts the base is loaded once more, and it and each expert sample
    draws of 64 prompts up to the longest allowed and score every prompt once: the plan
    counts those forward passes, their FLOPs and the load, at the least they can be."""
    free = {"cuda": None, "cpu": None}
    plain = plan_for(wizard_13b, free, device="cuda")
    doc = yaml.safe_load(wizard_13b.read_text())
    doc["parameters"]["written_prompts"] = 192
    wizard_13b.write_text(yaml.safe_dump(doc))
    written = plan_for(wizard_13b, free, device="cuda")
    # Four 13B checkpoints loaded to generate instead of three, all in float16.
    assert written.continuation_reads["load"] * 3 == plain.continuation_reads["load"] * 4
    continuing = sum(g.batches for g in written.generation) * 64
    # Per expert: 192 / 64 = 3 draws by each of two writers, and every prompt scored twice.
    writing = 2 * sum(3 * max(lengths) + len(lengths) for lengths in written.work.prompt_lengths)
    assert written.flops["generation_steps"] == continuing + writing
    assert written.flops["continuation"] > 2 * plain.flops["continuation"]
    h100 = next(c for c in devices.DEVICE_CLASSES if c.name == "h100-80gb")
    extra_load = plain.continuation_reads["load"] / 3 / (h100.disk_gbps * 1e9)
    assert written.continuation_seconds(h100) > plain.continuation_seconds(h100) + extra_load
    assert "the base is loaded once to write for every expert" in render(written)


def test_continuation_on_a_small_gpu_offloads_and_costs_its_reads(wizard_13b):
    free = {"cuda": 24 * 10**9, "cpu": 64 * 10**9}
    p = plan_for(wizard_13b, free, device="cuda")
    assert all(g.offloaded and g.host_bytes > 0 and g.disk_bytes == 0 for g in p.generation)
    on_gpu = p.phases["cuda"]["continuation"]
    assert on_gpu[memory.EXPERT] + on_gpu[memory.GENERATION] <= 24 * 10**9
    g = p.generation[0]
    assert p.continuation_reads["host"] == 3 * g.batches * 64 * g.host_bytes
    h100 = next(c for c in devices.DEVICE_CLASSES if c.name == "h100-80gb")
    assert p.continuation_seconds(h100) > p.continuation_reads["host"] / (h100.link_gbps * 1e9)
    assert p.phases["cpu"]["continuation"][memory.EXPERT] == g.host_bytes


def test_a_continuation_that_cannot_fit_is_refused_before_any_weight_is_read(
        families, tmp_path, monkeypatch):
    # The block loop fits; the pass may use next to none of the memory free.
    monkeypatch.setattr(expert_placement, "MEMORY_SHARE", 1e-9)
    monkeypatch.setattr(continuation, "loaded", None)  # never reached
    fam = families("llama", 2)
    with pytest.raises(ProDistillError, match=r"generating its continuations needs .* "
                       r"lower 'continue_tokens' or 'max_length'$"):
        merge(fam.recipe("prodistill", shots=4, continue_tokens=8), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cache_goes_to_device_then_cpu_then_disk(wizard_13b):
    free = {"cuda": None, "cpu": None}
    everything = plan_for(wizard_13b, free, device="cuda")
    # The peak of the block loop (the continuation before it takes what memory is free).
    with_cache = max(sum(terms.values()) for phase, terms in everything.phases["cuda"].items()
                     if phase != "continuation")
    cache = everything.phases["cuda"]["train"][memory.CACHE]
    assert plan_for(wizard_13b, {"cuda": with_cache, "cpu": None}, device="cuda").cache_at == "cuda"
    tight = {"cuda": with_cache - 1, "cpu": 10**12}
    moved = plan_for(wizard_13b, tight, device="cuda")
    assert moved.cache_at == "cpu" and memory.CACHE not in moved.phases["cuda"]["train"]
    assert moved.phases["cpu"]["write"][memory.CACHE] == cache  # streams updated in place
    assert plan_for(wizard_13b, {"cuda": with_cache - 1, "cpu": 10**9},
                    device="cuda").cache_at == "disk"
    # When even the rest does not fit, moving the cache would not help: it stays.
    assert plan_for(wizard_13b, {"cuda": 10**9, "cpu": 10**9}, device="cuda").cache_at == "cuda"


def test_real_run_refuses_a_13b_merge_with_16gb_free(wizard_13b, tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "available_memory", lambda device: 16 * 10**9)
    config = MergeConfiguration.model_validate(yaml.safe_load(wizard_13b.read_text()))
    # The merge calls this after checking its inputs and reading its prompts (the models
    # here are configs only, which that check would refuse first); the tiny-model test
    # below goes through a whole merge.
    with pytest.raises(ProDistillError) as err:
        fits.check_fits(parse_recipe(config), MergeOptions(), str(tmp_path / "out"))
    message = str(err.value)
    assert message.startswith("plan: the merge needs ") and "on cpu while training a block" in message
    assert "the largest part is the lambda + grads + Adam" in message and "--device" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_refusal_names_the_knob_of_the_largest_part(families, tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "available_memory", lambda device: 100_000)
    fam = families("llama", 2)
    with pytest.raises(ProDistillError, match="lower 'batch_size' or 'max_length'"):
        merge(fam.recipe("prodistill", shots=32, batch_size=32), tmp_path / "a")
    deep = families("llama", 2, model=tiny.ModelSpec(num_layers=8))  # its output outweighs one block
    with pytest.raises(ProDistillError, match="lower --out-shard-size"):
        merge(deep.recipe("prodistill", epochs=0, shots=1, max_length=4), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def tiny_block_config(arch):
    """A block config of ``arch`` as the tiny families build it, wide enough that the
    per-token and per-pair terms dominate, with grouped-query attention (a multimodal
    family's: its language model's)."""
    return tiny._make_config(arch, 100, num_layers=2, hidden_size=256, intermediate_size=704,
                             num_heads=8, num_kv_heads=4, tie_embeddings=None).get_text_config()


def tiny_block_runner(arch, dtype):
    """A tiny ``arch`` block runner and the context of a padded batch of 4 x 96 tokens."""
    config = tiny_block_config(arch)
    runner = BlockRunner(config, torch.device("cpu"))
    mask = torch.ones(4, 96, dtype=torch.long)
    mask[1:, 70:] = 0
    batch = Batch(torch.zeros_like(mask), mask)
    return config, runner, batch, runner.context(batch.attention_mask, dtype)


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_match_autograd(arch, dtype):
    config, runner, batch, ctx = tiny_block_runner(arch, dtype)
    rows, width = batch.input_ids.shape
    hidden = torch.randn(rows, width, runner.layout.width, dtype=dtype)
    shape = shapes.model_shape(config, [])
    predicted = memory.saved_bytes(shape, rows, width, dtype.itemsize)
    measured = []
    for index in range(len(runner.attention_types)):  # every kind of layer
        layer = runner.layer(index)
        weights = {n: (0.02 * torch.randn(p.shape)).to(dtype).requires_grad_()
                   for n, p in layer.state_dict(keep_vars=True).items()}
        saved = {}  # storage -> bytes, so a tensor saved twice counts once

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            runner.forward(index, layer, weights, hidden, ctx)
        # The weights, the cached input and the batch's context are counted elsewhere.
        ignore = {t.untyped_storage().data_ptr() for t in [
            *weights.values(), hidden, *ctx.masks.values(),
            *(t for table in ctx.position_embeddings.values() for t in table)]}
        measured.append(sum(v for k, v in saved.items() if k not in ignore))
    if any((getattr(config, k, None) or 0) > 1 for k in families.EXPERT_COUNT_KEYS):
        # Which experts a batch is routed to decides a few small tensors' sizes.
        assert abs(predicted / max(measured) - 1) < 0.01, (predicted, measured)
    else:
        assert predicted == max(measured), (predicted, measured)


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_bytes_match_the_batch_contexts(arch, dtype):
    config, _, batch, ctx = tiny_block_runner(arch, dtype)
    tensors = [ctx.token_mask, ctx.position_ids, batch.attention_mask, *ctx.masks.values(),
               *(t for table in ctx.position_embeddings.values() for t in table)]
    measured = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in tensors}.values())
    work = shapes.Workload(((tuple(batch.input_ids.shape),),), (0,), "test", ((),))
    predicted = memory.context_bytes(shapes.model_shape(config, []), work, dtype.itemsize)
    assert predicted == measured, (predicted, measured)


def with_parameters(recipe_path, **params):
    doc = yaml.safe_load(recipe_path.read_text())
    doc["parameters"].update(params)
    recipe_path.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.parametrize("requested, at", [("device", "cuda"), ("cpu", "cpu"), ("disk", "disk")])
def test_the_plan_honours_an_explicit_activation_placement(wizard_13b, requested, at):
    with_parameters(wizard_13b, activation_placement=requested)
    # With free memory unknown, auto would keep the streams on the device.
    p = plan_for(wizard_13b, {"cuda": None, "cpu": None}, device="cuda")
    assert p.cache_at == at
    held = {d: memory.CACHE in p.phases[d]["train"] for d in ("cuda", "cpu")}
    assert held == {"cuda": at == "cuda", "cpu": at == "cpu"}


def test_an_explicit_placement_that_cannot_fit_is_refused(wizard_13b, tmp_path, monkeypatch):
    with_parameters(wizard_13b, activation_placement="device", continue_tokens=0)
    roomy = plan_for(wizard_13b, {"cuda": None, "cpu": None}, device="cuda")
    free = {"cuda": roomy.total("cuda") - 1, "cpu": 10**12}
    assert plan_for(wizard_13b, free, device="cuda").placement == "device"
    monkeypatch.setattr(devices, "available_memory", lambda device: free[device.type])
    config = MergeConfiguration.model_validate(yaml.safe_load(wizard_13b.read_text()))
    with pytest.raises(ProDistillError, match=r"^plan: the merge needs .* on cuda while "
                       r"training a block \(.*activation cache"):
        fits.check_fits(parse_recipe(config), MergeOptions(device="cuda"), str(tmp_path / "out"))
    with_parameters(wizard_13b, activation_placement="auto")  # the same memory is enough
    assert plan_for(wizard_13b, free, device="cuda").placement == "cpu"


def test_the_disk_check_looks_at_the_folder_the_streams_use(families, tmp_path, monkeypatch):
    fam = families("llama", 2)
    recipe = fam.recipe("prodistill", epochs=1, shots=32, batch_size=32, continue_tokens=0)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe))
    roomy = planner.make_plan(parse_recipe(config), MergeOptions(), available={"cpu": None})
    # Room for everything but the streams, which therefore go to disk.
    monkeypatch.setattr(devices, "available_memory", lambda device: roomy.total("cpu") - 1)
    monkeypatch.setattr(preflight, "check_free_disk", lambda out_path, needed: None)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    out = tmp_path / "out"
    scratch = re.escape(str(out / ".prodistill-staging" / ".scratch"))
    with pytest.raises(ProDistillError, match=f"on disk but {scratch} has 0 B free"):
        merge(recipe, out)
    elsewhere = tmp_path / "acts" / "z"
    with pytest.raises(ProDistillError, match=f"on disk but {re.escape(str(elsewhere))} has"):
        merge(fam.recipe("prodistill", epochs=1, shots=32, batch_size=32, continue_tokens=0,
                         activation_dir=str(elsewhere)), out)
    assert not out.exists()


def test_a_merge_plans_from_its_own_calibration_set(families, monkeypatch):
    fam = families("llama", 2)
    recipe = MergeConfiguration.model_validate(yaml.safe_load(fam.recipe("prodistill", shots=8)))
    recipe, options = parse_recipe(recipe), MergeOptions()
    read = planner.make_plan(recipe, options, available={"cpu": None})
    calib = calibration.load_for_experts(recipe, options.trust_remote_code, 0)
    monkeypatch.setattr(calibration, "load_tokenizer", None)  # nothing is read again
    monkeypatch.setattr(calibration, "expert_prompts", None)
    given = planner.make_plan(recipe, options, calib, available={"cpu": None})
    assert given.work == read.work and given.phases == read.phases
    # Room for continue_tokens (64) after every prompt, as without the set.
    widths = [w for bs in given.work.batches for _, w in bs]
    assert min(widths) > 64 and given.work.source == "tokenizer"


def test_the_plan_counts_blocks_in_the_dtype_they_run_in(wizard_13b):
    # float16 weights merged as float16 (task vectors as stored, as mergekit forms them)
    # and trained in bfloat16 by request: the merged block and its gradient are bfloat16.
    recipe = yaml.safe_load(wizard_13b.read_text())
    recipe["dtype"] = "float16"
    recipe["parameters"]["activation_dtype"] = "bfloat16"
    wizard_13b.write_text(yaml.safe_dump(recipe, sort_keys=False))
    p = plan_for(wizard_13b, {"cuda": None, "cpu": None}, device="cuda")
    assert p.dtypes == {"weights": "float16", "task_vectors": "float16", "compute": "bfloat16",
                        "cache": "bfloat16", "output": "float16", "generation": "float16"}
    experts = 3
    assert p.phases["cuda"]["train"][memory.WEIGHTS] == \
        (1 + experts) * BLOCK_13B * 2 + 2 * BLOCK_13B * 2


def tiny_plan(fam, world=parallel.SINGLE, available=None, **params):
    config = MergeConfiguration.model_validate(yaml.safe_load(fam.recipe("prodistill", **params)))
    return planner.make_plan(parse_recipe(config), MergeOptions(),
                          available={"cpu": None} if available is None else available,
                          world=world)


def test_each_process_plans_the_experts_it_owns(families):
    fam = families("llama", 3)
    params = dict(shots=8, batch_size=4, continue_tokens=8, head_epochs=1)
    one = tiny_plan(fam, **params)
    first = tiny_plan(fam, parallel.World(0, 2, local_size=2), **params)
    second = tiny_plan(fam, parallel.World(1, 2, local_size=2), **params)
    assert (list(first.owned), list(second.owned)) == ([0, 1], [2])
    lam = [p.phases["cpu"]["train"][memory.LAMBDA] for p in (one, first, second)]
    assert lam == [16 * n * one.shape.block_numel for n in (3, 2, 1)]
    # The streams of experts 0 and 1 (merged and expert), and their held-out prompts'
    # three streams: expert 2's are the other process's.
    work, hidden = one.work, one.shape.hidden
    held = lambda i: sum(r * w for r, w in work.holdout_batches[i])  # noqa: E731
    own_streams = (2 * (work.slots(0) + work.slots(1)) + 3 * (held(0) + held(1))) * hidden * 4
    assert first.cache_bytes == own_streams < one.cache_bytes
    assert first.work == one.work  # the table still shows every expert's prompts
    # Every process steps as often; between them they do the one process's FLOPs.
    assert first.flops["steps"] == second.flops["steps"] == one.flops["steps"]
    for kind in ("training", "forwards", "continuation"):
        assert first.flops[kind] + second.flops[kind] == pytest.approx(one.flops[kind])
    assert (len(first.generation), len(second.generation)) == (2, 1)
    # Rank 0 alone writes the output.
    assert first.io_bytes - second.io_bytes > one.io_bytes - first.io_bytes
    # Two ring all-reduces of one block per step: dL/dW (float32 here) and the fp32
    # partial sum, which each process keeps beside the training step's other moments.
    P = one.shape.block_numel
    assert one.comm_bytes_per_step == 0
    assert first.comm_bytes_per_step == second.comm_bytes_per_step == 2 * (2 - 1) / 2 * P * (4 + 4)
    assert first.comm_bytes_per_block == \
        first.comm_bytes_per_step * one.flops["steps"] * one.flops["epochs"]
    transient = second.phases["cpu"]["train"][memory.TRANSIENT]
    widest = max((b for i in second.owned for b in work.batches[i]), key=lambda b: b[0] * b[1])
    assert transient == memory.training_step_bytes(second.shape, widest, "element", 4, P) \
        + 4 * one.shape.largest
    head = [memory.head_bytes(one.shape, widest, one.recipe.params, [4, 4], 4, 4, [4] * 4,
                              processes)[memory.TRANSIENT] for processes in (1, 2)]
    assert head[1] - head[0] == 4 * one.shape.hidden * one.shape.vocab[0]  # untied head


def test_processes_on_one_machine_share_its_cpu_memory(families, monkeypatch):
    monkeypatch.setattr(devices, "available_memory", lambda device: 10**12)
    config = MergeConfiguration.model_validate(yaml.safe_load(
        families("llama", 3).recipe("prodistill", shots=8)))
    shared = planner.make_plan(parse_recipe(config), MergeOptions(),
                            world=parallel.World(0, 2, local_size=2))
    assert shared.available["cpu"] == 10**12 // 2
    monkeypatch.setattr(devices, "available_memory", lambda device: 100_000)
    with pytest.raises(ProDistillError, match=r"^plan: process 1 of 2 needs .* on cpu while "):
        fits.check_fits(parse_recipe(config), MergeOptions(), "out",
                        world=parallel.World(1, 2, local_size=2))


def test_plan_command_plans_process_0_of_torchruns_processes(families, tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text(families("llama", 3).recipe("prodistill", shots=8))
    runner = CliRunner()
    out = runner.invoke(cli.main, ["plan", str(path), "--nproc-per-node", "2"]).output
    assert "processes: 2 (2 per machine); planned: process 0, which owns experts 1, 2 of 3" \
        in out
    assert re.search(r"communication: 2 all-reduces of one block per training step .* "
                     r"sent per step by each process", out)
    single = runner.invoke(cli.main, ["plan", str(path)]).output
    assert "processes:" not in single and "communication:" not in single
    # 4 processes for 3 experts: processes 0 and 1 split expert 1's batches, whose one
    # held-out prompt (of 8 shots) cannot be split: refused as the merge refuses it.
    refused = runner.invoke(cli.main, ["plan", str(path), "--nproc-per-node", "2",
                                       "--nnodes", "2"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "mergekit-prodistill: error: 2 processes share expert 1's batches, but one batch "
        "holds 1 prompts: every batch needs at least one prompt per process; raise "
        "'batch_size' or 'shots', or start fewer processes"]
    path.write_text(families("llama", 3).recipe("prodistill", shots=16))
    shared = runner.invoke(cli.main, ["plan", str(path), "--nproc-per-node", "2",
                                      "--nnodes", "2"]).output
    assert "processes: 4 (2 per machine); planned: process 0, which owns expert 1 of 3 " \
        "(recipe order) with 1 other process (rows 1, 3, ... of each batch)" in shared


def test_processes_that_share_an_expert_split_its_rows(families):
    fam = families("llama", 3)
    params = dict(shots=16, batch_size=8, continue_tokens=8)
    one = tiny_plan(fam, **params)
    first, second = (tiny_plan(fam, parallel.World(r, 4, local_size=4), **params)
                     for r in (0, 1))
    assert list(first.owned) == list(second.owned) == [0]
    # Each holds expert 1's whole coefficient state, and half the rows of its streams.
    P, work, hidden = one.shape.block_numel, one.work, one.shape.hidden
    for planned in (first, second):
        assert planned.phases["cpu"]["train"][memory.LAMBDA] == 16 * P
    half = lambda bs, part: sum(len(range(part, r, 2)) * w for r, w in bs)  # noqa: E731
    for part, planned in enumerate((first, second)):
        assert planned.cache_bytes == hidden * 4 * (
            2 * half(work.batches[0], part) + 3 * half(work.holdout_batches[0], part))
    assert first.flops["training"] + second.flops["training"] == pytest.approx(
        tiny_plan(fam, parallel.World(0, 3, local_size=3), **params).flops["training"])
    # The first of them continues the expert's prompts; the same two all-reduces.
    assert (len(first.generation), len(second.generation)) == (1, 0)
    assert first.comm_bytes_per_step == 2 * 3 / 4 * P * (4 + 4)


def test_a_merge_checks_the_plan_of_its_own_process(families, tmp_path, monkeypatch):
    seen = []

    def stop_after_the_plan(*args, world=parallel.SINGLE, **kwargs):
        seen.append(world)
        raise ProDistillError("stopped after the plan")

    monkeypatch.setattr(fits, "check_fits", stop_after_the_plan)
    config = MergeConfiguration.model_validate(yaml.safe_load(
        families("llama", 3).recipe("prodistill", shots=8)))
    # Nothing before the plan talks to the other processes: one process stands for them.
    with pytest.raises(ProDistillError, match="stopped after the plan"):
        run._merge(config, str(tmp_path / "out"), MergeOptions(quiet=True), None,
                   parallel.World(1, 2, local_size=2))
    assert [(w.rank, w.size, w.local_size, w.experts) for w in seen] == [(1, 2, 2, 3)]
