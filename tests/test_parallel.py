"""Several processes merge as one: torchrun, the gloo backend, tiny models on CPU."""

import datetime
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.parallel import World
from mergekit_prodistill.tiny import ModelSpec

from helpers import BIN, load_tensors, merge, run_cli

STATE = Path(".prodistill-staging") / ".progress" / "state.json"
# Results depend on the threads a process computes with, as in any torch program: the
# launched processes and the one-process merges they are compared with all use one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def merge_in_one_thread(recipe_text: str, out: Path) -> Path:
    """The merge in this process, as one process of a launcher runs it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return merge(recipe_text, out, random_seed=3)
    finally:
        torch.set_num_threads(threads)


def torchrun(processes: int, recipe: Path, out: Path, logs: Path = None, check=True):
    """``torchrun -m mergekit_prodistill RECIPE OUT`` on this machine; with ``logs``, each
    process's output goes to its own files there."""
    return run_cli(*_torchrun_args(processes, recipe, out, logs), check=check, env=ONE_THREAD)


def _torchrun_args(processes, recipe, out, logs):
    args = [BIN / "torchrun", "--standalone", "--nproc-per-node", processes]
    if logs:
        args += ["--log-dir", logs, "--redirects", "3"]
    return [*args, "-m", "mergekit_prodistill", recipe, out, "--quiet", "--random-seed", "3"]


def process_stderr(logs: Path, rank: int) -> str:
    """What process ``rank`` wrote to stderr (torchrun --log-dir --redirects 3)."""
    (path,) = logs.glob(f"*/attempt_0/{rank}/stderr.log")
    return path.read_text()


def errors(text: str):
    return [line for line in text.splitlines() if line.startswith("mergekit-prodistill:")]


def same_report(one: dict, other: dict) -> None:
    """Everything the report says of the training, times aside."""
    for block, twin in zip(one["blocks"], other["blocks"], strict=True):
        block.pop("seconds"), twin.pop("seconds")
        assert block == twin
    assert one["head"] == other["head"] and one["fidelity"] == other["fidelity"]


@pytest.fixture(scope="module")
def three_experts(families, tmp_path_factory):
    """A recipe with everything a merge trains (continuations, head, held-out prompts),
    three experts (so two processes own 2 and 1), and its merge in one process."""
    fam = families("llama", 3, model=ModelSpec(num_layers=4))
    folder = tmp_path_factory.mktemp("parallel")
    recipe = folder / "recipe.yml"
    recipe.write_text(fam.recipe("prodistill", epochs=3, lr=0.05, shots=8, batch_size=4,
                                 continue_tokens=4, head_epochs=2, holdout=0.25))
    one = merge_in_one_thread(recipe.read_text(), folder / "one")
    return recipe, one


def test_experts_split_into_contiguous_runs():
    assert [list(World(r, 2).owned(3)) for r in range(2)] == [[0, 1], [2]]
    assert [list(World(r, 3).owned(8)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(World().owned(3)) == [0, 1, 2]
    # More processes than experts: neighbours share an expert and split its batches' rows.
    worlds = [World(r, 5, experts=2) for r in range(5)]
    assert [(w.owned(2).start, w.part(2), w.contributes) for w in worlds] == [
        (0, (0, 3), True), (0, (1, 3), False), (0, (2, 3), False), (1, (0, 2), True),
        (1, (1, 2), False)]


LAUNCHERS = {
    "torchrun": [BIN / "torchrun", "--standalone", "--nproc-per-node", "2"],
    "accelerate": [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_merge_bit_for_bit_as_one(three_experts, tmp_path, launcher):
    recipe, one = three_experts
    two = tmp_path / "two"
    run_cli(*LAUNCHERS[launcher], "-m", "mergekit_prodistill", recipe, two, "--quiet",
            "--random-seed", "3", env=ONE_THREAD)
    a, b = load_tensors(one), load_tensors(two)
    assert a.keys() == b.keys()
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[0]}"
    report = json.loads((two / "prodistill_report.json").read_text())
    assert report["processes"] == 2
    same_report(json.loads((one / "prodistill_report.json").read_text()), report)
    assert not (two / ".prodistill-staging").exists()


def test_tied_head_and_scalar_coefficients_merge_as_in_one_process(families, tmp_path):
    """Gemma 4 E2B: scaled embeddings, a tied head (only the final norm trains),
    soft-capping, per-layer inputs and shared keys and values carried in the streams; one
    coefficient per tensor and expert, single-input distillation (the teacher outputs
    carry what the merged stream carried)."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(families("gemma4_e2b", 2).recipe(
        "prodistill", epochs=3, lr=0.05, shots=8, batch_size=4, continue_tokens=0,
        head_epochs=2, granularity="tensor", inputs="merged"))
    one = merge_in_one_thread(recipe.read_text(), tmp_path / "one")
    torchrun(2, recipe, tmp_path / "two")
    a, b = load_tensors(one), load_tensors(tmp_path / "two")
    assert all(torch.equal(a[name], b[name]) for name in a)
    same_report(*(json.loads((out / "prodistill_report.json").read_text())
                  for out in (one, tmp_path / "two")))


def test_processes_that_share_an_expert_split_its_batches(families, tmp_path):
    """3 processes, 2 experts: the first expert's batches are split over two processes
    (uneven rows: batches of 3 prompts). The same merge up to rounding, which training
    carries through: every block loss within 1e-6, every weight within 1e-4. The head's
    KL (about 3e-5 per token) is a difference of log-probabilities of about 5: rounding
    moves it by about 1e-8, so 1e-3 of it."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(families("llama", 2).recipe(
        "prodistill", epochs=3, lr=0.05, shots=9, batch_size=3, continue_tokens=4,
        head_epochs=2, holdout=0.33))
    one = merge_in_one_thread(recipe.read_text(), tmp_path / "one")
    torchrun(3, recipe, tmp_path / "three")
    a, b = load_tensors(one), load_tensors(tmp_path / "three")
    for name in a:
        scale = a[name].abs().max()
        assert (a[name] - b[name]).abs().max() <= 1e-4 * scale, name
    reports = [json.loads((out / "prodistill_report.json").read_text())
               for out in (one, tmp_path / "three")]
    for part in (*zip(reports[0]["blocks"], reports[1]["blocks"]),
                 (reports[0]["head"], reports[1]["head"])):
        losses = [[x["loss_before"], x["loss_after"], *x["epoch_losses"]] for x in part]
        assert losses[1] == pytest.approx(losses[0], rel=1e-6 if "block" in part[0] else 1e-3)
    assert [f["tokens"] for f in reports[1]["fidelity"]] == \
        [f["tokens"] for f in reports[0]["fidelity"]]


def test_batches_too_small_to_split_are_refused(families, tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(families("llama", 2).recipe("prodistill", epochs=1, shots=5,
                                                  batch_size=4))
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = torchrun(3, recipe, out, logs, check=False)
    assert proc.returncode != 0
    for rank in range(3):
        (line,) = errors(process_stderr(logs, rank))
        assert "2 processes share expert 1's batches, but one batch holds 1 prompts" in line
    assert not out.exists()


def worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the launcher's worker process of ``rank``."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} found")


def blocks_done(out: Path) -> int:
    try:
        return json.loads((out / STATE).read_text())["blocks_done"]
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers in /proc")
def test_a_killed_process_stops_every_process_and_a_rerun_continues(three_experts, tmp_path):
    recipe, one = three_experts
    slow = tmp_path / "recipe.yml"  # more epochs: time to kill it between two blocks
    slow.write_text(recipe.read_text().replace("epochs: 3", "epochs: 60"))
    whole = merge_in_one_thread(slow.read_text(), tmp_path / "whole")

    out, logs = tmp_path / "out", tmp_path / "logs"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **ONE_THREAD)
    launcher = subprocess.Popen([str(a) for a in _torchrun_args(2, slow, out, logs)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while blocks_done(out) < 1 and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(worker(launcher, 1), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    done = blocks_done(out)
    assert 1 <= done < 4, f"the kill should land mid-merge, after block {done}"
    # The survivor ends with one line and no traceback; nothing looks finished.
    survivor = process_stderr(logs, 0)
    assert len(errors(survivor)) == 1 and "Traceback" not in survivor, survivor
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()

    torchrun(2, slow, out)
    a, b = load_tensors(whole), load_tensors(out)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_on_cuda_tensor_sums_get_their_own_nccl_group_that_gives_up(monkeypatch):
    # No GPU here: the calls torch.distributed receives are what is checked.
    from mergekit_prodistill import parallel

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # other ranks log errors only, for the whole process
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(parallel.dist, "new_group",
                        lambda **kw: calls.append(("group", kw)) or "nccl-group")
    try:
        world = parallel.start(torch.device("cuda"))
        # Long waits and objects: gloo, hours; a dead NCCL peer raises where it is awaited.
        assert calls[1] == ("init", "gloo", {"timeout": parallel.TIMEOUT})
        assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "1"
        assert world.device == torch.device("cuda", 1) and world.tensors is None
        sized = world.with_timeout(1200.0)
        assert sized.tensors == "nccl-group"
        assert calls[2] == ("group", {"backend": "nccl", "timeout": datetime.timedelta(
            seconds=1200), "device_id": torch.device("cuda", 1)})
    finally:
        parallel._joined.clear()
        parallel.stop()


def test_more_processes_on_a_node_than_gpus_is_one_line(monkeypatch):
    from mergekit_prodistill import parallel

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device"))
    try:
        with pytest.raises(ProDistillError, match=r"^process 3 of 4: its local rank is 1 but "
                           r"this node has 1 GPU; start at most one process per GPU"):
            parallel.start(torch.device("cuda"))
    finally:
        parallel.stop()


def test_the_wait_for_peers_is_sized_from_the_plan(families):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill.plan import devices, planner
    from mergekit_prodistill.recipe import parse_recipe

    config = MergeConfiguration.model_validate(yaml.safe_load(
        families("llama", 2).recipe("prodistill", shots=4)))
    small = planner.make_plan(parse_recipe(config), MergeOptions(), available={"cpu": None})
    assert devices.collective_timeout(small) == devices.MIN_WAIT.total_seconds()

    class Slow:  # a plan whose blocks take an hour each on the slowest CPU class
        device, shape = "cpu", type("Shape", (), {"num_layers": 40})

        @staticmethod
        def seconds(cls):
            return 40 * 3600.0

    assert devices.collective_timeout(Slow) == devices.WAIT_FACTOR * 3600


def test_one_process_sums_at_once():
    tensor = torch.ones(3)
    assert World().sum_later(tensor)() is tensor
    assert World().with_timeout(1.0) == World()
