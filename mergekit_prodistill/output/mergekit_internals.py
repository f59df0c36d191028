"""mergekit's private helpers this package reuses, re-exported from one place.

mergekit 0.1.x keeps the output config, tokenizer and tag-along file copying as
underscored functions of ``mergekit.merge``; a mergekit upgrade that moves them breaks
here and nowhere else.
"""

import mergekit.merge as _mk_merge

from mergekit_prodistill.models.dtypes import requested_output_dtype

copy_tokenizer = _mk_merge._copy_tokenizer
copy_tagalong_files = _mk_merge._copy_tagalong_files
update_config_vocab = _mk_merge._update_config_vocab
set_chat_template = _mk_merge._set_chat_template


def model_out_config(merge_config, arch_info, trust_remote_code: bool = False):
    """The output model's config, as mergekit writes it, with its dtype set as transformers
    5 names it: mergekit's helper sets the deprecated ``torch_dtype``, which warns."""
    dtype = requested_output_dtype(merge_config)
    undated = merge_config.model_copy(update={"out_dtype": None, "dtype": None})
    config = _mk_merge._model_out_config(undated, arch_info, trust_remote_code)
    if dtype:
        config.dtype = dtype
    return config
