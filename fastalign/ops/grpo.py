"""Fused GRPO-family loss from hidden states: the completion tokens' log-probs and entropy through the shared engine
(``fastalign.ops.engine``), the loss of ``fastalign.objectives.grpo`` on them. Padded ``[B, T]`` batches, or packed
ones (``fastalign.ops.segments``): the per-token values of a packed batch are placed into ``[S, L]`` for the loss,
the hidden states never are.

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

from ..objectives.grpo import BatchTotals, GRPOLossConfig, grpo_loss
from .engine import RowValues, fused_rows_loss
from .linear import LinearOptions
from .segments import PackedLayout
from .torch_backend import RowStatsSpec, compute_dtype
from .validation import (FLOAT_DTYPES, LinearInputs, check_num_items, masked_token_tensor, require_finite,
                         require_same_device, require_tensor, validate_token_mask)


class GRPOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_grpo_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    metrics: dict[str, Tensor]  # detached 0-d fp32 tensors (float64 for float64 inputs), TRL names
    logprobs: Tensor  # [B, T] detached fp32 log-probs (0 outside the completion mask)
    entropy: Tensor | None  # [B, T] detached fp32 entropy (0 outside the completion mask), when computed


class GRPOInputs(NamedTuple):
    """The per-token inputs of the loss in the padded ``[S, T]`` layout (``advantages`` and the IS ratio ``[S, 1]``
    or ``[S, T]``), in the compute dtype."""

    advantages: Tensor
    mask: Tensor  # bool [S, T]: completion tokens whose target is not ignored
    old_logprobs: Tensor | None
    ref_logprobs: Tensor | None
    importance_sampling_ratio: Tensor | None
    sampling_logprobs: Tensor | None
    num_items_in_batch: Tensor | float | None

    def padded(self, layout: PackedLayout | None) -> GRPOInputs:
        """Inputs given per packed row ``[N]`` (per sequence ``[S, 1]``) placed into ``[S, L]``; as they are without
        a layout. Padding holds neutral values (mask False, ratio 1, log-probs and advantages 0)."""
        if layout is None:
            return self

        def place(t: Tensor | None, fill, per_sequence_allowed: bool = False):
            if t is None or per_sequence_allowed and tuple(t.shape) == (layout.num_sequences, 1):
                return t  # one per sequence already (if S = N = 1 both readings are the same value)
            return layout.to_padded(t.reshape(-1), fill)

        return GRPOInputs(place(self.advantages, 0.0, True), place(self.mask, False), place(self.old_logprobs, 0.0),
                          place(self.ref_logprobs, 0.0), place(self.importance_sampling_ratio, 1.0, True),
                          place(self.sampling_logprobs, 0.0), self.num_items_in_batch)


def validate_grpo_inputs(targets: Tensor, num_sequences: int, dtype: torch.dtype, config: GRPOLossConfig, *,
                         advantages, mask, old_logprobs, ref_logprobs, importance_sampling_ratio, sampling_logprobs,
                         num_items_in_batch, ignore_index: int, check_finite: bool) -> GRPOInputs:
    """Check the GRPO op's per-token arguments against ``targets`` (``[B, T]``, or ``[N]`` packed) and its
    ``num_sequences`` (B, or S), and convert them to ``dtype``; per-sequence ones become ``[S, 1]``. Per-token
    values outside the completion mask are replaced by neutral ones (log-probs and advantages 0, the IS ratio 1),
    whatever they were (NaN and inf included)."""
    shape, device, s = tuple(targets.shape), targets.device, num_sequences
    completion = targets != ignore_index
    if mask is not None:
        completion = completion & validate_token_mask("mask", mask, targets.shape, device)

    def token(name: str, value):
        if value is None:
            return None
        return masked_token_tensor(name, value, completion, check_finite=check_finite, logprobs=True).to(dtype)

    def per_sequence_or_token(name: str, value, sequence_shapes: tuple, fill: float) -> Tensor:
        value = require_tensor(name, value, dtypes=FLOAT_DTYPES)
        if not any(value.shape == expected for expected in (*sequence_shapes, shape)):
            expected = " or ".join(str(x) for x in (*sequence_shapes, shape))
            raise ValueError(f"{name}: expected shape {expected} (one per sequence, or per token), "
                             f"got {tuple(value.shape)}")
        require_same_device(targets, **{name: value})
        if tuple(value.shape) == shape:
            value = torch.where(completion, value, fill)
        if check_finite:
            require_finite(name, value)
        value = value.to(dtype)
        return value if tuple(value.shape) == shape else value.reshape(s, 1)

    advantages = per_sequence_or_token("advantages", advantages, ((s,),), 0.0)
    if config.beta != 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs: required when beta != 0 (beta={config.beta}), got None")
    ratio = importance_sampling_ratio
    if ratio is not None:
        ratio = per_sequence_or_token("importance_sampling_ratio", ratio, ((s,), (s, 1)), 1.0)
        if not torch.compiler.is_compiling() and bool((ratio < 0).any()):
            raise ValueError("importance_sampling_ratio: expected non-negative ratios, got negative values")
    if sampling_logprobs is not None and config.off_policy_mask_threshold is None:
        raise ValueError("sampling_logprobs: only used by the off-policy mask; set off_policy_mask_threshold or "
                         "pass None")
    if num_items_in_batch is not None and torch.compiler.is_compiling():  # compiled: not checked (a sync)
        num_items_in_batch = (num_items_in_batch.reshape(()) if isinstance(num_items_in_batch, Tensor)
                              else float(num_items_in_batch))
    elif num_items_in_batch is not None:
        num_items_in_batch = check_num_items(num_items_in_batch, int(completion.sum()))
    sampling = None
    if sampling_logprobs is not None:  # NaN: a token the rollout engine could not score (no evidence, as TRL 1.16)
        sampling = masked_token_tensor("sampling_logprobs", sampling_logprobs, completion, check_finite=False,
                                       logprobs=True)
        if check_finite:
            require_finite("sampling_logprobs", sampling.nan_to_num(nan=0.0))
        sampling = sampling.to(dtype)
    return GRPOInputs(advantages, completion, token("old_logprobs", old_logprobs), token("ref_logprobs", ref_logprobs),
                      ratio, sampling, num_items_in_batch)


def fused_grpo_loss(inputs: LinearInputs, opts: LinearOptions, config: GRPOLossConfig, tokens: GRPOInputs,
                    layout: PackedLayout | None = None, with_entropy: bool = True) -> GRPOLossOutput:
    """The fused GRPO loss on validated inputs: ``inputs.lead_shape == (B, T)`` (padded), or N packed rows with
    their ``layout``; ``tokens`` in the layout of ``targets``. ``with_entropy=False`` (the loss must not use the
    entropy) skips the entropy statistic and its metric."""
    tokens = tokens.padded(layout)
    # TRL truncates every completion to max_completion_length
    if config.loss_type == "dr_grpo" and not torch.compiler.is_compiling():
        longest = int(tokens.mask.sum(-1).max())
        if longest > config.max_completion_length:
            raise ValueError(f"max_completion_length: expected at least the longest completion ({longest} tokens; "
                             f"dr_grpo divides by B * max_completion_length), got {config.max_completion_length}")
    float_mask = tokens.mask.to(compute_dtype(inputs.hidden.dtype))
    totals = BatchTotals.of(float_mask)  # a chunk's sequences take the whole batch's counts

    def loss_of(logprobs: Tensor, entropy: Tensor | None, part: CompletionPart | None = None):
        if part is None:
            return grpo_loss(logprobs, tokens.advantages, float_mask, config, old_logprobs=tokens.old_logprobs,
                             ref_logprobs=tokens.ref_logprobs, entropy=entropy,
                             importance_sampling_ratio=tokens.importance_sampling_ratio,
                             sampling_logprobs=tokens.sampling_logprobs, num_items_in_batch=tokens.num_items_in_batch)
        sequences = part.sequences
        take = lambda t: None if t is None else t[sequences]  # noqa: E731
        return grpo_loss(logprobs, tokens.advantages[sequences], part.mask.to(float_mask.dtype), config,
                         old_logprobs=take(tokens.old_logprobs), ref_logprobs=take(tokens.ref_logprobs),
                         entropy=entropy, importance_sampling_ratio=take(tokens.importance_sampling_ratio),
                         sampling_logprobs=take(tokens.sampling_logprobs),
                         num_items_in_batch=tokens.num_items_in_batch,
                         totals=totals._replace(sequence_tokens=totals.sequence_tokens[sequences]))

    out = fused_completion_loss(inputs, opts, tokens.mask, loss_of, config.coupling, layout, with_entropy)
    return GRPOLossOutput(out.loss, out.result.metrics, out.logprobs, out.entropy)


class CompletionPart(NamedTuple):
    """A chunk's part of a completion batch: the sequences ``sequences`` (a slice of the S) and which of their
    tokens the chunk holds, ``mask [S', T]`` (all of them but with a per-token loss, whose chunks may split a
    sequence)."""

    sequences: slice
    mask: Tensor


class CompletionLoss(NamedTuple):
    """What :func:`fused_completion_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    result: NamedTuple  # the objective's output on the detached log-probs and entropy (its metrics...)
    logprobs: Tensor  # [B, T] (packed: [N]) detached, 0 outside the completion mask
    entropy: Tensor | None  # the same, when computed


def fused_completion_loss(inputs: LinearInputs, opts: LinearOptions, mask: Tensor, loss_of, coupling: str,
                          layout: PackedLayout | None = None, with_entropy: bool = True) -> CompletionLoss:
    """A loss of the completion tokens' log-probs and entropy in the padded ``[S, T]`` layout, through the engine:
    ``loss_of(logprobs [S, T], entropy [S, T], part=None)`` returns the objective's output (with ``.loss`` and
    ``.metrics``); in the one-pass plan, once per chunk, ``loss_of(logprobs [S', T], entropy [S', T], part)`` of
    the chunk's sequences (``CompletionPart``) must return their terms over the whole batch's normalizers.
    ``mask [S, T]`` (bool) the completion tokens (``targets`` not ignored), ``coupling`` what one token's gradient
    depends on (``"token"``, ``"sequence"``: whole sequences per chunk, ``"batch"``: two passes). ``inputs`` are
    ``[S, T]`` rows, or N packed rows with their ``layout``. ``with_entropy=False``: ``loss_of`` gets None for the
    entropy, which is not computed."""
    shape = mask.shape  # [S, T]
    compiling = torch.compiler.is_compiling()
    if compiling and layout is not None:  # every packed row, in packed order: the loss masks them
        positions, rows = layout.index, torch.arange(layout.index.numel(), device=mask.device)
    else:
        if compiling:  # every row (no data-dependent shape): the loss masks them, the outputs are masked below
            positions = torch.arange(shape.numel(), device=mask.device)
        else:
            positions = mask.reshape(-1).nonzero().squeeze(1)  # completion tokens in [S, T], by sequence
        rows = positions if layout is None else layout.packed_rows(positions)  # their rows of hidden
    # the sequences' rows: the engine's groups (one pass on the torch backend only); compiled, every row of each
    # sequence (a packed batch's lengths are data: two passes)
    length = shape[1]
    lengths = None
    if opts.backend == "torch" and coupling != "batch" and (layout is None or not compiling):
        lengths = [length] * shape[0] if compiling else mask.sum(-1).tolist()

    def as_batch(values: Tensor | None) -> Tensor | None:
        """Row values ``[M]`` as ``[S, T]`` (0 elsewhere), differentiably."""
        if values is None:
            return None
        batch = values.new_zeros(shape.numel()).index_put((positions,), values).view(shape)
        return torch.where(mask, batch, 0.0) if compiling else batch  # compiled: every row was computed

    def loss_fn(values: RowValues) -> Tensor:
        if values.groups is None:
            return loss_of(as_batch(values.logprobs), as_batch(values.entropy)).loss
        # a chunk: its sequences' [S', T] alone
        sequences = values.groups
        where = positions[values.rows] - sequences.start * length
        size = (sequences.stop - sequences.start) * length

        def place(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.new_zeros(size).index_put((where,), v).view(-1, length)

        part = mask.new_zeros(size).index_fill_(0, where, True).view(-1, length) & mask[sequences]
        return loss_of(place(values.logprobs), place(values.entropy), CompletionPart(sequences, part)).loss

    engine_coupling = {"token": "token" if lengths is not None or not compiling else None, "sequence": lengths,
                       "batch": None}[coupling]
    out = fused_rows_loss(inputs, opts, loss_fn, rows=rows, coupling=engine_coupling,
                          groups=lengths if coupling == "token" else None, spec=RowStatsSpec(entropy=with_entropy))
    logprobs, entropy = as_batch(out.logprobs), as_batch(out.entropy)
    with torch.no_grad():
        result = loss_of(logprobs, entropy)  # fp32 (float64 for float64 inputs)
    if layout is not None:
        logprobs, entropy = layout.to_packed(logprobs), None if entropy is None else layout.to_packed(entropy)
    return CompletionLoss(out.loss, result, logprobs.view(inputs.lead_shape),
                          None if entropy is None else entropy.view(inputs.lead_shape))
