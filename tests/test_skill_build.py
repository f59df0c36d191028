"""The skill families build the same models on every machine: the build pins the kernels
torch picks (threads, ATen's CPU capability, MKL's code path) in a child process, so the
caller's settings do not change a bit of the result."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from mergekit_prodistill.tiny.skills import BuildSettings

TINY = BuildSettings(suite="quick", pretrain_steps=30, finetune_steps=10, train_examples=400,
                     calibration_prompts=4, test_examples=4, batch_size=16)
BUILD = ("import sys; from pathlib import Path; from mergekit_prodistill.tiny.skills import "
         "build, BuildSettings; build(Path(sys.argv[1]), BuildSettings(**eval(sys.argv[2])), "
         "log=lambda m: None)")


def digest(root: Path) -> str:
    """Every safetensors file's bytes, in path order."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.safetensors")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build_with(cache: Path, **env) -> Path:
    repo = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", BUILD, str(cache), repr(TINY.__dict__)], check=True,
                   env={**os.environ, "PYTHONPATH": repo, **env})
    (root,) = cache.glob("models-*")
    return root


def test_the_callers_threads_and_kernels_do_not_change_the_models(tmp_path):
    one = build_with(tmp_path / "a", OMP_NUM_THREADS="1")
    # Another thread count, and the AVX2 kernels an older CPU would run (where this CPU
    # has AVX-512, an unpinned build gives other bits).
    two = build_with(tmp_path / "b", OMP_NUM_THREADS="2", ATEN_CPU_CAPABILITY="avx2")
    assert one.name == two.name  # the same cache key
    assert digest(one) == digest(two)
    assert len(list(one.rglob("*.safetensors"))) > 4  # base and experts, sharded


def test_the_cache_key_names_what_fixes_the_bits(monkeypatch):
    import torch

    key = TINY.fingerprint()
    assert key == BuildSettings(**TINY.__dict__).fingerprint()
    assert key != BuildSettings(**{**TINY.__dict__, "seed": 1}).fingerprint()
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")  # another torch: other kernels
    assert TINY.fingerprint() != key
