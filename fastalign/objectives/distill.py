"""On-policy distillation's divergence between a student's and a teacher's next-token distributions: TRL 1.16's
generalized JSD (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``, ``DistillationTrainer``) on blocks of
tempered logits (``divergence_terms``), with the student-logit gradient in TRL's closed form (``divergence_block_``:
both, in place, as the fused op walks the blocks).

With ``p_s``, ``p_t`` the student's and the teacher's softmax of their tempered logits (per model: scale, then
softcap, then the temperature) and ``m = (1 - beta) p_s + beta p_t``, per token:

- ``beta = 0``: the forward ``KL(p_t || p_s)``; ``d / d z_s = p_s - p_t``;
- ``beta = 1``: the reverse ``KL(p_s || p_t)``; ``d / d z_s = p_s (log p_s - log p_t - KL)``;
- else ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``; ``d / d z_s = (1 - beta) p_s (log p_s - log m - KL(p_s || m))``.

The loss is the sum over the masked tokens divided by ``num_items_in_batch``, else by their count (0 when there is
none: TRL's ``clamp(min=1)``). ``hard_label_weight`` mixes in a cross-entropy on ``targets`` as Liger's distillation
base does, on the student's logits before the temperature: ``(1 - w) divergence + w CE`` (both reduced alike).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DistillConfig:
    """The options of the fused distillation loss, checked once."""

    beta: float = 1.0
    hard_label_weight: float = 0.0

    def __post_init__(self):
        for name, value in (("beta", self.beta), ("hard_label_weight", self.hard_label_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")


def _log_mixture(log_ps: Tensor, log_pt: Tensor, beta: float) -> Tensor:
    return torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))


def divergence_terms(log_ps: Tensor, log_pt: Tensor, beta: float) -> Tensor:
    """Per-row sums over a block ``[C, V']`` of columns (the whole vocabulary, or a shard's part of it) of the
    global ``log p_s`` and ``log p_t``: ``[3, C]`` = the divergence, ``aux`` (what the gradient needs:
    ``KL(p_s || m)`` for the JSD, the divergence for the KLs) and the student's entropy. All three sum over
    columns, so the shards of a vocabulary add theirs."""
    ps, pt = log_ps.exp(), log_pt.exp()
    entropy = -(ps * log_ps).sum(-1)
    if beta == 0.0:
        divergence = (pt * (log_pt - log_ps)).sum(-1)
        return torch.stack([divergence, divergence, entropy])
    if beta == 1.0:
        divergence = (ps * (log_ps - log_pt)).sum(-1)
        return torch.stack([divergence, divergence, entropy])
    log_m = _log_mixture(log_ps, log_pt, beta)
    kl_student = ps * (log_ps - log_m)
    divergence = (beta * pt * (log_pt - log_m) + (1 - beta) * kl_student).sum(-1)
    return torch.stack([divergence, kl_student.sum(-1), entropy])


def divergence_block_(log_ps: Tensor, log_pt: Tensor, work: Tensor,
                      beta: float) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """The fused op's form of ``divergence_terms`` and of the gradient: on a block ``[C, V']`` of the global
    ``log p_s``, ``log p_t`` (as ``divergence_terms``) and ``work [3, C, V']`` whose ``work[0]``, ``work[1]`` hold
    ``p_s``, ``p_t``, in place, allocating no ``[C, V']``: ``log_pt`` and ``work`` are overwritten, ``log_ps`` kept.
    Returns the block's terms ``[3, C]`` (as ``divergence_terms``) and ``grads(terms, scale)``: from the rows'
    whole-vocabulary terms (the block's, or summed over the shards), ``scale [C]`` times ``d divergence / d z_s``
    ``[C, V']`` of each row (the tempered student logits ``z_s``), in ``log_pt``'s storage; call it once, before
    ``work`` is reused.

    The JSD's ``log m`` is ``log((1 - beta) p_s + beta p_t)`` (TRL: a logsumexp of the two weighted log-probs; the
    same within rounding), floored at the dtype's smallest normal number: where both probabilities underflow, every
    term they enter is a product with 0."""
    ps, pt = work[0], work[1]
    entropy = -torch.linalg.vecdot(ps, log_ps)
    if beta == 0.0:  # KL(p_t || p_s); d / d z_s = p_s - p_t
        divergence = torch.linalg.vecdot(pt, log_pt.sub_(log_ps))
        return torch.stack([divergence, divergence, entropy]), \
            lambda terms, scale: torch.sub(ps, pt, out=log_pt).mul_(scale[:, None])
    if beta == 1.0:  # KL(p_s || p_t); d / d z_s = p_s (log p_s - log p_t - KL)
        diff = torch.sub(log_ps, log_pt, out=log_pt)
        divergence = torch.linalg.vecdot(ps, diff)
        return torch.stack([divergence, divergence, entropy]), \
            lambda terms, scale: diff.sub_(terms[1][:, None]).mul_(ps).mul_(scale[:, None])
    log_m = torch.lerp(ps, pt, beta, out=work[2]).clamp_min_(torch.finfo(ps.dtype).tiny).log_()
    kl_teacher = torch.linalg.vecdot(pt, log_pt.sub_(log_m))
    diff = torch.sub(log_ps, log_m, out=log_pt)  # log p_s - log m
    kl_student = torch.linalg.vecdot(ps, diff)
    divergence = beta * kl_teacher + (1 - beta) * kl_student

    def grads(terms: Tensor, scale: Tensor) -> Tensor:  # (1 - beta) p_s (log p_s - log m - KL(p_s || m))
        return diff.sub_(terms[1][:, None]).mul_(ps).mul_((1 - beta) * scale[:, None])

    return torch.stack([divergence, kl_student, entropy]), grads
