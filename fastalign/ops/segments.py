"""Packed (padding-free) batches: S sequences concatenated into N rows, described by flash-attention's ``cu_seqlens``
(int ``[S + 1]``, offsets of the sequences) or by transformers' ``position_ids`` (``[N]`` or ``[1, N]``, a sequence
starting wherever the position is 0), and the padded ``[S, L]`` layout that per-token values map to.

The fused ops never pad the hidden states or compute logits for padding: only per-token values (log-probs, masks,
advantages: ``[N]`` numbers) are placed into ``[S, L]``, so the sequence-level terms of the objectives run unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .validation import FLOAT_DTYPES, INT_DTYPES, require_shape, require_tensor


class PackedLayout(NamedTuple):
    """Where each of the N packed rows sits in the padded ``[S, L]`` layout (``L`` the longest sequence)."""

    index: Tensor  # [N] int64 flat position in [S, L]
    shape: tuple[int, int]  # (S, L)

    @property
    def num_sequences(self) -> int:
        return self.shape[0]

    def to_padded(self, values: Tensor, fill: float | int | bool) -> Tensor:
        """``values [N, ...]`` as ``[S, L, ...]``, ``fill`` where no row is."""
        out = values.new_full((self.shape[0] * self.shape[1], *values.shape[1:]), fill)
        return out.index_copy(0, self.index, values).view(*self.shape, *values.shape[1:])

    def to_packed(self, padded: Tensor) -> Tensor:
        """``padded [S, L, ...]`` back to ``[N, ...]``."""
        return padded.reshape(self.shape[0] * self.shape[1], *padded.shape[2:])[self.index]

    def packed_rows(self, positions: Tensor) -> Tensor:
        """The packed row ``[M]`` of each flat ``[S, L]`` position ``[M]`` (positions that hold a row)."""
        row = torch.full((self.shape[0] * self.shape[1],), -1, dtype=torch.long, device=self.index.device)
        row[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        return row[positions]


def packed_layout(num_rows: int, device: torch.device, *, cu_seqlens=None, position_ids=None,
                  num_sequences: int | None = None) -> PackedLayout | None:
    """The layout of a packed batch of ``num_rows`` rows from exactly one of ``cu_seqlens`` and ``position_ids``
    (None when neither is given: the batch is padded). Empty sequences are allowed in ``cu_seqlens``. Under
    ``torch.compile``: unchecked, and every sequence padded to ``num_rows`` (static shapes; the padded layout holds
    per-token numbers only); ``position_ids`` then need ``num_sequences`` (the count of a per-sequence argument: in
    ``position_ids`` it is a data-dependent size)."""
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("cu_seqlens: expected either cu_seqlens or position_ids to describe a packed batch, got both")
    if cu_seqlens is None and position_ids is None:
        return None
    compiling = torch.compiler.is_compiling()
    if cu_seqlens is not None:
        cu = require_tensor("cu_seqlens", cu_seqlens, dtypes=INT_DTYPES, dim=1)
        if cu.device != device:
            raise ValueError(f"cu_seqlens: expected a tensor on {device} (the device of hidden), got {cu.device}")
        cu = cu.long()
        if cu.numel() < 2 or not compiling and (int(cu[0]) != 0 or int(cu[-1]) != num_rows
                                                or bool((cu[1:] < cu[:-1]).any())):  # compiled: not checked (syncs)
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets [S + 1] from 0 to the {num_rows} packed "
                             f"rows, got {cu.tolist() if cu.numel() <= 16 else tuple(cu.shape)}")
        lengths = cu[1:] - cu[:-1]
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths,
                                          output_size=num_rows)
        position = torch.arange(num_rows, device=device) - cu[:-1][segment]
        if compiling:  # the longest sequence is a data-dependent size: pad every sequence to N instead
            return PackedLayout(segment * num_rows + position, (lengths.numel(), num_rows))
    else:
        pos = require_tensor("position_ids", position_ids, dtypes=INT_DTYPES)
        if pos.device != device:
            raise ValueError(f"position_ids: expected a tensor on {device} (the device of hidden), got {pos.device}")
        if tuple(pos.shape) not in ((num_rows,), (1, num_rows)):
            raise ValueError(f"position_ids: expected shape ({num_rows},) or (1, {num_rows}) (one per packed row), "
                             f"got {tuple(pos.shape)}")
        position = pos.reshape(-1).long()
        if compiling:  # S from a per-sequence argument; each sequence padded to N as with cu_seqlens
            if num_sequences is None:
                raise ValueError("position_ids: a packed batch under torch.compile needs cu_seqlens, or a "
                                 "per-sequence argument that gives the number of sequences (the number in "
                                 "position_ids is a data-dependent size), got position_ids alone")
            segment = torch.cumsum((position == 0).long(), 0) - 1
            return PackedLayout(segment * num_rows + position, (num_sequences, num_rows))
        starts = position == 0
        steps_ok = (position[1:] == position[:-1] + 1) | starts[1:]
        if num_rows == 0 or not bool(starts[0]) or not bool(steps_ok.all()):
            raise ValueError("position_ids: expected each packed sequence to count 0, 1, 2, ... (a sequence starts "
                             "where the position is 0, the first row included)")
        segment = torch.cumsum(starts.long(), 0) - 1
        lengths = torch.bincount(segment)
    longest = max(int(lengths.max()), 1)
    return PackedLayout(segment * longest + position, (lengths.numel(), longest))


def check_sequence_count(name: str, value, layout: PackedLayout | None, cu_seqlens=None) -> None:
    """A per-sequence argument ``value`` (``[S]``) of a packed batch against its layout's S sequences: a mismatch
    blames the layout (``position_ids`` that never restart describe one sequence), not the argument."""
    if layout is None or not isinstance(value, Tensor) or value.dim() != 1 or value.numel() in (
            layout.num_sequences, layout.index.numel()):  # [S], or per token [N]
        return
    source, rule = ("cu_seqlens", "offsets [S + 1]") if cu_seqlens is not None else (
        "position_ids", "a sequence starts where the position is 0; position_ids that never restart describe one")
    raise ValueError(f"{source}: expected {value.numel()} packed sequences ({rule}), one per entry of {name}, "
                     f"got {layout.num_sequences}")


def validate_sequence_layout(hidden, targets, packed: bool) -> None:
    """``hidden [B, T, H]`` and ``targets [B, T]``: B sequences of T tokens; packed, ``hidden [N, H]`` (or
    ``[1, N, H]``) and ``targets [N]`` (``[1, N]``)."""
    hidden = require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if packed:
        if not (hidden.dim() == 2 or hidden.dim() == 3 and hidden.shape[0] == 1) or hidden.shape[-2] == 0:
            raise ValueError(f"hidden: expected shape [N, H] or [1, N, H] with N >= 1 (a packed batch, with "
                             f"cu_seqlens or position_ids), got {tuple(hidden.shape)}")
        require_shape("targets", require_tensor("targets", targets), tuple(hidden.shape[:-1]),
                      f"the leading dimensions of hidden {tuple(hidden.shape)}")
        return
    if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"hidden: expected shape [B, T, H] with B, T >= 1 (B completions of T tokens), "
                         f"got {tuple(hidden.shape)}")
    require_shape("targets", require_tensor("targets", targets), tuple(hidden.shape[:2]),
                  f"[B, T], the leading dimensions of hidden {tuple(hidden.shape)}")
