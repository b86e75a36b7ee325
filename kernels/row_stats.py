"""Per-row statistics of the tempered logits ``z [N, V]``: which ones a pass computes (``RowStatsSpec``), their
values (``RowStats``) and their exact merge over two disjoint vocabulary ranges (``merge_row_stats``).

Plain PyTorch, no Triton: the kernels' launchers, the torch backend and the vocab-parallel merge share it. Every
statistic is mergeable: the statistics of vocabulary tiles, of the vocab splits of one kernel launch and of the
vocabulary shards of a group combine into those of the whole vocabulary. The entropy is carried as such (not as
``lse - E_p[z]``, a difference of two numbers of size ``|z|``): every term of its merge is non-negative, so it
keeps fp32 accuracy at any logit scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowStatsSpec:
    """The optional statistics a forward pass computes besides the lse and the target logit, in the same pass (a
    flag left off costs nothing: constexpr branches in the kernels, skipped passes on the torch backend)."""

    entropy: bool = False  # -sum_v p_v log p_v
    lse2: bool = False  # logsumexp_v(2 z_v), so that log sum_v p_v^2 = lse2 - 2 lse (WPO)
    logit_sum: bool = False  # sum_v z_v (the mean logit: TRL's logits/chosen metric)
    argmax: bool = False  # arg max_v z_v, ties to the smallest id, with max_v z_v (mean_token_accuracy)

    @property
    def any_extra(self) -> bool:
        return self.entropy or self.lse2 or self.logit_sum or self.argmax


class RowStats(NamedTuple):
    """Per-row statistics ``[N]`` of the logits of a vocabulary range (a tile, a split, a shard, or the whole); the
    optional ones are None unless the ``RowStatsSpec`` asked for them. The target logit is 0 where the target is
    ignored or outside the range; the entropy is that of the softmax over the range alone, before a merge."""

    lse: Tensor
    target_logit: Tensor
    entropy: Tensor | None = None
    lse2: Tensor | None = None
    logit_sum: Tensor | None = None
    max_logit: Tensor | None = None  # with argmax: what the argmax merge compares
    argmax: Tensor | None = None  # int64 global vocabulary id

    def rows(self, rows: slice | Tensor) -> RowStats:
        return RowStats(*(None if s is None else s[rows] for s in self))


def merge_row_stats(a: RowStats, b: RowStats) -> RowStats:
    """Row statistics over the union of two disjoint vocabulary ranges (tiles, or shards under vocab parallelism)."""
    lse = torch.logaddexp(a.lse, b.lse)  # >= max(a.lse, b.lse) exactly: lse - a.lse >= 0
    entropy = None
    if a.entropy is not None:  # H = sum_r w_r (H_r + lse - lse_r), w_r = exp(lse_r - lse): every term >= 0
        entropy = (a.lse - lse).exp() * (a.entropy + (lse - a.lse)) + (b.lse - lse).exp() * (b.entropy + (lse - b.lse))
    lse2 = None if a.lse2 is None else torch.logaddexp(a.lse2, b.lse2)
    logit_sum = None if a.logit_sum is None else a.logit_sum + b.logit_sum
    max_logit = argmax = None
    if a.argmax is not None:  # the larger max; ties to the smaller id
        take_b = (b.max_logit > a.max_logit) | ((b.max_logit == a.max_logit) & (b.argmax < a.argmax))
        max_logit, argmax = torch.where(take_b, b.max_logit, a.max_logit), torch.where(take_b, b.argmax, a.argmax)
    return RowStats(lse, a.target_logit + b.target_logit, entropy, lse2, logit_sum, max_logit, argmax)
