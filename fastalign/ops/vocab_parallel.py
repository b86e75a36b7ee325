"""Vocab-parallel lm_head (tensor parallelism): this rank's shard of the vocabulary, and the all-reduce merge of the
per-row statistics that gives every rank those of the whole vocabulary.

With a process group of P ranks, rank r holds the contiguous rows ``vocab_start .. vocab_start + V_r - 1`` of the
lm_head weight ``[V, H]`` (shards may be uneven) and the same hidden states ``[N, H]`` as every other rank. Then:

1. the row statistics of this shard's logits are merged across the group by ``VocabShard.all_reduce_stats`` (a
   MAX all-reduce of the lse, then one SUM all-reduce of the rescaled terms), so the log-probs, entropy, loss and
   metrics are identical on every rank and equal to the unsharded op's: after the whole forward pass (two-pass
   paths), or chunk by chunk inside the torch backend's one-pass fused loss (PPO, DPO with whole pairs), whose
   chunks are sized from the widest shard so that every rank walks the same ones;
2. the gradients come from the global statistics: this rank's ``d weight [V_r, H]`` and ``d bias [V_r]`` shard,
   and a partial ``d hidden [N, H]`` (the sum over the shard's vocabulary), all-reduced inside the op with
   ``reduce_hidden_grad=True``, left to the caller otherwise (Megatron's copy-to-tensor-parallel-region backward
   does that all-reduce).

Every rank of the group calls the op with the same arguments but its own shard (same hidden, targets, options,
``requires_grad`` and grad mode): the ops run the same collectives in the same order on every rank. Shard-dependent
errors (an empty or non-finite shard) are found from the one all-gather and raised on every rank alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .torch_backend import LinearGrads, RowStats
from .validation import require_tensor


@dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous vocabulary shard ``[vocab_start, vocab_start + V_r)`` of a ``vocab_size`` vocabulary
    split over ``group``, and whether ``d hidden`` is all-reduced inside the op."""

    group: dist.ProcessGroup
    rank: int  # in the group
    vocab_start: int
    vocab_size: int  # the global V
    widest_shard: int  # rows of the largest shard: chunks are sized from it, so every rank walks the same chunks
    reduce_hidden_grad: bool

    @classmethod
    def of(cls, group: dist.ProcessGroup, weight: Tensor, bias, reduce_hidden_grad: bool,
           check_finite: bool) -> VocabShard:
        """The shard of ``weight [V_r, H]``, from ONE all-gather of the shard sizes (int64, on the weight's device),
        which also carries whether each rank's ``weight``/``bias`` holds NaN/inf (with ``check_finite``).

        Raises on every rank alike when a shard is empty or not finite, so that no rank is left waiting in a later
        collective while another one raises.
        """
        finite = not check_finite or all(bool(torch.isfinite(t.sum())) for t in (weight, bias)
                                         if isinstance(t, Tensor) and t.is_floating_point())
        local = torch.tensor([weight.shape[0], int(finite)], dtype=torch.int64, device=weight.device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        sizes, finite = torch.stack(gathered).t().tolist()
        rank = dist.get_rank(group)
        if min(sizes) == 0:
            raise ValueError(f"weight: expected a non-empty vocabulary shard [V_r, H] on every rank of "
                             f"process_group, got shard sizes {sizes} (rank {rank} has {tuple(weight.shape)})")
        if not all(finite):
            bad = [r for r, ok in enumerate(finite) if not ok]
            raise ValueError(f"weight: expected finite values in the weight and bias shards of every rank, got "
                             f"NaN/inf on rank(s) {bad} of process_group (pass check_finite=False to skip this "
                             f"check)")
        return cls(group, rank, sum(sizes[:rank]), sum(sizes), max(sizes), reduce_hidden_grad)

    def all_reduce_stats(self, stats: RowStats) -> RowStats:
        """The global row statistics ``[N]`` from this shard's, identical on every rank.

        A MAX all-reduce of the shard lse (and max logit, with argmax) gives ``m``; one SUM all-reduce of the
        stacked rescaled terms ``s_r = exp(lse_r - m)`` (sum-exp ``S``), ``target_logit_r`` (0 outside the owning
        shard) and, when present, ``s_r (H_r + m - lse_r)`` (entropy), ``exp(lse2_r - 2 m)`` and ``logit_sum_r``
        gives ``lse = m + log S``, ``H = sum_r s_r (H_r + m - lse_r) / S + log S`` (every term >= 0: no
        cancellation) and ``lse2``; with argmax, a MIN all-reduce of the ids of the shards at the global max.
        """
        tops = torch.stack([stats.lse] + ([stats.max_logit] if stats.argmax is not None else []))
        dist.all_reduce(tops, op=dist.ReduceOp.MAX, group=self.group)
        top = tops[0]
        scale = torch.exp(stats.lse - top)
        terms = [scale, stats.target_logit]
        if stats.entropy is not None:
            terms.append(scale * (stats.entropy + (top - stats.lse)))
        if stats.lse2 is not None:
            terms.append(torch.exp(stats.lse2 - 2 * top))  # lse2_r <= 2 lse_r <= 2 m
        if stats.logit_sum is not None:
            terms.append(stats.logit_sum)
        summed = torch.stack(terms)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
        log_sumexp, optional = summed[0].log(), iter(summed[2:])
        entropy = None if stats.entropy is None else next(optional) / summed[0] + log_sumexp
        lse2 = None if stats.lse2 is None else 2 * top + next(optional).log()
        logit_sum = None if stats.logit_sum is None else next(optional)
        max_logit = argmax = None
        if stats.argmax is not None:  # the smallest id among the shards holding the global max
            max_logit = tops[1]
            argmax = torch.where(stats.max_logit == max_logit, stats.argmax, torch.iinfo(torch.int64).max)
            dist.all_reduce(argmax, op=dist.ReduceOp.MIN, group=self.group)
        return RowStats(top + log_sumexp, summed[1], entropy, lse2, logit_sum, max_logit, argmax)

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the group (in place), e.g. per-row sums over the shards' vocabulary columns."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def finish_grads(self, grads: LinearGrads) -> LinearGrads:
        """This rank's gradients from the global statistics: ``d hidden`` all-reduced (in place) with
        ``reduce_hidden_grad``, else left as this shard's partial sum."""
        if self.reduce_hidden_grad and grads.hidden is not None:
            dist.all_reduce(grads.hidden, op=dist.ReduceOp.SUM, group=self.group)
        return grads

    def replicated_input(self, hidden: Tensor) -> Tensor:
        """``hidden`` for a term every rank computes alike (the PPO value head): without ``reduce_hidden_grad``
        the caller sums the ranks' ``d hidden``, so only rank 0 lets that term's gradient through."""
        return hidden if self.reduce_hidden_grad or self.rank == 0 else hidden.detach()


def vocab_shard(process_group, weight, bias, *, reduce_hidden_grad, check_finite: bool) -> VocabShard | None:
    """The validated vocab-parallel arguments of an op: None without a process group (``reduce_hidden_grad`` has
    nothing to reduce then), else this rank's shard of ``weight [V_r, H]`` and ``bias [V_r]`` (one all-gather)."""
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad: expected a bool, got {type(reduce_hidden_grad).__name__}")
    if process_group is None:
        return None
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group: expected None or a torch.distributed.ProcessGroup (the tensor-parallel "
                        f"group the vocabulary is split over), got {type(process_group).__name__}")
    return VocabShard.of(process_group, require_tensor("weight", weight, dim=2), bias, reduce_hidden_grad,
                         check_finite)
