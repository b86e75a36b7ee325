"""The trainers' losses on ``loss_backend="fused"`` (fastalign's ops, no logits) or ``"reference"`` (materialized
``[B, T, V]`` logits, the same formulas from ``fastalign.objectives``): the switch lives here and nowhere else.

Under mixed precision (``torch.autocast``, see ``TrainingConfig.bf16``) each loss takes the hidden states, lm_head
weight and bias in the autocast dtype, as autocast gives them to a linear layer, and runs with autocast off: the
fused ops accumulate in fp32 themselves, and the reference backend computes its logits in that dtype, as an
autocast lm_head does (see :func:`lm_head_precision`).

Padding-free batches (``padding_free=True``): ``hidden [1, N, H]`` and every per-token input ``[1, N]`` packed as
``hf.PackedSequences`` says (``packed``); the fused losses take the packing's ``cu_seqlens``, the reference backend
unpacks everything to the padded ``[B, T]`` layout first."""
from __future__ import annotations

import functools
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hf import LogitTransform, PackedSequences
from ..functional import (fused_linear_cross_entropy, fused_linear_distill_loss, fused_linear_dpo_loss,
                          fused_linear_grpo_loss, fused_linear_kto_loss, fused_linear_logprobs, fused_linear_ppo_loss,
                          fused_linear_rloo_loss)
from ..objectives.aggregation import aggregation_weights
from ..objectives.distill import divergence_terms
from ..objectives.dpo import DPOOptions, dpo_metrics, dpo_sequence_loss
from ..objectives.grpo import GRPOLossConfig, grpo_loss as grpo_objective, high_entropy_mask
from ..objectives.kto import KTOOptions, kto_loss as kto_objective, kto_metrics
from ..objectives.rloo import RLOOOptions, rloo_loss as rloo_objective
from ..objectives.sft import (CrossEntropyConfig, cross_entropy_metrics, mean_over_tokens, reduce_cross_entropy,
                              token_cross_entropy)
from ..objectives.ppo import (PPOLossConfig, PPOTokens, ValueHeadInputs, policy_loss_value, ppo_metrics,
                              value_loss_terms)
from .data import IGNORE_INDEX


def lm_head_precision(loss_fn):
    """Decorate ``loss_fn(hidden, weight, bias, ...)``: under autocast, call it with those three cast to the
    autocast dtype (the casts are differentiable: fp32 master weights get fp32 gradients) and autocast off;
    otherwise call it as is."""

    @functools.wraps(loss_fn)
    def run(hidden: Tensor, weight: Tensor, bias: Tensor | None, *args, **kwargs):
        device = hidden.device.type
        if not torch.is_autocast_enabled(device):
            return loss_fn(hidden, weight, bias, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return loss_fn(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), *args,
                           **kwargs)

    return run


def materialized_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                        transform: LogitTransform = LogitTransform()) -> Tensor:
    """``[B, T, V]`` fp32 logits the plain way, with the model's logit ``transform`` (scale, then soft-cap)."""
    logits = F.linear(hidden, weight, bias).float() * transform.logit_scale
    cap = transform.logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


def materialized_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False,
                          transform: LogitTransform = LogitTransform()):
    """``[B, T]`` fp32 log-probs (and entropy) the plain way: ``[B, T, V]`` logits, then a log-softmax."""
    logp = torch.log_softmax(materialized_logits(hidden, weight, bias, transform) / temperature, dim=-1)
    valid = targets != IGNORE_INDEX
    logprobs = logp.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
    if not return_entropy:
        return logprobs
    return logprobs, -(logp.exp() * logp).sum(-1).masked_fill(~valid, 0.0)


def unpacked(packed: PackedSequences | None, hidden: Tensor, targets: Tensor, *per_token: Tensor | None) -> tuple:
    """Packed ``hidden [1, N, H]``, ``targets`` and per-token values ``[1, N]`` in the padded ``[B, T]`` layout
    (-100 / 0 at padding); as they are without a packing."""
    if packed is None:
        return hidden, targets, *per_token
    return (packed.unpack(hidden, 0.0), packed.unpack(targets, IGNORE_INDEX),
            *(None if t is None else packed.unpack(t, 0.0) for t in per_token))


def layout_of(packed: PackedSequences | None) -> dict:
    """The fused ops' packed-layout argument (none for a padded batch)."""
    return {} if packed is None else {"cu_seqlens": packed.cu_seqlens}


@lm_head_precision
def token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, backend: str, *,
                   temperature: float = 1.0, return_entropy: bool = False, packed: PackedSequences | None = None,
                   deterministic: bool | None = None, transform: LogitTransform = LogitTransform()):
    """Per-token log-probs ``[B, T]`` (0 where ``targets`` is -100), and entropy with ``return_entropy``; of a
    ``packed`` batch in its padded layout (no sequence-level term: the fused op skips the padding's rows).
    ``deterministic``: the fused op's mode (the reference backend has none). ``transform``: the model's logit
    transform (``hf.logit_transform``), as every loss here takes it."""
    hidden, targets = unpacked(packed, hidden, targets)
    if backend == "fused":
        return fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                     return_entropy=return_entropy, check_finite=False, deterministic=deterministic,
                                     **transform._asdict())
    return materialized_logprobs(hidden, weight, bias, targets, temperature=temperature,
                                 return_entropy=return_entropy, transform=transform)


@lm_head_precision
def dpo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ref_logps: Tensor | None,
             options: DPOOptions, backend: str, *, num_pairs: int | Tensor | None = None,
             num_chosen_tokens: int | Tensor | None = None, packed: PackedSequences | None = None,
             transform: LogitTransform = LogitTransform()) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss and TRL metrics of ``B`` groups of K responses: ``hidden [K*B, T, H]``, ``targets [K*B, T]`` (best
    rows first), reference log-probs ``[K, B]`` (sums; None with ``reference_free``). Not the metrics over the
    vocabulary: they are token means, which the trainers' metric averaging (over micro-batches and ranks) would
    weigh wrongly.
    ``num_pairs``, ``num_chosen_tokens``: divisors of the pair losses' sum and of the chosen NLL (default: this
    batch's groups and chosen tokens, the means)."""
    if backend == "fused":
        out = fused_linear_dpo_loss(
            hidden, weight, targets, bias=bias, ref_logps=ref_logps, num_pairs=num_pairs,
            num_chosen_tokens=num_chosen_tokens, check_finite=False, **asdict(options), **layout_of(packed),
            **transform._asdict())
        return out.loss, out.metrics
    hidden, targets = unpacked(packed, hidden, targets)
    logp = torch.log_softmax(materialized_logits(hidden, weight, bias, transform), dim=-1)
    mask = targets != IGNORE_INDEX
    logprobs = logp.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    denoms = torch.logsumexp(2.0 * logp.detach(), dim=-1) if options.use_weighting else None  # log sum_v p_v^2
    result, logps = dpo_sequence_loss(logprobs, mask, ref_logps, options, num_pairs=num_pairs,
                                      num_chosen_tokens=num_chosen_tokens, token_log_denoms=denoms)
    return result.loss, dpo_metrics(result, logps)


@lm_head_precision
def ppo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, old_logprobs: Tensor,
             advantages: Tensor, value_head, old_values: Tensor, returns: Tensor, config: PPOLossConfig, backend: str,
             *, temperature: float, num_tokens: int | Tensor | None = None,
             packed: PackedSequences | None = None, deterministic: bool | None = None,
             transform: LogitTransform = LogitTransform()) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO loss (policy + ``vf_coef`` x value, token sums over ``num_tokens``, default the number of
    response tokens: the means) and its TRL metrics on the response tokens, the entropy included: ``hidden [B, T,
    H]`` at the positions that predict ``targets [B, T]`` (-100 after EOS), per-token ``[B, T]`` inputs, the linear
    ``value_head`` on the same hidden rows. The entropy is computed as the rollout's log-probs compute it: a fused
    op's log-probs are batch-invariant (``deterministic``) for one set of row statistics, not across sets."""
    if backend == "fused":
        out = fused_linear_ppo_loss(
            hidden, weight, targets, old_logprobs, advantages, bias=bias, value_head_weight=value_head.weight,
            value_head_bias=value_head.bias, old_values=old_values, returns=returns, temperature=temperature,
            num_tokens=num_tokens, compute_entropy=True, check_finite=False, deterministic=deterministic,
            **asdict(config), **layout_of(packed), **transform._asdict())
        return out.loss, out.metrics
    hidden, targets, old_logprobs, advantages, old_values, returns = unpacked(
        packed, hidden, targets, old_logprobs, advantages, old_values, returns)
    logprobs, entropy = (t.reshape(-1) for t in materialized_logprobs(
        hidden, weight, bias, targets, temperature=temperature, return_entropy=True, transform=transform))
    mask = (targets != IGNORE_INDEX).reshape(-1)
    weights = aggregation_weights(mask, num_tokens=num_tokens)
    tokens = PPOTokens(old_logprobs.reshape(-1), advantages.reshape(-1), None, weights)
    head = ValueHeadInputs(value_head.weight, value_head.bias, old_values.reshape(-1, 1), returns.reshape(-1, 1))
    value = value_loss_terms(hidden.reshape(-1, hidden.shape[-1]), head, weights, mask, config.cliprange_value)
    loss = policy_loss_value(tokens, config, logprobs, None) + config.vf_coef * value.loss
    with torch.no_grad():
        metrics = ppo_metrics(tokens, config, mask, logprobs.detach(), entropy, value.metrics)
    metrics["loss/total"] = loss.detach()
    return loss, metrics


@lm_head_precision
def grpo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, advantages: Tensor,
              config: GRPOLossConfig, backend: str, *, old_logprobs: Tensor | None = None,
              ref_logprobs: Tensor | None = None, temperature: float = 1.0,
              num_items_in_batch: int | Tensor | None = None,
              packed: PackedSequences | None = None, deterministic: bool | None = None,
              entropy_stats: bool = False,
              transform: LogitTransform = LogitTransform()) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (TRL's ``_compute_loss`` for one process, without the gradient-accumulation division) and its TRL
    metrics over the completion tokens (``targets != -100``): ``hidden [B, T, H]`` at the positions that predict
    ``targets [B, T]``, ``advantages [B]``, old / reference log-probs ``[B, T]`` (None: on-policy / no KL).
    ``entropy_stats``: the metrics also hold ``entropy/effective_sum`` and ``entropy/effective_count``, the entropy
    summed over the tokens the loss acts on (the high-entropy ones with ``top_entropy_quantile < 1``) and their number
    (the adaptive entropy controller's window statistics)."""
    if backend == "fused":
        out = fused_linear_grpo_loss(hidden, weight, targets, advantages, old_logprobs=old_logprobs, bias=bias,
                                     ref_logprobs=ref_logprobs, num_items_in_batch=num_items_in_batch,
                                     temperature=temperature, check_finite=False, deterministic=deterministic,
                                     **asdict(config), **layout_of(packed), **transform._asdict())
        loss, metrics, entropy = out.loss, dict(out.metrics), out.entropy
    else:
        hidden, targets, old_logprobs, ref_logprobs = unpacked(packed, hidden, targets, old_logprobs, ref_logprobs)
        logprobs, entropy = materialized_logprobs(hidden, weight, bias, targets, temperature=temperature,
                                                  return_entropy=True, transform=transform)
        result = grpo_objective(logprobs, advantages, targets != IGNORE_INDEX, config, old_logprobs=old_logprobs,
                                ref_logprobs=ref_logprobs, entropy=entropy, num_items_in_batch=num_items_in_batch)
        loss, metrics = result.loss, dict(result.metrics)
    if entropy_stats:
        entropy = entropy.detach().reshape(targets.shape)
        effective = targets != IGNORE_INDEX
        if config.top_entropy_quantile < 1:
            effective = high_entropy_mask(entropy, effective, 1 - config.top_entropy_quantile)
        metrics["entropy/effective_sum"] = (entropy * effective).sum()
        metrics["entropy/effective_count"] = effective.sum().to(entropy.dtype)
    return loss, metrics


@lm_head_precision
def kto_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, labels: Tensor,
             ref_logps: Tensor, kl: Tensor | None, options: KTOOptions, backend: str, *,
             num_examples: int | Tensor | None = None, packed: PackedSequences | None = None,
             transform: LogitTransform = LogitTransform()) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO loss and TRL's per-batch metrics of ``B`` examples: ``hidden [B, T, H]``, ``targets [B, T]`` (-100 off
    the completion), ``labels [B]`` bool (desirable), reference sequence log-probs ``[B]``, the batch KL estimate
    (``kto_kl``; None for ``apo_zero_unpaired``). ``num_examples``: divisor of the losses' sum (default ``B``)."""
    if backend == "fused":
        out = fused_linear_kto_loss(hidden, weight, targets, labels, ref_logps=ref_logps, kl=kl, bias=bias,
                                    num_examples=num_examples, check_finite=False, **asdict(options),
                                    **layout_of(packed), **transform._asdict())
        return out.loss, out.metrics
    hidden, targets = unpacked(packed, hidden, targets)
    logps = materialized_logprobs(hidden, weight, bias, targets, transform=transform).sum(-1)  # 0 off the completion
    result = kto_objective(logps, ref_logps, labels, kl, options, num_examples=num_examples)
    return result.loss, kto_metrics(result, logps)


@lm_head_precision
def rloo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, advantages: Tensor,
              options: RLOOOptions, backend: str, *, old_logprobs: Tensor | None = None, temperature: float = 1.0,
              packed: PackedSequences | None = None, deterministic: bool | None = None,
              transform: LogitTransform = LogitTransform()) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO loss (TRL's ``_compute_loss`` for one process, without the gradient-accumulation division) and its TRL
    metrics over the completion tokens (``targets != -100``): ``hidden [B, T, H]`` at the positions that predict
    ``targets [B, T]``, ``advantages [B]``, old log-probs ``[B, T]`` (None: on-policy)."""
    if backend == "fused":
        out = fused_linear_rloo_loss(hidden, weight, targets, advantages, old_logprobs=old_logprobs, bias=bias,
                                     epsilon=options.epsilon, epsilon_high=options.epsilon_high,
                                     temperature=temperature, check_finite=False, deterministic=deterministic,
                                     **layout_of(packed), **transform._asdict())
        return out.loss, out.metrics
    hidden, targets, old_logprobs = unpacked(packed, hidden, targets, old_logprobs)
    logprobs, entropy = materialized_logprobs(hidden, weight, bias, targets, temperature=temperature,
                                              return_entropy=True, transform=transform)
    mask = targets != IGNORE_INDEX
    old_logps = None if old_logprobs is None else torch.where(mask, old_logprobs, 0.0).sum(-1)
    result = rloo_objective(logprobs, advantages, mask, options, old_logps=old_logps, entropy=entropy)
    return result.loss, result.metrics
def sft_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, backend: str, *,
             loss_type: str = "nll", label_smoothing: float = 0.0, num_items_in_batch: Tensor | None = None,
             transform: LogitTransform = LogitTransform()) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT cross-entropy of ``hidden [..., H]`` against ``targets [...]`` (any layout, packed included) and TRL's
    ``entropy`` / ``mean_token_accuracy``: the sum over the trained tokens divided by ``num_items_in_batch``
    (default: their count, the mean). ``transform``: the model's logit transform (``hf.logit_transform``)."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    if backend == "fused":
        out = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction, loss_type=loss_type,
                                         label_smoothing=label_smoothing, check_finite=False, **transform._asdict())
        loss, metrics = out.loss, out.metrics
    else:
        config = CrossEntropyConfig(reduction=reduction, label_smoothing=label_smoothing, loss_type=loss_type)
        logits = materialized_logits(hidden, weight, bias, transform)
        logp = torch.log_softmax(logits, -1)
        valid = targets != IGNORE_INDEX
        logprobs = logp.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
        per_token = token_cross_entropy(logprobs, torch.logsumexp(logits, -1), logits.sum(-1), logits.shape[-1],
                                        config)
        mask = valid.to(per_token.dtype)
        loss = reduce_cross_entropy(per_token, mask, config)
        with torch.no_grad():
            metrics = cross_entropy_metrics(-(logp.exp() * logp).sum(-1), (logits.argmax(-1) == targets).to(
                mask.dtype), mask)
    return (loss if num_items_in_batch is None else loss / num_items_in_batch), metrics


def distill_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher_hidden: Tensor, teacher_weight: Tensor,
                 teacher_bias: Tensor | None, mask: Tensor, backend: str, *, beta: float, temperature: float,
                 num_items_in_batch: Tensor | None = None, transform: LogitTransform = LogitTransform(),
                 teacher_transform: LogitTransform = LogitTransform()) -> tuple[Tensor, dict[str, Tensor]]:
    """The generalized JSD of the student (``hidden [B, R, H]``, its lm_head) from the frozen teacher
    (``teacher_hidden [B, R, H_t]``, its lm_head) over the tokens of ``mask [B, R]``, and the student's ``entropy``
    and the mean ``divergence``; ``transform`` and ``teacher_transform``: each model's logit transform
    (``hf.logit_transform``). Under autocast both heads run in the autocast dtype (the fused op accumulates in
    fp32)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight, teacher_hidden, teacher_weight = (t.to(dtype) for t in (hidden, weight, teacher_hidden,
                                                                               teacher_weight))
        bias, teacher_bias = (None if b is None else b.to(dtype) for b in (bias, teacher_bias))
    with torch.autocast(device, enabled=False):
        if backend == "fused":
            out = fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, mask, beta=beta,
                                            temperature=temperature, student_bias=bias, teacher_bias=teacher_bias,
                                            num_items_in_batch=num_items_in_batch, check_finite=False,
                                            **{f"student_{k}": v for k, v in transform._asdict().items()},
                                            **{f"teacher_{k}": v for k, v in teacher_transform._asdict().items()})
            return out.loss, out.metrics
        log_ps = torch.log_softmax(materialized_logits(hidden, weight, bias, transform) / temperature, -1)
        with torch.no_grad():
            log_pt = torch.log_softmax(materialized_logits(teacher_hidden, teacher_weight, teacher_bias,
                                                           teacher_transform) / temperature, -1)
        divergence, _, entropy = divergence_terms(log_ps, log_pt, beta)
        m = mask.to(divergence.dtype)
        loss = mean_over_tokens(divergence, m, num_items_in_batch)
        with torch.no_grad():
            metrics = {"entropy": mean_over_tokens(entropy, m), "divergence": mean_over_tokens(divergence, m)}
        return loss, metrics
