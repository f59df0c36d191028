"""A merge shows the user its results, not its libraries' deprecations or stray bars."""

import re

import mergekit.tokenizer.build
import pytest
import torch
import transformers
import yaml
from mergekit.architecture import arch_info_for_config
from mergekit.config import MergeConfiguration
from transformers.utils import logging as transformers_logging

from mergekit_prodistill.models import blocks, dtypes
from mergekit_prodistill.output import mergekit_internals
from mergekit_prodistill.quiet import progress_bars_hidden

from helpers import BIN, run_cli

BAR = re.compile(r"\d+%\|")  # tqdm's "100%|" wherever a bar was drawn


@pytest.fixture(scope="module")
def quiet_run(families, tmp_path_factory):
    """stderr of ``mergekit-yaml --quiet`` on a recipe that builds a tokenizer (mergekit's
    tokenizer builder draws a bar) and continues the experts' prompts (transformers loads
    each expert, drawing its own bar)."""
    fam = families("qwen3", 2)
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=1, shots=4, continue_tokens=4))
    doc["tokenizer_source"] = "base"
    folder = tmp_path_factory.mktemp("quiet")
    recipe = folder / "recipe.yml"
    recipe.write_text(yaml.safe_dump(doc))
    return run_cli(BIN / "mergekit-yaml", recipe, folder / "out", "--quiet").stderr


def test_a_quiet_merge_draws_no_progress_bar(quiet_run):
    assert not BAR.search(quiet_run), quiet_run


def test_a_merge_raises_no_deprecation_warning(quiet_run):
    for text in ("FutureWarning", "DeprecationWarning", "deprecated"):
        assert text not in quiet_run, quiet_run


def test_mask_functions_get_the_cache_by_the_name_they_declare():
    def early_5x(config, inputs_embeds, attention_mask, past_key_values, position_ids=None):
        pass

    def later_5x(config, inputs_embeds, attention_mask, cache, position_ids=None):
        pass

    assert blocks.cache_argument(early_5x) == "past_key_values"
    assert blocks.cache_argument(later_5x) == "cache"


def test_block_context_warns_nothing(recwarn):
    config = transformers.Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8,
                                      use_sliding_window=True, max_window_layers=1,
                                      sliding_window=4)
    runner = blocks.BlockRunner(config, torch.device("cpu"))
    assert set(runner.attention_types) == {"full_attention", "sliding_attention"}
    ones = torch.ones(2, 5, dtype=torch.long)
    runner.context(ones, torch.float32)
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_config_dtype_never_reads_the_deprecated_torch_dtype(monkeypatch):
    def deprecated(self):
        raise AssertionError("torch_dtype was read")

    monkeypatch.setattr(transformers.PretrainedConfig, "torch_dtype", property(deprecated))
    assert dtypes.config_dtype(transformers.LlamaConfig()) == "float32"
    assert dtypes.config_dtype(transformers.LlamaConfig(dtype="bfloat16")) == "bfloat16"


def test_output_config_gets_its_dtype_without_the_deprecated_torch_dtype(families, monkeypatch):
    def deprecated(self, value):
        raise AssertionError("torch_dtype was set")

    monkeypatch.setattr(transformers.PretrainedConfig, "torch_dtype",
                        property(lambda self: self.dtype, deprecated))
    fam = families("qwen3", 2)
    for out_dtype, expected in ((None, "float32"), ("bfloat16", "bfloat16")):
        doc = yaml.safe_load(fam.recipe("prodistill"))
        doc["out_dtype"] = out_dtype
        merge_config = MergeConfiguration.model_validate(doc)
        arch = arch_info_for_config(merge_config.base_model.config())
        config = mergekit_internals.model_out_config(merge_config, arch)
        assert str(config.dtype).replace("torch.", "") == expected
        assert merge_config.out_dtype == out_dtype  # the recipe itself is left as it was


def test_quiet_hides_bars_only_for_the_run():
    builder_tqdm = mergekit.tokenizer.build.tqdm
    shown = transformers_logging.is_progress_bar_enabled()
    with progress_bars_hidden(True):
        assert not transformers_logging.is_progress_bar_enabled()
        assert mergekit.tokenizer.build.tqdm.tqdm(range(3)).disable
    assert mergekit.tokenizer.build.tqdm is builder_tqdm
    assert transformers_logging.is_progress_bar_enabled() == shown
    with progress_bars_hidden(False):
        assert mergekit.tokenizer.build.tqdm is builder_tqdm
