"""Fused GRPO-family loss from hidden states: the completion tokens' log-probs and entropy through the shared engine
(``fastalign.ops.engine``), the loss of ``fastalign.objectives.grpo`` on them.

Only completion tokens (``mask`` and ``targets != ignore_index``) get logits, in sequence order. The engine's plan
follows the loss's coupling (``GRPOLossConfig.coupling``): per-token losses take any chunking (one pass on the torch
backend, three matmuls), sequence-level terms (GSPO ratios, vespo, the off-policy mask) take whole sequences per
chunk (one pass where a sequence fits the budget), the top-entropy quantile needs every token's entropy before any
gradient (two passes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.grpo import GRPOLossConfig, grpo_loss
from .engine import RowValues, fused_rows_loss
from .linear import LinearOptions
from .torch_backend import compute_dtype
from .validation import (FLOAT_DTYPES, LinearInputs, require_finite, require_same_device, require_shape,
                         require_tensor, validate_token_mask, validate_token_tensor)


class GRPOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_grpo_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    metrics: dict[str, Tensor]  # detached 0-d fp32 tensors (float64 for float64 inputs), TRL names
    logprobs: Tensor  # [B, T] detached fp32 log-probs (0 outside the completion mask)
    entropy: Tensor  # [B, T] detached fp32 entropy (0 outside the completion mask)


class GRPOInputs(NamedTuple):
    """The per-token inputs of the loss, ``[B, T]`` (``advantages`` ``[B, 1]`` or ``[B, T]``, the IS ratio
    ``[B, 1]`` or ``[B, T]``), in the compute dtype."""

    advantages: Tensor
    mask: Tensor  # bool: completion tokens whose target is not ignored
    old_logprobs: Tensor | None
    ref_logprobs: Tensor | None
    importance_sampling_ratio: Tensor | None
    sampling_logprobs: Tensor | None
    num_items_in_batch: Tensor | float | None


def validate_grpo_inputs(targets: Tensor, device: torch.device, dtype: torch.dtype, config: GRPOLossConfig, *,
                         advantages, mask, old_logprobs, ref_logprobs, importance_sampling_ratio, sampling_logprobs,
                         num_items_in_batch, ignore_index: int, check_finite: bool) -> GRPOInputs:
    """Check the GRPO op's per-token arguments against ``targets [B, T]`` and convert them to ``dtype``."""
    shape = targets.shape
    b = shape[0]

    def token(name: str, value):
        if value is None:
            return None
        return validate_token_tensor(name, value, shape, device, check_finite=check_finite).to(dtype)

    advantages = require_tensor("advantages", advantages, dtypes=FLOAT_DTYPES)
    if tuple(advantages.shape) not in ((b,), tuple(shape)):
        raise ValueError(f"advantages: expected shape ({b},) (one per sequence) or {tuple(shape)} (per token), "
                         f"got {tuple(advantages.shape)}")
    require_same_device(targets, advantages=advantages)
    if check_finite:
        require_finite("advantages", advantages)
    completion = targets != ignore_index
    if mask is not None:
        completion = completion & validate_token_mask("mask", mask, shape, device)
    if config.beta != 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs: required when beta != 0 (beta={config.beta}), got None")
    ratio = importance_sampling_ratio
    if ratio is not None:
        ratio = require_tensor("importance_sampling_ratio", ratio, dtypes=FLOAT_DTYPES)
        if tuple(ratio.shape) not in (tuple(shape), (b, 1)):
            raise ValueError(f"importance_sampling_ratio: expected shape {tuple(shape)} or ({b}, 1), "
                             f"got {tuple(ratio.shape)}")
        require_same_device(targets, importance_sampling_ratio=ratio)
        if check_finite:
            require_finite("importance_sampling_ratio", ratio)
        if bool((ratio < 0).any()):
            raise ValueError("importance_sampling_ratio: expected non-negative ratios, got negative values")
        ratio = ratio.to(dtype)
    if sampling_logprobs is not None and config.off_policy_mask_threshold is None:
        raise ValueError("sampling_logprobs: only used by the off-policy mask; set off_policy_mask_threshold or "
                         "pass None")
    if num_items_in_batch is not None:
        num_items_in_batch = _check_num_items(num_items_in_batch, int(completion.sum()))
    return GRPOInputs(advantages.to(dtype).reshape(b, -1), completion, token("old_logprobs", old_logprobs),
                      token("ref_logprobs", ref_logprobs), ratio, token("sampling_logprobs", sampling_logprobs),
                      num_items_in_batch)


def _check_num_items(value, own: int):
    """A completion-token count over the whole accumulated batch: a number or one-element tensor >= this batch's."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        count = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        count = float(value)
    else:
        raise TypeError(f"num_items_in_batch: expected a number or a one-element tensor, got {type(value).__name__}")
    if not count >= max(own, 1):
        raise ValueError(f"num_items_in_batch: expected at least this batch's own completion tokens ({max(own, 1)}; "
                         f"pass the count over the whole accumulated batch), got {count}")
    return value.reshape(()) if isinstance(value, Tensor) else count


def fused_grpo_loss(inputs: LinearInputs, opts: LinearOptions, config: GRPOLossConfig,
                    tokens: GRPOInputs) -> GRPOLossOutput:
    """The fused GRPO loss on validated inputs (``inputs.lead_shape == (B, T)``)."""
    shape = inputs.lead_shape
    dtype = compute_dtype(inputs.hidden.dtype)
    rows = tokens.mask.reshape(-1).nonzero().squeeze(1)  # completion tokens, sequence by sequence
    if config.coupling == "sequence":  # whole sequences per chunk
        groups = tokens.mask.sum(-1).tolist()
    else:
        groups = "token" if config.coupling == "token" else None
    float_mask = tokens.mask.to(dtype)

    def as_batch(values: Tensor | None, part: slice | None = None) -> Tensor | None:
        """Row values (``[M]``, or those of the rows ``part`` of them) as ``[B, T]`` (0 elsewhere), differentiably."""
        if values is None:
            return None
        where = rows if part is None else rows[part]
        return values.new_zeros(shape.numel()).index_put((where,), values).view(shape)

    def loss_of(logprobs: Tensor, entropy: Tensor | None):
        return grpo_loss(logprobs, tokens.advantages, float_mask, config, old_logprobs=tokens.old_logprobs,
                         ref_logprobs=tokens.ref_logprobs, entropy=entropy,
                         importance_sampling_ratio=tokens.importance_sampling_ratio,
                         sampling_logprobs=tokens.sampling_logprobs, num_items_in_batch=tokens.num_items_in_batch)

    def loss_fn(values: RowValues) -> Tensor:
        return loss_of(as_batch(values.logprobs, values.rows), as_batch(values.entropy, values.rows)).loss

    out = fused_rows_loss(inputs, opts, loss_fn, rows=rows, coupling=groups, with_entropy=True)
    logprobs, entropy = as_batch(out.logprobs), as_batch(out.entropy)
    with torch.no_grad():
        metrics = loss_of(logprobs, entropy).metrics  # fp32 (float64 for float64 inputs)
    return GRPOLossOutput(out.loss, metrics, logprobs, entropy)


def validate_sequence_layout(hidden, targets) -> None:
    """``hidden [B, T, H]`` and ``targets [B, T]``: B sequences of T tokens."""
    hidden = require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"hidden: expected shape [B, T, H] with B, T >= 1 (B completions of T tokens), "
                         f"got {tuple(hidden.shape)}")
    require_shape("targets", require_tensor("targets", targets), tuple(hidden.shape[:2]),
                  f"[B, T], the leading dimensions of hidden {tuple(hidden.shape)}")
