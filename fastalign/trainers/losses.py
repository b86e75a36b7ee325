"""The trainers' losses on ``loss_backend="fused"`` (fastalign's ops, no logits) or ``"reference"`` (materialized
``[B, T, V]`` logits, the same formulas from ``fastalign.objectives``): the switch lives here and nowhere else."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import fused_linear_dpo_loss, fused_linear_logprobs, fused_linear_ppo_loss
from ..objectives.aggregation import aggregation_weights
from ..objectives.dpo import DPOOptions, dpo_loss as dpo_objective, dpo_metrics, rpo_nll
from ..objectives.ppo import (PPOLossConfig, PPOTokens, ValueHeadInputs, policy_loss_value, ppo_metrics,
                              value_loss_terms)
from .data import IGNORE_INDEX


def materialized_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False):
    """``[B, T]`` fp32 log-probs (and entropy) the plain way: ``[B, T, V]`` logits, then a log-softmax."""
    logp = torch.log_softmax(F.linear(hidden, weight, bias).float() / temperature, dim=-1)
    valid = targets != IGNORE_INDEX
    logprobs = logp.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
    if not return_entropy:
        return logprobs
    return logprobs, -(logp.exp() * logp).sum(-1).masked_fill(~valid, 0.0)


def token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, backend: str, *,
                   temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs ``[B, T]`` (0 where ``targets`` is -100), and entropy with ``return_entropy``."""
    if backend == "fused":
        return fused_linear_logprobs(hidden, weight, targets, bias, temperature=temperature,
                                     return_entropy=return_entropy, check_finite=False)
    return materialized_logprobs(hidden, weight, bias, targets, temperature=temperature,
                                 return_entropy=return_entropy)


def sequence_logps(logprobs: Tensor, targets: Tensor, average: bool) -> Tensor:
    """``[N]`` sums (``average``: means) of the token log-probs ``[N, T]`` over the response (``targets != -100``)."""
    sums = logprobs.sum(-1)
    return sums / (targets != IGNORE_INDEX).sum(-1).clamp(min=1) if average else sums


def dpo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ref_chosen: Tensor | None,
             ref_rejected: Tensor | None, options: DPOOptions, backend: str, *, average_log_prob: bool = False,
             num_pairs: int | Tensor | None = None,
             num_chosen_tokens: int | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss and TRL metrics of ``B`` pairs: ``hidden [2B, T, H]``, ``targets [2B, T]`` (chosen rows first),
    reference log-probs ``[B]`` (None with ``reference_free``). ``average_log_prob``: per-token means (IPO).
    ``num_pairs``, ``num_chosen_tokens``: divisors of the pair losses' sum and of the RPO NLL (default: this
    batch's pairs and chosen tokens, the means)."""
    if backend == "fused":
        out = fused_linear_dpo_loss(hidden, weight, targets, bias=bias, ref_chosen_logps=ref_chosen,
                                    ref_rejected_logps=ref_rejected, beta=options.beta, loss_type=options.loss_type,
                                    label_smoothing=options.label_smoothing, average_log_prob=average_log_prob,
                                    rpo_alpha=options.rpo_alpha, reference_free=options.reference_free,
                                    num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens, check_finite=False)
        return out.loss, out.metrics
    logprobs = materialized_logprobs(hidden, weight, bias, targets)
    logps = sequence_logps(logprobs, targets, average_log_prob)
    pairs = logps.shape[0] // 2
    nll = None if options.rpo_alpha is None else rpo_nll(logprobs[:pairs].sum(-1),
                                                         (targets[:pairs] != IGNORE_INDEX).sum(-1),
                                                         num_tokens=num_chosen_tokens)
    result = dpo_objective(logps[:pairs], logps[pairs:], ref_chosen, ref_rejected, options, chosen_nll=nll,
                           num_pairs=num_pairs)
    return result.loss, dpo_metrics(result, logps[:pairs], logps[pairs:])


def ppo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, old_logprobs: Tensor,
             advantages: Tensor, value_head, old_values: Tensor, returns: Tensor, config: PPOLossConfig, backend: str,
             *, temperature: float, num_tokens: int | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO loss (policy + ``vf_coef`` x value, token sums over ``num_tokens``, default the number of
    response tokens: the means) and its TRL metrics on the response tokens: ``hidden [B, T, H]`` at the positions
    that predict ``targets [B, T]`` (-100 after EOS), per-token ``[B, T]`` inputs, the linear ``value_head`` on the
    same hidden rows."""
    if backend == "fused":
        out = fused_linear_ppo_loss(
            hidden, weight, targets, old_logprobs, advantages, bias=bias, cliprange=config.cliprange,
            value_head_weight=value_head.weight, value_head_bias=value_head.bias, old_values=old_values,
            returns=returns, cliprange_value=config.cliprange_value, vf_coef=config.vf_coef,
            temperature=temperature, num_tokens=num_tokens, check_finite=False)
        return out.loss, out.metrics
    logprobs = materialized_logprobs(hidden, weight, bias, targets, temperature=temperature).reshape(-1)
    mask = (targets != IGNORE_INDEX).reshape(-1)
    weights = aggregation_weights(mask, num_tokens=num_tokens)
    tokens = PPOTokens(old_logprobs.reshape(-1), advantages.reshape(-1), None, weights)
    head = ValueHeadInputs(value_head.weight, value_head.bias, old_values.reshape(-1, 1), returns.reshape(-1, 1))
    value = value_loss_terms(hidden.reshape(-1, hidden.shape[-1]), head, weights, mask, config.cliprange_value)
    loss = policy_loss_value(tokens, config, logprobs, None) + config.vf_coef * value.loss
    with torch.no_grad():
        metrics = ppo_metrics(tokens, config, mask, logprobs.detach(), None, value.metrics)
    metrics["loss/total"] = loss.detach()
    return loss, metrics
