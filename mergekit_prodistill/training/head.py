"""Train the final norm's and the LM head's merging coefficients after the last block.

The paper's recipe merges the final norm and the LM head by task arithmetic. Yet the LM
head is where experts that read the same hidden state must write different tokens, and
its task vectors are among the largest. Here its coefficients (and the final norm's) are
trained like a block's: element-wise by default, starting from ``init``, with Adam, so that
on each expert's calibration sequences the merged model's next-token distribution,
read from the merged stream, matches the expert's own, read from the expert's stream
(KL divergence per real token, averaged over experts). No labels are needed.

With tied embeddings there is no LM head tensor: the head is the merged input embedding,
which the merged stream already started from, so only the final norm is trained.
"""

import logging
from typing import Dict, Tuple

import torch
from torch.func import functional_call

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.models.blocks import decoder_of
from mergekit_prodistill.models.families import family_of, meta_model
from mergekit_prodistill.training.activations import on_device
from mergekit_prodistill.training.coefficients import (EpochLosses, MergedPart, fit, gathered_stats,
                                                       init_coefficients, masked_kl,
                                                       mean_over_experts, written_weights)

LOG = logging.getLogger("mergekit_prodistill")


def find_norm_and_head(pre_weights, post_weights, is_present):
    """(final norm, LM head, whether the head is its own tensor) as WeightInfos.

    The head is the vocabulary-indexed matrix among the last weights; when no checkpoint
    holds it (``is_present``), it is tied to the input embedding, which is returned
    instead and is not trained.
    """
    norm = head = None
    for weight in post_weights:
        if weight.vocabulary_axis is not None and weight.name.endswith(".weight"):
            head = weight if is_present(weight) else None
        elif weight.name.endswith("norm.weight"):
            norm = weight
    if norm is None:
        raise ProDistillError("no final norm found among the model's last weights; "
                              "set head_epochs: 0")
    if head is not None:
        return norm, head, True
    embedding = next((w for w in pre_weights if w.vocabulary_axis == 0), None)
    if embedding is None:
        raise ProDistillError("no LM head or input embedding found; set head_epochs: 0")
    return norm, embedding, False


def final_norm(config) -> torch.nn.Module:
    """The architecture's own final norm module, without weights (on ``meta``)."""
    skeleton = meta_model(config)
    norm = getattr(decoder_of(skeleton), "norm", None)
    if norm is None:
        raise ProDistillError(
            f"architecture {type(skeleton).__name__}: no final norm found; set head_epochs: 0"
        )
    return norm.eval()


class HeadForward:
    """The family's own path from the last block's output to next-token log-probabilities:
    its final norm module (Gemma's is 1 + weight), the LM head, then the logit scaling
    (Granite) or soft-capping (Gemma2, Gemma3) its forward applies."""

    def __init__(self, config):
        # A multimodal model's own forward decides what follows the head (Gemma 3's does
        # not soft-cap where its causal LM does); the values are its language model's.
        self.family = family_of(config)
        self.config = config.get_text_config()
        self.norm = final_norm(self.config)

    def __call__(self, norm_w, head_w, hidden):
        normed = functional_call(self.norm, {"weight": norm_w}, (hidden,))
        logits = self.family.finish_logits(self.config, torch.nn.functional.linear(normed, head_w))
        return torch.log_softmax(logits.float(), dim=-1)


def load_norm_and_head(norm_weight, head_weight, base, experts, align, precision):
    """The final norm (``"weight"``) and LM head (``"head"``) of the base, and every
    expert's task vectors of them (formed as ``precision`` says), with vocabulary rows in
    the output's order (``align``, as the embeddings are merged), so that every
    distribution ranges over the same tokens.
    """
    # load_all closes each shard once read, so the experts' memory-mapped pages go with
    # their tensors once the task vectors are taken.
    weights = (norm_weight, head_weight)
    base_t, expert_t = base.load_all(weights), [e.load_all(weights) for e in experts]
    base_w, expert_w = {}, [{} for _ in experts]
    for own, weight in zip(("weight", "head"), weights):
        base_w[own], aligned = align(weight, base_t[weight.name],
                                     [t[weight.name] for t in expert_t])
        for w, t in zip(expert_w, aligned):
            w[own] = t
    return base_w, [{n: precision.task_vector(w[n], base_w[n]) for n in base_w}
                    for w in expert_w]


def train_head(part: MergedPart, streams, config, p, generator: torch.Generator,
               device: torch.device, precision) -> Tuple[Dict, Dict]:
    """The final norm and LM head as written (``"weight"``, ``"head"``; the output
    dtype), with trained coefficients, and a report.

    ``streams`` holds the last block's outputs: the merged model's and every owned
    expert's own; ``part`` the base's norm and head and the owned experts' task vectors.
    With a tied head (``"head"`` frozen in ``part``) the head keeps task arithmetic.
    """
    log_probs = HeadForward(config)
    base_w, deltas, world = part.base_w, part.deltas, part.world
    contexts = streams.contexts

    def teacher(i, b):
        with torch.no_grad():
            w = {n: (base_w[n] + deltas[i][n]).to(part.dtype) for n in base_w}
            return log_probs(w["weight"], w["head"], on_device(streams.expert[i][b], device))

    def kl_of(w, i, b):
        student = log_probs(w["weight"], w["head"], on_device(streams.merged[i][b], device))
        return masked_kl(student, teacher(i, b), contexts[i][b].token_mask)

    def loss_of(w, i, b):  # a batch split over processes: each its rows' share
        return kl_of(w, i, b) * contexts[i][b].share

    def mean_loss(coeffs) -> float:
        """The loss over every batch, averaged over experts, with the weights as written."""
        w = {n: t.to(part.dtype) for n, t in
             written_weights(base_w, deltas, coeffs, precision, world).items()}
        per_expert = []
        with torch.no_grad():
            for i, batches in enumerate(contexts):
                tokens = [int(context.token_mask.sum()) for context in batches]
                per_expert.append([sum(float(kl_of(w, i, b)) * n for b, n in enumerate(tokens)),
                                   sum(tokens)])
        return mean_over_experts(per_expert, world)

    start = init_coefficients(base_w, len(deltas), p, part.frozen)
    loss_before, losses = mean_loss(start), EpochLosses()
    coeffs, small_share = fit(part, p, p.head_epochs, streams.batch_counts, loss_of,
                              generator, losses)
    report = {"loss_before": loss_before, "epoch_losses": losses.losses,
              "loss_after": mean_loss(coeffs), "small_gradient_share": small_share}
    trained = [n for n in base_w if n not in part.frozen]
    report.update(gathered_stats([{n: c[n] for n in trained} for c in coeffs], world))
    LOG.info("%s: KL %.4g -> %.4g", part.name, report["loss_before"], report["loss_after"])
    return written_weights(base_w, deltas, coeffs, precision, world), report
