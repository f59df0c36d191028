"""Greedy decoding and exact match, batched by prompt length so no padding is needed."""

from collections import defaultdict
from typing import Dict, List, Tuple

import torch

from .tasks import EOS


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: List[str], max_new_tokens: int) -> List[str]:
    """Each prompt's greedy continuation up to the end-of-sequence token."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    by_length = defaultdict(list)
    encoded = [tokenizer(p).input_ids for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    answers = [None] * len(prompts)
    for indices in by_length.values():
        ids = torch.tensor([encoded[i] for i in indices])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        )[:, ids.shape[1]:]
        for i, row in zip(indices, out.tolist()):
            row = row[: row.index(eos)] if eos in row else row
            answers[i] = tokenizer.decode(row)
    return answers


def char_match(answer: str, gold: str) -> float:
    """Share of the gold answer's characters reproduced at their position."""
    return sum(a == g for a, g in zip(answer, gold)) / max(len(gold), len(answer), 1)


def score(model, tokenizer, pairs: List[Tuple[str, str]], max_new_tokens: int) -> Dict[str, float]:
    """Exact match (the benchmark's measure) and per-character accuracy (partial credit)."""
    answers = greedy_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    return {
        "exact": sum(a == gold for a, (_, gold) in zip(answers, pairs)) / len(pairs),
        "chars": sum(char_match(a, gold) for a, (_, gold) in zip(answers, pairs)) / len(pairs),
    }


def score_model(path, tokenizer, tests: Dict[str, List[Tuple[str, str]]]) -> Dict[str, Dict]:
    """Scores per task of the checkpoint at ``path``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    longest = max(len(tokenizer(gold, add_special_tokens=False).input_ids)
                  for pairs in tests.values() for _, gold in pairs)
    return {task: score(model, tokenizer, pairs, longest + 1) for task, pairs in tests.items()}
