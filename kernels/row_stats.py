"""Per-row statistics of the tempered logits ``z [N, V]`` (``RowStats``) and their exact merge over two disjoint
vocabulary ranges (``merge_row_stats``).

Plain PyTorch, no Triton: the kernels' launchers, the torch backend and the vocab-parallel merge share it. Every
statistic is mergeable: the statistics of vocabulary tiles, of the vocab splits of one kernel launch and of the
vocabulary shards of a group combine into those of the whole vocabulary. The entropy is carried as such (not as
``lse - E_p[z]``, a difference of two numbers of size ``|z|``): every term of its merge is non-negative, so it
keeps fp32 accuracy at any logit scale.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RowStats(NamedTuple):
    """Per-row statistics ``[N]`` of the logits of a vocabulary range (a tile, a split, a shard, or the whole); the
    entropy is None unless asked for. The target logit is 0 where the target is ignored or outside the range; the
    entropy is that of the softmax over the range alone, before a merge."""

    lse: Tensor
    target_logit: Tensor
    entropy: Tensor | None = None

    def rows(self, rows: slice | Tensor) -> RowStats:
        return RowStats(*(None if s is None else s[rows] for s in self))


def merge_row_stats(a: RowStats, b: RowStats) -> RowStats:
    """Row statistics over the union of two disjoint vocabulary ranges (tiles, or shards under vocab parallelism)."""
    lse = torch.logaddexp(a.lse, b.lse)  # >= max(a.lse, b.lse) exactly: lse - a.lse >= 0
    entropy = None
    if a.entropy is not None:  # H = sum_r w_r (H_r + lse - lse_r), w_r = exp(lse_r - lse): every term >= 0
        entropy = (a.lse - lse).exp() * (a.entropy + (lse - a.lse)) + (b.lse - lse).exp() * (b.entropy + (lse - b.lse))
    return RowStats(lse, a.target_logit + b.target_logit, entropy)
