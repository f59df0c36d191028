import functools
import os
import subprocess
import sys
from pathlib import Path

# Tests must never reach a model hub. Set before huggingface_hub is imported (by mergekit
# below): it reads these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_prodistill import integration
from mergekit_prodistill.tiny import build_tiny_family

integration.install()  # what the start-up hook does once mergekit is imported

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Tiny base+experts families, built once per (arch, experts) and shared."""
    root = tmp_path_factory.mktemp("families")

    @functools.cache
    def get(arch="llama", n_experts=2, **kwargs):
        name = f"{arch}-{n_experts}" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        return build_tiny_family(root / name, arch=arch, n_experts=n_experts, **kwargs)

    return get


def merge(recipe_text: str, out: Path, **options) -> Path:
    """Run a recipe in-process through mergekit's own entry point (as mergekit-yaml does)."""
    options.setdefault("quiet", True)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    run_merge(config, str(out), options=MergeOptions(**options), config_source=recipe_text)
    return out


def run_cli(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def with_expert_parameters(recipe_text: str, *updates: dict) -> str:
    """The recipe with each expert's ``parameters:`` replaced by the matching dict."""
    doc = yaml.safe_load(recipe_text)
    for entry, params in zip(doc["models"], updates):
        entry["parameters"] = params
    return yaml.safe_dump(doc, sort_keys=False)
