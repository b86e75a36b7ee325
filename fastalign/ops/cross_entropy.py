"""Fused cross-entropy (SFT) from hidden states: the targets' log-probs, the lse and the sum of the logits of the
rows whose target is not ignored, through the one engine (``fastalign.ops.engine``), and the loss of
``fastalign.objectives.sft`` on them.

A scalar reduction is a sum of per-token terms over a normalizer known before any logit (a token count): coupling
``"token"``, one pass on the torch backend (three matmuls), two on triton. The z-loss and label smoothing differentiate
the lse and the sum of the logits, whose gradients the engine's backward applies (``torch_backend.RowGrads``).
``reduction="none"`` returns a per-token loss whose upstream gradient is unknown in the forward: the two-pass plan of
the registered operators (``engine.registered_rows_loss``, four matmuls), differentiable per token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.sft import (CrossEntropyConfig, cross_entropy_metrics, reduce_cross_entropy,
                              token_cross_entropy)
from .engine import RowValues, fused_rows_loss, registered_rows_loss
from .linear import LinearOptions
from .torch_backend import RowStats, RowStatsSpec, compute_dtype
from .validation import LinearInputs, check_num_items


class CrossEntropyOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_cross_entropy` returns."""

    loss: Tensor  # scalar (``[...]`` with reduction="none"), differentiable w.r.t. hidden, weight and bias
    metrics: dict[str, Tensor]  # detached 0-d fp32 tensors (float64 for float64 inputs): entropy, mean_token_accuracy
    logprobs: Tensor  # [...] detached fp32 log-probs of the targets (0 at ignored positions)
    lse: Tensor  # [...] detached fp32 log-sum-exp of the tempered logits (0 at ignored positions)


def _mean_num_items(num_items_in_batch, config: CrossEntropyConfig, own: int):
    """``num_items_in_batch`` for a mean over the accumulated batch's tokens (at least this batch's ``own``)."""
    if num_items_in_batch is None:
        return None
    if config.reduction != "mean":
        raise ValueError(f"num_items_in_batch: only with reduction='mean' (it replaces the mean's token count), got "
                         f"reduction={config.reduction!r}")
    if torch.compiler.is_compiling():
        return num_items_in_batch
    return check_num_items(num_items_in_batch, own)


def fused_cross_entropy(inputs: LinearInputs, opts: LinearOptions, config: CrossEntropyConfig,
                        num_items_in_batch=None) -> CrossEntropyOutput:
    """The fused cross-entropy on validated inputs (``prepare_linear``)."""
    targets = inputs.targets
    valid = targets != opts.ignore_index
    compiling = torch.compiler.is_compiling()
    num_items_in_batch = _mean_num_items(num_items_in_batch, config, 0 if compiling else int(valid.sum()))
    # Only the counted rows get logits; every row (masked in the loss) when compiled (no data-dependent shape) or
    # when every row counts (no copy of hidden, no scatter of its gradient).
    rows = None if compiling or bool(valid.all()) else valid.nonzero().squeeze(1)
    mask = (valid if rows is None else valid[rows]).to(compute_dtype(inputs.hidden.dtype))
    vocab = inputs.weight.shape[0] if opts.shard is None else opts.shard.vocab_size
    spec = RowStatsSpec(entropy=True, logit_sum=config.needs_logit_sum, argmax=True)
    normalizer = valid.sum() if config.reduction == "mean" and num_items_in_batch is None else None

    def per_token(values: RowValues) -> Tensor:
        if values.stats is None:  # no row selected: the loss of none
            return values.logprobs
        return token_cross_entropy(values.logprobs, values.stats.lse, values.stats.logit_sum, vocab, config)

    def loss_fn(values: RowValues) -> Tensor:
        part = mask if values.rows is None else mask[values.rows]
        total = (per_token(values) * part).sum()
        if num_items_in_batch is not None:
            return total / num_items_in_batch
        return total if normalizer is None else total / normalizer.clamp(min=1)

    if config.reduction == "none":
        out = registered_rows_loss(inputs, opts, lambda values: per_token(values) * mask, rows=rows, spec=spec)
    else:
        out = fused_rows_loss(inputs, opts, loss_fn, rows=rows, spec=spec)
    stats = out.stats
    if stats is None:  # no row selected
        stats = RowStats(out.logprobs, out.logprobs, argmax=out.logprobs.long())
    with torch.no_grad():
        correct = (stats.argmax == (targets if rows is None else targets[rows])).to(mask.dtype)
        metrics = cross_entropy_metrics(out.entropy, correct, mask)
    n = targets.numel()

    def scatter(values: Tensor) -> Tensor:
        """Row values ``[M]`` as ``[...]`` (0 at ignored positions), differentiably."""
        values = torch.where(valid, values, 0.0) if rows is None else values.new_zeros(n).index_put((rows,), values)
        return values.view(inputs.lead_shape)

    loss = scatter(out.loss) if config.reduction == "none" else out.loss
    return CrossEntropyOutput(loss, metrics, scatter(out.logprobs), scatter(torch.where(mask > 0, stats.lse, 0.0)))
