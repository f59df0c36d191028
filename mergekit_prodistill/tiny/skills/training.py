"""Pretrain the base model and fully fine-tune one expert per task from it.

Supervised next-token training on "<s>prompt answer</s>", with the loss on the answer and
the end-of-sequence token (and, for a base that reads prompts, on the prompt's tokens with
a smaller weight). Deterministic for a given seed; CPU only.
"""

import math
import random
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .tasks import EOS


def encode_examples(tokenizer, pairs: List[Tuple[str, Optional[str]]],
                    prompt_loss: float = 0.0):
    """Token ids and loss weights: 1 on answer and EOS targets, ``prompt_loss`` on the
    prompt's; an answer of None is a prompt read alone, without EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out = []
    for prompt, answer in pairs:
        p = tokenizer(prompt).input_ids
        a = [] if answer is None else tokenizer(answer, add_special_tokens=False).input_ids + [eos]
        out.append((p + a, [float(prompt_loss)] * len(p) + [1] * len(a)))
    return out


def collate(batch, pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    loss_mask = torch.zeros(len(batch), width)
    for row, (seq, lm) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        loss_mask[row, : len(seq)] = torch.tensor(lm, dtype=torch.float)
    return ids, mask, loss_mask


@dataclass(frozen=True)
class Schedule:
    """One training run's optimisation: ``steps`` is the length of the learning-rate
    schedule (linear warm-up, cosine decay from ``lr``); ``stop`` ends training early, at
    that step of the same schedule."""

    steps: int
    lr: float
    batch_size: int
    seed: int
    stop: Optional[int] = None

    def optimizer(self, model):
        """AdamW over ``model``'s parameters and the learning-rate schedule that drives it."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0,
                                      betas=(0.9, 0.98))
        steps, warmup = self.steps, max(1, self.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        )
        return optimizer, schedule


def answer_loss(model, ids, mask, loss_mask):
    """Mean cross entropy of the next-token predictions where ``loss_mask`` is 1."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target_mask = loss_mask[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return (loss * target_mask.reshape(-1)).sum() / target_mask.sum()


def train(model, tokenizer, pairs, schedule: Schedule, *, log=print, name: str = "",
          prompt_loss: float = 0.0) -> None:
    """AdamW with linear warm-up and cosine decay over ``schedule.steps``; cross entropy on
    the answers (and ``prompt_loss`` times it on the prompts); stops early at
    ``schedule.stop`` if set."""
    data = encode_examples(tokenizer, pairs, prompt_loss)
    rng = random.Random(schedule.seed)
    torch.manual_seed(schedule.seed)
    optimizer, lr_schedule = schedule.optimizer(model)
    steps, pad = schedule.steps, tokenizer.pad_token_id
    model.train()
    started, running = time.time(), None
    for step in range(steps if schedule.stop is None else min(schedule.stop, steps)):
        ids, mask, loss_mask = collate(rng.sample(data, schedule.batch_size), pad)
        loss = answer_loss(model, ids, mask, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        running = float(loss.detach()) if running is None else 0.95 * running + 0.05 * float(loss.detach())
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  {name} step {step + 1}/{steps}: loss {running:.4f} ({time.time() - started:.0f} s)")
    model.eval()
