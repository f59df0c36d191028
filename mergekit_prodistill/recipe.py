"""ProDistill's recipe schema, read from a normal mergekit ``MergeConfiguration``.

mergekit accepts any key under ``parameters:`` and silently ignores the ones a method does
not know; a list there means a gradient over layers. ProDistill's settings are plain
scalars, so this module validates them itself: unknown keys are rejected by name (with the
closest valid key suggested), lists and filters are rejected, ranges are checked, and
settings that contradict each other are refused (:mod:`recipe_checks` words the errors).
"""

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Union

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.output.output_folder import folder_problem
from mergekit_prodistill.recipe_checks import check_chat_template, plain, validated

# epochs: auto trains every block for AUTO_EPOCHS epochs and at least AUTO_STEPS steps.
AUTO_EPOCHS = 30
AUTO_STEPS = 480


class ProDistillParameters(BaseModel):
    """Global ``parameters:`` of a prodistill recipe."""

    model_config = ConfigDict(extra="forbid")

    init: float = Field(0.5, description="initial value of every merging coefficient")
    lr: float = Field(0.1, gt=0, description="Adam learning rate for the coefficients")
    epochs: Union[int, Literal["auto"]] = Field(
        "auto",
        description="passes over the calibration data per block; auto: 30, or more when "
        "a block has few batches, so that every block gets at least 480 optimiser steps, "
        "as many as at 64 shots (120 epochs at 16 shots of batch_size 4); 0: task "
        "arithmetic, nothing trained",
    )
    patience: int = Field(
        0, ge=0, description="stop a block's training once its loss on the held-out "
        "prompts has not improved by 1% for this many checks (one every 10 optimiser "
        "steps); 0: train every epoch")
    shots: int = Field(64, ge=1, description="calibration prompts used per expert")
    holdout: float = Field(
        0.125,
        ge=0,
        lt=1,
        description="prompts held out per expert, as a share of shots, drawn from its "
        "source beyond the training prompts and never trained on: the merge reports how "
        "many of each expert's next-token choices on them ProDistill and task arithmetic "
        "keep (0: no report)",
    )
    batch_size: int = Field(4, ge=1, description="prompts per expert in one step")
    max_length: int = Field(512, ge=1, description="tokens kept per prompt")
    granularity: Literal["element", "tensor", "task"] = Field(
        "element",
        description="one coefficient per weight element, per weight tensor, or per expert "
        "and block (the paper's ablation)",
    )
    continue_tokens: int = Field(
        64,
        ge=0,
        description="tokens each expert generates greedily after each of its calibration "
        "prompts; the distillation then runs on prompt + continuation (0: prompts only, "
        "as in the paper)",
    )
    written_prompts: int = Field(
        0,
        ge=0,
        description="more calibration prompts per expert, written by a model: sampled from "
        "the tokens its prompts all start with until the tokens they all end with, by the "
        "expert or the base, whichever predicts its real prompts better; each is then "
        "continued like a real one (0: none)",
    )
    head_epochs: int = Field(
        0,
        ge=0,
        description="epochs training the final norm and LM head coefficients to match each "
        "expert's next-token distribution (0: task arithmetic with weight init, as in the "
        "paper)",
    )
    inputs: Literal["dual", "merged", "expert"] = Field(
        "dual",
        description="block inputs: merged stream for the student and the expert's own "
        "stream for the teacher (dual), or one stream for both (the paper's ablation)",
    )

    activation_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the cached activation streams, the block forward passes and "
        "training; auto: float32 (TF32 matmuls on CUDA), whose rounding, unlike "
        "bfloat16's, is far below what real fine-tunes' task vectors change",
    )
    activation_placement: Literal["auto", "device", "cpu", "disk"] = Field(
        "auto",
        description="where the activation streams live: on the compute device, in CPU "
        "memory, or in files under activation_dir; auto: the first that fits",
    )
    activation_dir: Optional[str] = Field(
        None, description="folder for disk-backed activation streams"
    )

    def holdout_count(self) -> int:
        """Prompts held out per expert (when its source has that many beyond ``shots``)."""
        return math.ceil(self.holdout * self.shots)

    def epochs_for(self, steps_per_epoch: int, real_steps: Optional[int] = None) -> int:
        """The epochs a block is trained for, given its optimiser steps per epoch (and the
        steps the real prompts alone would take, where prompts were written).

        With few shots an epoch is a few steps; 30 of them leave the coefficients far from
        converged (the hard suite's 16-shot merges kept 0.757 of the experts' skill after
        200 steps and 0.807 after 480), so ``auto`` also counts steps, not only passes.
        Written prompts (``written_prompts``) spread the steps of 30 epochs of the real
        prompts over more data rather than adding steps.
        """
        if self.epochs != "auto":
            return self.epochs
        steps = max(AUTO_EPOCHS * (real_steps or steps_per_epoch), AUTO_STEPS)
        return math.ceil(steps / steps_per_epoch)

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                               and value >= 0):
            return value
        raise ValueError("must be auto or a whole number of epochs (0: task arithmetic, "
                         "nothing trained)")

    @field_validator("activation_dtype", mode="before")
    @classmethod
    def _no_float16(cls, value):
        if value == "float16":
            raise ValueError(
                "float16 cannot carry the merging coefficients' gradients (about 1e-9 at "
                "13B widths, below its range): use bfloat16 or float32 (auto picks "
                "bfloat16 on GPUs that have it)")
        return value

    @field_validator("activation_dir")
    @classmethod
    def _a_folder(cls, value: Optional[str]) -> Optional[str]:
        problem = value and folder_problem(value)
        if problem:
            raise ValueError(f"{value} {problem}; name a folder (it is created if missing)")
        return value

    @field_validator("init", "lr", "patience", "shots", "holdout", "batch_size",
                     "max_length", "continue_tokens", "written_prompts", "head_epochs",
                     mode="before")
    @classmethod
    def _not_a_switch(cls, value):
        if isinstance(value, bool):  # YAML's yes/no/on/off too; pydantic takes them as 1/0
            raise ValueError("must be a number, not true or false")
        return value

    @field_validator("init", "lr")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _head_reads_the_merged_stream(self):
        if self.head_epochs and self.epochs == 0:
            raise ValueError(
                "head_epochs trains the head on the streams the block loop leaves, and "
                "'epochs: 0' runs no block loop (plain task arithmetic); set epochs above 0, "
                "or head_epochs: 0")
        if self.head_epochs and self.inputs == "expert":
            raise ValueError(
                "head_epochs trains the head on the merged model's last hidden states, "
                "which 'inputs: expert' does not compute; use inputs: dual or merged, or "
                "head_epochs: 0")
        if self.written_prompts and self.epochs == 0:
            raise ValueError("written_prompts are trained on, and 'epochs: 0' trains "
                             "nothing; set epochs above 0, or written_prompts: 0")
        if self.patience and self.holdout == 0:
            raise ValueError(
                "patience stops each block on its held-out prompts, and 'holdout: 0' holds "
                "none out; set holdout above 0, or patience: 0")
        return self

    @model_validator(mode="after")
    def _folder_for_disk_streams(self):
        kept = {"device": "on the compute device", "cpu": "in CPU memory"}
        if self.activation_dir and self.activation_placement in kept:
            raise ValueError(
                "activation_dir holds disk-backed activation streams, and 'activation_placement: "
                f"{self.activation_placement}' keeps them {kept[self.activation_placement]}; "
                "set activation_placement: disk or auto, or remove activation_dir")
        return self


class ExpertParameters(BaseModel):
    """Per-model ``parameters:`` of an expert in a prodistill recipe."""

    model_config = ConfigDict(extra="forbid")

    calibration: Optional[str] = Field(
        None,
        description="local prompts: a JSONL, text, Parquet, CSV or JSON file, a folder of "
        "them, or a folder written by Dataset.save_to_disk",
    )
    dataset: Optional[str] = Field(
        None,
        description="a Hugging Face dataset: Hub id (read from the local cache when "
        "offline) or local dataset folder",
    )
    subset: Optional[str] = Field(None, description="the dataset's configuration (subset)")
    split: Optional[str] = Field(None, description="the dataset split (default: train)")
    field: Optional[str] = Field(
        None,
        description="the JSON field or dataset column holding the prompt (default: the "
        "first of text, prompt, instruction, question, problem)",
    )
    template: str = Field(
        "{prompt}",
        description="the expert's prompt format: a string containing {prompt}, a preset "
        "name (vicuna, alpaca, alpaca-cot, alpaca-code), or chat (the tokenizer's own "
        "chat template)",
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from mergekit_prodistill.inputs.templates import resolve_template

        resolve_template(value)  # raises on an unknown preset; the name is kept for the card
        return value

    @model_validator(mode="after")
    def _one_source(self):
        if (self.calibration is None) == (self.dataset is None):
            raise ValueError(
                "name the calibration prompts with exactly one of 'calibration:' (a local "
                "file or folder) and 'dataset:' (a Hugging Face dataset)"
            )
        if self.subset is not None and self.dataset is None:
            raise ValueError("'subset' applies to 'dataset:' sources only")
        return self


@dataclass(frozen=True)
class Expert:
    model: ModelReference
    params: ExpertParameters


@dataclass(frozen=True)
class ProDistillRecipe:
    base: ModelReference
    experts: List[Expert]
    params: ProDistillParameters
    dtype: Optional[str]
    out_dtype: Optional[str]


def parse_recipe(config: MergeConfiguration) -> ProDistillRecipe:
    """Validate a prodistill ``MergeConfiguration`` and return its settings."""
    if config.slices or config.modules or not config.models:
        raise ProDistillError(
            "recipe: prodistill merges whole models; list them under 'models:' "
            "('slices:' and 'modules:' are not supported)"
        )
    check_chat_template(config.chat_template)
    if config.base_model is None:
        raise ProDistillError(
            "recipe: prodistill needs 'base_model:', the model every expert was "
            "fine-tuned from"
        )
    params = validated(
        ProDistillParameters, plain(config.parameters, "recipe"), "recipe parameters"
    )
    experts = []
    for entry in config.models:
        where = f"model {entry.model}"
        if entry.model == config.base_model:
            if entry.parameters:
                raise ProDistillError(
                    f"{where}: the base model takes no parameters in a prodistill recipe"
                )
            continue
        raw = plain(entry.parameters, where)
        experts.append(Expert(entry.model, validated(ExpertParameters, raw, where)))
    if not experts:
        raise ProDistillError("recipe: prodistill needs at least one expert besides the base")
    if len({e.model for e in experts}) != len(experts):
        raise ProDistillError("recipe: an expert is listed twice under 'models:'")
    return ProDistillRecipe(
        base=config.base_model,
        experts=experts,
        params=params,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
    )
