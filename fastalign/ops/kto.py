"""Fused KTO loss from hidden states: each completion's log-prob sum through the shared engine
(``fastalign.ops.engine``, one sequence per group), the loss of ``fastalign.objectives.kto`` on those sums.

Only completion tokens (``targets != ignore_index``) get logits. On the torch backend whole sequences go per chunk
(one pass, three matmuls) when the longest fits the memory budget, else two passes; triton makes two passes.
Packed batches (``cu_seqlens`` / ``position_ids``, ``fastalign.ops.segments``): one completion per sequence.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.dpo import check_count
from ..objectives.kto import KTOOptions, kto_logit_metrics, kto_loss, kto_metrics
from .dpo import PreferenceRows, token_logit_means
from .engine import RowValues, fused_rows_loss
from .linear import LinearOptions
from .segments import PackedLayout
from .torch_backend import RowStatsSpec
from .validation import (FLOAT_DTYPES, LinearInputs, require_finite, require_logprobs, require_same_device,
                         require_shape, require_tensor)


class KTOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_kto_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    rewards: Tensor  # [B] beta * (policy - reference), detached
    logps: Tensor  # [B] the policy's completion log-prob sums, detached
    metrics: dict[str, Tensor]  # detached, TRL's per-batch names (kto_metrics; kto_metric_means for the logged ones)


class KTOInputs(NamedTuple):
    """The per-completion inputs of the loss, validated, in the compute dtype."""

    labels: Tensor  # [B] bool, desirable
    ref_logps: Tensor  # [B]
    kl: Tensor | None  # 0-dim, detached (None for apo_zero_unpaired)
    num_examples: int | Tensor | None


def validate_kto_inputs(targets: Tensor, num_sequences: int, dtype: torch.dtype, options: KTOOptions, *, labels,
                        ref_logps, kl, num_examples, check_finite: bool, average_log_prob: bool = False) -> KTOInputs:
    """Check the KTO op's per-completion arguments against the ``num_sequences`` B completions of ``targets``."""
    b = num_sequences
    labels = require_tensor("labels", labels)
    if labels.dtype != torch.bool:
        raise TypeError(f"labels: expected a bool tensor (True: desirable), got dtype {labels.dtype}")
    require_shape("labels", labels, (b,), "one label per completion")
    ref_logps = require_tensor("ref_logps", ref_logps, dtypes=FLOAT_DTYPES)
    require_shape("ref_logps", ref_logps, (b,), "one reference log-prob per completion")
    require_same_device(targets, labels=labels, ref_logps=ref_logps)
    if options.uses_kl:
        if kl is None:
            raise ValueError("kl: expected the batch KL estimate (a one-element tensor, see "
                             "fastalign.objectives.kto.kto_kl) for loss_type='kto', got None")
        kl = require_tensor("kl", kl, dtypes=FLOAT_DTYPES)
        if kl.numel() != 1:
            raise ValueError(f"kl: expected a one-element tensor, got shape {tuple(kl.shape)}")
        require_same_device(targets, kl=kl)
        kl = kl.detach().reshape(()).to(dtype)
    elif kl is not None:
        raise ValueError(f"kl: expected None for loss_type={options.loss_type!r} (no KL term), got a tensor")
    if check_finite:
        require_finite("ref_logps", ref_logps)
        require_finite("kl", kl)
    # a sum over up to T tokens may carry T tokens' rounding; a mean one token's
    require_logprobs("ref_logps", ref_logps, 1 if average_log_prob else targets.shape[-1])
    if kl is not None and not torch.compiler.is_compiling() and bool(kl < 0):
        raise ValueError(f"kl: expected the clamped batch KL estimate >= 0 (TRL clamps it at 0, as kto_kl does), "
                         f"got {float(kl):g}")
    if num_examples is not None:
        num_examples = check_count("num_examples", num_examples, b, "at least the completions in this batch")
    return KTOInputs(labels, ref_logps.detach().to(dtype), kl, num_examples)


def fused_kto_loss(inputs: LinearInputs, opts: LinearOptions, options: KTOOptions, examples: KTOInputs,
                   layout: PackedLayout | None = None, *, average_log_prob: bool = False,
                   vocab_metrics: bool = False) -> KTOLossOutput:
    """The fused KTO loss on validated inputs: ``inputs.lead_shape == (B, T)``, or N packed rows with their
    ``layout`` of B sequences. ``average_log_prob``: each completion's mean token log-prob instead of the sum (0
    without tokens); ``vocab_metrics``: TRL's ``logits/*`` sums (``kto_logit_metrics``) from the same pass."""
    rows = PreferenceRows.of(inputs.targets.view(inputs.lead_shape), opts.ignore_index, 1, layout)  # group: sequence
    counts = rows.mask.sum(-1)
    num_examples = rows.mask.shape[0] if examples.num_examples is None else examples.num_examples

    def loss_of(values: RowValues):
        """The loss of the completions ``values.groups`` (all without) over the whole batch's example count."""
        batch, mask = rows.part(values.logprobs, values.rows, values.groups)
        part = slice(None) if values.groups is None else values.groups
        logps = batch.sum(-1)
        if average_log_prob:
            logps = logps / counts[part].clamp(min=1).to(logps.dtype)
        return kto_loss(logps, examples.ref_logps[part], examples.labels[part], examples.kl, options,
                        num_examples=examples.num_examples if values.groups is None else num_examples), logps

    out = fused_rows_loss(inputs, opts, lambda values: loss_of(values)[0].loss, rows=rows.rows,
                          coupling=rows.group_rows, spec=RowStatsSpec(logit_sum=vocab_metrics))
    with torch.no_grad():
        result, logps = loss_of(RowValues(out.logprobs, None, out.stats))
        metrics = kto_metrics(result, logps)
        if vocab_metrics:
            means = out.logprobs.new_zeros(0) if out.stats is None else token_logit_means(out.stats, inputs, opts)
            sequence = torch.div(rows.index, rows.mask.shape[-1], rounding_mode="floor")
            completion = rows.mask.reshape(-1)[rows.index]  # compiled: every row, the ignored ones left out
            metrics.update(kto_logit_metrics(means, examples.labels[sequence] & completion,
                                             ~examples.labels[sequence] & completion))
    return KTOLossOutput(out.loss, result.rewards, logps, metrics)
