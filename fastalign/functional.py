"""The public fused ops: functions of hidden states and the lm_head weight that never materialize the logits."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .objectives.ppo import PPOLossConfig
from .ops.logprobs import linear_logprobs, prepare_linear
from .ops.ppo import PPOLossOutput, ppo_loss, validate_value_head
from .ops.validation import FLOAT_DTYPES, INT_DTYPES, validate_token_tensor


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                          temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                          backend: str = "auto", chunk_size: int | None = None, check_finite: bool = True):
    """Per-token log-probs ``log softmax((hidden @ weight.T + bias) / temperature)[targets]``, without the logits.

    Args:
        hidden: ``[..., H]`` last hidden states (fp32, fp16, bf16; float64 on the torch backend).
        weight: ``[V, H]`` lm_head weight, same dtype. A frozen weight (``requires_grad=False``) costs no
            ``d weight`` work.
        targets: ``[...]`` int64 token ids in ``[0, V)``, or ``ignore_index`` (log-prob 0, no gradient).
        bias: optional ``[V]`` lm_head bias.
        temperature: positive divisor of the logits.
        return_entropy: also return the entropy ``-sum_v p_v log p_v`` of the tempered distribution.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere; ``$FASTALIGN_BACKEND`` overrides), ``"triton"``,
            ``"torch"``.
        chunk_size: tokens per chunk on the torch backend; None sizes it from ``$FASTALIGN_CHUNK_BUDGET_MB``
            (default 64 MiB of ``[chunk, V]`` temporaries).
        check_finite: raise on NaN/inf in ``hidden``, ``weight`` or ``bias`` (one cheap pass over each).

    Returns:
        ``logprobs`` shaped like ``targets``, fp32 (float64 for float64 inputs); with ``return_entropy``,
        ``(logprobs, entropy)``. Both are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, check_finite=check_finite)
    logprobs, entropy = linear_logprobs(inputs, opts, return_entropy)
    logprobs = logprobs.view(inputs.lead_shape)
    return (logprobs, entropy.view(inputs.lead_shape)) if return_entropy else logprobs


def fused_linear_ppo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor,
                          advantages: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
                          ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                          cliprange: float = 0.2, cliprange_high: float | None = None,
                          dual_clip: float | None = None, entropy_coef: float = 0.0, temperature: float = 1.0,
                          value_head_weight: Tensor | None = None, value_head_bias: Tensor | None = None,
                          old_values: Tensor | None = None, returns: Tensor | None = None,
                          cliprange_value: float = 0.2, vf_coef: float = 0.1, loss_agg: str = "token-mean",
                          num_tokens=None, num_sequences=None, compute_entropy: bool | None = None,
                          ignore_index: int = -100, backend: str = "auto", chunk_size: int | None = None,
                          check_finite: bool = True) -> PPOLossOutput:
    """PPO loss from hidden states in one pass over the vocabulary, without the logits.

    ``loss = agg(pg + kl_coef * kl - entropy_coef * entropy) + vf_coef * agg(value_loss)`` with the clipped
    surrogate ``pg = max(-A r, -A clip(r, 1 - cliprange, 1 + cliprange_high))`` (optional dual clip), the KL
    estimator ``kl_estimator`` (``k1``, ``k2``, ``k3``) to ``ref_logprobs``, and the clipped value loss of a linear
    value head on the same hidden rows. Formulas: ``fastalign.objectives.ppo``.

    Args:
        hidden ``[B, T, H]``, weight ``[V, H]``, targets ``[B, T]`` (sampled token ids, ``ignore_index`` allowed),
        old_logprobs, advantages, ref_logprobs, mask: ``[B, T]``. ``mask`` marks response tokens (default: the
        tokens whose target is not ignored); masked tokens contribute nothing.
        value_head_weight: ``[H]`` or ``[K, H]`` (with ``value_head_bias`` ``[]``/``[K]``); then ``old_values`` and
            ``returns`` ``[B, T]`` (``[B, T, K]``) are required. Without a head the op is policy-only (GRPO).
        loss_agg: ``token-mean``, ``seq-mean-token-sum`` or ``seq-mean-token-mean``; ``num_tokens`` /
            ``num_sequences``: the normalizer over the whole accumulated batch (gradient accumulation, data
            parallel), default this batch's.
        compute_entropy: compute the entropy (for ``objective/entropy``); default: when ``entropy_coef != 0``.
        Other options as in :func:`fused_linear_logprobs`.

    Returns:
        ``PPOLossOutput(loss, metrics, logprobs, entropy, values)``: ``loss`` differentiable w.r.t. hidden,
        weight, bias and the value head; the rest detached. Metrics use TRL's names (``policy/clipfrac``,
        ``policy/approxkl``, ``objective/kl``, ``objective/entropy``, ``loss/policy``, ``loss/value``,
        ``val/clipfrac``, ``val/vpred``, ``policy/ratio_mean`` ...).
    """
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, check_finite=check_finite)
    config = PPOLossConfig(cliprange=cliprange, cliprange_high=cliprange_high, dual_clip=dual_clip, kl_coef=kl_coef,
                           kl_estimator=kl_estimator, entropy_coef=entropy_coef, cliprange_value=cliprange_value,
                           vf_coef=vf_coef, loss_agg=loss_agg)
    token = partial(validate_token_tensor, shape=targets.shape, device=inputs.hidden.device,
                    check_finite=check_finite)
    old_logprobs, advantages = token("old_logprobs", old_logprobs), token("advantages", advantages)
    if ref_logprobs is not None:
        ref_logprobs = token("ref_logprobs", ref_logprobs)
    elif kl_coef != 0:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (kl_coef={kl_coef}), got None")
    not_ignored = targets != ignore_index
    if mask is None:
        mask = not_ignored
    else:
        mask = token("mask", mask, dtypes=(torch.bool, *FLOAT_DTYPES, *INT_DTYPES)).bool() & not_ignored
    value_head = validate_value_head(value_head_weight, value_head_bias, old_values, returns, inputs,
                                     targets.shape, check_finite)
    with_entropy = entropy_coef != 0 if compute_entropy is None else bool(compute_entropy)
    if entropy_coef != 0 and not with_entropy:
        raise ValueError(f"compute_entropy: must not be False when entropy_coef != 0 (entropy_coef={entropy_coef})")
    return ppo_loss(inputs, opts, config, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                    ref_logprobs=ref_logprobs, value_head=value_head, num_tokens=num_tokens,
                    num_sequences=num_sequences, with_entropy=with_entropy)
