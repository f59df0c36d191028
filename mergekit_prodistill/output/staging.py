"""Everything around the weights: staging, config, tokenizer, model card and report.

The whole output is written to a staging folder inside the target and moved into place
only when complete, so an interrupted merge never leaves a folder that looks finished.
"""

import os
import shutil

from mergekit_prodistill.layout import (PROCESSOR_FILES, PROGRESS, RECIPE, REPORT, SCRATCH,
                                        WEIGHT_PREFIXES, staging_dir)
from mergekit_prodistill.models.families import vocabulary_indexed
from mergekit_prodistill.output import card, mergekit_internals
from mergekit_prodistill.output.report import Report


def start_staging(out_path: str) -> str:
    """The staging folder, emptied of everything but the progress of an interrupted run."""
    staging = staging_dir(out_path)
    os.makedirs(staging, exist_ok=True)
    for name in os.listdir(staging):
        if name != PROGRESS:
            path = os.path.join(staging, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return staging


def discard(staging: str, out_path: str, created_out: bool) -> None:
    """Remove what a failed run wrote: the staging folder, and the output folder if new."""
    shutil.rmtree(staging, ignore_errors=True)
    if created_out and os.path.isdir(out_path) and not os.listdir(out_path):
        os.rmdir(out_path)


def listing(folder: str) -> list:
    """The files under ``folder`` as sorted relative paths, hidden ones (working data) left out."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/")
                  for n in names if not n.startswith(".")]
    return sorted(found)


def finish(staging: str, out_path: str, merge_config, arch_info, options, vocabulary,
           report: Report) -> None:
    """Write config, tokenizer, card and report into the staging folder, then publish."""
    cfg = mergekit_internals.model_out_config(merge_config, arch_info, options.trust_remote_code)
    if vocabulary.tokenizer is not None:
        # A built vocabulary is always saved, and sets vocab_size, as mergekit does (and
        # the row counts of tensors merged as the embedding is, Gemma 4's per-layer one).
        indexed = vocabulary_indexed(cfg)
        mergekit_internals.update_config_vocab(cfg, arch_info, vocabulary.tokenizer,
                                        pad_to_multiple_of=vocabulary.pad_to_multiple_of)
        for key in indexed.values():
            setattr(cfg.get_text_config(), key, cfg.get_text_config().vocab_size)
        mergekit_internals.set_chat_template(vocabulary.tokenizer, merge_config)
        vocabulary.tokenizer.save_pretrained(staging)
    elif options.copy_tokenizer:
        mergekit_internals.copy_tokenizer(merge_config, staging, options=options)
    cfg.save_pretrained(staging)
    # mergekit's layout lists the files to copy where it has one; a multimodal model's
    # processor files come along even where it infers the layout.
    tagalong = [*(arch_info.tagalong_files or []),
                *(f for f in PROCESSOR_FILES if report.towers)]
    mergekit_internals.copy_tagalong_files(merge_config, staging,
                                           files=list(dict.fromkeys(tagalong)), options=options)
    if options.write_model_card:
        name = os.path.basename(os.path.abspath(out_path))
        card.write_card(staging, merge_config, name, report)
        with open(os.path.join(staging, RECIPE), "w", encoding="utf-8") as f:
            f.write(report.recipe)
    # The report is written last so it can list every file of the finished merge: that
    # list is exactly what --push-to-hub uploads.
    report.files = sorted([*listing(staging), REPORT])
    report.write(staging)
    publish(staging, out_path)


def publish(staging: str, out_path: str) -> None:
    """Move the finished files into ``out_path``, replacing weights of an older merge."""
    for name in os.listdir(out_path):
        if name.startswith(WEIGHT_PREFIXES):
            os.remove(os.path.join(out_path, name))
    for name in os.listdir(staging):
        if name not in (PROGRESS, SCRATCH):
            os.replace(os.path.join(staging, name), os.path.join(out_path, name))
