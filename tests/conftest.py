"""Fixtures shared by every test; helpers to import live in helpers.py."""

import functools
import os

# Tests must never reach a model hub. Set before huggingface_hub is imported (by mergekit
# below): it reads these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from mergekit_prodistill import integration  # noqa: E402
from mergekit_prodistill.tiny import build_tiny_family  # noqa: E402
from mergekit_prodistill.tiny.skills import build_skill_family  # noqa: E402
from mergekit_prodistill.training.weights import ModelTensors  # noqa: E402

integration.install()  # what the start-up hook does once mergekit is imported


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Tiny base+experts families, built once per (arch, experts) and shared."""
    root = tmp_path_factory.mktemp("families")

    @functools.cache
    def get(arch="llama", n_experts=2, **kwargs):
        name = f"{arch}-{n_experts}" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        return build_tiny_family(root / name, arch=arch, n_experts=n_experts, **kwargs)

    return get


@pytest.fixture(scope="session")
def skill_family(tmp_path_factory):
    """The quick start's base and experts with real skills (about a minute to build), built
    once per session, or once for good under $MERGEKIT_PRODISTILL_SKILLS_CACHE if set."""
    cache = os.environ.get("MERGEKIT_PRODISTILL_SKILLS_CACHE")
    return build_skill_family(cache or tmp_path_factory.mktemp("skills"))


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if the merge reads a tensor: every check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read before the input was checked")

    monkeypatch.setattr(ModelTensors, "load", refuse)
