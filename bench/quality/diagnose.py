"""Where a merged model departs from the experts: per position, per block, per coefficient.

Teacher-forced on test prompts followed by their correct answers, so every model reads
the same tokens. For each task, compares the merged model with that task's expert:

* the relative squared error of the last hidden state (before the final norm), separately
  at prompt positions and at answer positions;
* how often the merged model's next-token choice agrees with the expert's at answer
  positions (the tokens exact match depends on).
"""

from typing import Dict, List, Tuple

import torch

from mergekit_prodistill.tiny.skills.training import collate, encode_examples


@torch.no_grad()
def _hidden_and_logits(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


@torch.no_grad()
def position_errors(merged, experts: Dict[str, torch.nn.Module], tokenizer,
                    tests: Dict[str, List[Tuple[str, str]]], limit: int = 100) -> Dict[str, Dict]:
    """Per task: hidden-state error at prompt and answer positions, and answer agreement."""
    result = {}
    for task, pairs in tests.items():
        batch = encode_examples(tokenizer, pairs[:limit])
        ids, mask, answer = collate(batch, tokenizer.pad_token_id)
        # Positions that predict an answer token: the one before each answer token.
        predicts = torch.zeros_like(answer)
        predicts[:, :-1] = answer[:, 1:]
        prompt = mask.float() - predicts
        h_m, l_m = _hidden_and_logits(merged, ids, mask)
        h_e, l_e = _hidden_and_logits(experts[task], ids, mask)
        err = (h_m - h_e).pow(2).sum(-1) / h_e.pow(2).sum(-1).clamp_min(1e-12)
        agree = (l_m.argmax(-1) == l_e.argmax(-1)).float()
        result[task] = {
            "hidden_error_prompt": float((err * prompt).sum() / prompt.sum()),
            "hidden_error_answer": float((err * predicts).sum() / predicts.sum()),
            "answer_token_agreement": float((agree * predicts).sum() / predicts.sum()),
        }
    return result


SCALES = (0.5, 0.7, 0.9, 1.0)
INTERFERENCE = 0.3


@torch.no_grad()
def task_vector_scaling(base_path, expert_paths: Dict[str, str], tokenizer, tests,
                        score) -> Dict[str, Dict[str, float]]:
    """Why data-free merges fail here: each task's accuracy for theta_0 + s * tau_task
    alone, and for theta_0 + tau_task + 0.3 * (every other task vector)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_path).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    taus = {}
    for task, path in expert_paths.items():
        expert = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
        taus[task] = {k: expert[k] - base[k] for k in base}

    def accuracy(task, coeffs):
        model.load_state_dict({k: base[k] + sum(c * taus[t][k] for t, c in coeffs.items())
                               for k in base})
        return score(model, tokenizer, tests[task])

    result = {}
    for task in taus:
        row = {f"alone x{s}": accuracy(task, {task: s}) for s in SCALES}
        others = {t: INTERFERENCE for t in taus if t != task}
        row[f"x1 + others x{INTERFERENCE}"] = accuracy(task, {task: 1.0, **others})
        result[task] = row
    return result


@torch.no_grad()
def task_vector_sizes(base_path, expert_paths: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    """How far each expert moved from the base: the standard deviation of its task vector
    over all weights relative to that of the base's weights, and the largest such ratio
    of any one weight matrix (norm weights, whose spread is tiny, are left out there)."""
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    flat_base = torch.cat([v.flatten() for v in base.values()])
    result = {}
    for task, path in expert_paths.items():
        expert = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
        tau = {k: expert[k] - base[k] for k in base}
        result[task] = {
            "relative_std": float(torch.cat([v.flatten() for v in tau.values()]).std()
                                  / flat_base.std()),
            "largest_tensor_relative_std": max(float(tau[k].std() / base[k].std())
                                               for k in base if base[k].dim() == 2),
        }
    return result
