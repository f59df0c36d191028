"""The benchmark's checkpoints per suite: the package's skill families, with these settings.

Building, caching, the tasks and the test sets are the package's
(``mergekit_prodistill.tiny.skills``); the quick start builds a smaller family the same way.
"""

from mergekit_prodistill.tiny.skills.family import BuildSettings, Checkpoints, build, held_out_sets

__all__ = ["SETTINGS", "BuildSettings", "Checkpoints", "build", "held_out_sets"]

# Each suite's checkpoints. In ``competent`` the base is stopped early so that it is fair,
# not perfect, at every task, and the experts move little from it (a small learning rate),
# as fine-tuned experts of a capable base do.
SETTINGS = {
    "novel": BuildSettings(),
    "competent": BuildSettings(suite="competent", pretrain_steps=1200, pretrain_stop=900,
                               finetune_steps=400, finetune_lr=1e-4),
}
