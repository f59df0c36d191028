"""ProDistill merge method for mergekit.

ProDistill (Xu, Li, Zhang, ICML 2025, arXiv 2502.12706) merges fine-tuned experts into
their common base by training element-wise merging coefficients one decoder block at a
time, so that the merged block reproduces each expert's block on a few unlabeled prompts.

Importing this package is cheap; the heavy modules load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "run_prodistill":
        from mergekit_prodistill.run import run_prodistill

        return run_prodistill
    raise AttributeError(f"module 'mergekit_prodistill' has no attribute {name!r}")
