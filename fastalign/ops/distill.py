"""Fused distillation loss from two models' hidden states: TRL 1.16's generalized JSD (``fastalign.objectives.
distill``) between a trained student head and a frozen teacher head over one vocabulary, through the engine's
two-head pass (``engine.fused_pair_loss``): per chunk of the masked rows, both heads' logits, the divergence and its
gradient w.r.t. the student's logits, four matmuls; never an ``[N, V]`` of either model.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.distill import DistillConfig, divergence_logit_grads, divergence_terms
from ..objectives.sft import mean_over_tokens
from .engine import PairPlan, fused_pair_loss
from .linear import LinearOptions
from .torch_backend import compute_dtype
from .validation import (FLOAT_DTYPES, LinearInputs, check_num_items, require_finite, require_tensor,
                         validate_token_mask)


class DistillLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_distill_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. the student's hidden, weight and bias
    metrics: dict[str, Tensor]  # detached 0-d fp32 tensors: entropy, divergence (and hard_loss with targets)
    entropy: Tensor  # [...] detached fp32 student entropy of the tempered logits (0 outside the mask)


def validate_teacher(teacher_hidden, teacher_weight, teacher_bias, student: LinearInputs, *,
                     check_finite: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The teacher's ``hidden [..., H']`` (same leading shape as the student's), ``weight [V_r, H']`` (the student
    weight's vocabulary rows) and ``bias [V_r]``, flattened and detached."""
    hidden = require_tensor("teacher_hidden", teacher_hidden, dtypes=FLOAT_DTYPES)
    weight = require_tensor("teacher_weight", teacher_weight, dtypes=FLOAT_DTYPES, dim=2)
    if tuple(hidden.shape[:-1]) != tuple(student.lead_shape):
        raise ValueError(f"teacher_hidden: expected the student's leading shape {tuple(student.lead_shape)} + (H',), "
                         f"got {tuple(hidden.shape)}")
    if weight.shape[0] != student.weight.shape[0] or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"teacher_weight: expected shape ({student.weight.shape[0]}, {hidden.shape[-1]}) (the "
                         f"student's vocabulary, the teacher's hidden size), got {tuple(weight.shape)}")
    if teacher_bias is not None:
        teacher_bias = require_tensor("teacher_bias", teacher_bias, dtypes=FLOAT_DTYPES, dim=1)
        if teacher_bias.shape[0] != weight.shape[0]:
            raise ValueError(f"teacher_bias: expected shape ({weight.shape[0]},), got {tuple(teacher_bias.shape)}")
    for name, t in (("teacher_hidden", hidden), ("teacher_weight", weight), ("teacher_bias", teacher_bias)):
        if t is not None and t.device != student.hidden.device:
            raise ValueError(f"{name}: expected a tensor on {student.hidden.device} (the device of student_hidden), "
                             f"got {t.device}")
        if check_finite:
            require_finite(name, t)
    hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    return hidden, weight.detach(), None if teacher_bias is None else teacher_bias.detach()


def fused_distill_loss(student: LinearInputs, teacher: tuple[Tensor, Tensor, Tensor | None], opts: LinearOptions,
                       teacher_opts: LinearOptions, config: DistillConfig, mask, targets: Tensor | None,
                       num_items_in_batch=None) -> DistillLossOutput:
    """The fused distillation loss on validated inputs (``student.targets``: ``targets`` or zeros; ``teacher_opts``:
    ``opts`` with the teacher's logit transform)."""
    device, dtype = student.hidden.device, compute_dtype(student.hidden.dtype)
    counted = torch.ones(student.lead_shape, dtype=torch.bool, device=device)
    if mask is not None:
        counted = validate_token_mask("mask", mask, student.lead_shape, device)
    counted = counted.reshape(-1)
    rows = counted.nonzero().squeeze(1)
    if num_items_in_batch is not None:
        num_items_in_batch = check_num_items(num_items_in_batch, int(rows.numel()))
    normalizer = num_items_in_batch if num_items_in_batch is not None else rows.numel()
    normalizer = max(normalizer, 1) if isinstance(normalizer, (int, float)) else normalizer
    weight_soft = 1.0 - config.hard_label_weight
    row_scale = torch.full((rows.numel(),), weight_soft, dtype=dtype, device=device) / normalizer
    hard_targets = hard_scale = None
    if targets is not None:
        hard_targets = student.targets[rows]
        hard_scale = (hard_targets != opts.ignore_index).to(dtype) * config.hard_label_weight / normalizer
    plan = PairPlan((teacher[0][rows], teacher[1], teacher[2]), partial(divergence_terms, beta=config.beta),
                    partial(divergence_logit_grads, beta=config.beta), row_scale, hard_targets, hard_scale, opts,
                    teacher_opts, [])
    loss, terms = fused_pair_loss(student._replace(hidden=student.hidden[rows]), plan)
    with torch.no_grad():
        entropy = terms.new_zeros(counted.numel()).index_put((rows,), terms[2])
        every = torch.ones_like(terms[0])
        metrics = {"entropy": mean_over_tokens(terms[2], every), "divergence": mean_over_tokens(terms[0], every)}
        if targets is not None:
            metrics["hard_loss"] = mean_over_tokens(terms[-1], (hard_targets != opts.ignore_index).to(dtype))
    return DistillLossOutput(loss, metrics, entropy.view(student.lead_shape))
