"""Fused DPO loss from hidden states: per-sequence log-prob sums reduced inside the pass over the tokens, the DPO loss
of those sums (``fastalign.objectives.dpo``), and its gradient applied to every token of each sequence.

Layout: ``hidden [2B, T, H]`` and ``targets [2B, T]`` hold the chosen responses of B pairs, then the rejected ones.
Only response tokens (target != ignore_index) are kept, gathered pair by pair (chosen b, then rejected b): prompt
and padding rows cost no logits at all, and they would get a zero gradient anyway.

A token's gradient weight is ``d loss / d its sequence's sum``, known only once its whole pair has been seen. Two
strategies, chosen per batch (``whole_pair_chunks``):

- whole pairs per chunk (torch backend, when the largest pair's ``[rows, V]`` logits fit ``PAIR_BUDGET_CHUNKS``
  chunk budgets, or ``chunk_size`` when given): the weight is known in the chunk that computes the logits, so one
  pass of three matmuls (``linear_logprobs_fused``);
- two passes (triton backend, or a pair too large): the log-sum-exp pass over all tokens, the loss on the ``[2B]``
  sums, then the backward pass that recomputes the logits: four matmuls, memory O(chunk) however long a pair is.

With whole pairs the gradient is formed in the autograd forward and only scaled in the backward; with two passes
the second pass is the backward, each token's upstream gradient being ``d loss / d its sequence's sum``. The
segment reduction of the per-token log-probs into sequence sums is done inside the pass: on the triton backend by
the DPO epilogue kernel (atomics into the ``[2B]`` sums, no ``[M]`` log-prob round trip), on the torch backend
in PyTorch (``index_add_``, per chunk with whole pairs), ``M`` the number of response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.dpo import DPOOptions, DPOResult, dpo_loss, dpo_metrics, rpo_nll
from . import torch_backend
from .chunking import rows_per_chunk
from .linear import LinearOptions, logprobs_backward, lse_forward, scale_precomputed_grads, triton_dpo_sequence_sums
from .torch_backend import LinearGrads, RowStats, compute_dtype
from .validation import FLOAT_DTYPES, LinearInputs, require_finite, require_same_device, require_shape, require_tensor


@dataclass(frozen=True)
class DPOConfig:
    """The DPO loss options, how a sequence's token log-probs are reduced (sum, or mean with ``average_log_prob``),
    and the normalizers of the whole accumulated batch: ``num_pairs`` divides the sum of the pair losses (default
    this batch's B), ``num_chosen_tokens`` the RPO NLL (default this batch's chosen response tokens)."""

    options: DPOOptions
    average_log_prob: bool
    num_pairs: int | Tensor | None = None
    num_chosen_tokens: int | Tensor | None = None


class PairBatch(NamedTuple):
    """The response tokens of a ``[2B, T]`` batch, gathered pair by pair, and the per-sequence constants.

    Sequences are numbered ``0 .. 2B-1`` as the rows of the batch: chosen ``b`` is ``b``, rejected ``b`` is ``B + b``.
    """

    index: Tensor  # [M] flat row (in [0, 2B*T)) of each response token, pair by pair
    seq_ids: Tensor  # [M] sequence of each response token
    counts: Tensor  # [2B] response tokens per sequence (compute dtype)
    ref_logps: Tensor | None  # [2B] reference log-probs (sums or means, as the policy's), None if reference-free

    @classmethod
    def of(cls, targets: Tensor, ignore_index: int, dtype: torch.dtype) -> PairBatch:
        """From ``targets [2B, T]``, without reference log-probs yet."""
        rows, length = targets.shape
        valid = (targets != ignore_index).reshape(-1)
        pair_order = torch.arange(rows * length, device=targets.device).view(2, rows // 2, length).transpose(0, 1)
        pair_order = pair_order.reshape(-1)
        index = pair_order[valid[pair_order]]
        counts = valid.view(rows, length).sum(dim=1).to(dtype)
        return cls(index, torch.div(index, length, rounding_mode="floor"), counts, None)

    @property
    def num_pairs(self) -> int:
        return self.counts.shape[0] // 2

    def pair_rows(self) -> list[int]:
        """Response tokens per pair (chosen + rejected), in gathered order, on the host."""
        b = self.num_pairs
        return (self.counts[:b] + self.counts[b:]).long().tolist()

    def sums(self, logprobs: Tensor) -> Tensor:
        """Per-sequence sums ``[2B]`` of the token log-probs ``[M]`` (the segment reduction)."""
        return torch.zeros_like(self.counts).index_add_(0, self.seq_ids, logprobs.to(self.counts.dtype))

    def loss(self, sums: Tensor, config: DPOConfig) -> tuple[DPOResult, Tensor]:
        """The DPO result of the sequence sums ``[2B]``, and the per-sequence log-probs ``[2B]`` it was given.

        A sequence without response tokens has log-prob 0 (its mean too); the RPO term is the NLL of the chosen
        tokens over ``config.num_chosen_tokens`` or this batch's chosen tokens (0 when there is none).
        """
        b = self.num_pairs
        logps = sums / self.counts.clamp(min=1) if config.average_log_prob else sums
        nll = None
        if config.options.rpo_alpha is not None:
            num_tokens = config.num_chosen_tokens
            if num_tokens is None:
                num_tokens = self.counts[:b].sum().clamp(min=1)
            nll = rpo_nll(sums[:b], self.counts[:b], num_tokens=num_tokens)
        ref = (None, None) if self.ref_logps is None else (self.ref_logps[:b], self.ref_logps[b:])
        result = dpo_loss(logps[:b], logps[b:], *ref, config.options, chosen_nll=nll, num_pairs=config.num_pairs)
        return result, logps

    def sum_grads(self, sums: Tensor, config: DPOConfig) -> Tensor:
        """``d loss / d sums`` ``[2B]``: the gradient weight of every token of each sequence."""
        with torch.enable_grad():
            leaf = sums.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(leaf, config)[0].loss, leaf)
        return grad


PAIR_BUDGET_CHUNKS = 8
"""Whole pairs may take up to this many chunk budgets: holding a pair's ``[tokens, V]`` logits saves a quarter of
the policy's matmuls (three per token instead of four). 384 MiB by default: pairs of up to 3k response tokens
(chosen + rejected) at V=32k."""


def whole_pair_chunks(pair_rows: list[int], vocab_size: int, chunk_size: int | None) -> list[slice] | None:
    """Row ranges of consecutive whole pairs, or None when the largest pair is too large (then two passes).

    With ``chunk_size``, chunks of at most that many rows. Otherwise chunks of the memory budget's rows (one
    ``[rows, V]`` fp32 buffer), or of the largest pair's rows when it is larger but within ``PAIR_BUDGET_CHUNKS``
    budgets.
    """
    largest = max(pair_rows)
    limit = rows_per_chunk(sum(pair_rows), vocab_size, chunk_size=chunk_size, buffers=1)
    if chunk_size is None and largest <= PAIR_BUDGET_CHUNKS * limit:
        limit = max(limit, largest)
    if largest > limit:
        return None
    chunks, start, end = [], 0, 0
    for rows in pair_rows:
        if end + rows - start > limit:
            chunks.append(slice(start, end))
            start = end
        end += rows
    return chunks + [slice(start, end)]


def whole_pair_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, batch: PairBatch,
                    config: DPOConfig, chunks: list[slice], opts: LinearOptions,
                    need: dict[str, bool]) -> tuple[Tensor, LinearGrads]:
    """Sequence sums ``[2B]`` and the loss gradients in one pass over ``chunks`` of whole pairs of the gathered
    response rows ``hidden [M, H]`` (torch backend): three matmuls per chunk."""
    sums = torch.zeros_like(batch.counts)

    def token_grads(rows: slice, logprobs: Tensor, _entropy) -> tuple[Tensor, None]:
        seq = batch.seq_ids[rows]
        sums.index_add_(0, seq, logprobs)
        # The loss is a sum of per-pair terms (the RPO term is linear in the chosen sums), so the gradient at this
        # chunk's pairs, whose sums are complete, does not depend on the partial sums of the pairs still to come.
        return batch.sum_grads(sums, config)[seq], None

    out = torch_backend.linear_logprobs_fused(
        hidden, weight, bias, targets, token_grads, inv_temperature=opts.inv_temperature,
        ignore_index=opts.ignore_index, need_grad_hidden=need["need_hidden"], need_grad_weight=need["need_weight"],
        need_grad_bias=need["need_bias"], chunks=chunks, shard=opts.shard)
    return sums, opts.finish_grads(out.grads)


def sequence_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, batch: PairBatch,
                   opts: LinearOptions) -> tuple[Tensor, RowStats]:
    """Sequence sums ``[2B]`` and the row statistics of the gathered response rows ``hidden [M, H]``: one matmul."""
    if opts.backend == "triton":  # the segment reduction inside the epilogue kernel (atomics into [2B])
        sums, stats = triton_dpo_sequence_sums(hidden, weight, bias, targets, batch.seq_ids, batch.counts.shape[0],
                                               opts)
        return sums.to(batch.counts.dtype), stats
    stats = lse_forward(hidden, weight, bias, targets, opts, with_entropy=False)
    return batch.sums(stats.target_logit - stats.lse), stats


class LinearDPO(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, targets [N], batch, config, opts, chunks)
    -> (loss, sums [2B])``.

    ``N = 2B*T`` flat rows, of which only the response rows ``batch.index`` are computed; ``sums`` is detached.
    With ``chunks`` of whole pairs: the gradients are formed in the forward and scaled in the backward. Without
    (two passes): the forward is the log-sum-exp pass; the backward recomputes the logits, each token's upstream
    gradient being ``grad_loss * d loss / d its sequence's sum``.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, batch: PairBatch,
                config: DPOConfig, opts: LinearOptions, chunks: list[slice] | None):
        ctx.need = dict(zip(("need_hidden", "need_weight", "need_bias"), ctx.needs_input_grad[:3]))
        ctx.opts, ctx.hidden_shape, ctx.input_dtypes = opts, hidden.shape, (hidden.dtype, weight.dtype, weight.dtype)
        rows_hidden, rows_targets = hidden[batch.index], targets[batch.index]
        ctx.whole_pairs = chunks is not None
        if ctx.whole_pairs:
            sums, grads = whole_pair_pass(rows_hidden, weight, bias, rows_targets, batch, config, chunks, opts,
                                          ctx.need)
            ctx.present = [g is not None for g in grads]
            ctx.save_for_backward(batch.index, *(g for g in grads if g is not None))
        else:
            sums, stats = sequence_logps(rows_hidden, weight, bias, rows_targets, batch, opts)
            grad_logprobs = batch.sum_grads(sums, config)[batch.seq_ids]
            ctx.save_for_backward(batch.index, hidden, weight, bias, targets, *stats[:2], grad_logprobs)
        ctx.mark_non_differentiable(sums)
        return batch.loss(sums, config)[0].loss, sums

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_sums):
        index, *saved = ctx.saved_tensors
        if ctx.whole_pairs:
            saved = iter(saved)
            grads = scale_precomputed_grads([next(saved) if present else None for present in ctx.present],
                                            grad_loss)
        else:
            hidden, weight, bias, targets, lse, target_logit, grad_logprobs = saved
            grads = logprobs_backward(hidden[index], weight, bias, targets[index], RowStats(lse, target_logit, None),
                                      grad_logprobs * grad_loss, None, ctx.opts, **ctx.need)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes)]
        if grads[0] is not None:  # scatter the response rows' gradient back; prompt and padding rows get 0
            grads[0] = grads[0].new_zeros(ctx.hidden_shape).index_copy_(0, index, grads[0])
        return (*grads, None, None, None, None, None)


class DPOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_dpo_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    chosen_rewards: Tensor  # [B] beta * (policy - reference), detached
    rejected_rewards: Tensor  # [B]
    chosen_logps: Tensor  # [B] per-sequence sums (means with average_log_prob), detached
    rejected_logps: Tensor  # [B]
    metrics: dict[str, Tensor]  # detached scalars, TRL names


def fused_dpo_loss(inputs: LinearInputs, opts: LinearOptions, config: DPOConfig,
                   reference: LinearInputs | Tensor | None) -> DPOLossOutput:
    """The fused DPO loss on validated inputs (``inputs.lead_shape == (2B, T)``).

    reference: the reference lm_head problem (computed here, no gradient), the reference log-probs ``[2B]``
    (chosen then rejected, as the policy's: sums or means), or None (reference-free).
    """
    dtype = compute_dtype(inputs.hidden.dtype)
    batch = PairBatch.of(inputs.targets.view(inputs.lead_shape), opts.ignore_index, dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (inputs.hidden, inputs.weight, inputs.bias))
    chunks = None
    if needs_grad and opts.backend == "torch" and batch.index.numel() > 0:
        # Sized from the widest vocabulary shard with a group: every rank must choose the same chunks.
        width = inputs.weight.shape[0] if opts.shard is None else opts.shard.widest_shard
        chunks = whole_pair_chunks(batch.pair_rows(), width, opts.chunk_size)
    # With whole pairs, the forward-only passes may take chunks as large: that memory is spent anyway (and large
    # chunks run faster).
    forward_opts = opts if chunks is None else replace(opts, chunk_size=max(c.stop - c.start for c in chunks))
    if isinstance(reference, LinearInputs):
        with torch.no_grad():
            ref_sums = sequence_logps(reference.hidden[batch.index], reference.weight, reference.bias,
                                      reference.targets[batch.index], batch, forward_opts)[0]
        reference = ref_sums / batch.counts.clamp(min=1) if config.average_log_prob else ref_sums
    batch = batch._replace(ref_logps=None if reference is None else reference.to(dtype))
    if needs_grad:
        loss, sums = LinearDPO.apply(inputs.hidden, inputs.weight, inputs.bias, inputs.targets, batch, config, opts,
                                     chunks)
    else:
        sums = sequence_logps(inputs.hidden[batch.index], inputs.weight, inputs.bias, inputs.targets[batch.index],
                              batch, opts)[0]
    with torch.no_grad():
        result, logps = batch.loss(sums, config)
        metrics = dpo_metrics(result, logps[:batch.num_pairs], logps[batch.num_pairs:])
    b = batch.num_pairs
    return DPOLossOutput(loss if needs_grad else result.loss, result.chosen_rewards, result.rejected_rewards,
                         logps[:b], logps[b:], metrics)


def validate_pair_layout(hidden, targets) -> None:
    """``hidden [2B, T, H]`` and ``targets [2B, T]``: B chosen then B rejected sequences of T tokens."""
    hidden = require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape [2B, T, H] (B chosen then B rejected sequences), "
                         f"got {tuple(hidden.shape)}")
    rows, length = hidden.shape[:2]
    if rows % 2 or length == 0:
        raise ValueError(f"hidden: expected an even number 2B >= 2 of sequences (B chosen then B rejected) of "
                         f"T >= 1 tokens, got shape {tuple(hidden.shape)}")
    require_shape("targets", require_tensor("targets", targets), (rows, length),
                  f"[2B, T], the leading dimensions of hidden {tuple(hidden.shape)}")


def validate_reference(inputs: LinearInputs, opts: LinearOptions, config: DPOConfig, *, ref_chosen_logps,
                       ref_rejected_logps, ref_hidden, ref_weight, ref_bias,
                       check_finite: bool) -> LinearInputs | Tensor | None:
    """The reference of the DPO op: precomputed log-probs ``[2B]``, a reference lm_head problem, or None."""
    precomputed = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    computed = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
    given = [name for name, value in {**precomputed, **computed}.items() if value is not None]
    if config.options.reference_free:
        if given:
            raise ValueError(f"{given[0]}: expected None with reference_free=True (reference log-probs are taken "
                             f"as 0), got a tensor")
        return None
    if not given:
        raise ValueError("ref_chosen_logps: expected the reference log-probs [B] (with ref_rejected_logps), or "
                         "ref_hidden and ref_weight to compute them, or reference_free=True; got None")
    if any(name in precomputed for name in given) and any(name in computed for name in given):
        raise ValueError(f"ref_hidden: expected either precomputed ref_chosen_logps/ref_rejected_logps or "
                         f"ref_hidden/ref_weight(/ref_bias), not both; got {', '.join(given)}")
    b = inputs.lead_shape[0] // 2
    if given[0] in precomputed:
        for name, value in precomputed.items():
            if value is None:
                raise ValueError(f"{name}: required with {given[0]} (precomputed reference), got None")
            require_tensor(name, value, dtypes=FLOAT_DTYPES)
            require_shape(name, value, (b,), "one log-prob per pair, B = hidden.shape[0] // 2")
            require_same_device(inputs.hidden, **{name: value})
            if check_finite:
                require_finite(name, value)
        return torch.cat([ref_chosen_logps.detach(), ref_rejected_logps.detach()])
    for name in ("ref_hidden", "ref_weight"):
        if computed[name] is None:
            raise ValueError(f"{name}: required with {given[0]} (reference computed here), got None")
    ref_hidden = require_tensor("ref_hidden", ref_hidden, dtypes=FLOAT_DTYPES)
    require_shape("ref_hidden", ref_hidden, (*inputs.lead_shape, inputs.hidden.shape[1]), "the shape of hidden")
    ref_weight = require_tensor("ref_weight", ref_weight)
    require_shape("ref_weight", ref_weight, tuple(inputs.weight.shape), "the shape of weight")
    for name, value in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if value is not None and require_tensor(name, value).dtype != ref_hidden.dtype:
            raise TypeError(f"{name}: expected dtype {ref_hidden.dtype} (the dtype of ref_hidden), got {value.dtype}")
    if ref_bias is not None:
        require_shape("ref_bias", ref_bias, (inputs.weight.shape[0],), "one entry per row of ref_weight")
    if opts.backend == "triton" and ref_hidden.dtype == torch.float64:
        raise TypeError("ref_hidden: backend='triton' takes float32, float16 or bfloat16 inputs, got torch.float64")
    require_same_device(inputs.hidden, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    if check_finite:  # a shared lm_head was checked as weight and bias already
        for name, value, policy in (("ref_hidden", ref_hidden, None), ("ref_weight", ref_weight, inputs.weight),
                                    ("ref_bias", ref_bias, inputs.bias)):
            if value is not policy:
                require_finite(name, value)
    return LinearInputs(ref_hidden.detach().reshape(inputs.hidden.shape), ref_weight.detach(),
                        None if ref_bias is None else ref_bias.detach(), inputs.targets, inputs.lead_shape)
