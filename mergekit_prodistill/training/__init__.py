"""Training: merging coefficients, their optimiser, the block loop, the head and the
merger that walks the model. The top layer below the doors (``run``, ``cli``)."""
