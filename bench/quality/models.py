"""The benchmark's checkpoints per suite: the package's skill families, with these settings.

Building, caching, the tasks and the test sets are the package's
(``mergekit_prodistill.tiny.skills``); the quick start builds a smaller family the same way.
"""

from mergekit_prodistill.tiny.skills.family import BuildSettings, Checkpoints, build, held_out_sets

__all__ = ["SETTINGS", "BuildSettings", "Checkpoints", "build", "held_out_sets", "CLAIMS",
           "broken_claims"]

# Each suite's checkpoints. In ``competent`` the base is stopped early so that it is fair,
# not perfect, at every task, and the experts move little from it (a small learning rate),
# as fine-tuned experts of a capable base do.
SETTINGS = {
    "novel": BuildSettings(),
    "competent": BuildSettings(suite="competent", pretrain_steps=1200, pretrain_stop=800,
                               finetune_steps=400, finetune_lr=1e-4),
    # Four experts on a Qwen2-style base (attention biases) stopped early; addition, new
    # to the base, gets four times the others' fine-tuning, so the largest task vector.
    "hard": BuildSettings(suite="hard", architecture="Qwen2ForCausalLM", pretrain_stop=500,
                          finetune_steps_of={"add": 1200}),
}


# What each suite says of its models, checked after every build (:func:`broken_claims`):
# every expert masters its task; the base is fair at the tasks listed (>= FAIR: the
# competent base adds only sums below 1000, about 40% of the test sums) and lacks the
# skills listed (< NEW).
EXPERT, FAIR, NEW = 0.95, 0.35, 0.15
CLAIMS = {
    "novel": {"fair": (), "new": ("rev", "sort", "rot")},
    "competent": {"fair": ("rev", "sort", "rot", "add"), "new": ()},
    "hard": {"fair": (), "new": ("add",)},
}


def broken_claims(suite: str, own) -> list:
    """The claims of ``CLAIMS[suite]`` that the scores ``own`` (model -> task -> exact)
    break, one line each."""
    claims, base, broken = CLAIMS[suite], own["base"], []
    for task, scores in own.items():
        if task != "base" and scores[task] < EXPERT:
            broken.append(f"expert {task} scores {scores[task]:.1%} on its task (< {EXPERT:.0%})")
    broken += [f"base scores {base[t]:.1%} on {t} (< {FAIR:.0%}: not fair)"
               for t in claims["fair"] if base[t] < FAIR]
    broken += [f"base scores {base[t]:.1%} on {t} (>= {NEW:.0%}: not new)"
               for t in claims["new"] if base[t] >= NEW]
    return broken
