"""Where activation streams go, decided by the plan without needing an accelerator, and
allocated there by the merge."""

import pytest
import torch
import yaml
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_prodistill.plan import devices, fits, planner
from mergekit_prodistill.plan.planner import stream_placement
from mergekit_prodistill.recipe import parse_recipe
from mergekit_prodistill.training.activations import ActivationStore

from helpers import load_tensors, merge

GB = 1 << 30
CUDA = torch.device("cuda")  # only the object: nothing is allocated on it here


def placed(streams, device_free, host_free, device=CUDA, requested="auto"):
    """The placement of ``streams`` bytes beside 4 GB of block state on the device and
    1 GB of output buffer in CPU memory."""
    rest, host_rest = 4 * GB, 1 * GB
    if device.type == "cpu":  # one memory: the block state and the buffer share it
        rest = host_rest = rest + host_rest
    totals = {"device": rest + streams, "cpu": host_rest + streams, "disk": rest}
    return stream_placement(requested, device, totals, {str(device): device_free,
                                                        "cpu": host_free})


def test_streams_stay_on_the_gpu_when_they_fit():
    assert placed(10 * GB, device_free=40 * GB, host_free=100 * GB) == "device"
    assert placed(10 * GB, device_free=None, host_free=0) == "device"  # unknown: as if enough


def test_streams_move_to_host_then_disk_as_they_grow():
    assert placed(30 * GB, device_free=10 * GB, host_free=100 * GB) == "cpu"
    assert placed(99 * GB + 1, device_free=10 * GB, host_free=100 * GB) == "disk"


def test_cpu_compute_keeps_streams_in_memory_unless_they_do_not_fit():
    cpu = torch.device("cpu")
    assert placed(10 * GB, 20 * GB, 20 * GB, device=cpu) == "device"
    assert placed(19 * GB, 20 * GB, 20 * GB, device=cpu) == "disk"


def test_streams_stay_when_moving_them_would_not_help():
    assert placed(GB, device_free=2 * GB, host_free=0) == "device"  # the check refuses


def test_an_explicit_choice_wins():
    assert placed(1, device_free=80 * GB, host_free=100 * GB, requested="disk") == "disk"
    assert placed(90 * GB, device_free=GB, host_free=GB, requested="device") == "device"


def test_disk_streams_need_a_folder(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        ActivationStore([[(2, 3)]], 4, torch.bfloat16, "disk", torch.device("cpu"), None)
    store = ActivationStore([[(2, 3)]], 4, torch.bfloat16, "disk", torch.device("cpu"),
                            str(tmp_path))
    (stream,) = store.allocate("z1")
    stream[0].fill_(1.5)
    assert stream[0].shape == (2, 3, 4) and stream[0].dtype == torch.bfloat16
    assert (tmp_path / "z1.bin").stat().st_size == 2 * 3 * 4 * 2


def test_the_store_takes_a_decided_placement():
    with pytest.raises(ValueError, match="auto"):
        ActivationStore([[(2, 3)]], 4, torch.float32, "auto", torch.device("cpu"), None)


@pytest.mark.parametrize("requested, tight", [("auto", False), ("auto", True), ("device", False),
                                              ("cpu", False), ("disk", False)])
def test_the_merge_puts_the_streams_where_its_plan_does(families, tmp_path, monkeypatch,
                                                        requested, tight):
    fam = families("llama", 2)
    recipe = fam.recipe("prodistill", epochs=1, shots=8, continue_tokens=0,
                        activation_placement=requested)
    if tight:  # CPU memory for everything but the streams: auto sends them to disk
        config = MergeConfiguration.model_validate(yaml.safe_load(recipe))
        roomy = planner.make_plan(parse_recipe(config), MergeOptions(), available={"cpu": None})
        monkeypatch.setattr(devices, "available_memory", lambda device: roomy.total("cpu") - 1)
    plans, stores = [], []
    check_fits, init = fits.check_fits, ActivationStore.__init__
    monkeypatch.setattr(fits, "check_fits",
                        lambda *a, **k: plans.append(check_fits(*a, **k)) or plans[-1])

    def spy(store, *args, **kwargs):
        init(store, *args, **kwargs)
        stores.append(store)

    monkeypatch.setattr(ActivationStore, "__init__", spy)
    out = merge(recipe, tmp_path / "out")
    (fit,) = plans
    assert len(stores) == 2  # the training streams and the held-out prompts' streams
    expected = requested if requested != "auto" else "disk" if tight else "device"
    for store in stores:
        assert store.placement == fit.placement == expected
        assert store.dtype == dtype_from_name(fit.dtypes["cache"]) == torch.float32
        assert store.directory == fit.activation_dir == str(out / ".prodistill-staging" / ".scratch")
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("placement", ["cpu", "disk"])
def test_activation_placements_give_identical_merges(families, tmp_path, placement):
    fam = families("qwen2", 2)
    params = dict(epochs=3, lr=0.05, shots=8)
    ref = load_tensors(merge(fam.recipe("prodistill", **params), tmp_path / "ref"))
    extra = {"activation_dir": str(tmp_path / "acts")} if placement == "disk" else {}
    out = merge(fam.recipe("prodistill", activation_placement=placement, **params, **extra),
                tmp_path / "out")
    got = load_tensors(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    if placement == "disk":  # the streams were there, and are deleted with the merge done
        assert (tmp_path / "acts").is_dir() and not list((tmp_path / "acts").iterdir())
