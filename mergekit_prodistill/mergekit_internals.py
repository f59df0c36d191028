"""mergekit's private helpers this package reuses, re-exported from one place.

mergekit 0.1.x keeps the output config, tokenizer and tag-along file copying as
underscored functions of ``mergekit.merge``; a mergekit upgrade that moves them breaks
here and nowhere else.
"""

import mergekit.merge as _mk_merge

model_out_config = _mk_merge._model_out_config
copy_tokenizer = _mk_merge._copy_tokenizer
copy_tagalong_files = _mk_merge._copy_tagalong_files
update_config_vocab = _mk_merge._update_config_vocab
set_chat_template = _mk_merge._set_chat_template
