"""The environment that pins the kernels torch picks, so that training and merging give
the same bits on any x86-64 CPU: one thread, ATen's portable kernels and MKL's AVX2 code
path on every CPU (the last two cost about 10% of a skill family's build time).

It takes effect only if set before torch starts, so this module imports nothing: a script
can load it by path before importing torch (the package's ``__init__`` files import torch),
and ``python kernels.py`` prints it as ``export NAME=VALUE`` lines for a shell to eval.
"""

# One thread: torch's own and MKL's.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# ATen's CPU capability and MKL's code path (conditional numerical reproducibility).
KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AVX2"}
# Everything a skill family's build sets before torch starts (family.PINNED).
PINNED = {**THREADS, **KERNELS}


def exports(env=PINNED) -> str:
    """``env`` as shell ``export NAME=VALUE`` lines."""
    return "".join(f"export {name}={value}\n" for name, value in env.items())


if __name__ == "__main__":
    print(exports(), end="")
