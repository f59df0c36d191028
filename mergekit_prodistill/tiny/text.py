"""The tiny families' text: calibration prompts of three task flavours and the tokenizer.

`make_prompts` gives the same prompts for the same (flavour, n, seed) in every process;
`build_tokenizer` trains one byte-level BPE tokenizer on a fixed corpus of those prompts,
so every tiny family shares one vocabulary and any text encodes without `<unk>`.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["BOS_ID", "EOS_ID", "FLAVOUR_NAMES", "MAX_POSITIONS", "PAD_ID", "SPECIAL_TOKENS",
           "TOKENIZER_VOCAB_SIZE", "UNK_ID", "build_tokenizer", "make_prompts"]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
TOKENIZER_VOCAB_SIZE = 768
# The tokenizer's model_max_length and every family's max_position_embeddings.
MAX_POSITIONS = 256


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
