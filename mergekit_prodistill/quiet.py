"""What a prodistill run does not print: with ``--quiet`` every progress bar, not only
mergekit's own; always, mergekit's notices that it infers a model's layout.

mergekit's flag reaches the bars of its merge loop; a prodistill run also draws
transformers' bars (loading an expert to continue its prompts, Hub downloads) and the bar
of mergekit's tokenizer builder, which takes no option. They are hidden for the length of
one run and shown again after it, so other merges in the same process keep theirs.
"""

import contextlib
import functools
import logging
import types

import mergekit.tokenizer.build as _mk_tokenizer_build
import tqdm
from transformers.utils import logging as transformers_logging

# The tokenizer builder calls ``tqdm.tqdm(...)`` through its module's ``tqdm`` name.
_SILENT_TQDM = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))


@contextlib.contextmanager
def progress_bars_hidden(quiet: bool):
    """Hide the bars of transformers and mergekit's tokenizer builder when ``quiet``."""
    if not quiet:
        yield
        return
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # transformers' and huggingface_hub's
    builder_tqdm, _mk_tokenizer_build.tqdm = _mk_tokenizer_build.tqdm, _SILENT_TQDM
    try:
        yield
    finally:
        _mk_tokenizer_build.tqdm = builder_tqdm
        if shown:
            transformers_logging.enable_progress_bar()


def honours_quiet(run):
    """``run(merge_config, out_path, options, ...)`` with every bar hidden when
    ``options.quiet``."""

    @functools.wraps(run)
    def quietened(merge_config, out_path, options, *args, **kwargs):
        with progress_bars_hidden(options.quiet):
            return run(merge_config, out_path, options, *args, **kwargs)

    return quietened


class _LayoutNotices(logging.Filter):
    """mergekit's notices that it has no layout of an architecture and the modules it
    inferred instead: expected for every family not on its list, which the merge reads
    from the transformers model itself (weight_units.py), so they tell a user nothing."""

    STARTS = ("No JSON architecture found for ", "Inferred ")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.STARTS) or " templates, and " in message)


@contextlib.contextmanager
def layout_notices_hidden():
    """Hide mergekit's layout-inference notices (logged to its logger and to the root
    logger) while a layout is worked out."""
    hidden = _LayoutNotices()
    loggers = [logging.getLogger(), logging.getLogger("mergekit.architecture")]
    for logger in loggers:
        logger.addFilter(hidden)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hidden)
