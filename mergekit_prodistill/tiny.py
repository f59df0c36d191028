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

Command line: ``python -m mergekit_prodistill.tiny OUT_DIR --arch llama --experts 3``
builds a family in OUT_DIR and writes OUT_DIR/recipe.yml (a ProDistill recipe).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

__all__ = ["ARCHITECTURES", "TinyFamily", "build_tiny_family", "build_tokenizer", "main"]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "granite")

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
TOKENIZER_VOCAB_SIZE = 768
MAX_POSITIONS = 256
# Small window so prompts of ordinary length really cross it.
SLIDING_WINDOW = 6

_ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "granite": "GraniteForCausalLM",
}
# One sliding and one full attention layer first, so two layers already hold both kinds.
_ALTERNATING = ("sliding_attention", "full_attention")


# --------------------------------------------------------------------------- prompts

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_OPS = [("plus", "+"), ("minus", "-"), ("times", "*"), ("divided by", "/")]
_THINGS = ["apples", "books", "coins", "marbles", "pencils", "cookies", "stamps", "shells"]
_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]

_CODE_TASKS = [
    "reverses a list",
    "sorts a list of numbers",
    "counts the vowels in a string",
    "checks whether a number is prime",
    "returns the largest element of an array",
    "merges two sorted lists",
    "removes duplicates from a list",
    "computes the factorial of n",
    "parses a date string",
    "finds the longest word in a sentence",
    "flattens a nested list",
    "computes the nth Fibonacci number",
]
_LANGS = ["Python", "Rust", "JavaScript", "Go", "C", "Java"]
_CODE_EXTRAS = [
    "Add type hints.",
    "Include a short docstring.",
    "Make it run in linear time.",
    "Do not use any library functions.",
    "Write two unit tests for it as well.",
    "Explain the edge cases in one sentence.",
]

_CHAT_TOPICS = [
    "the weather today",
    "a good book to read",
    "how to cook rice",
    "why the sky is blue",
    "the history of the bicycle",
    "how plants grow",
    "a fun weekend plan",
    "learning to play the guitar",
    "how the moon changes shape",
    "the best way to sleep well",
]
_CHAT_OPENERS = ["Can you tell me about", "What do you know about", "Please explain", "I am curious about"]
_CHAT_EXTRAS = [
    "Keep it short.",
    "Use simple words.",
    "My friend asked me this yesterday.",
    "I want to explain it to a child.",
    "Give me three points.",
    "Answer in a friendly tone.",
]


def _arithmetic_prompt(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    word, sym = rng.choice(_OPS)
    style = rng.randrange(4)
    if style == 0:
        text = f"What is {a} {word} {b}?"
    elif style == 1:
        text = f"Compute {a} {sym} {b}."
    elif style == 2:
        n, m = rng.randint(2, 10), rng.randint(2, 10)
        name = rng.choice(_NAMES)
        thing = rng.choice(_THINGS)
        text = (
            f"{name} has {_NUMBER_WORDS[n]} {thing} and buys {_NUMBER_WORDS[m]} more. "
            f"How many {thing} does {name} have now?"
        )
    else:
        sign = rng.choice("+-")
        text = f"Solve for x: {a}x {sign} {b} = {rng.randint(100, 999)}."
    if style != 2 and rng.random() < 0.4:
        text += " Show your work step by step."
    return text


def _code_prompt(rng: random.Random) -> str:
    text = f"Write a {rng.choice(_LANGS)} function that {rng.choice(_CODE_TASKS)}."
    for extra in rng.sample(_CODE_EXTRAS, rng.randint(0, 2)):
        text += " " + extra
    return text


def _chat_prompt(rng: random.Random) -> str:
    text = f"{rng.choice(_CHAT_OPENERS)} {rng.choice(_CHAT_TOPICS)}?"
    for extra in rng.sample(_CHAT_EXTRAS, rng.randint(0, 2)):
        text += " " + extra
    return text


_FLAVOURS = (_arithmetic_prompt, _code_prompt, _chat_prompt)
FLAVOUR_NAMES = ("arithmetic", "code", "chat")


def make_prompts(flavour: int, n: int, seed: int = 0) -> list[str]:
    """`n` deterministic prompts of task flavour `flavour` (taken modulo the flavour count)."""
    rng = random.Random(f"tiny-prompts-{flavour}-{seed}")
    gen = _FLAVOURS[flavour % len(_FLAVOURS)]
    return [gen(rng) for _ in range(n)]


# --------------------------------------------------------------------------- tokenizer

_TOKENIZER_CACHE: dict[int, Any] = {}


def _tokenizer_corpus() -> list[str]:
    # Fixed corpus (independent of the family's seed) so one tokenizer serves every
    # family in a process and all families share a vocabulary.
    corpus: list[str] = []
    for flavour in range(len(_FLAVOURS)):
        corpus.extend(make_prompts(flavour, 200, seed=12345))
    return corpus


def build_tokenizer():
    """A byte-level BPE `PreTrainedTokenizerFast` (vocab 768) that prepends BOS.

    Byte-level, so any text encodes without `<unk>`. Cached per process.
    """
    if "tok" in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE["tok"]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast  # alias of TokenizersBackend in transformers 5

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID, PAD_ID]
    # BOS lives in the tokenizer.json post-processor, so it survives save/reload.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    _TOKENIZER_CACHE["tok"] = hf
    return hf


# --------------------------------------------------------------------------- models


def _make_config(
    arch: str,
    vocab_size: int,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    tie_embeddings: bool | None,
):
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, GraniteConfig,
                              LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

    if tie_embeddings is None:
        # Gemma checkpoints have no LM head of their own (mergekit's gemma layout has none).
        tie_embeddings = arch in ("qwen3", "gemma", "gemma2", "gemma3")
    head_dim = hidden_size // num_heads
    layer_types = [_ALTERNATING[i % 2] for i in range(num_layers)]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        architectures=[_ARCH_CLASS[arch]],
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "mistral":
        cfg = MistralConfig(sliding_window=SLIDING_WINDOW, **common)
    elif arch == "qwen2":
        # Qwen2 derives layer_types from these: layers with index >= max_window_layers
        # slide, so with max_window_layers=1 every layer after the first is sliding.
        cfg = Qwen2Config(
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=1,
            **common,
        )
    elif arch == "qwen3":
        # Qwen3Config defaults head_dim to 128 instead of hidden/heads.
        cfg = Qwen3Config(head_dim=head_dim, **common)
    elif arch == "gemma":
        # Gemma configs default head_dim to 256 instead of hidden/heads.
        cfg = GemmaConfig(head_dim=head_dim, **common)
    elif arch == "gemma2":
        # Soft-capping thresholds low enough that the tiny model's logits reach them.
        cfg = Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim,
                           sliding_window=SLIDING_WINDOW, layer_types=layer_types,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **common)
    elif arch == "gemma3":
        # Sliding layers take their own rotary base, as in real Gemma3 checkpoints.
        cfg = Gemma3TextConfig(
            head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=SLIDING_WINDOW,
            layer_types=layer_types, final_logit_softcapping=3.0,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            **common)
    elif arch == "granite":
        # Multipliers away from 1, as in Granite 3 checkpoints, so that ignoring any shows.
        cfg = GraniteConfig(embedding_multiplier=12.0, residual_multiplier=0.22,
                            attention_multiplier=1 / head_dim, logits_scaling=8.0, **common)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    return cfg


@torch.no_grad()
def _perturb_base(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Norm weights init to exactly 1 and biases to 0; move them off those values so a
    # merge that ignores or mishandles norms/biases gives a visibly different result.
    for module in model.modules():
        is_norm = "RMSNorm" in type(module).__name__
        for pname, p in module.named_parameters(recurse=False):
            if pname == "bias":
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif is_norm:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def _expert_state(
    base: dict[str, torch.Tensor], seed: int, scale: float
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        std = float(t.std()) if t.numel() > 1 else 0.0
        std = std if std > 0 else max(abs(float(t.abs().mean())), 1e-3)
        out[name] = t + scale * std * torch.randn(t.shape, generator=gen)
    return out


# --------------------------------------------------------------------------- family

_BASELESS_METHODS = frozenset({"linear"})


@dataclass
class TinyFamily:
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
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_embeddings: bool | None = None,
    prompts_per_expert: int = 32,
    seed: int = 0,
    max_shard_size: int | str = "100KB",
    expert_scale: float = 0.05,
    extra_tokens: Sequence[Sequence[str]] = (),
) -> TinyFamily:
    """Build a base model, `n_experts` perturbed experts and calibration files under `root`.

    Layout: root/base, root/expert_{i}, root/calibration/expert_{i}.jsonl.
    Existing model directories are replaced.

    `extra_tokens[i]` (optional) are tokens added to expert i's tokenizer, with as many
    new embedding (and LM head) rows, the way a fine-tune that adds a `[PAD]` token
    grows its vocabulary.
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    if n_experts < 1:
        raise ValueError("n_experts must be >= 1")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    config = _make_config(
        arch,
        len(tokenizer),
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        tie_embeddings=tie_embeddings,
    )

    # Fork the RNG so building a family does not disturb the caller's torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # transformers' default attention: sdpa, or eager where a family has no sdpa (Gemma2).
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    _perturb_base(model, torch.Generator().manual_seed(seed + 1))

    base_dir = root / "base"
    _save(model, tokenizer, base_dir, max_shard_size)

    # named_parameters() skips tied duplicates, so lm_head follows embed_tokens when tied.
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    experts = []
    for i in range(n_experts):
        state = _expert_state(base_state, seed=seed * 1000 + 17 * (i + 1), scale=expert_scale)
        with torch.no_grad():
            for name, t in state.items():
                params[name].copy_(t)
        d = root / f"expert_{i}"
        added = tuple(extra_tokens[i]) if i < len(extra_tokens) else ()
        if added:
            _save(*_with_added_tokens(model, tokenizer, added, seed * 1000 + 31 * (i + 1)),
                  d, max_shard_size)
        else:
            _save(model, tokenizer, d, max_shard_size)
        experts.append(d)

    calib_dir = root / "calibration"
    calib_dir.mkdir(exist_ok=True)
    calibration = []
    for i in range(n_experts):
        path = calib_dir / f"expert_{i}.jsonl"
        prompts = make_prompts(i, prompts_per_expert, seed=seed)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for p in prompts:
                f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
        calibration.append(path)

    return TinyFamily(
        root=root,
        base=base_dir,
        experts=experts,
        calibration=calibration,
        arch=arch,
        flavours=[FLAVOUR_NAMES[i % len(FLAVOUR_NAMES)] for i in range(n_experts)],
    )


@torch.no_grad()
def _with_added_tokens(model, tokenizer, tokens: Sequence[str], seed: int):
    """Copies of `model` and `tokenizer` with `tokens` appended; the new rows are random."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    model = copy.deepcopy(model)
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                if m is not None}
    for weight in matrices.values():
        new = weight[old_rows:]
        new.copy_(float(weight[:old_rows].std()) * torch.randn(new.shape, generator=gen))
    return model, tokenizer


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
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)


# --------------------------------------------------------------------------- CLI

EXAMPLE_PARAMETERS = dict(epochs=5, lr=0.05, shots=16, batch_size=8, max_length=64, init=0.5)


def main(argv: list[str] | None = None) -> TinyFamily:
    ap = argparse.ArgumentParser(
        prog="python -m mergekit_prodistill.tiny",
        description="Build a tiny offline base + experts model family and a ProDistill recipe.",
    )
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=32, help="calibration prompts per expert")
    args = ap.parse_args(argv)

    fam = build_tiny_family(
        args.out_dir, arch=args.arch, n_experts=args.experts, seed=args.seed, prompts_per_expert=args.prompts
    )
    recipe_path = fam.root / "recipe.yml"
    recipe_path.write_text(fam.recipe("prodistill", **EXAMPLE_PARAMETERS), encoding="utf-8")
    print(f"base:   {fam.base}")
    for e, c in zip(fam.experts, fam.calibration):
        print(f"expert: {e}  calibration: {c}")
    print(f"recipe: {recipe_path}")
    return fam


if __name__ == "__main__":
    main()
