"""Fused RLOO loss from hidden states: the completion tokens' log-probs and entropy through the shared engine, by
GRPO's driver for completion losses (``fastalign.ops.grpo.fused_completion_loss``), the loss of
``fastalign.objectives.rloo`` on them. Padded ``[B, T]`` batches, or packed ones (``fastalign.ops.segments``).

The sequence ratio couples a completion's tokens: whole sequences go per chunk (torch: one pass of three matmuls when
the longest fits the memory budget, else two passes; triton: two passes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.rloo import RLOOOptions, rloo_loss
from .grpo import CompletionPart, fused_completion_loss
from .linear import LinearOptions
from .segments import PackedLayout
from .torch_backend import compute_dtype
from .validation import (FLOAT_DTYPES, LinearInputs, masked_token_tensor, require_finite, require_logprobs,
                         require_same_device, require_shape, require_tensor, validate_token_mask)


class RLOOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_rloo_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    metrics: dict[str, Tensor]  # detached 0-d fp32 tensors (float64 for float64 inputs), TRL names
    logprobs: Tensor  # [B, T] detached fp32 log-probs (0 outside the completion mask; [N] packed)
    entropy: Tensor  # [B, T] detached fp32 entropy (0 outside the completion mask; [N] packed)
    logps: Tensor  # [B] detached completion log-probs (sums over the mask): the next iteration's old_logprobs


class RLOOInputs(NamedTuple):
    """The per-completion inputs of the loss in the padded ``[S, T]`` layout, in the compute dtype."""

    advantages: Tensor  # [S]
    mask: Tensor  # bool [S, T]: completion tokens whose target is not ignored
    old_logps: Tensor | None  # [S] sums over the mask


def validate_rloo_inputs(targets: Tensor, layout: PackedLayout | None, dtype: torch.dtype, *, advantages, mask,
                         old_logprobs, ignore_index: int, check_finite: bool) -> RLOOInputs:
    """Check the RLOO op's arguments against ``targets`` (``[B, T]``, or ``[N]`` packed with its ``layout``) and
    place them into the padded layout: ``advantages`` one per sequence, ``old_logprobs`` per token (summed over the
    mask) or per sequence."""
    s = targets.shape[0] if layout is None else layout.num_sequences
    advantages = require_tensor("advantages", advantages, dtypes=FLOAT_DTYPES)
    require_shape("advantages", advantages, (s,), "one per completion: RLOO's advantages are per sequence")
    completion = targets != ignore_index
    if mask is not None:
        completion = completion & validate_token_mask("mask", mask, targets.shape, targets.device)
    old = old_logprobs
    if old is not None:
        old = require_tensor("old_logprobs", old, dtypes=FLOAT_DTYPES)
        if tuple(old.shape) not in (tuple(targets.shape), (s,)):
            raise ValueError(f"old_logprobs: expected shape {tuple(targets.shape)} (per token) or {(s,)} (per "
                             f"sequence, TRL's old_logps), got {tuple(old.shape)}")
    require_same_device(targets, advantages=advantages, old_logprobs=old)
    if check_finite:
        require_finite("advantages", advantages)
    per_token = old is not None and tuple(old.shape) == tuple(targets.shape)  # (also when N == S, packed)
    if per_token:  # values outside the completion never reach the sum, whatever they are
        old = masked_token_tensor("old_logprobs", old, completion, check_finite=check_finite, logprobs=True)
    elif check_finite:
        require_finite("old_logprobs", old)
    if layout is not None:
        completion = layout.to_padded(completion.reshape(-1), False)
    if per_token:
        old = old.reshape(completion.shape) if layout is None else layout.to_padded(old.reshape(-1), 0.0)
        old = old.to(dtype).sum(-1)
    elif old is not None:  # per sequence: a sum of up to the longest completion's log-probs
        require_logprobs("old_logprobs", old, tokens_per_value=int(completion.sum(-1).max()))
    return RLOOInputs(advantages.to(dtype), completion, None if old is None else old.detach().to(dtype))


def fused_rloo_loss(inputs: LinearInputs, opts: LinearOptions, options: RLOOOptions, tokens: RLOOInputs,
                    layout: PackedLayout | None = None) -> RLOOLossOutput:
    """The fused RLOO loss on validated inputs: ``inputs.lead_shape == (B, T)`` (padded), or N packed rows with
    their ``layout``; ``tokens`` in the padded layout."""
    float_mask = tokens.mask.to(compute_dtype(inputs.hidden.dtype))

    def loss_of(logprobs: Tensor, entropy: Tensor | None, part: CompletionPart | None = None):
        if part is None:
            return rloo_loss(logprobs, tokens.advantages, float_mask, options, old_logps=tokens.old_logps,
                             entropy=entropy)
        old = None if tokens.old_logps is None else tokens.old_logps[part.sequences]  # a chunk's whole sequences
        return rloo_loss(logprobs, tokens.advantages[part.sequences], part.mask.to(float_mask.dtype), options,
                         old_logps=old, entropy=entropy, num_sequences=float_mask.shape[0])

    out = fused_completion_loss(inputs, opts, tokens.mask, loss_of, "sequence", layout)
    return RLOOLossOutput(out.loss, out.result.metrics, out.logprobs, out.entropy, out.result.logps)
