"""The benchmark's tasks, their data splits, and the character-level tokenizer.

Every task reads the same kind of input, a short string of letters, and writes an answer
that can be checked exactly. The tasks differ only in their name at the start of the
prompt, so experts trained on them must write different letters at the same answer
positions from the same inputs: their fine-tuning pulls the shared weights apart.

    rev:hcafk=    -> kfach
    sort:hcafk=   -> acfhk
    rot:hcafk=    -> kfdin    (each letter moved three places along the alphabet)

The base model is pretrained on neighbouring skills under other names, as a real base
model knows much but not the experts' exact tasks: copying, reversing while moving each
letter one place on, sorting in descending order, and moving letters one place on.

    copy:hcafk=   -> hcafk
    back:hcafk=   -> lgbdi
    dsc:hcafk=    -> khfca
    inc:hcafk=    -> idbgl

Splits are disjoint by construction: every input string is drawn once from one seeded
stream and dealt to exactly one of training, calibration and test.
"""

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

ALPHABET = "abcdefghijklmnop"
MIN_LEN, MAX_LEN = 4, 8
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Every character any prompt or answer can hold.
CHARACTERS = sorted(set(ALPHABET + ":="))


def _rot(s: str, k: int) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + k) % len(ALPHABET)] for c in s)


@dataclass(frozen=True)
class Task:
    name: str
    solve: Callable[[str], str]

    def prompt(self, letters: str) -> str:
        return f"{self.name}:{letters}="


PRETRAIN = [
    Task("copy", lambda s: s),
    Task("back", lambda s: _rot(s[::-1], 1)),
    Task("dsc", lambda s: "".join(sorted(s, reverse=True))),
    Task("inc", lambda s: _rot(s, 1)),
]
TASKS = [
    Task("rev", lambda s: s[::-1]),
    Task("sort", lambda s: "".join(sorted(s))),
    Task("rot", lambda s: _rot(s, 3)),
]
# Task names are single tokens, so that no task's name shares a token with the letters.
NAMES = [t.name for t in PRETRAIN + TASKS]


@dataclass
class Splits:
    train: List[str]
    calibration: List[str]
    test: List[str]


def random_letters(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_splits(n_train: int, n_calibration: int, n_test: int, seed: int) -> Dict[str, Splits]:
    """Disjoint input strings per task (and, under 'pretrain', for the base model)."""
    rng = random.Random(seed)
    seen = set()

    def draw(n: int) -> List[str]:
        out = []
        while len(out) < n:
            s = random_letters(rng)
            if s not in seen:
                seen.add(s)
                out.append(s)
        return out

    splits = {"pretrain": Splits(draw(n_train), [], [])}
    for task in TASKS:
        # Drawn in this order so that adding test items never changes the training data.
        splits[task.name] = Splits(draw(n_train), draw(n_calibration), draw(n_test))
    return splits


def examples(task: Task, inputs: List[str]) -> List[Tuple[str, str]]:
    """(prompt, answer) pairs."""
    return [(task.prompt(s), task.solve(s)) for s in inputs]


def pretraining_examples(inputs: List[str]) -> List[Tuple[str, str]]:
    """The base model's generic data: each input under one of the pretraining tasks."""
    return [(t.prompt(s), t.solve(s)) for i, s in enumerate(inputs)
            for t in [PRETRAIN[i % len(PRETRAIN)]]]


def build_tokenizer():
    """A character-level Hugging Face fast tokenizer that prepends BOS to every prompt."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + NAMES + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # A task name is one token; everything else is one token per character.
    pattern = "|".join(NAMES) + "|."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=64,
    )
