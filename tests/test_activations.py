"""Where activation streams go, decided without needing an accelerator."""

import pytest
import torch

from mergekit_prodistill import activations
from mergekit_prodistill.activations import ActivationStore, choose_placement
from mergekit_prodistill.errors import ProDistillError

GB = 1 << 30
CUDA = torch.device("cuda")  # only the object: nothing is allocated on it here


@pytest.fixture
def free_memory(monkeypatch):
    def set_free(device_bytes, host_bytes):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (device_bytes, 80 * GB))
        monkeypatch.setattr(activations, "available_host_bytes", lambda: host_bytes)
    return set_free


def test_streams_stay_on_the_gpu_when_they_fit(free_memory):
    free_memory(device_bytes=40 * GB, host_bytes=100 * GB)
    assert choose_placement("auto", 10 * GB, CUDA) == "device"


def test_streams_move_to_host_then_disk_as_they_grow(free_memory):
    free_memory(device_bytes=10 * GB, host_bytes=100 * GB)
    assert choose_placement("auto", 30 * GB, CUDA) == "cpu"
    assert choose_placement("auto", 90 * GB, CUDA) == "disk"


def test_cpu_compute_keeps_streams_in_memory_unless_they_do_not_fit(free_memory):
    free_memory(device_bytes=0, host_bytes=20 * GB)
    assert choose_placement("auto", 10 * GB, torch.device("cpu")) == "device"
    assert choose_placement("auto", 19 * GB, torch.device("cpu")) == "disk"


def test_an_explicit_choice_wins(free_memory):
    free_memory(device_bytes=80 * GB, host_bytes=100 * GB)
    assert choose_placement("disk", 1, CUDA) == "disk"


def test_disk_streams_need_a_folder(tmp_path):
    store = ActivationStore([[(2, 3)]], 4, torch.bfloat16, "disk", torch.device("cpu"), None)
    with pytest.raises(ProDistillError, match="activation_dir"):
        store.allocate("z1")
    store.directory = str(tmp_path)
    (stream,) = store.allocate("z1")
    stream[0].fill_(1.5)
    assert stream[0].shape == (2, 3, 4) and stream[0].dtype == torch.bfloat16
    assert (tmp_path / "z1.bin").stat().st_size == 2 * 3 * 4 * 2
