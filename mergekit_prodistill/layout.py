"""Every file and folder name a merge writes: the one place that decides them.

The output folder gets mergekit's files (weights, config, tokenizer, card, recipe) plus
the report. Work in progress lives in a hidden staging folder inside it, so an interrupted
merge never leaves a folder that looks finished; hidden names are never published.
"""

import os

STAGING = ".prodistill-staging"  # the output being built, moved into place when complete
PROGRESS = ".progress"  # inside STAGING: what a resumed run continues from
STATE = "state.json"  # inside PROGRESS: the block loop's state after the last saved block
CONTINUATIONS = "continuations.json"  # inside PROGRESS: every expert's continued prompts
SCRATCH = ".scratch"  # inside STAGING: disk-backed activation streams, unless placed
REPORT = "prodistill_report.json"
CARD = "README.md"
PLOT = "prodistill_loss.png"
RECIPE = "mergekit_config.yml"  # the recipe as mergekit writes it beside the card
WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")
# A multimodal base's files that its processor loads, copied beside its merged weights.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json")
# What a merge writes at the top of its output folder: finding one of these there means
# the folder already holds a model that this run would overwrite.
OUTPUT_FILES = ("config.json", CARD, RECIPE, REPORT)


def per_process(name: str, rank: int, size: int) -> str:
    """The name of one process's own working file (streams) when several processes merge."""
    return name if size == 1 else f"{name}-rank{rank}-of-{size}"


def streams_file(blocks_done: int, rank: int, size: int) -> str:
    """Inside PROGRESS: one process's activation streams after ``blocks_done`` blocks."""
    return per_process(f"streams-{blocks_done}", rank, size) + ".safetensors"


def activation_file(stream: str) -> str:
    """Inside the activation folder (SCRATCH, or the recipe's activation_dir): one
    disk-backed activation stream, deleted when the block loop ends."""
    return f"{stream}.bin"


def unit_file(unit: str) -> str:
    """Inside PROGRESS: one finished unit's merged tensors (embeddings, a block, the head)."""
    return f"{unit}.safetensors"


def staging_dir(out_path: str) -> str:
    return os.path.join(out_path, STAGING)


def scratch_dir(out_path: str) -> str:
    return os.path.join(staging_dir(out_path), SCRATCH)
