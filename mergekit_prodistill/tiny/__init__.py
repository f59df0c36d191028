"""Tiny offline "base + experts" model families for tests and examples.

`build_tiny_family` writes, without any network access and deterministically:

* a small decoder-only causal LM (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3 or
  granite flavour) saved as a
  sharded safetensors Hugging Face checkpoint together with a real fast tokenizer,
* `n_experts` copies of it, each with its own small perturbation of every parameter,
* one unlabeled JSONL calibration prompt file per expert (`{"text": ...}` per line),
  each expert with a different task flavour (arithmetic, code, chat, ...).

The result is small enough to build in about a second, yet exercises the parts of a
real checkpoint that a merge method can get wrong: GQA, tied / untied embeddings,
q/k/v biases, q/k norms, sliding-window attention layers, several shards, scaled
embeddings (Gemma, Granite), (1 + weight) norms, attention and logit soft-capping, a
rotary embedding per attention type (Gemma3) and Granite's residual and logit multipliers.

The package splits the work by job: `text` (prompts and tokenizer), `configs` (one
config per architecture), `perturb` (the base's and experts' weights); this module
assembles them on disk, and `__main__` is the command line:
``python -m mergekit_prodistill.tiny OUT_DIR --arch llama --experts 3``. These experts
have no skills to keep; `skills` builds a family that has (the built-in example's).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from .configs import ARCH_CLASS, ARCHITECTURES, HUB_FORMAT, HUB_NAMES, SLIDING_WINDOW, make_config
from .perturb import expert_state, perturb_base, with_added_tokens
from .text import (BOS_ID, EOS_ID, FLAVOUR_NAMES, MAX_POSITIONS, PAD_ID, SPECIAL_TOKENS,
                   TOKENIZER_VOCAB_SIZE, UNK_ID, build_tokenizer, make_prompts)

__all__ = ["ARCHITECTURES", "ARCH_CLASS", "BOS_ID", "EOS_ID", "FLAVOUR_NAMES", "MAX_POSITIONS",
           "ModelSpec", "PAD_ID", "SLIDING_WINDOW", "SPECIAL_TOKENS", "TOKENIZER_VOCAB_SIZE",
           "TinyFamily", "UNK_ID", "build_tiny_family", "build_tokenizer", "make_config",
           "make_prompts"]

# The names these two had while the package was one module.
_make_config, _ARCH_CLASS = make_config, ARCH_CLASS

_BASELESS_METHODS = frozenset({"linear"})


@dataclass(frozen=True, repr=False)
class ModelSpec:
    """The tiny base model's size and how its checkpoints are sharded on disk.

    `tie_embeddings=None` ties the embeddings as that architecture's checkpoints do. The
    repr names only the settings that differ from the defaults: `ModelSpec(num_layers=3)`.
    """

    num_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_embeddings: bool | None = None
    max_shard_size: int | str = "100KB"

    def __repr__(self) -> str:
        changed = (f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if getattr(self, f.name) != f.default)
        return f"ModelSpec({', '.join(changed)})"

    def config(self, arch: str, vocab_size: int):
        """The transformers config of an `arch` model of this size (see `make_config`)."""
        return make_config(arch, vocab_size, num_layers=self.num_layers,
                           hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, tie_embeddings=self.tie_embeddings)


@dataclass
class TinyFamily:
    """Where `build_tiny_family` put one family's models and calibration files."""

    root: Path
    base: Path
    experts: list[Path]
    calibration: list[Path]
    arch: str = "llama"
    flavours: list[str] = field(default_factory=list)

    def recipe(self, merge_method: str = "prodistill", **parameters) -> str:
        """A mergekit YAML recipe text (absolute paths, `dtype: float32`).

        For `prodistill` each expert gets `parameters: {calibration: <jsonl>}` and
        **parameters become the global `parameters:` block. For any other method each
        expert gets `weight: parameters.get("weight", 0.5)` and the remaining
        **parameters (all but `weight`) become the global block. `linear` gets no
        `base_model`: mergekit's linear merge has no base and would otherwise treat the
        base as one more input that needs a weight.
        """
        models = []
        global_params = dict(parameters)
        if merge_method == "prodistill":
            for expert, calib in zip(self.experts, self.calibration):
                models.append(
                    {"model": str(Path(expert).resolve()), "parameters": {"calibration": str(Path(calib).resolve())}}
                )
        else:
            weight = global_params.pop("weight", 0.5)
            for expert in self.experts:
                models.append({"model": str(Path(expert).resolve()), "parameters": {"weight": weight}})
        doc: dict[str, Any] = {"merge_method": merge_method}
        if merge_method not in _BASELESS_METHODS:
            doc["base_model"] = str(Path(self.base).resolve())
        doc["models"] = models
        if global_params:
            doc["parameters"] = global_params
        doc["dtype"] = "float32"
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def build_tiny_family(
    root,
    arch: str = "llama",
    n_experts: int = 2,
    *,
    model: ModelSpec = ModelSpec(),
    prompts_per_expert: int = 32,
    seed: int = 0,
    expert_scale: float = 0.05,
    extra_tokens: Sequence[Sequence[str]] = (),
) -> TinyFamily:
    """Build a base model, `n_experts` perturbed experts and calibration files under `root`.

    Layout: root/base, root/expert_{i}, root/calibration/expert_{i}.jsonl.
    Existing model directories are replaced. `model` sets the base's size and shards.

    `extra_tokens[i]` (optional) are tokens added to expert i's tokenizer, with as many
    new embedding (and LM head) rows, the way a fine-tune that adds a `[PAD]` token
    grows its vocabulary.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    if n_experts < 1:
        raise ValueError("n_experts must be >= 1")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    base = _base_model(model.config(arch, len(tokenizer)), seed)
    _save(base, tokenizer, root / "base", model.max_shard_size)
    added = [tuple(extra_tokens[i]) if i < len(extra_tokens) else () for i in range(n_experts)]
    experts = _write_experts(base, tokenizer, root, added, seed=seed, scale=expert_scale,
                             max_shard_size=model.max_shard_size)
    return TinyFamily(
        root=root,
        base=root / "base",
        experts=experts,
        calibration=_write_calibration(root / "calibration", n_experts, prompts_per_expert, seed),
        arch=arch,
        flavours=[FLAVOUR_NAMES[i % len(FLAVOUR_NAMES)] for i in range(n_experts)],
    )


def _base_model(config, seed: int):
    """The base: a model of `config` drawn from `seed`, every parameter then perturbed."""
    import transformers

    # Fork the RNG so building a family does not disturb the caller's torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The class the config names (Qwen3.5's multimodal one, which the causal LM
        # mapping does not build); transformers' default attention: sdpa, or eager where
        # a family has no sdpa (Gemma2).
        model = getattr(transformers, config.architectures[0])._from_config(
            config, dtype=torch.float32)
    model.eval()
    perturb_base(model, torch.Generator().manual_seed(seed + 1))
    return model


def _write_experts(model, tokenizer, root: Path, added: list[tuple[str, ...]], *, seed: int,
                   scale: float, max_shard_size) -> list[Path]:
    """Save one expert per entry of `added` (the tokens it adds) as root/expert_{i}; each is
    the base `model` perturbed by its own seed. Leaves the last expert's weights in `model`."""
    # named_parameters() skips tied duplicates, so lm_head follows embed_tokens when tied.
    # Persistent floating buffers are stored weights too (DeepSeek-V3's router bias).
    params = {**dict(model.named_parameters()), **_stored_buffers(model)}
    base_state = {n: t.detach().clone() for n, t in params.items()}
    experts = []
    for i, tokens in enumerate(added):
        state = expert_state(base_state, seed=seed * 1000 + 17 * (i + 1), scale=scale)
        with torch.no_grad():
            for name, t in state.items():
                params[name].copy_(t)
        d = root / f"expert_{i}"
        if tokens:
            _save(*with_added_tokens(model, tokenizer, tokens, seed * 1000 + 31 * (i + 1)),
                  d, max_shard_size)
        else:
            _save(model, tokenizer, d, max_shard_size)
        experts.append(d)
    return experts


def _stored_buffers(model) -> dict:
    """The model's persistent floating-point buffers, by their checkpoint names."""
    return {f"{prefix}.{name}".lstrip("."): buffer for prefix, module in model.named_modules()
            for name, buffer in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set and buffer.is_floating_point()}


def _write_calibration(calib_dir: Path, n_experts: int, prompts_per_expert: int,
                       seed: int) -> list[Path]:
    """One JSONL prompt file per expert, calib_dir/expert_{i}.jsonl, in expert i's flavour."""
    calib_dir.mkdir(exist_ok=True)
    calibration = []
    for i in range(n_experts):
        path = calib_dir / f"expert_{i}.jsonl"
        prompts = make_prompts(i, prompts_per_expert, seed=seed)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for p in prompts:
                f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
        calibration.append(path)
    return calibration


def _save(model, tokenizer, directory: Path, max_shard_size) -> None:
    from transformers.utils import logging as hf_logging

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    # save_pretrained draws a "Writing model shards" bar per call; silence it, then
    # restore the caller's setting.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, max_shard_size=max_shard_size,
                              save_original_format=type(model).__name__ not in HUB_FORMAT)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    renames = HUB_NAMES.get(type(model).__name__)
    if renames:
        _rename_stored(directory, renames)


def _rename_stored(directory: Path, renames: dict) -> None:
    """Store the tensors under the names the Hub's checkpoints of this class use (which
    transformers loads too), where transformers would save other ones."""
    from safetensors.torch import load_file, save_file

    def renamed(name: str) -> str:
        old = next((o for o in renames if name.startswith(o)), None)
        return renames[old] + name[len(old):] if old else name

    for path in directory.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({renamed(n): t for n, t in tensors.items()}, path, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {renamed(n): f for n, f in doc["weight_map"].items()}
        index.write_text(json.dumps(doc, indent=2))
