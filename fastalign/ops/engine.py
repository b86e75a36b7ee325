"""The one loss engine under the fused loss ops: the log-probs (and entropy) of selected rows of the lm_head problem,
fed to a differentiable PyTorch loss, and that loss's gradient applied to ``hidden``, ``weight`` and ``bias``,
without the ``[N, V]`` logits.

A loss op gives the rows it needs (e.g. the completion tokens, pair by pair) and a ``loss_fn`` of their per-token
values; how the loss couples the rows decides the plan:

- **one pass** (torch backend, gradient needed, coupling ``"token"`` or groups that fit the chunk budget): chunks
  of whole groups; each chunk's logits are formed once and give its log-probs, the loss's gradient at its rows
  (known in the forward: the loss is a scalar, and a sum of per-group terms) and the gradients of the three
  matmuls (``linear_logprobs_fused``). The autograd backward only scales them. The loss sees one chunk's rows at
  a time (``RowValues.rows``, and ``RowValues.groups`` the range of its groups): no work of all M rows per chunk.
- **two passes** (triton, batch-level coupling, or a group too large for the budget): the statistics pass over
  all rows, the loss and its per-token gradient, then in the autograd backward the pass that recomputes the
  logits (four matmuls in all, memory O(chunk) whatever the group sizes).
- **forward only** (no gradient needed): the statistics pass and the loss.
- **compiled** (under ``torch.compile``), as registered operators (``ops.registered``) so that dynamo traces the
  whole op: where eager would take one pass, one pass (``compiled_one_pass``: per chunk ``fastalign::chunk_log_probs``,
  the loss's row gradients by ``torch.func.grad``, ``fastalign::chunk_grads``; three matmuls), otherwise two
  (``fastalign::token_stats``, the loss in plain PyTorch, then ``fastalign::logprobs_backward``; four matmuls).

Vocab parallelism (``opts.shard``) is handled below this module: the statistics are global, the gradients the
shard's. Rows that are not selected get no logits and a zero ``d hidden``.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import torch_backend
from .chunking import rows_per_chunk
from .linear import LinearOptions, logprobs_backward, lse_forward, scale_precomputed_grads
from .logprobs import token_outputs
from .registered import one_pass_chunk, registered_token_stats
from .torch_backend import RowGrads, RowStats, RowStatsSpec
from .validation import LinearInputs

GROUP_BUDGET_CHUNKS = 8
"""Whole groups may take up to this many chunk budgets: holding a group's ``[rows, V]`` logits saves a quarter of the
matmuls (three per token instead of four). 384 MiB by default: groups of up to 3k rows at V=32k."""

Coupling = Sequence[int] | str | None
"""How a loss couples its rows: ``"token"`` (a sum of per-token terms), a list of group sizes (a sum of per-group
terms over consecutive rows, e.g. pairs or sequences), or None (the whole batch, e.g. a quantile)."""


class RowValues(NamedTuple):
    """What a loss function receives: the log-probs and entropy (0 at ignored rows), differentiable, and the row
    statistics (those of ``fused_rows_loss``'s ``spec``) of the rows ``rows`` (a slice of the M; None: all M), and
    ``groups``, the range of the groups (``fused_rows_loss``'s ``coupling`` or ``groups``) those rows belong to (None
    with ``rows`` None, or without groups). Of the statistics, ``lse`` and ``logit_sum`` are differentiable (a
    z-loss, label smoothing: their gradients flow through the engine's backward, ``torch_backend.RowGrads``), the
    others detached: detach ``lse`` where it only normalizes."""

    logprobs: Tensor
    entropy: Tensor | None
    stats: RowStats | None
    rows: slice | None = None
    groups: slice | None = None


LossFn = Callable[[RowValues], Tensor]
"""``loss_fn(values) -> scalar``. In the one-pass plan it is called once per chunk on that chunk's values alone
(``values.rows``, ``values.groups`` say which): it returns the terms of those rows (coupling ``"token"``) or of those
whole groups, over the WHOLE batch's normalizers (counts known before any logit: tokens, sequences, pairs), so that
its gradient at those rows is the whole loss's; it must not form values of all M rows. Otherwise (two passes, no
gradient, the returned loss) it is called once on all M rows, ``rows`` and ``groups`` None."""


class EngineOutput(NamedTuple):
    """The loss (scalar, differentiable w.r.t. hidden, weight, bias) and the detached per-row values ``[M]``."""

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor | None
    stats: RowStats | None = None  # the row statistics (with those of ``spec``); None when no row is selected


def whole_group_chunks(group_rows: Sequence[int], vocab_size: int, chunk_size: int | None,
                       buffers: int = 1) -> list[slice] | None:
    """Row ranges of consecutive whole groups, or None when the largest group is too large (then two passes).

    With ``chunk_size``, chunks of at most that many rows. Otherwise chunks of the memory budget's rows (``buffers``
    ``[rows, V]`` fp32 temporaries: 2 with entropy), or of the largest group's rows when it is larger but within
    ``GROUP_BUDGET_CHUNKS`` budgets. Empty groups are allowed.
    """
    total, largest = sum(group_rows), max([0, *group_rows])  # max(..., default=0): not traced by dynamo
    limit = rows_per_chunk(max(total, 1), vocab_size, chunk_size=chunk_size, buffers=buffers)
    if chunk_size is None and largest <= GROUP_BUDGET_CHUNKS * limit:
        limit = max(limit, largest)
    if largest > limit:
        return None
    chunks, start, end = [], 0, 0
    for rows in group_rows:
        if end + rows - start > limit:
            chunks.append(slice(start, end))
            start = end
        end += rows
    if end > start:
        chunks.append(slice(start, end))
    return chunks


def _loss_and_grads(loss_fn: LossFn, logprobs: Tensor, entropy: Tensor | None, stats: RowStats | None,
                    valid: Tensor, rows: slice | None = None, groups: slice | None = None) -> tuple[Tensor, RowGrads]:
    """The loss of ``RowValues(logprobs, entropy, stats, rows, groups)`` and its gradients w.r.t. the log-probs, the
    entropy, the lse and the sum of logits (None when the loss does not use them; the log-probs' always a tensor),
    0 at ignored rows (``valid``)."""
    def leaf(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().requires_grad_(True)

    with torch.enable_grad():
        leaves = [leaf(logprobs), leaf(entropy)]
        if stats is not None:
            leaves += [leaf(stats.lse), leaf(stats.logit_sum)]
            stats = stats._replace(lse=leaves[2], logit_sum=leaves[3])
        loss = loss_fn(RowValues(leaves[0], leaves[1], stats, rows, groups))
        used = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, used, allow_unused=True) if loss.requires_grad else [None] * len(used)
    found = iter(grads)
    grads = [None if t is None else next(found) for t in leaves]
    grads = [None if g is None else torch.where(valid, g, 0.0) for g in grads]
    if grads[0] is None:  # the loss does not depend on the log-probs
        grads[0] = torch.zeros_like(valid, dtype=logprobs.dtype)
    return loss.detach(), RowGrads(*grads)


class GroupIndex(NamedTuple):
    """The first row of each group (python ints), to name the groups of a chunk of rows without a device sync."""

    starts: list[int]

    @classmethod
    def of(cls, group_rows: Sequence[int] | None) -> GroupIndex | None:
        return None if group_rows is None else cls(list(itertools.accumulate(group_rows, initial=0))[:-1])

    def of_rows(self, rows: slice) -> slice:
        """The groups holding rows ``rows`` (those of none in between included): the last group starting at or
        before ``rows.start`` (a non-empty one) to the last starting before ``rows.stop``."""
        return slice(self._count(lambda start: start <= rows.start) - 1, self._count(lambda start: start < rows.stop))

    def _count(self, before: Callable[[int], bool]) -> int:
        """How many of the sorted starts satisfy ``before`` (true on a prefix): a binary search in plain Python,
        which ``torch.compile`` traces (the C ``bisect`` it cannot)."""
        low, high = 0, len(self.starts)
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if before(self.starts[middle]) else (low, middle)
        return low


class _Plan(NamedTuple):
    """What the autograd function needs besides the tensors it differentiates."""

    rows: Tensor | None  # [M] selected flat rows, None: all
    targets: Tensor  # [M] targets of the selected rows
    loss_fn: LossFn
    chunks: list[slice] | str | None  # one pass over these chunks ("token": any), None: two passes
    groups: GroupIndex | None  # the groups the loss names chunks by (``RowValues.groups``)
    spec: RowStatsSpec  # the statistics to compute (entropy: for the loss or the metrics)
    opts: LinearOptions
    outputs: list  # filled by the forward: [logprobs, entropy, stats]

    @property
    def with_entropy(self) -> bool:
        return self.spec.entropy


class _EngineLoss(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, plan) -> loss``; the detached per-row values go to
    ``plan.outputs``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan):
        need = dict(zip(("need_hidden", "need_weight", "need_bias"), ctx.needs_input_grad[:3]))
        opts, targets = plan.opts, plan.targets
        rows_hidden = hidden if plan.rows is None else hidden[plan.rows]
        valid = targets != opts.ignore_index
        ctx.plan, ctx.need, ctx.hidden_shape = plan, need, hidden.shape
        ctx.grad_shapes = (rows_hidden.shape, weight.shape, None if bias is None else bias.shape)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        ctx.one_pass = plan.chunks is not None
        if targets.numel() == 0:  # nothing selected: the loss of no rows, zero gradients
            empty = hidden.new_zeros(0, dtype=torch_backend.compute_dtype(hidden.dtype))
            with torch.no_grad():
                loss = plan.loss_fn(RowValues(empty, empty if plan.with_entropy else None, None))
            ctx.one_pass, ctx.present = True, [False, False, False]
            plan.outputs[:] = [empty, empty if plan.with_entropy else None, None]
            return loss.detach()
        if ctx.one_pass:
            def token_grads(rows: slice, lp: Tensor, ent: Tensor | None, stats: RowStats) -> RowGrads:
                groups = None if plan.groups is None else plan.groups.of_rows(rows)
                return _loss_and_grads(plan.loss_fn, lp, ent, stats, valid[rows], rows, groups)[1]

            out = torch_backend.linear_logprobs_fused(
                rows_hidden, weight, bias, targets, token_grads, **opts.logit_args,
                ignore_index=opts.ignore_index, spec=plan.spec,
                need_grad_hidden=need["need_hidden"],
                need_grad_weight=need["need_weight"], need_grad_bias=need["need_bias"], chunk_size=opts.chunk_size,
                chunks=None if plan.chunks == "token" else plan.chunks, shard=opts.shard,
                deterministic=opts.deterministic)
            grads = opts.finish_grads(out.grads)
            ctx.present = [g is not None for g in grads]
            ctx.save_for_backward(*(g for g in grads if g is not None))
            with torch.no_grad():
                loss = plan.loss_fn(RowValues(out.logprobs, out.entropy, out.stats))
            plan.outputs[:] = [out.logprobs, out.entropy, out.stats]
        else:
            stats = lse_forward(rows_hidden, weight, bias, targets, opts, spec=plan.spec)
            logprobs, entropy = token_outputs(stats, valid, plan.with_entropy)
            loss, grads = _loss_and_grads(plan.loss_fn, logprobs, entropy, stats, valid)
            ctx.grad_present = [g is not None for g in grads]
            saved_rows = () if plan.rows is None else (plan.rows,)
            ctx.save_for_backward(hidden, weight, bias, *stats_tensors(stats), *(g for g in grads if g is not None),
                                  *saved_rows)
            plan.outputs[:] = [logprobs, entropy, stats]
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        plan, saved = ctx.plan, list(ctx.saved_tensors)
        if ctx.one_pass:
            grads = _precomputed_grads(ctx, saved, grad_loss)
        else:
            hidden, weight, bias = saved[:3]
            rows = saved.pop() if plan.rows is not None else None
            stats = RowStats(saved[3], saved[4], saved[5] if saved[5].numel() else None)
            upstream = iter(saved[6:])
            row_grads = RowGrads(*(next(upstream) * grad_loss if present else None for present in ctx.grad_present))
            rows_hidden = hidden if rows is None else hidden[rows]
            grads = logprobs_backward(rows_hidden, weight, bias, plan.targets, stats, row_grads.logprobs,
                                      row_grads.entropy, plan.opts, **ctx.need, grad_lse=row_grads.lse,
                                      grad_logit_sum=row_grads.logit_sum)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes)]
        if grads[0] is not None and plan.rows is not None:  # scatter the selected rows' gradient back
            grads[0] = grads[0].new_zeros(ctx.hidden_shape).index_copy_(0, plan.rows, grads[0])
        return grads[0], grads[1], grads[2], None


def _precomputed_grads(ctx, saved: list[Tensor], grad_loss: Tensor) -> list[Tensor | None]:
    """The gradients a one-pass forward saved (``ctx.present`` says which), times ``grad_loss``; zeros of
    ``ctx.grad_shapes`` for those needed but not formed."""
    grads = scale_precomputed_grads([saved.pop(0) if present else None for present in ctx.present], grad_loss)
    return [grad_loss.new_zeros(shape) if g is None and need else g
            for g, shape, need in zip(grads, ctx.grad_shapes, ctx.needs_input_grad[:3])]


class PairPlan(NamedTuple):
    """A loss of two heads over one vocabulary (``fused_pair_loss``): the frozen head and the loss's pieces."""

    other: tuple[Tensor, Tensor, Tensor | None]  # hidden [N, H'], weight [V, H'], bias [V] | None, detached
    block_fn: torch_backend.PairBlock
    row_scale: Tensor  # [N]: the loss is sum_n row_scale[n] terms[0, n] (+ the hard-target part)
    hard_targets: Tensor | None  # [N]
    hard_scale: Tensor | None  # [N], 0 at ignored targets
    opts: LinearOptions  # the trained head's
    other_opts: LinearOptions  # the frozen head's logit transform (the same temperature)
    outputs: list  # filled by the forward: [terms [k, N]]
    triton_pass: Callable | None = None  # backend "triton": (hidden, weight, bias, plan, need) -> PairResult


class _PairLoss(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, plan) -> loss``, one pass over both heads; the per-row
    terms go to ``plan.outputs``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: PairPlan):
        opts = plan.opts
        need = ctx.needs_input_grad[:3]
        ctx.grad_shapes = (hidden.shape, weight.shape, None if bias is None else bias.shape)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        other_hidden, other_weight, other_bias = plan.other
        if opts.backend == "triton":
            out = plan.triton_pass(hidden, weight, bias, plan, need)
        else:
            out = torch_backend.linear_pair_fused(
                hidden, torch_backend.linear_head(weight, bias, opts.logit_args), other_hidden,
                torch_backend.linear_head(other_weight, other_bias, plan.other_opts.logit_args), plan.block_fn,
                plan.row_scale, hard_targets=plan.hard_targets, hard_scale=plan.hard_scale,
                ignore_index=opts.ignore_index, need_grad_hidden=need[0], need_grad_weight=need[1],
                need_grad_bias=need[2], chunk_size=opts.chunk_size, shard=opts.shard,
                deterministic=opts.deterministic)
        grads = opts.finish_grads(out.grads)
        ctx.present = [g is not None for g in grads]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        loss = (plan.row_scale * out.terms[0]).sum()
        if plan.hard_targets is not None:
            loss = loss + (plan.hard_scale * out.terms[-1]).sum()
        plan.outputs[:] = [out.terms]
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grads = _precomputed_grads(ctx, list(ctx.saved_tensors), grad_loss)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes)]
        return grads[0], grads[1], grads[2], None


def fused_pair_loss(inputs: LinearInputs, plan: PairPlan) -> tuple[Tensor, Tensor]:
    """A loss of two heads of the same rows over one vocabulary: ``inputs`` the trained head (``targets`` unused),
    ``plan.other`` the frozen one. Returns the loss (differentiable w.r.t. ``inputs.hidden``, ``weight``, ``bias``)
    and the detached per-row terms ``[k, N]`` (``torch_backend.linear_pair_fused``, one pass; triton:
    ``plan.triton_pass``)."""
    loss = _PairLoss.apply(inputs.hidden, inputs.weight, inputs.bias, plan)
    return loss, plan.outputs[0]


def stats_tensors(stats: RowStats) -> tuple[Tensor, Tensor, Tensor]:
    """The row statistics as three tensors for ``save_for_backward`` (a missing entropy as an empty one)."""
    entropy = stats.entropy if stats.entropy is not None else stats.lse.new_empty(0)
    return stats.lse, stats.target_logit, entropy


def fused_rows_loss(inputs: LinearInputs, opts: LinearOptions, loss_fn: LossFn, *, rows: Tensor | None = None,
                    coupling: Coupling = "token", groups: Sequence[int] | None = None,
                    spec: RowStatsSpec = RowStatsSpec()) -> EngineOutput:
    """The loss ``loss_fn`` of the per-token values of rows ``rows`` of the lm_head problem ``inputs``.

    Args:
        inputs, opts: the validated lm_head problem (``hidden [N, H]`` flat) and its options (``prepare_linear``).
        loss_fn: ``RowValues -> scalar``, differentiable in the log-probs and entropy (see ``LossFn``).
        rows: ``[M]`` int64 flat rows to compute, in the order the loss wants them (groups consecutive); None: all
            ``N`` rows in order.
        coupling: ``"token"``, a list of group sizes in row order (summing to M), or None (see ``Coupling``).
        groups: with coupling ``"token"``, group sizes (summing to M) by which ``values.groups`` names a chunk's
            rows (a chunk may then hold a group in part); with a list ``coupling``, that list.
        spec: the row statistics to compute in the same pass: ``entropy`` (``values.entropy``, for the loss or only
            for the metrics) and ``lse2``, ``logit_sum``, ``argmax`` (``values.stats``, detached, for the loss; and
            ``EngineOutput.stats`` for the metrics).

    Returns:
        ``EngineOutput(loss, logprobs [M], entropy [M] | None, stats)``: the loss differentiable w.r.t.
        ``inputs.hidden``, ``inputs.weight`` and ``inputs.bias``; the per-row values detached (fp32, float64 for
        float64 inputs).
    """
    hidden, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    group_index = GroupIndex.of(coupling if coupling not in ("token", None) else groups)
    if torch.compiler.is_compiling():
        count = inputs.targets.shape[0] if rows is None else rows.shape[0]
        chunks = None
        if needs_grad and opts.backend == "torch" and opts.shard is None and not opts.deterministic and count:
            chunks = _one_pass_chunks(count, coupling, weight.shape[0], opts)
        if chunks is None:
            return registered_rows_loss(inputs, opts, loss_fn, rows=rows, spec=spec)
        return compiled_one_pass(inputs, opts, loss_fn, rows=rows, chunks=chunks, groups=group_index, spec=spec)
    targets = inputs.targets if rows is None else inputs.targets[rows]
    if not needs_grad:
        stats = lse_forward(hidden if rows is None else hidden[rows], weight, bias, targets, opts, spec=spec)
        logprobs, entropy = token_outputs(stats, targets != opts.ignore_index, spec.entropy)
        with torch.no_grad():
            loss = loss_fn(RowValues(logprobs, entropy, stats))
        return EngineOutput(loss, logprobs, entropy, stats)
    chunks = None
    if opts.backend == "torch" and targets.numel() > 0:
        width = weight.shape[0] if opts.shard is None else opts.shard.widest_shard
        chunks = "token" if coupling == "token" else _group_chunks(coupling, width, opts)
    plan = _Plan(rows, targets, loss_fn, chunks, group_index, spec, opts, [])
    loss = _EngineLoss.apply(hidden, weight, bias, plan)
    return EngineOutput(loss, *plan.outputs)


def _group_chunks(coupling: Coupling, width: int, opts: LinearOptions) -> list[slice] | None:
    """The one pass's chunks of whole groups for a list ``coupling`` (vocabulary ``width`` columns), None where it
    takes two passes (batch coupling, a group too large). One ``[rows, V]`` buffer: the one pass forms p in place of
    log p unless the entropy itself is trained (and one for the softcap's derivative)."""
    if coupling is None:
        return None
    return whole_group_chunks(list(coupling), width, opts.chunk_size, buffers=1 if opts.logit_softcap is None else 2)


def _one_pass_chunks(count: int, coupling: Coupling, vocab_size: int, opts: LinearOptions) -> list[slice] | None:
    """The chunks of the compiled one-pass plan over ``count`` rows (``linear_logprobs_fused``'s for coupling
    ``"token"``, else ``_group_chunks``)."""
    if coupling != "token":
        return _group_chunks(coupling, vocab_size, opts)
    step = rows_per_chunk(count, vocab_size, chunk_size=opts.chunk_size, buffers=1 if opts.logit_softcap is None else 2)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def compiled_one_pass(inputs: LinearInputs, opts: LinearOptions, loss_fn: LossFn, *, rows: Tensor | None,
                      chunks: list[slice], groups: GroupIndex | None, spec: RowStatsSpec) -> EngineOutput:
    """``fused_rows_loss``'s one-pass plan under ``torch.compile`` (three matmuls per row, as eager): per chunk the
    registered ``fastalign::chunk_log_probs``, the loss's gradients at the chunk's rows by ``torch.func.grad`` of
    ``loss_fn`` on them (traced, the one-pass contract of ``LossFn``), then ``fastalign::chunk_grads`` while the
    chunk's ``log p`` lives. The loss returned is ``loss_fn`` on all rows (not differentiated, as in eager) plus,
    for ``hidden``, ``weight`` and ``bias``, a term of value 0 whose gradient is the one formed in the chunks."""
    hidden, targets, weight, bias = inputs.hidden, inputs.targets, inputs.weight, inputs.bias
    if rows is not None:
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    detached = (hidden.detach(), weight.detach(), None if bias is None else bias.detach())
    dtype = torch_backend.compute_dtype(weight.dtype)
    d_weight = weight.new_zeros(weight.shape if need[1] else (0,), dtype=dtype)  # the chunks add theirs
    parts = []
    for chunk in chunks:
        def row_grads_of(logprobs, entropy, stats, chunk=chunk):
            return _traced_row_grads(loss_fn, RowValues(logprobs, entropy, stats, chunk,
                                                        None if groups is None else groups.of_rows(chunk)))

        parts.append(one_pass_chunk(detached[0][chunk], *detached[1:], targets[chunk], opts, spec, need[0], d_weight,
                                    need[2], row_grads_of))
    logprobs = torch.cat([part[0] for part in parts])
    entropy = torch.cat([part[1] for part in parts]) if spec.entropy else None
    stats = RowStats(*(None if field[0] is None else torch.cat(field) for field in zip(*(part[2] for part in parts))))
    with torch.no_grad():
        loss = loss_fn(RowValues(logprobs, entropy, stats))
    grads = (torch.cat([part[3][0] for part in parts]) if need[0] else None, d_weight if need[1] else None,
             sum(part[3][1] for part in parts) if need[2] else None)
    for leaf, grad in zip((hidden, weight, bias), grads):
        if grad is not None:
            carrier = (leaf.to(grad.dtype) * grad).sum()
            loss = loss + (carrier - carrier.detach())
    return EngineOutput(loss, logprobs, entropy, stats)


def _traced_row_grads(loss_fn: LossFn, values: RowValues) -> RowGrads:
    """``loss_fn``'s gradients w.r.t. the log-probs, the entropy, the lse and the sum of logits of a chunk's
    ``values`` (``torch.func.grad``, traced under compile; 0 for values the loss does not use; the chunk op drops
    the ignored rows)."""
    stats = values.stats
    leaves = [values.logprobs, values.entropy, stats.lse, stats.logit_sum]
    present = [k for k, leaf in enumerate(leaves) if leaf is not None]

    def chunk_loss(*args):
        filled = list(leaves)
        for k, arg in zip(present, args):
            filled[k] = arg
        return loss_fn(values._replace(logprobs=filled[0], entropy=filled[1],
                                       stats=stats._replace(lse=filled[2], logit_sum=filled[3])))

    grads = torch.func.grad(chunk_loss, argnums=tuple(range(len(present))))(*(leaves[k] for k in present))
    found = dict(zip(present, grads))
    return RowGrads(*(found.get(k) for k in range(4)))


def registered_rows_loss(inputs: LinearInputs, opts: LinearOptions, loss_fn: LossFn, *, rows: Tensor | None,
                         spec: RowStatsSpec) -> EngineOutput:
    """``fused_rows_loss``'s compiled plan: the registered statistics op on the rows, ``loss_fn`` on its
    differentiable log-probs and entropy, autograd through the registered backward (``ops.registered``)."""
    hidden, targets = inputs.hidden, inputs.targets
    if rows is not None:
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    logprobs, entropy, stats = registered_token_stats(hidden, inputs.weight, inputs.bias, targets, opts, spec)
    loss = loss_fn(RowValues(logprobs, entropy, stats))
    return EngineOutput(loss, logprobs.detach(), None if entropy is None else entropy.detach(),
                        RowStats(*(None if t is None else t.detach() for t in stats)))
