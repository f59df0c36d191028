"""Vocabularies of different sizes: where every model's token rows go in the merged model.

WizardMath-13B has 32001 embedding rows (an added ``[PAD]``) where Llama-2-13B and the
other fine-tunes have 32000. Embeddings and the LM head are merged by task arithmetic, so
their rows must first be aligned on one output vocabulary. This module follows mergekit
and uses its own tokenizer code (``mergekit.tokenizer``):

* With ``tokenizer_source:`` or ``tokenizer:`` in the recipe, the output tokenizer and the
  row alignment are exactly those of a mergekit merge with the same settings.
* Without either, vocabularies of one size are merged row by row, as mergekit does. When
  sizes differ (where mergekit stops with an error), the merge behaves as
  ``tokenizer_source: union``: a token every model has is merged by task arithmetic as
  usual; a token that only some models have takes its row from them (the model's own row
  when one model has it, the mean of their rows when several do), and the merged model
  gets the union tokenizer. This is logged and written in the model card.

Calibration prompts are tokenised with each expert's own tokenizer. The expert stream
reads the expert's own embedding rows; the merged stream reads the merged rows of the same
tokens, so every calibration token must exist in the merged vocabulary.
"""

import logging
from typing import Dict, List, Tuple

import torch
from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.io.tasks import GatherTensors
from mergekit.tokenizer import BuildTokenizer, PermutedVocabulary

from mergekit_prodistill.errors import ProDistillError, one_line

LOG = logging.getLogger("mergekit_prodistill")


class Vocabulary:
    """The merged model's vocabulary and how each input model's rows map onto it."""

    def __init__(self, base: ModelReference, experts: List[ModelReference],
                 rows: Dict[ModelReference, int], merge_config=None, task=None, info=None,
                 source=None, implicit: bool = False):
        self.base, self.experts, self.rows = base, experts, rows
        self.task, self.info = task, info  # None: every model shares the base's rows
        self.source, self.implicit = source, implicit
        tokenizer_config = merge_config.tokenizer if merge_config is not None else None
        self.tokens = (tokenizer_config.tokens if tokenizer_config else None) or {}
        self.pad_to_multiple_of = tokenizer_config.pad_to_multiple_of if tokenizer_config else None
        self.summary = self._summary() if info is not None else None

    @property
    def tokenizer(self):
        """The output tokenizer, or None when the base model's is used unchanged."""
        return self.info.tokenizer if self.info is not None else None

    def align(self, weight, base_t: torch.Tensor, expert_ts: List[torch.Tensor]
              ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Put a vocabulary-indexed tensor of every model in the output's row order."""
        if self.info is None or weight.vocabulary_axis is None:
            return base_t, expert_ts
        models = [self.base, *self.experts]
        permute = PermutedVocabulary(
            gather_tensors=GatherTensors(weight_info=ImmutableMap({m: weight for m in models})),
            tokenizer_task=self.task,
            tokens=ImmutableMap(dict(self.tokens)),
            pad_to_multiple_of=self.pad_to_multiple_of,
            base_model=self.base,
            vocabulary_axis=weight.vocabulary_axis,
        )
        aligned = permute.execute(tokenizer_info=self.info,
                                  tensors=dict(zip(models, [base_t, *expert_ts])))
        return aligned[self.base], [aligned[m] for m in self.experts]

    def id_table(self, model: ModelReference) -> torch.Tensor:
        """For each of ``model``'s token ids, its id in the merged model (-1: none)."""
        rows = self.rows[model]
        if self.info is None:
            table = torch.arange(rows)
            table[table >= self.rows[self.base]] = -1
            return table
        table = torch.full((rows,), -1, dtype=torch.long)
        for out_id, own_id in self.info.permutations[model].items():
            if 0 <= own_id < rows:
                table[own_id] = out_id
        return table

    def calibration_ids(self, batches_per_expert, sources) -> List[List[torch.Tensor]]:
        """Merged-vocabulary ids of every expert's calibration batches (padding -> 0)."""
        out = []
        for expert, path, batches in zip(self.experts, sources, batches_per_expert):
            table = self.id_table(expert)
            mapped = []
            for batch in batches:
                ids, real = batch.input_ids, batch.attention_mask.bool()
                beyond = ids[real & (ids >= len(table))]
                if beyond.numel():
                    raise ProDistillError(
                        f"calibration source {path}: the tokenizer of model {expert} gives token "
                        f"id {int(beyond[0])}, beyond its {len(table)} embedding rows"
                    )
                merged = table[ids.clamp(max=len(table) - 1)]
                missing = ids[real & (merged < 0)]
                if missing.numel():
                    raise ProDistillError(
                        f"calibration file {path}: token {self._token(expert, int(missing[0]))} "
                        f"of model {expert} has no row in the merged model's vocabulary; "
                        "remove it from the prompts or use tokenizer_source: union"
                    )
                mapped.append(merged.clamp(min=0))
            out.append(mapped)
        return out

    def _token(self, model, token_id: int) -> str:
        vocab = self.info.original_vocabs.get(model, {}) if self.info is not None else {}
        name = next((t for t, i in vocab.items() if i == token_id), None)
        return f"{name!r} (id {token_id})" if name else f"id {token_id}"

    def _summary(self) -> str:
        size = len(self.info.tokenizer.get_vocab())
        base_perm = self.info.permutations[self.base]
        vocab = self.info.tokenizer.get_vocab()
        new = [t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if base_perm.get(i, -1) < 0]
        donors = {
            t: [m for m in self.experts if self.info.permutations[m].get(vocab[t], -1) >= 0]
            for t in new
        }
        added = "; ".join(
            f"{t!r} from {', '.join(str(m) for m in ms) or 'no model'}"
            for t, ms in list(donors.items())[:5]
        ) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        rows = ", ".join(f"{m}: {self.rows[m]}" for m in [self.base, *self.experts])
        if self.implicit:
            head = (
                f"The models' vocabularies differ in size ({rows} rows), so the merge follows "
                "mergekit's tokenizer_source: union: tokens every model has are merged by task "
                "arithmetic, and a token only some models have takes its rows from those models"
            )
        else:
            head = f"Vocabulary built as mergekit's tokenizer source '{self.source}' ({rows} rows)"
        tail = f"; tokens not in the base model: {added}" if new else ""
        return f"{head}. The merged model has {size} tokens{tail}."


def build_vocabulary(recipe, merge_config, trust_remote_code: bool,
                     rows: Dict[ModelReference, int]) -> Vocabulary:
    """Build the merged vocabulary from the recipe's tokenizer settings and row counts."""
    experts = [e.model for e in recipe.experts]
    source = merge_config.tokenizer.source if merge_config.tokenizer else merge_config.tokenizer_source
    implicit = False
    if source is None:
        if len(set(rows.values())) <= 1:
            return Vocabulary(recipe.base, experts, rows)
        source, implicit = "union", True
    tokens = (merge_config.tokenizer.tokens if merge_config.tokenizer else None) or {}
    task = BuildTokenizer(
        base_model=recipe.base,
        # Recipe order, not mergekit's set order: the union's ids must not vary by run.
        referenced_models=(recipe.base, *experts),
        tokenizer_source=source,
        trust_remote_code=trust_remote_code,
        add_tokens=tuple(tokens),
    )
    try:
        info = task.execute()
    except Exception as exc:
        raise ProDistillError(
            f"recipe: cannot build the merged tokenizer (source {source}): {one_line(exc)}"
        ) from None
    vocabulary = Vocabulary(recipe.base, experts, rows, merge_config, task, info, source, implicit)
    try:
        # A dry run on one-column stand-ins finds bad `tokens:` settings now, not after the
        # real embeddings are read.
        probe = WeightInfo(name="vocabulary", vocabulary_axis=0)
        vocabulary.align(probe, torch.zeros(rows[recipe.base], 1),
                         [torch.zeros(rows[m], 1) for m in experts])
    except Exception as exc:
        raise ProDistillError(
            f"recipe: the tokenizer settings cannot be applied: {one_line(exc)}"
        ) from None
    # A size mismatch the recipe did not address is worth a warning; a chosen source is not.
    LOG.log(logging.WARNING if implicit else logging.INFO, "%s", vocabulary.summary)
    return vocabulary
