"""Fused distillation loss from two models' hidden states: TRL 1.16's generalized JSD (``fastalign.objectives.
distill``) between a trained student head and a frozen teacher head over one vocabulary, through the engine's
two-head pass (``engine.fused_pair_loss``): per chunk of the masked rows, both heads' logits, the divergence and its
gradient w.r.t. the student's logits, four matmuls; never an ``[N, V]`` of either model.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.distill import DistillConfig, divergence_block_
from ..objectives.sft import mean_over_tokens
from .engine import PairPlan, fused_pair_loss
from .linear import LinearOptions, lse_forward
from .torch_backend import LinearGrads, PairResult, RowStatsSpec, compute_dtype
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
    plan = PairPlan((teacher[0][rows], teacher[1], teacher[2]), partial(divergence_block_, beta=config.beta),
                    row_scale, hard_targets, hard_scale, opts, teacher_opts, [],
                    partial(triton_divergence_pass, beta=config.beta))
    loss, terms = fused_pair_loss(student._replace(hidden=student.hidden[rows]), plan)
    with torch.no_grad():
        entropy = terms.new_zeros(counted.numel()).index_put((rows,), terms[2])
        every = torch.ones_like(terms[0])
        metrics = {"entropy": mean_over_tokens(terms[2], every), "divergence": mean_over_tokens(terms[0], every)}
        if targets is not None:
            metrics["hard_loss"] = mean_over_tokens(terms[-1], (hard_targets != opts.ignore_index).to(dtype))
    return DistillLossOutput(loss, metrics, entropy.view(student.lead_shape))


def triton_divergence_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: PairPlan,
                           need: tuple[bool, bool, bool], *, beta: float) -> PairResult:
    """The engine's two-head pass on the Triton kernels (``fastalign.kernels.divergence``): the statistics pass
    (each head's lse, the student's entropy, with hard targets the student's lse and target logit before the
    temperature: ``lse_forward``, merged across the group with a vocab shard), the per-row terms (summed across the
    group), then the student's gradients (this shard's) when ``need`` asks for any. Returns what
    ``torch_backend.linear_pair_fused`` does: terms ``[3 (+1), N]`` and the student's gradients."""
    from fastalign.kernels.divergence import Head, HardLabels, divergence_backward, divergence_terms as pair_terms

    opts, other_opts = plan.opts, plan.other_opts
    other_hidden, other_weight, other_bias = plan.other
    zeros = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)  # no target: lse only
    stats_s = lse_forward(hidden, weight, bias, zeros, opts, spec=RowStatsSpec(entropy=True))
    stats_t = lse_forward(other_hidden, other_weight, other_bias, zeros, other_opts)
    student = Head(hidden, weight, bias, opts.logit_scale, opts.logit_softcap)
    teacher = Head(other_hidden, other_weight, other_bias, other_opts.logit_scale, other_opts.logit_softcap)
    terms = pair_terms(student, teacher, stats_s.lse, stats_t.lse, inv_temperature=opts.inv_temperature, beta=beta,
                       deterministic=opts.deterministic)
    if opts.shard is not None:
        terms = opts.shard.all_reduce_sum(terms)
    dtype = compute_dtype(hidden.dtype)
    terms = [terms[0], terms[1], stats_s.entropy]
    hard = None
    if plan.hard_targets is not None:  # the cross-entropy on the logits before the temperature
        raw = lse_forward(hidden, weight, bias, plan.hard_targets, dataclasses.replace(opts, temperature=1.0))
        terms.append(raw.lse - raw.target_logit)
        hard = HardLabels(plan.hard_targets, raw.lse, plan.hard_scale)
    grads = LinearGrads(None, None, None)
    if any(need):
        grads = LinearGrads(*(None if g is None else g.to(dtype) for g in divergence_backward(
            student, teacher, stats_s.lse, stats_t.lse, terms[1], plan.row_scale, inv_temperature=opts.inv_temperature,
            beta=beta, hard=hard, ignore_index=opts.ignore_index, vocab_start=opts.vocab_start,
            need_grad_hidden=need[0], need_grad_weight=need[1], need_grad_bias=need[2],
            deterministic=opts.deterministic)))
    return PairResult(torch.stack([t.to(dtype) for t in terms]), grads)
