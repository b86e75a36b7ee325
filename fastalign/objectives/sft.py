"""Supervised fine-tuning's cross-entropy on per-token values: ``torch.nn.functional.cross_entropy`` (reductions,
label smoothing), TRL 1.16's ``SFTTrainer`` ``loss_type="dft"`` and a PaLM z-loss, from each token's log-prob, the
log-sum-exp of its (tempered) logits and their sum; the fused op gets the three without the ``[N, V]`` logits.

Per token, with ``lp = log p_y``, ``lse = logsumexp_v z_v`` and ``S = sum_v z_v`` over the vocabulary of size V:

- ``nll``: ``-lp``; ``dft`` (Dynamic Fine-Tuning, arXiv:2508.05629, as TRL's SFTTrainer): ``-sg(exp(lp)) lp``;
- label smoothing ``eps`` (``F.cross_entropy``'s): ``(1 - eps) nll + eps (lse - S / V)``, the second term being
  ``-mean_v log p_v``;
- z-loss (PaLM, Chowdhery et al. 2022): ``+ z_loss lse^2``.

Reductions (ignored tokens never count): ``"none"`` per token; ``"sum"``; ``"mean"`` over the tokens whose target
is not ignored (0 when there is none: TRL's ``clamp(min=1)`` of its token count, where ``F.cross_entropy`` gives
NaN), or the sum over ``num_items_in_batch`` when given (transformers' ``ForCausalLMLoss`` convention, which TRL's
SFT loss follows: the tokens of the whole accumulated batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CE_LOSS_TYPES = ("nll", "dft")
CE_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CrossEntropyConfig:
    """The options of the fused cross-entropy, checked once."""

    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    loss_type: str = "nll"

    def __post_init__(self):
        if self.reduction not in CE_REDUCTIONS:
            raise ValueError(f"reduction: expected one of {CE_REDUCTIONS}, got {self.reduction!r}")
        if self.loss_type not in CE_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {CE_LOSS_TYPES}, got {self.loss_type!r}")
        for name, value, high in (("label_smoothing", self.label_smoothing, 1.0), ("z_loss", self.z_loss, None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (high is not None and value > high):
                bound = "in [0, 1]" if high is not None else ">= 0"
                raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
        if self.loss_type == "dft" and self.label_smoothing:
            raise ValueError(f"label_smoothing: not used with loss_type='dft' (TRL's SFTTrainer smooths the nll loss "
                             f"only), got {self.label_smoothing!r}")

    @property
    def needs_logit_sum(self) -> bool:
        return self.label_smoothing > 0


def token_cross_entropy(logprobs: Tensor, lse: Tensor, logit_sum: Tensor | None, vocab_size: int,
                        config: CrossEntropyConfig) -> Tensor:
    """Per-token loss ``[...]`` from the log-probs of the targets, the lse and (with label smoothing) the sum of
    the logits ``[...]``; differentiable in all three. Values at ignored positions are the caller's to mask."""
    nll = -logprobs
    if config.loss_type == "dft":
        nll = nll * logprobs.detach().exp()
    loss = nll
    if config.label_smoothing:
        eps = config.label_smoothing
        loss = (1 - eps) * nll + eps * (lse - logit_sum / vocab_size)
    if config.z_loss:
        loss = loss + config.z_loss * lse.square()
    return loss


def reduce_cross_entropy(per_token: Tensor, mask: Tensor, config: CrossEntropyConfig,
                         num_items_in_batch: Tensor | float | None = None) -> Tensor:
    """``per_token [...]`` reduced over the float ``mask [...]`` (1 where the target counts): see the module."""
    if config.reduction == "none":
        return per_token * mask
    if config.reduction == "sum" and num_items_in_batch is None:
        return (per_token * mask).sum()
    return mean_over_tokens(per_token, mask, num_items_in_batch)


def mean_over_tokens(values: Tensor, mask: Tensor, num_items_in_batch: Tensor | float | None = None) -> Tensor:
    """TRL's token mean of ``values`` over the float ``mask``: the sum over ``num_items_in_batch``, else over the
    masked tokens' count (0 when there is none: TRL's ``clamp(min=1)``)."""
    total = (values * mask).sum()
    return total / num_items_in_batch if num_items_in_batch is not None else total / mask.sum().clamp(min=1)


def cross_entropy_metrics(entropy: Tensor, correct: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """TRL's SFT metrics: the mean entropy and the share of tokens whose arg-max logit is the target, over the
    counted tokens (0 when there is none)."""
    count = mask.sum().clamp(min=1)
    return {"entropy": (entropy * mask).sum() / count, "mean_token_accuracy": (correct * mask).sum() / count}
