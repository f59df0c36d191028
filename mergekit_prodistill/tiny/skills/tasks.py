"""The skill families' task suites, their data splits, and the character-level tokenizer.

A suite names the skills its base model is pretrained on and the tasks its experts are
fine-tuned on. Every task writes an answer that can be checked exactly. The string tasks
read the same kind of input and differ only in their name at the start of the prompt, so
experts trained on them must write different letters at the same answer positions: their
fine-tuning pulls the shared weights apart.

Suite ``novel``: the base knows none of the tasks. Its experts' tasks:

    rev:hcafk=    -> kfach
    sort:hcafk=   -> acfhk
    rot:hcafk=    -> kfdin    (each letter moved three places along the alphabet)

and the base is pretrained on neighbouring skills under other names, as a real base model
knows much but not the experts' exact tasks: copying, reversing while moving each letter
one place on, sorting in descending order, and moving letters one place on.

    copy:hcafk=   -> hcafk
    back:hcafk=   -> lgbdi
    dsc:hcafk=    -> khfca
    inc:hcafk=    -> idbgl

Suite ``competent``: the base is briefly pretrained on the experts' own four tasks, so it
is fair at each before any expert exists. The fourth task computes its answer; every
number is written least significant digit first (here 485 + 937 = 1422):

    add:584+739=  -> 2241

Suite ``hard``: four experts on a base with attention biases (Qwen2-style). The base is
briefly pretrained on two of the string tasks among neighbouring skills, so it is poor
but not hopeless at them and knows rot only by its neighbour ``inc``, and it reads
numbers (``max`` writes the larger of two) without ever adding them. Addition, new to it, takes its expert four times the fine-tuning of the
others, so its task vector is the largest, as a math expert's is among instruction and
code experts.

    max:584+739=  -> 937

Suite ``quick`` (the quick start's): ``competent``'s base, with experts for three of its
tasks: rev, rot and add.

Splits are disjoint by construction: every input string is drawn once from one seeded
stream and dealt to exactly one of training, calibration and test.
"""

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

ALPHABET = "abcdefghijklmnop"
DIGITS = "0123456789"
MIN_LEN, MAX_LEN = 4, 8
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def _rot(s: str, k: int) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + k) % len(ALPHABET)] for c in s)


def random_letters(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def random_sum(rng: random.Random) -> str:
    """Two 3-digit numbers to add, each written least significant digit first."""
    return f"{rng.randint(100, 999)}+{rng.randint(100, 999)}"[::-1]


def _add(s: str) -> str:
    # Every number least significant digit first, so each answer digit depends on the
    # input digits at its own place and the carry the digit before it left.
    a, b = s.split("+")
    return str(int(a[::-1]) + int(b[::-1]))[::-1]


@dataclass(frozen=True)
class Task:
    name: str
    solve: Callable[[str], str]
    draw: Callable[[random.Random], str] = random_letters  # one random input

    def prompt(self, inputs: str) -> str:
        return f"{self.name}:{inputs}="


REV = Task("rev", lambda s: s[::-1])
SORT = Task("sort", lambda s: "".join(sorted(s)))
ROT = Task("rot", lambda s: _rot(s, 3))
ADD = Task("add", _add, random_sum)


@dataclass(frozen=True)
class Suite:
    name: str
    pretrain: Tuple[Task, ...]  # the base model's skills
    tasks: Tuple[Task, ...]  # one expert each
    characters: str  # every character any prompt or answer can hold
    bos: bool = True  # prompts start with a BOS token

    @property
    def names(self) -> List[str]:
        """Task names, each one token, so that no name shares a token with the inputs."""
        return list(dict.fromkeys(t.name for t in self.pretrain + self.tasks))


def random_short_sum(rng: random.Random) -> str:
    """Like ``random_sum``, but only sums below 1000: no carry out of the hundreds."""
    while True:
        s = random_sum(rng)
        if len(_add(s)) == 3:
            return s


# The competent suite's base reads only sums below 1000, so it never writes a fourth
# digit: it is right on those, about a third of the test sums, and wrong on the rest.
SHORT_ADD = Task("add", _add, random_short_sum)
# Shares of the competent (and quick) base's pretraining data, set so that every task is
# fair, none mastered, at step 800 of the schedule: the string tasks are learned after
# some 600 steps, addition (of short sums) after some 700.
COMPETENT_PRETRAIN = (REV,) * 3 + (SORT,) * 3 + (ROT,) * 2 + (SHORT_ADD,) * 8

def _larger(s: str) -> str:
    a, b = s.split("+")
    return max(a, b, key=lambda n: int(n[::-1]))


MAX = Task("max", _larger, random_sum)
# The string tasks' neighbours under other names: copying, reversing while moving each
# letter one place on, sorting in descending order, moving letters one place on.
NEIGHBOURS = (
    Task("copy", lambda s: s),
    Task("back", lambda s: _rot(s[::-1], 1)),
    Task("dsc", lambda s: "".join(sorted(s, reverse=True))),
    Task("inc", lambda s: _rot(s, 1)),
)

SUITES = {
    "novel": Suite(
        "novel",
        pretrain=NEIGHBOURS,
        tasks=(REV, SORT, ROT),
        characters=ALPHABET + ":=",
    ),
    "competent": Suite(
        "competent",
        pretrain=COMPETENT_PRETRAIN,
        tasks=(REV, SORT, ROT, ADD),
        characters=ALPHABET + DIGITS + ":=+",
    ),
    "hard": Suite(
        "hard",
        pretrain=(*NEIGHBOURS, MAX) * 2 + (REV, SORT),
        tasks=(ADD, REV, SORT, ROT),
        characters=ALPHABET + DIGITS + ":=+",
        bos=False,
    ),
    "quick": Suite(
        "quick",
        # competent's base, to the step: drawn first, its data do not depend on the tasks.
        pretrain=COMPETENT_PRETRAIN,
        tasks=(REV, ROT, ADD),
        characters=ALPHABET + DIGITS + ":=+",
    ),
}


@dataclass
class Splits:
    train: List[str]
    calibration: List[str]
    test: List[str]


def make_splits(suite: Suite, n_train: int, n_calibration: int, n_test: int,
                seed: int) -> Dict[str, Splits]:
    """Disjoint inputs per task (and, under 'pretrain', for the base model)."""
    rng = random.Random(seed)
    seen = set()

    def draw(n: int, tasks: Tuple[Task, ...]) -> List[str]:
        # The i-th input is drawn for tasks[i % len(tasks)], which will read it.
        out = []
        while len(out) < n:
            s = tasks[len(out) % len(tasks)].draw(rng)
            if s not in seen:
                seen.add(s)
                out.append(s)
        return out

    splits = {"pretrain": Splits(draw(n_train, suite.pretrain), [], [])}
    for task in suite.tasks:
        # Drawn in this order so that adding test items never changes the training data.
        splits[task.name] = Splits(draw(n_train, (task,)), draw(n_calibration, (task,)),
                                   draw(n_test, (task,)))
    return splits


def examples(task: Task, inputs: List[str]) -> List[Tuple[str, str]]:
    """(prompt, answer) pairs."""
    return [(task.prompt(s), task.solve(s)) for s in inputs]


def pretraining_examples(suite: Suite, splits: Dict[str, Splits]) -> List[Tuple[str, str]]:
    """The base model's data: each pretraining input under the task it was drawn for."""
    tasks = suite.pretrain
    return [(tasks[i % len(tasks)].prompt(s), tasks[i % len(tasks)].solve(s))
            for i, s in enumerate(splits["pretrain"].train)]


def build_tokenizer(suite: Suite):
    """A character-level Hugging Face fast tokenizer; each task name is one token.

    The names are added tokens that match only as whole words, so that they never split
    an input (``sort:haddk=`` keeps ``add`` as letters) and so that the tokenizer class a
    family's ``AutoTokenizer`` substitutes (Qwen2's rebuilds the pre-tokenizer from its
    own rules) tokenizes exactly the same. A BOS token is prepended unless the suite's
    family has none (Qwen2's tokenizer adds none, and would drop it).
    """
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            processors)
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(suite.characters))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + characters)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_tokens([AddedToken(n, single_word=True, normalized=False) for n in suite.names])
    tok.decoder = decoders.Fuse()
    if suite.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=64,
    )
