"""Chunked PyTorch backend of the fused linear log-prob ops: the same math as ``fastalign.kernels``, any device.

Logits ``z = softcap(logit_scale * (hidden @ weight.T + bias)) * inv_temperature`` (``softcap(x) = c tanh(x / c)``
with ``c = logit_softcap``, none when None) are formed in fp32 (float64 stays float64) one block at a time, the
transform in one place (``_Linear.logits``): every statistic is of the transformed logits, and every logit gradient
is multiplied by the transform's derivative ``logit_scale * inv_temperature * (1 - tanh^2)`` (``_Linear.grad_scale``
and ``_Linear.softcap_grad``); reductions and the weight gradient are accumulated in that dtype. A block is ``[rows,
tile]``: vocabulary tiles of ``VOCAB_TILE`` columns outer, token chunks inner, so a block is still in cache for the
elementwise passes after its matmul. The blocks' per-row statistics (and the frozen-weight moments) merge exactly as
those of vocabulary shards do (``merge_row_stats``); gradients from the global statistics are independent per block.

The entry points mirror the kernels: ``linear_lse_forward`` (log-sum-exp, target logit and the optional statistics
of a ``RowStatsSpec``: entropy, ``lse(2z)``, sum of logits, arg-max),
``linear_logprobs_backward`` (recompute the logits, then the gradients), ``linear_weight_moments`` (a frozen
weight: the forward also forms what ``d hidden`` needs), and ``linear_logprobs_fused`` (a loss whose per-token
gradient is known in the forward: logits, ``d hidden`` and ``d weight`` in one pass, three matmuls). Only the last
holds whole ``[chunk, V]`` rows: a chunk's gradient needs its log-sum-exp over the whole vocabulary before its
logits are dropped.

**Deterministic mode** (``deterministic=True``): every matmul and row-wise pass runs on a block of exactly
``BLOCK_ROWS`` rows (the last one padded with zero rows and ignored targets) and a fixed vocabulary tile, whatever
N, the chunk size or the memory budget, and a block's tile statistics are merged on its ``[BLOCK_ROWS]`` vectors in
tile order: a row's statistics are bitwise the same alone or in any batch, at any position (CPU matmuls are not:
a 1-row product takes another kernel than a 64-row one, and elementwise ops on ``[N]`` vectors end in a scalar
tail whose ``exp``/``log`` round differently). The backward walks the same fixed blocks in a fixed order and forms
the one-hot term densely (no accumulating ``index_put_``, non-deterministic on CUDA).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from fastalign.kernels.row_stats import RowStats, RowStatsSpec, merge_row_stats

from .chunking import rows_per_chunk



class RowGrads(NamedTuple):
    """A loss's gradients w.r.t. per-row values ``[C]`` (0 at ignored rows; None: the loss does not use the value):
    the log-probs, the entropy, the log-sum-exp (a z-loss) and the sum of logits (label smoothing). The logits'
    gradient is ``dz = g_lp (onehot - p) - g_ent p (log p + H) + g_lse p + g_sum`` w.r.t. the transformed, tempered
    logits, times the transform's derivative (``_Linear.grad_scale``, ``_Linear.softcap_grad``) w.r.t. the raw."""

    logprobs: Tensor
    entropy: Tensor | None = None
    lse: Tensor | None = None
    logit_sum: Tensor | None = None

    def probs_scale(self) -> Tensor:
        """The coefficient of ``-p`` in ``dz`` besides the entropy's: ``g_lp - g_lse``."""
        return self.logprobs if self.lse is None else self.logprobs - self.lse


TokenGrads = Callable[[slice, Tensor, Tensor | None, RowStats], tuple]
"""``(rows, logprobs [C], entropy [C] | None, stats) -> RowGrads`` (or its first fields, e.g. ``(d loss / d logprobs
[C], d loss / d entropy [C] | None)``), ``stats`` the chunk's (global) row statistics ``[C]``, detached."""

VOCAB_TILE = 4096
TILE_ROWS = 512
"""Block shape on CPU: a ``[512, 4096]`` fp32 block of logits (8 MiB) is still in cache for the elementwise passes
after its matmul; a whole ``[chunk, V]`` block (64 MiB) streams from DRAM in each."""
PAIR_BUDGET_CHUNKS = 8
"""Chunk budgets a chunk of ``linear_pair_fused`` may take (384 MiB by default: the two heads' ``[rows, V]`` logits
of 1536 rows at V = 32k, 384 at 128k; as the engine's ``GROUP_BUDGET_CHUNKS`` for whole groups): on this project's
AMD EPYC (quiet, N=4096, 2026-12-07) the op took 1.14x the 4-matmul floor at 8 budgets, 1.19x at 4, 1.22x at 2."""
PAIR_PART_BYTES = 8 << 20
"""Bytes of the ``[rows, V]`` buffers (five or six) the elementwise work of ``linear_pair_fused`` walks at a time: a
chunk's rows are many for its matmuls, its dozen elementwise passes run on parts that stay in the CPU's cache (on
the AMD EPYC, 32 MiB of L3: 1.32x the floor in parts of 1 MiB, 1.04-1.06x at 4 to 16 MiB, 1.27x in whole chunks)."""
PAIR_BLOCK_ROWS = 64
"""Rows of every chunk of ``linear_pair_fused`` in deterministic mode (56 MiB of fp32 chunk buffers at V = 32k,
220 MiB at V = 128k), fewer rows than ``BLOCK_ROWS``: whatever N, the chunk size or the budget."""
BLOCK_ROWS = TILE_ROWS
"""Rows of every block in deterministic mode (fixed whatever N, the chunk size and the memory budget). On this
project's AMD EPYC a ``[128, 512] x [512, 4096]`` matmul takes 2.2x the time per row of a 512-row one (1.6x at 256
rows), so the block is as tall as the default mode's: the price is the padding of a chunk's last block."""


class LinearGrads(NamedTuple):
    """Gradients in the compute dtype (fp32, or float64): ``[N, H]``, ``[V, H]``, ``[V]``; None where not needed."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


class WeightMoments(NamedTuple):
    """Per-row ``[N, H]`` softmax moments of the weight rows: what ``d hidden`` needs when the weight is frozen."""

    mean: Tensor  # sum_v p_v W_v
    entropy: Tensor | None  # sum_v p_v (z_v - E_p[z]) W_v = sum_v p_v (log p_v + H) W_v


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, float64 for float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Linear:
    """The lm_head operands prepared once per call, and the block-level products with fp32 accumulation.

    ``grad_scale``: the constant factor of the logits' derivative w.r.t. the raw ``hidden @ weight.T + bias``
    (``logit_scale * inv_temperature``); with a softcap, ``softcap_grad`` gives the elementwise one."""

    def __init__(self, weight: Tensor, bias: Tensor | None, inv_temperature: float, logit_scale: float = 1.0,
                 logit_softcap: float | None = None):
        self.dtype = compute_dtype(weight.dtype)
        # No fp32 output for low-precision matmuls on CPU: upcast the weight once per call there.
        upcast = weight.device.type != "cuda" and weight.dtype != self.dtype
        self.weight = weight.to(self.dtype) if upcast else weight
        self.bias = None if bias is None else bias.to(self.dtype)
        self.inv_temperature, self.logit_scale = inv_temperature, logit_scale
        self.grad_scale = logit_scale * inv_temperature
        self.softcap = logit_softcap
        if logit_softcap is not None:  # z = tanh(raw * tanh_in) * tanh_out
            self.tanh_in, self.tanh_out = logit_scale / logit_softcap, logit_softcap * inv_temperature
        self._buffer: Tensor | None = None  # logits storage reused by every block (see ``logits``)

    @property
    def buffers(self) -> int:
        """``[rows, V]`` temporaries the softcap adds to a pass that forms gradients (its derivative's)."""
        return 0 if self.softcap is None else 1

    def softcap_grad(self, z: Tensor, out: Tensor | None = None) -> Tensor | None:
        """``1 - tanh^2`` ``[C, tile]`` of the softcap at the (transformed) logits ``z``, a new tensor or ``out``;
        None without a softcap."""
        if self.softcap is None:
            return None
        return torch.mul(z, 1.0 / self.tanh_out, out=out).square_().neg_().add_(1.0)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def tiles(self) -> list[slice]:
        """The vocabulary tiles: column ranges of at most ``VOCAB_TILE``."""
        return [slice(start, min(start + VOCAB_TILE, self.vocab_size))
                for start in range(0, self.vocab_size, VOCAB_TILE)]

    def _mm(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dtype == self.dtype:
            return a @ b
        return torch.mm(a, b, out_dtype=self.dtype)

    def reserve(self, numel: int, device: torch.device) -> None:
        """Make the logits buffer hold at least ``numel`` elements (views of a replaced buffer stay valid)."""
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = None  # free the smaller buffer first
            self._buffer = torch.empty(numel, dtype=self.dtype, device=device)

    def logits(self, hidden: Tensor, cols: slice = slice(None), offset: int = 0) -> Tensor:
        """Transformed, tempered logits ``[C, tile]`` of rows ``hidden [C, H]`` and vocabulary columns ``cols``, valid
        until the next call at the same ``offset``: they are written into one buffer reused by every block, from element
        ``offset`` on (on CPU, a fresh tensor per block costs page faults worth a fifth of the matmul)."""
        weight = self.weight[cols]
        bias = None if self.bias is None else self.bias[cols]
        h = hidden.to(weight.dtype)
        if h.dtype == self.dtype:
            rows, width = h.shape[0], weight.shape[0]
            self.reserve(offset + rows * width, h.device)
            z = self._buffer[offset:offset + rows * width].view(rows, width)
            if bias is not None:
                torch.addmm(bias, h, weight.t(), out=z)
            else:
                torch.mm(h, weight.t(), out=z)
        else:  # low-precision matmul with an fp32 output (CUDA): no out= variant
            z = self._mm(h, weight.t())
            if bias is not None:
                z.add_(bias)
        if self.softcap is not None:
            z.mul_(self.tanh_in).tanh_().mul_(self.tanh_out)
        elif self.grad_scale != 1.0:
            z.mul_(self.grad_scale)
        return z

    def times_weight(self, block: Tensor, cols: slice = slice(None)) -> Tensor:
        """``block [C, tile] @ weight[cols] [tile, H]`` -> ``[C, H]`` in the compute dtype."""
        weight = self.weight[cols]
        return self._mm(block.to(weight.dtype), weight)


class _Targets(NamedTuple):
    """Targets of a chunk relative to a range of vocabulary columns (a tile of this shard)."""

    index: Tensor  # [C, 1] int64 column in the range, a safe 0 where not valid
    valid: Tensor  # [C] bool: not ignored and inside [vocab_start, vocab_start + width)

    @classmethod
    def of(cls, targets: Tensor, ignore_index: int, vocab_start: int, width: int) -> _Targets:
        local = targets - vocab_start
        valid = (targets != ignore_index) & (local >= 0) & (local < width)
        return cls(torch.where(valid, local, 0).unsqueeze(1), valid)


def _chunks(num_rows: int, rows: int) -> Iterator[slice]:
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def _block_chunks(num_rows: int, cols: slice, chunk_size: int | None, buffers: int) -> Iterator[slice]:
    """Token chunks for blocks of the tile ``cols``: ``chunk_size`` rows when given, else ``TILE_ROWS`` (fewer when
    ``buffers`` ``[rows, tile]`` temporaries would exceed the chunk budget)."""
    rows = rows_per_chunk(num_rows, cols.stop - cols.start, chunk_size=chunk_size, buffers=buffers)
    return _chunks(num_rows, rows if chunk_size is not None else min(rows, TILE_ROWS))


def _empty_stats(num_rows: int, lin: _Linear, device: torch.device, spec: RowStatsSpec) -> RowStats:
    def empty(wanted: bool = True, dtype: torch.dtype = lin.dtype) -> Tensor | None:
        return torch.empty(num_rows, dtype=dtype, device=device) if wanted else None

    return RowStats(empty(), empty(), empty(spec.entropy), empty(spec.lse2), empty(spec.logit_sum),
                    empty(spec.argmax), empty(spec.argmax, torch.int64))


def _store(dst: Sequence[Tensor | None], rows: slice, src: Sequence[Tensor | None]) -> None:
    for d, s in zip(dst, src):
        if d is not None:
            d[rows] = s


def _row_stats(z: Tensor, tgt: _Targets, spec: RowStatsSpec, id_start: int, softmax: bool,
               keep_log_p: bool = True) -> tuple[RowStats, Tensor | None, Tensor | None]:
    """Statistics of one block of tempered logits ``z [C, tile]`` (``id_start``: the global id of its first column)
    and, with ``softmax``, its probabilities: ``(stats, p, p_norm)``, the probabilities being ``p`` times the rows'
    ``p_norm [C]`` (None: ``p`` itself).

    ``z`` is replaced by ``log_softmax(z)``, or with ``softmax`` by ``p`` itself unless optional statistics are
    computed and ``keep_log_p`` asks for ``log p`` (then ``p`` is a new tensor). Every row-wise pass runs
    ``_STAT_BYTES`` of rows at a time, so that the block's rows are read from memory once after its matmul and the
    log-softmax, ``exp``, the entropy and ``lse2`` dots and the copy of ``p`` in place work on rows still in cache.
    Without optional statistics, the lse is the first column's ``z - log p``. With them, the lse comes from the row
    max (``log p`` there is small: no rounding of the size of ``|z|``), the entropy is ``-sum_v p_v log p_v``
    (terms of one sign, not ``lse - E_p[z]``, a difference of two numbers of size ``|z|``),
    ``lse2 = 2 lse + log sum_v p_v^2``, the arg-max from the maxima of groups of columns (``_max_argmax``). When
    ``p`` replaces ``z`` and no ``log p`` is kept, one ``exp`` instead of two (the log-softmax's and ``p``'s):
    ``x = z - max``, ``q = exp(x)``, ``s = sum_v q_v``, ``lse = max + log s``, entropy ``log s - sum_v q_v x_v / s``
    (two terms >= 0: no cancellation), ``sum_v p_v^2 = sum_v q_v^2 / s^2``; ``z`` is then replaced by ``q`` and
    ``p_norm = 1 / s`` (``_shifted_softmax_stats``): the caller folds it into its per-row scales, a division pass
    less.
    """
    num_rows = len(z)
    target_logit = z.gather(1, tgt.index).squeeze(1).masked_fill(~tgt.valid, 0.0)

    def vector(wanted: bool = True, dtype: torch.dtype = z.dtype) -> Tensor | None:
        return z.new_empty(num_rows, dtype=dtype) if wanted else None

    lse = vector()
    step = _stat_rows(z)
    if not spec.any_extra:
        first = z[:, 0].clone()
        for rows in _chunks(num_rows, step):
            block = z[rows]
            torch._log_softmax(block, 1, False, out=block)  # log p, row by row (an aliased out is safe row-wise)
            torch.sub(first[rows], block[:, 0], out=lse[rows])
            if softmax:
                block.exp_()
        return RowStats(lse, target_logit), (z if softmax else None), None
    logit_sum, entropy, sum_p2 = vector(spec.logit_sum), vector(spec.entropy), vector(spec.lse2)
    row_max, at_max = vector(), vector(spec.argmax, torch.int64)  # ties: the first (smallest) column
    p = None if not softmax else (z.new_empty(z.shape) if keep_log_p else z)
    dots = spec.entropy or spec.lse2
    shifted = p is z and dots  # z <- q = exp(z - max), p_norm = 1 / s
    p_norm = vector(shifted)
    # p of a few rows at a time when it is not kept next to log p (no second [C, tile] buffer), and the products
    # summed by the dots (the shifted path forms them in place of x): workspaces of a few rows, allocated once (no
    # allocation per slice: allocations interleaved with 4 MiB temporaries fragment the CPU heap, +90 MiB of peak
    # RSS seen)
    work = z.new_empty(step, z.shape[1]) if dots and (p is None or p is z) else None
    products = z.new_empty(step, z.shape[1]) if dots and not shifted else None
    for rows in _chunks(num_rows, step):
        block = z[rows]
        if logit_sum is not None:
            torch.sum(block, 1, out=logit_sum[rows])
        if spec.argmax:
            _max_argmax(block, row_max[rows], at_max[rows])
        else:
            torch.amax(block, 1, out=row_max[rows])
        if shifted:
            _shifted_softmax_stats(block, row_max[rows], lse[rows], None if entropy is None else entropy[rows],
                                   None if sum_p2 is None else sum_p2[rows], work, p_norm[rows])
            continue
        torch._log_softmax(block, 1, False, out=block)  # log p
        # log p = z - c row by row is monotonic in z: its max sits at the max logit
        torch.sub(row_max[rows], torch.amax(block, 1), out=lse[rows])
        if dots:
            q = torch.exp(block, out=work[:len(block)] if work is not None else p[rows])
            if entropy is not None:
                _dot(q, block, entropy[rows], products)
            if sum_p2 is not None:
                _dot(q, q, sum_p2[rows], products)
        elif p is not None and p is not z:
            torch.exp(block, out=p[rows])
        if p is z:  # no dots here: those rows took _shifted_softmax_stats
            block.exp_()
    if entropy is not None:
        entropy.neg_()
    return RowStats(lse, target_logit, entropy, None if sum_p2 is None else sum_p2.log_().add_(2 * lse), logit_sum,
                    row_max if spec.argmax else None,
                    at_max.add_(id_start) if spec.argmax else None), p, p_norm


def _level2_cache_bytes() -> int | None:
    """The first CPU's level-2 cache in bytes (Linux sysfs), None where unknown."""
    try:
        base = Path("/sys/devices/system/cpu/cpu0/cache")
        for index in base.glob("index*"):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                return int(size[:-1]) << {"K": 10, "M": 20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError, KeyError):
        return None
    return None


def _stat_bytes(level2: int | None) -> int:
    """Rows of a block taken at a time by its row-wise passes, in bytes: half a core's L2 cache where it holds 2 MiB
    or more (the slice and the two workspaces of ``_row_stats`` then stay in L2: on the Intel Xeon, 1 MiB slices
    took the entropy statistics of a ``[384, 32768]`` chunk from 21 to 13 ms), else 4 MiB (in the L3 between the
    passes, 32 rows at V=32k: measured on the AMD EPYC, whose smaller L2 would mean many more, smaller ops)."""
    return level2 // 2 if level2 is not None and level2 >= 2 << 20 else 4 << 20


def _shifted_softmax_stats(block: Tensor, row_max: Tensor, lse: Tensor, neg_entropy: Tensor | None,
                           sum_p2: Tensor | None, work: Tensor, p_norm: Tensor) -> None:
    """``_row_stats``'s in-place path for the rows ``block [c, tile]`` of logits (replaced by ``q = exp(z - max)``):
    fills ``lse``, ``-entropy``, ``sum_v p_v^2`` and ``p_norm = 1 / s`` ``[c]`` from ``x = z - row_max`` (in
    ``work``, a workspace of at least c rows, then the dots' products in its place) and ``q``: five passes over the
    rows, no division of ``q`` (its ``1 / s`` goes to the caller's per-row scales)."""
    x = torch.sub(block, row_max.unsqueeze(1), out=work[:len(block)])
    q = torch.exp(x, out=block)
    total = q.sum(1)
    log_total = total.log()
    torch.add(row_max, log_total, out=lse)
    if neg_entropy is not None:  # sum_v p_v x_v - log s
        torch.sum(x.mul_(q), 1, out=neg_entropy)
        neg_entropy.div_(total).sub_(log_total)
    if sum_p2 is not None:
        torch.sum(torch.mul(q, q, out=x), 1, out=sum_p2)
        sum_p2.div_(total.square())
    torch.reciprocal(total, out=p_norm)


ARGMAX_GROUP = 64
"""Columns per group of ``_max_argmax``: a max over groups of 64 runs vectorized at about the speed of a plain row
max, while ``torch.max`` with indices is a scalar loop (8-13x slower per ``[32, 32768]`` slice on the AMD EPYC)."""


def _max_argmax(block: Tensor, row_max: Tensor, at_max: Tensor) -> None:
    """Row max and arg-max (the first column holding the max) of ``block [c, tile]`` into ``row_max``, ``at_max``
    ``[c]``: the maxima of groups of ``ARGMAX_GROUP`` consecutive columns (the last group shorter), the row max as
    theirs, the first group that holds it, and the first of that group's columns that does (columns past the tile
    clamped to its last, which only repeats that column after its own place)."""
    c, width = block.shape
    whole = width // ARGMAX_GROUP * ARGMAX_GROUP
    groups = block[:, :whole].unflatten(1, (whole // ARGMAX_GROUP, ARGMAX_GROUP)).amax(2)
    if whole < width:
        groups = torch.cat([groups, block[:, whole:].amax(1, keepdim=True)], 1)
    torch.amax(groups, 1, out=row_max)
    first_group = (groups == row_max.unsqueeze(1)).to(torch.uint8).argmax(1, keepdim=True)
    cols = (first_group * ARGMAX_GROUP + torch.arange(ARGMAX_GROUP, device=block.device)).clamp_(max=width - 1)
    at_max.copy_(cols.gather(1, block.gather(1, cols).argmax(1, keepdim=True)).squeeze(1))


_STAT_BYTES = _stat_bytes(_level2_cache_bytes())
"""Size of the rows of a block taken at a time by its row-wise passes (``_stat_bytes``)."""


def _stat_rows(z: Tensor) -> int:
    """Rows of ``z [C, tile]`` per ``_STAT_BYTES``, at least 1 and at most C."""
    return max(1, min(len(z), _STAT_BYTES // (z.shape[1] * z.element_size())))


def _dot(a: Tensor, b: Tensor, out: Tensor, products: Tensor) -> None:
    """Row-wise dot products of ``[C, tile]`` blocks into ``out [C]``, the products in the workspace ``products``
    (at least ``[C, tile]``; a multiply and a row sum are 4x faster on CPU than a batched ``bmm`` of the rows)."""
    products = products[:len(a)]
    torch.sum(torch.mul(a, b, out=products), 1, out=out)


def _merge_moments(a: RowStats, ma: WeightMoments, b: RowStats, mb: WeightMoments, merged: RowStats) -> WeightMoments:
    """Weight moments over the union of two disjoint vocabulary ranges, ``merged`` being their merged statistics:
    each side's probabilities scale by ``exp(lse_side - lse)``, and its entropy moment shifts by the difference of
    the centring terms, ``(log p_v + H) - (log q_v + H_side) = (lse_side - lse) + (H - H_side)``, q being the side's
    own softmax."""
    wa, wb = (a.lse - merged.lse).exp().unsqueeze(1), (b.lse - merged.lse).exp().unsqueeze(1)
    entropy = None
    if ma.entropy is not None:
        shift_a = ((a.lse - merged.lse) + (merged.entropy - a.entropy)).unsqueeze(1)
        shift_b = ((b.lse - merged.lse) + (merged.entropy - b.entropy)).unsqueeze(1)
        entropy = ma.entropy.addcmul_(ma.mean, shift_a).mul_(wa).add_(mb.entropy.addcmul_(mb.mean, shift_b).mul_(wb))
    return WeightMoments(ma.mean.mul_(wa).add_(mb.mean.mul_(wb)), entropy)


def _entropy_logit_grads(log_p: Tensor, p: Tensor, entropy: Tensor, tgt: _Targets, grad_logprobs: Tensor,
                         grad_entropy: Tensor, grad_scale: float, probs_scale: Tensor | None = None,
                         softcap_grad: Tensor | None = None, constant: Tensor | None = None) -> Tensor:
    """Gradient w.r.t. the raw logits of a block ``[C, tile]`` from its global ``log p`` and ``p`` and the rows'
    entropy ``[C]``, computed in place of ``log_p``.

    ``dz = g_lp onehot - (probs_scale + g_ent (z - E_p[z])) p + constant``, with ``z - E_p[z] = log p + H``, times
    the transform's derivative ``grad_scale`` (times ``softcap_grad [C, tile]``, ``_Linear``); ``probs_scale`` is
    ``g_lp`` unless the loss also depends on the lse, ``constant`` the sum of logits' gradient (``RowGrads``).
    """
    probs_scale = grad_logprobs if probs_scale is None else probs_scale
    grad = log_p.add_(entropy.unsqueeze(1)).mul_(grad_entropy.unsqueeze(1)).add_(probs_scale.unsqueeze(1))
    grad.mul_(p).neg_()
    grad.scatter_add_(1, tgt.index, torch.where(tgt.valid, grad_logprobs, 0.0).unsqueeze(1).to(grad.dtype))
    if constant is not None:
        grad.add_(constant.unsqueeze(1))
    if grad_scale != 1.0:
        grad.mul_(grad_scale)
    return grad if softcap_grad is None else grad.mul_(softcap_grad)


def _dense_softmax_grads(probs: Tensor, scale: Tensor, tgt: _Targets, probs_scale: Tensor | None = None,
                         softcap_grad: Tensor | None = None, constant: Tensor | None = None) -> Tensor:
    """The logit gradients ``(scale onehot - probs_scale probs + constant) softcap_grad`` of a block ``[C, tile]``
    (``scale``, ``probs_scale``, ``constant`` ``[C]``, already times the transform's ``grad_scale``; ``probs_scale``
    ``scale`` by default, no ``constant`` and no ``softcap_grad [C, tile]`` when None) in place of ``probs``: a
    scatter with one source per element, deterministic on every device (unlike an accumulating ``index_put_``)."""
    grad = probs.mul_((-scale if probs_scale is None else -probs_scale).unsqueeze(1))
    grad.scatter_add_(1, tgt.index, torch.where(tgt.valid, scale, 0.0).unsqueeze(1).to(grad.dtype))
    if constant is not None:
        grad.add_(constant.unsqueeze(1))
    return grad if softcap_grad is None else grad.mul_(softcap_grad)


class _GradAccumulator:
    """Buffers for ``d hidden [N, H]``, ``d weight [V, H]``, ``d bias [V]`` (compute dtype), filled block by block.

    ``d weight`` is not zeroed first: the first block of each vocabulary tile writes its product there (a 64 MiB
    zero fill less at V=32k, H=512), later ones add to it. Callers walk every tile for each chunk of rows, so the
    tiles are either all written or none (then ``result`` zeroes it)."""

    def __init__(self, hidden: Tensor, lin: _Linear, need_hidden: bool, need_weight: bool, need_bias: bool):
        kw = dict(dtype=lin.dtype, device=hidden.device)
        vocab, width = lin.weight.shape
        self.lin = lin
        self.hidden = torch.zeros(hidden.shape[0], width, **kw) if need_hidden else None
        self.weight = torch.empty(vocab, width, **kw) if need_weight else None
        self.bias = torch.zeros(vocab, **kw) if need_bias else None
        self._written: set[tuple[int, int]] = set()  # the (start, stop) columns of the tiles of d weight written

    def add_weight_to(self, d_weight: Tensor) -> None:
        """Accumulate ``d weight`` into ``d_weight [V, H]`` (compute dtype; whole-vocabulary blocks) instead of a new
        buffer."""
        self.weight = d_weight
        self._written.add((0, d_weight.shape[0]))

    def _add_weight(self, cols: slice, logit_grads_t: Tensor, hidden_rows: Tensor) -> Tensor:
        """``d weight[cols] (+)= logit_grads_t [tile, C] @ hidden_rows [C, H]``; returns ``d weight[cols]``."""
        d_weight, key = self.weight[cols], (cols.start, cols.stop)
        if key in self._written:
            return d_weight.addmm_(logit_grads_t, hidden_rows)
        self._written.add(key)
        return torch.mm(logit_grads_t, hidden_rows, out=d_weight)

    def add(self, rows: slice, cols: slice, hidden_rows: Tensor, logit_grads: Tensor) -> None:
        """Add the gradients of the block's logit gradients ``[C, tile]``."""
        if self.hidden is not None:
            self.hidden[rows].add_(self.lin.times_weight(logit_grads, cols))
        if self.weight is not None:
            self._add_weight(cols, logit_grads.t(), hidden_rows.to(self.lin.dtype))
        if self.bias is not None:
            self.bias[cols].add_(logit_grads.sum(dim=0))

    def add_softmax(self, rows: slice, cols: slice, hidden_rows: Tensor, probs: Tensor, scale: Tensor,
                    tgt: _Targets, probs_scale: Tensor | None = None, softcap_grad: Tensor | None = None) -> None:
        """Add the gradients of the block's logit gradients ``(scale onehot - probs_scale probs) softcap_grad``
        (``[C]`` each, ``probs_scale`` ``scale`` by default; ``softcap_grad [C, tile]`` when given, ``probs`` then
        scaled in place) without forming them: the per-row ``-probs_scale`` goes to the ``[C, H]`` side of the
        products, the one-hot term to a gather and
        an accumulating ``index_put_`` (one ``[C, tile]`` pass less). On CPU, ``index_add_`` runs as a
        ``scatter_add_`` of the expanded index, 15x slower (0.2 s for 384 rows of 512 at V=32k), and indexing a
        slice of the weight 10x slower than an ``index_select`` of the weight itself."""
        target_scale = scale
        if softcap_grad is not None:  # the derivative on both terms: probs d, and d at the target
            probs = probs.mul_(softcap_grad)
            target_scale = scale * softcap_grad.gather(1, tgt.index).squeeze(1)
        on_target = torch.where(tgt.valid, target_scale, 0.0).unsqueeze(1)
        neg_scale = (-(scale if probs_scale is None else probs_scale)).unsqueeze(1)
        target = tgt.index.squeeze(1)
        if self.hidden is not None:
            target_rows = self.lin.weight.index_select(0, target + cols.start).to(self.lin.dtype).mul_(on_target)
            self.hidden[rows].addcmul_(self.lin.times_weight(probs, cols), neg_scale).add_(target_rows)
        if self.weight is not None:
            h = hidden_rows.to(self.lin.dtype)
            d_weight = self._add_weight(cols, probs.t(), h * neg_scale)
            d_weight.index_put_((target,), h * on_target, accumulate=True)
        if self.bias is not None:
            d_bias = self.bias[cols]
            d_bias.addmv_(probs.t(), neg_scale.squeeze(1))
            d_bias.index_put_((target,), on_target.squeeze(1), accumulate=True)

    def add_constant(self, rows: slice, cols: slice, hidden_rows: Tensor, constant: Tensor) -> None:
        """Add the gradients of logit gradients ``constant [C]`` at every column of the tile (the sum of logits'),
        without a ``[C, tile]`` pass: ``d hidden += c (sum_v W_v)``, ``d W_v += c^T hidden``, ``d b_v += sum c``.
        After ``add``/``add_softmax`` of the same block (``d weight`` of the tile is written)."""
        if self.hidden is not None:
            self.hidden[rows].addr_(constant, self.lin.weight[cols].sum(0, dtype=self.lin.dtype))
        if self.weight is not None:
            self.weight[cols].add_((constant @ hidden_rows.to(self.lin.dtype)).unsqueeze(0))
        if self.bias is not None:
            self.bias[cols].add_(constant.sum())

    def add_softmax_block(self, rows: slice, cols: slice, hidden_rows: Tensor, probs: Tensor, tgt: _Targets,
                          scale: Tensor, probs_scale: Tensor, constant: Tensor | None, softcap_grad: Tensor | None,
                          dense: bool = False) -> None:
        """Add the gradients of the block's logit gradients ``(scale onehot - probs_scale probs + constant)
        softcap_grad`` (``[C]`` each, already times the transform's ``grad_scale``; no constant term when None):
        formed in place of ``probs`` when ``dense`` (deterministic) or when the softcap's derivative makes the
        constant's term vary per logit, else through ``add_softmax`` and ``add_constant`` without forming them."""
        if dense or (constant is not None and softcap_grad is not None):
            self.add(rows, cols, hidden_rows, _dense_softmax_grads(probs, scale, tgt, probs_scale, softcap_grad,
                                                                   constant))
            return
        self.add_softmax(rows, cols, hidden_rows, probs, scale, tgt, probs_scale, softcap_grad)
        if constant is not None:
            self.add_constant(rows, cols, hidden_rows, constant)

    def result(self) -> LinearGrads:
        if self.weight is not None and not self._written:
            self.weight.zero_()
        return LinearGrads(self.hidden, self.weight, self.bias)


def linear_lse_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                       inv_temperature: float, ignore_index: int, vocab_start: int = 0,
                       spec: RowStatsSpec = RowStatsSpec(), chunk_size: int | None = None,
                       deterministic: bool = False, logit_scale: float = 1.0,
                       logit_softcap: float | None = None) -> RowStats:
    """Row statistics ``[N]`` (those of ``spec``) of ``(hidden [N, H] @ weight [V, H].T + bias) * inv_temperature``
    (transformed by ``logit_scale`` and ``logit_softcap``, see the module docstring), block by block
    (batch-invariant ``BLOCK_ROWS`` blocks when ``deterministic``).

    ``targets [N]`` are vocabulary ids of which this weight holds ``vocab_start .. vocab_start + V - 1``.
    """
    lin = _Linear(weight, bias, inv_temperature, logit_scale, logit_softcap)
    n = hidden.shape[0]
    if deterministic:
        return _invariant_lse_forward(lin, hidden, targets, ignore_index, vocab_start, spec)
    stats = None
    for cols in lin.tiles():
        tile = _empty_stats(n, lin, hidden.device, spec)
        for rows in _block_chunks(n, cols, chunk_size, buffers=1):  # the logits; p only a few rows at a time
            first = vocab_start + cols.start
            tgt = _Targets.of(targets[rows], ignore_index, first, cols.stop - cols.start)
            _store(tile, rows, _row_stats(lin.logits(hidden[rows], cols), tgt, spec, first, softmax=False)[0])
        stats = tile if stats is None else merge_row_stats(stats, tile)
    return stats


class _InvariantChunk(NamedTuple):
    """Rows ``rows`` in the deterministic mode's blocks (``_invariant_chunk``): per vocabulary tile its columns,
    its blocks' local ``log p`` ``[BLOCK_ROWS, tile]`` (kept only when asked, else empty) and its statistics
    ``[C_pad]``; and the statistics over every tile ``[C_pad]``; ``C_pad`` is the row count rounded up to whole
    ``BLOCK_ROWS`` blocks."""

    rows: slice
    tiles: list[tuple[slice, list[Tensor], RowStats]]
    stats: RowStats

    def blocks(self) -> Iterator[tuple[int, slice, slice]]:
        """(index, rows of the problem, rows of the chunk's padded vectors) of each block, padding left out."""
        for index, start in enumerate(range(self.rows.start, self.rows.stop, BLOCK_ROWS)):
            stop = min(start + BLOCK_ROWS, self.rows.stop)
            yield index, slice(start, stop), slice(start - self.rows.start, stop - self.rows.start)


def _invariant_chunk(lin: _Linear, hidden: Tensor, targets: Tensor, rows: slice, ignore_index: int,
                     vocab_start: int, spec: RowStatsSpec, keep: bool) -> _InvariantChunk:
    """The statistics of rows ``rows`` in the deterministic mode: every logits block is exactly ``BLOCK_ROWS``
    rows (copied into one buffer, the last padded with zero rows and ignored targets) times a vocabulary tile, and
    each block's tile statistics are merged in tile order on its own ``[BLOCK_ROWS]`` vectors, so that a row's
    statistics depend on that row alone. Tiles outer, blocks inner: a weight tile is read once per chunk. With
    ``keep`` the tiles' ``log p`` stay in the logits buffer (``C_pad x V``), else each block overwrites the last."""
    count = rows.stop - rows.start
    padded = -(-count // BLOCK_ROWS) * BLOCK_ROWS
    block = hidden.new_zeros(BLOCK_ROWS, hidden.shape[1])
    block_targets = targets.new_empty(BLOCK_ROWS)
    if keep:
        lin.reserve(padded * lin.vocab_size, hidden.device)
    tiles, offset = [], 0
    for cols in lin.tiles():
        first, width = vocab_start + cols.start, cols.stop - cols.start
        tile, log_ps = _empty_stats(padded, lin, hidden.device, spec), []
        for start in range(0, padded, BLOCK_ROWS):
            inside = slice(rows.start + start, min(rows.start + start + BLOCK_ROWS, rows.stop))
            size = inside.stop - inside.start
            block[:size], block[size:] = hidden[inside], 0
            block_targets[:size], block_targets[size:] = targets[inside], ignore_index
            z = lin.logits(block, cols, offset)
            tgt = _Targets.of(block_targets, ignore_index, first, width)
            _store(tile, slice(start, start + BLOCK_ROWS), _row_stats(z, tgt, spec, first, softmax=False)[0])
            if keep:  # z <- log p of the block's tile
                log_ps.append(z)
                offset += z.numel()
        tiles.append((cols, log_ps, tile))
    merged = _empty_stats(padded, lin, hidden.device, spec)
    for start in range(0, padded, BLOCK_ROWS):
        block_rows = slice(start, start + BLOCK_ROWS)
        stats = None
        for _, _, tile in tiles:
            stats = tile.rows(block_rows) if stats is None else merge_row_stats(stats, tile.rows(block_rows))
        _store(merged, block_rows, stats)
    return _InvariantChunk(rows, tiles, merged)


def _invariant_lse_forward(lin: _Linear, hidden: Tensor, targets: Tensor, ignore_index: int, vocab_start: int,
                           spec: RowStatsSpec) -> RowStats:
    """``linear_lse_forward`` in deterministic mode (``_invariant_chunk``)."""
    n = hidden.shape[0]
    return _invariant_chunk(lin, hidden, targets, slice(0, n), ignore_index, vocab_start, spec,
                            keep=False).stats.rows(slice(0, n))


def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, stats: RowStats,
                             grad_logprobs: Tensor, grad_entropy: Tensor | None = None, *, inv_temperature: float,
                             ignore_index: int, vocab_start: int = 0, need_grad_hidden: bool = True,
                             need_grad_weight: bool = True, need_grad_bias: bool = False,
                             chunk_size: int | None = None, deterministic: bool = False, logit_scale: float = 1.0,
                             logit_softcap: float | None = None, grad_lse: Tensor | None = None,
                             grad_logit_sum: Tensor | None = None) -> LinearGrads:
    """Gradients for upstream ``grad_logprobs [N]`` (and ``grad_entropy``, ``grad_lse``, ``grad_logit_sum`` ``[N]``:
    ``RowGrads``), recomputing the logits block by block (``BLOCK_ROWS`` blocks in a fixed order and a dense one-hot
    term when ``deterministic``).

    ``stats`` are the (global) row statistics of the forward. Callers zero the upstream gradients at ignored rows.
    """
    lin = _Linear(weight, bias, inv_temperature, logit_scale, logit_softcap)
    n = hidden.shape[0]
    acc = _GradAccumulator(hidden, lin, need_grad_hidden, need_grad_weight, need_grad_bias)
    row_grads = RowGrads(grad_logprobs, grad_entropy, grad_lse, grad_logit_sum)
    scale = grad_logprobs.to(lin.dtype) * lin.grad_scale
    probs_scale = row_grads.probs_scale().to(lin.dtype)
    constant = None if grad_logit_sum is None else grad_logit_sum.to(lin.dtype) * lin.grad_scale
    for cols in lin.tiles():
        blocks = (_chunks(n, BLOCK_ROWS) if deterministic else _block_chunks(
            n, cols, chunk_size, buffers=(1 if grad_entropy is None else 2) + lin.buffers))
        for rows in blocks:
            tgt = _Targets.of(targets[rows], ignore_index, vocab_start + cols.start, cols.stop - cols.start)
            z = lin.logits(hidden[rows], cols)
            d = lin.softcap_grad(z)
            if grad_entropy is None:  # dz = g (onehot - p), from p = exp(z - lse) in place
                acc.add_softmax_block(rows, cols, hidden[rows], z.sub_(stats.lse[rows].unsqueeze(1)).exp_(), tgt,
                                      scale[rows], probs_scale[rows] * lin.grad_scale,
                                      None if constant is None else constant[rows], d, dense=deterministic)
            else:
                log_p = z.sub_(stats.lse[rows].unsqueeze(1))
                acc.add(rows, cols, hidden[rows], _entropy_logit_grads(
                    log_p, log_p.exp(), stats.entropy[rows], tgt, grad_logprobs[rows], grad_entropy[rows],
                    lin.grad_scale, probs_scale[rows], d, None if grad_logit_sum is None else grad_logit_sum[rows]))
    return acc.result()


def linear_weight_moments(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                          inv_temperature: float, ignore_index: int, spec: RowStatsSpec = RowStatsSpec(),
                          chunk_size: int | None = None, deterministic: bool = False,
                          logit_scale: float = 1.0) -> tuple[RowStats, WeightMoments]:
    """Forward statistics (those of ``spec``) plus the weight moments ``[N, H]``, so that with a frozen weight the
    backward is elementwise: ``d hidden = logit_scale * inv_temperature * (g_lp (W_y - mean) - g_ent entropy)``
    (no softcap: its derivative varies per logit). Two matmuls
    (three with entropy); each tile's moments are merged as its statistics are (``_merge_moments``), the entropy
    moment in its centred form ``sum_v p_v (log p_v + H) W_v``. ``deterministic``: the rows padded to whole
    ``BLOCK_ROWS`` blocks, each block's tiles merged on its own vectors in tile order, as ``_invariant_chunk`` does:
    the same statistics bit for bit, and moments that depend on the row alone."""
    lin = _Linear(weight, bias, inv_temperature, logit_scale)
    n, width = hidden.shape[0], weight.shape[1]
    if deterministic:  # zero rows with ignored targets up to whole blocks
        padded = -(-n // BLOCK_ROWS) * BLOCK_ROWS
        hidden = torch.cat([hidden, hidden.new_zeros(padded - n, hidden.shape[1])])
        targets = torch.cat([targets, targets.new_full((padded - n,), ignore_index)])
    rows_all = hidden.shape[0]
    tiles = []
    for cols in lin.tiles():
        tile = _empty_stats(rows_all, lin, hidden.device, spec)
        mean = torch.empty(rows_all, width, dtype=lin.dtype, device=hidden.device)
        tile_moments = WeightMoments(mean, torch.empty_like(mean) if spec.entropy else None)
        # The logits, and p next to log p when an optional statistic is asked for.
        for rows in (_chunks(rows_all, BLOCK_ROWS) if deterministic
                     else _block_chunks(rows_all, cols, chunk_size, buffers=2 if spec.any_extra else 1)):
            z = lin.logits(hidden[rows], cols)
            tgt = _Targets.of(targets[rows], ignore_index, cols.start, cols.stop - cols.start)
            block, p, _ = _row_stats(z, tgt, spec, cols.start, softmax=True)  # log p next to p: p normalized
            mean[rows] = lin.times_weight(p, cols)
            if spec.entropy:
                tile_moments.entropy[rows] = lin.times_weight(z.add_(block.entropy.unsqueeze(1)).mul_(p), cols)
            _store(tile, rows, block)
        tiles.append((tile, tile_moments))
    if not deterministic:
        return _merge_tiles(tiles)
    stats = _empty_stats(rows_all, lin, hidden.device, spec)
    moments = WeightMoments(torch.empty_like(tiles[0][1].mean),
                            None if tiles[0][1].entropy is None else torch.empty_like(tiles[0][1].mean))
    for rows in _chunks(rows_all, BLOCK_ROWS):
        block_stats, block_moments = _merge_tiles([(tile.rows(rows), WeightMoments(*(
            None if m is None else m[rows] for m in tile_moments))) for tile, tile_moments in tiles])
        _store(stats, rows, block_stats)
        _store(moments, rows, block_moments)
    return stats.rows(slice(0, n)), WeightMoments(*(None if m is None else m[:n] for m in moments))


def _merge_tiles(tiles: list[tuple[RowStats, WeightMoments]]) -> tuple[RowStats, WeightMoments]:
    """The statistics and weight moments of the whole vocabulary from those of its tiles, merged in tile order."""
    stats, moments = tiles[0]
    for tile, tile_moments in tiles[1:]:
        merged = merge_row_stats(stats, tile)
        stats, moments = merged, _merge_moments(stats, moments, tile, tile_moments, merged)
    return stats, moments


def hidden_grad_from_moments(weight: Tensor, targets: Tensor, moments: WeightMoments, grad_logprobs: Tensor,
                             grad_entropy: Tensor | None, *, inv_temperature: float, ignore_index: int,
                             logit_scale: float = 1.0) -> Tensor:
    """Elementwise ``d hidden [N, H]`` from the moments of ``linear_weight_moments`` (no matmul over V)."""
    valid = targets != ignore_index
    target_rows = weight[torch.where(valid, targets, 0)].to(moments.mean.dtype)
    grad = (target_rows - moments.mean).mul_(grad_logprobs.unsqueeze(1))
    if grad_entropy is not None:
        grad.sub_(moments.entropy * grad_entropy.unsqueeze(1))
    grad_scale = logit_scale * inv_temperature
    return grad.mul_(grad_scale) if grad_scale != 1.0 else grad


class ShardMerge(Protocol):
    """A weight that is one vocabulary shard of a group (``fastalign.ops.vocab_parallel.VocabShard``)."""

    vocab_start: int  # global id of the shard's first row
    widest_shard: int  # rows of the group's widest shard: every rank sizes its chunks from it, so all walk the same

    def all_reduce_stats(self, stats: RowStats) -> RowStats:
        """The chunk's statistics over the whole vocabulary (a collective: every rank calls it for each chunk)."""

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the group (a collective)."""


class FusedResult(NamedTuple):
    """Per-token outputs ``[N]`` (0 at ignored rows), the gradients of the loss and the (global) row statistics."""

    logprobs: Tensor
    entropy: Tensor | None
    grads: LinearGrads
    stats: RowStats


def linear_logprobs_fused(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                          token_grads: TokenGrads, *, inv_temperature: float, ignore_index: int,
                          spec: RowStatsSpec = RowStatsSpec(), need_grad_hidden: bool = True,
                          need_grad_weight: bool = True, need_grad_bias: bool = False, chunk_size: int | None = None,
                          chunks: Sequence[slice] | None = None, shard: ShardMerge | None = None,
                          deterministic: bool = False, logit_scale: float = 1.0,
                          logit_softcap: float | None = None) -> FusedResult:
    """Log-probs (entropy and the other statistics of ``spec``) and, in the same pass, the gradients of a loss whose
    per-token gradient is known.

    ``token_grads(rows, logprobs, entropy, stats)`` returns ``d loss / d logprobs`` (and ``d loss / d entropy``) for
    the chunk ``rows``; it must give 0 at ignored rows. Three matmuls per chunk: logits, ``d hidden``, ``d weight``, on
    whole ``[chunk, V]`` rows. ``chunks``: the row ranges to walk, in this order, together covering every row once
    (e.g. whole sequences); default: equal chunks of ``chunk_size`` rows or sized from the memory budget.
    ``shard``: the weight is one vocabulary shard; each chunk's statistics are merged across the group before its
    gradient is formed (``d hidden`` is then this shard's partial sum). ``deterministic``: each chunk in the
    batch-invariant blocks of ``_invariant_chunk`` (its ``[chunk, V]`` logits kept tile by tile); default chunks
    are then whole blocks, so that the gradients do not depend on the chunk size either.
    """
    lin = _Linear(weight, bias, inv_temperature, logit_scale, logit_softcap)
    n, vocab = hidden.shape[0], weight.shape[0]
    vocab_start = 0 if shard is None else shard.vocab_start
    acc = _GradAccumulator(hidden, lin, need_grad_hidden, need_grad_weight, need_grad_bias)
    logprobs = torch.empty(n, dtype=lin.dtype, device=hidden.device)
    entropy = torch.empty_like(logprobs) if spec.entropy else None
    all_stats = _empty_stats(n, lin, hidden.device, spec)
    if chunks is None:
        # One [rows, V] buffer: p takes the place of log p unless the entropy is trained (then a second, transient).
        per_chunk = rows_per_chunk(n, vocab if shard is None else shard.widest_shard, chunk_size=chunk_size,
                                   buffers=1 + lin.buffers)
        if deterministic:  # whole blocks: the same blocks, so the same gradient sums, whatever the chunk size
            per_chunk = max(1, per_chunk // BLOCK_ROWS) * BLOCK_ROWS
        chunks = _chunks(n, per_chunk)
    entropy_trained = False
    for rows in chunks:
        if deterministic:
            _invariant_fused_chunk(lin, acc, hidden, targets, rows, token_grads, logprobs, entropy, all_stats,
                                   spec, ignore_index, vocab_start, shard)
            continue
        tgt = _Targets.of(targets[rows], ignore_index, vocab_start, vocab)
        valid = targets[rows] != ignore_index
        z = lin.logits(hidden[rows])
        d = lin.softcap_grad(z)
        # p in place of log p in the statistics' pass, unless a shard must rescale log p first or the entropy is
        # trained (known from the first chunk's gradients: a wrong guess recomputes that chunk's log p)
        in_place = shard is None and not entropy_trained
        # z <- p (or p / p_norm) or log p
        stats, p, p_norm = _row_stats(z, tgt, spec, vocab_start, softmax=in_place, keep_log_p=False)
        if shard is not None:  # rescale log p from the shard's softmax to the whole vocabulary's
            shard_lse, stats = stats.lse, shard.all_reduce_stats(stats)
            z.add_((shard_lse - stats.lse).unsqueeze(1))
        _store(all_stats, rows, stats)
        logprobs[rows] = torch.where(valid, stats.target_logit - stats.lse, 0.0)
        if entropy is not None:
            entropy[rows] = torch.where(valid, stats.entropy, 0.0)
        row_grads = RowGrads(*token_grads(rows, logprobs[rows], None if entropy is None else entropy[rows], stats))
        if row_grads.entropy is not None and in_place:  # the entropy is trained after all: log p again
            entropy_trained, p = True, None
            z = lin.logits(hidden[rows]).sub_(stats.lse.unsqueeze(1))
        _add_chunk_grads(acc, lin, rows, hidden[rows], z, p, p_norm, d, stats, tgt, row_grads)
        del z, p, d  # chunks may grow (whole sequences): free this chunk's logits before a larger buffer is allocated
    return FusedResult(logprobs, entropy, acc.result(), all_stats)


def _add_chunk_grads(acc: _GradAccumulator, lin: _Linear, rows: slice, hidden_rows: Tensor, z: Tensor,
                     p: Tensor | None, p_norm: Tensor | None, d: Tensor | None, stats: RowStats, tgt: _Targets,
                     row_grads: RowGrads) -> None:
    """Add the gradients of a chunk of whole ``[C, V]`` rows from its loss's ``row_grads``: ``z`` holds ``log p``
    (overwritten), or with ``p`` given (times the rows' ``p_norm`` when given) anything; ``d`` the softcap's
    derivative. With an entropy gradient ``z`` must hold ``log p`` (its gradient needs both)."""
    grad_lp, grad_ent, every_col = row_grads.logprobs, row_grads.entropy, slice(0, lin.vocab_size)
    if grad_ent is not None:  # the entropy's gradient needs log p next to p: a second [C, V] buffer
        acc.add(rows, every_col, hidden_rows, _entropy_logit_grads(
            z, z.exp(), stats.entropy, tgt, grad_lp, grad_ent, lin.grad_scale, row_grads.probs_scale(), d,
            row_grads.logit_sum))
    else:  # dz = g (onehot - p) (entropy, if any, for the metrics only); p = p * p_norm when given
        probs_scale = row_grads.probs_scale() * lin.grad_scale
        acc.add_softmax_block(rows, every_col, hidden_rows, z.exp_() if p is None else p, tgt,
                              grad_lp * lin.grad_scale, probs_scale if p_norm is None else probs_scale * p_norm,
                              None if row_grads.logit_sum is None else row_grads.logit_sum * lin.grad_scale, d)


def chunk_log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, inv_temperature: float,
                    ignore_index: int, spec: RowStatsSpec = RowStatsSpec(), softmax: bool = False,
                    logit_scale: float = 1.0, logit_softcap: float | None = None, out: Tensor | None = None,
                    softcap_out: Tensor | None = None) -> tuple[RowStats, Tensor, Tensor | None, Tensor | None]:
    """The first half of one chunk of ``linear_logprobs_fused``, for a caller that computes the loss's row
    gradients in between (the compiled one-pass plan, ``ops.registered``): the rows' statistics ``[C]``, their
    ``log p [C, V]`` or with ``softmax`` their ``p`` (times the rows' ``p_norm [C]`` when given: ``_row_stats``),
    and with a softcap its derivative ``[C, V]``; the whole vocabulary of ``hidden [C, H]``'s rows. ``out``,
    ``softcap_out``: flat storage of at least ``C * V`` elements for the two blocks (default: new tensors)."""
    lin = _Linear(weight, bias, inv_temperature, logit_scale, logit_softcap)
    lin._buffer = out
    z = lin.logits(hidden)
    if out is not None and z.data_ptr() != out.data_ptr():  # a low-precision CUDA matmul: no out= variant
        z = out[:z.numel()].view(z.shape).copy_(z)
    d = lin.softcap_grad(z, out=None if softcap_out is None else softcap_out[:z.numel()].view(z.shape))
    stats, p, p_norm = _row_stats(z, _Targets.of(targets, ignore_index, 0, lin.vocab_size), spec, 0,
                                  softmax=softmax, keep_log_p=False)
    return stats, z if p is None else p, p_norm, d


def chunk_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, log_p: Tensor | None,
                p: Tensor | None, p_norm: Tensor | None, d: Tensor | None, stats: RowStats, row_grads: RowGrads, *,
                inv_temperature: float, ignore_index: int, need_grad_hidden: bool = True,
                grad_weight: Tensor | None = None, need_grad_bias: bool = False, logit_scale: float = 1.0,
                logit_softcap: float | None = None) -> LinearGrads:
    """The second half (``chunk_log_probs``'s): the chunk's gradients ``d hidden [C, H]`` and ``d bias [V]``, its
    ``d weight`` added to ``grad_weight [V, H]`` when given, from its ``log p [C, V]`` or ``p`` (and ``p_norm``),
    overwritten, the softcap's derivative ``d``, ``stats`` (``lse``, ``entropy``) and the loss's ``row_grads`` (0
    at ignored rows; no entropy gradient with ``p``)."""
    lin = _Linear(weight, bias, inv_temperature, logit_scale, logit_softcap)
    acc = _GradAccumulator(hidden, lin, need_grad_hidden, False, need_grad_bias)
    if grad_weight is not None:
        acc.add_weight_to(grad_weight)
    _add_chunk_grads(acc, lin, slice(0, hidden.shape[0]), hidden, log_p, p, p_norm, d, stats,
                     _Targets.of(targets, ignore_index, 0, lin.vocab_size), row_grads)
    return acc.result()


def _invariant_fused_chunk(lin: _Linear, acc: _GradAccumulator, hidden: Tensor, targets: Tensor, rows: slice,
                           token_grads: TokenGrads, logprobs: Tensor, entropy: Tensor | None, all_stats: RowStats,
                           spec: RowStatsSpec, ignore_index: int, vocab_start: int, shard: ShardMerge | None) -> None:
    """One chunk of ``linear_logprobs_fused`` in deterministic mode: its statistics exactly as the deterministic
    forward forms them (merged across the group block by block with a shard), then the gradients of each tile's
    blocks from their kept ``log p``, ``log p_global = log p_tile + lse_tile - lse``, in a fixed order (tiles outer,
    blocks inner)."""
    chunk = _invariant_chunk(lin, hidden, targets, rows, ignore_index, vocab_start, spec, keep=True)
    stats = chunk.stats
    if shard is not None:  # block by block: the merge's exp/log on fixed-length vectors
        stats = _empty_stats(stats.lse.shape[0], lin, hidden.device, spec)
        for start in range(0, stats.lse.shape[0], BLOCK_ROWS):
            block_rows = slice(start, start + BLOCK_ROWS)
            _store(stats, block_rows, shard.all_reduce_stats(chunk.stats.rows(block_rows)))
    count = rows.stop - rows.start
    _store(all_stats, rows, stats.rows(slice(0, count)))
    valid = targets[rows] != ignore_index
    logprobs[rows] = torch.where(valid, all_stats.target_logit[rows] - all_stats.lse[rows], 0.0)
    if entropy is not None:
        entropy[rows] = torch.where(valid, all_stats.entropy[rows], 0.0)
    row_grads = RowGrads(*token_grads(rows, logprobs[rows], None if entropy is None else entropy[rows],
                                      all_stats.rows(rows)))
    grad_lp, grad_ent, probs_scale = row_grads.logprobs, row_grads.entropy, row_grads.probs_scale()
    constant = row_grads.logit_sum
    for cols, log_ps, tile in chunk.tiles:
        for index, block_rows, local in chunk.blocks():
            tile_log_p = log_ps[index][:local.stop - local.start]
            shift = tile.lse[local] - stats.lse[local]  # global log p = the tile's + shift
            tgt = _Targets.of(targets[block_rows], ignore_index, vocab_start + cols.start, cols.stop - cols.start)
            d = None if lin.softcap is None else lin.softcap_grad(tile_log_p + tile.lse[local].unsqueeze(1))  # z
            if grad_ent is None:  # p = p_tile exp(shift): one [C, tile] pass less than shifting log p
                grad = _dense_softmax_grads(tile_log_p.exp_(), grad_lp[local] * lin.grad_scale, tgt,
                                            probs_scale[local] * lin.grad_scale * shift.exp(), d,
                                            None if constant is None else constant[local] * lin.grad_scale)
            else:
                tile_log_p.add_(shift.unsqueeze(1))
                grad = _entropy_logit_grads(tile_log_p, tile_log_p.exp(), stats.entropy[local], tgt, grad_lp[local],
                                            grad_ent[local], lin.grad_scale, probs_scale[local], d,
                                            None if constant is None else constant[local])
            acc.add(block_rows, cols, hidden[block_rows], grad)


PairBlock = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]]
"""``(log_ps [C, V'], log_pt [C, V'], work [3, C, V']) -> (terms [k, C], grads)``: per-row sums over a block of
vocabulary columns of two heads' global log-probabilities (shards add theirs; ``work[0]``, ``work[1]`` hold their
probabilities), and ``grads(terms, scale [C])``: each row's ``scale`` times its term's gradient w.r.t. the first
head's tempered logits ``[C, V']`` in ``log_pt``'s storage, from the rows' whole-vocabulary ``terms``
(``objectives.distill.divergence_block_``: ``log_pt`` and ``work`` overwritten)."""


class PairResult(NamedTuple):
    """Per-row terms ``[k, N]`` of two heads (with hard targets one more: the cross-entropy) and the first head's
    gradients."""

    terms: Tensor
    grads: LinearGrads


def linear_head(weight: Tensor, bias: Tensor | None, logit_args: dict) -> _Linear:
    """One head of ``linear_pair_fused``: ``weight [V, H]``, ``bias [V]`` and its logit transform
    (``LinearOptions.logit_args``: ``inv_temperature``, ``logit_scale``, ``logit_softcap``)."""
    return _Linear(weight, bias, **logit_args)


def linear_pair_fused(hidden: Tensor, lin: _Linear, other_hidden: Tensor, other: _Linear, block_fn: PairBlock,
                      row_scale: Tensor, *, hard_targets: Tensor | None = None,
                      hard_scale: Tensor | None = None, ignore_index: int = -100, need_grad_hidden: bool = True,
                      need_grad_weight: bool = True, need_grad_bias: bool = False, chunk_size: int | None = None,
                      shard: ShardMerge | None = None, deterministic: bool = False) -> PairResult:
    """Two heads over one vocabulary in one pass (distillation): per chunk of rows the transformed, tempered logits
    of the first head (``hidden [N, H]`` through ``lin``, trained) and of the other (``other_hidden [N, H']``
    through ``other``, frozen: no gradient), each head with its own logit transform (``linear_head``: scale, then
    softcap, then the temperature, TRL's order), their global log-softmax, the rows' ``block_fn`` terms and the
    gradient of ``sum_n row_scale[n] terms[0, n]`` (+ ``hard_scale[n]`` times the cross-entropy of ``hard_targets``
    on the first head's transformed logits before the temperature) w.r.t. the first head: four matmuls per chunk
    (two logits, ``d hidden``, ``d weight``) on whole ``[chunk, V]`` rows of both heads (the gradient lands in the
    other head's logits), the elementwise work in parts of ``PAIR_PART_BYTES`` (``_pair_part``).

    ``shard``: both weights are the same vocabulary shard; each chunk's lse are merged across the group, the terms
    summed (``all_reduce_sum``), so that every rank has the whole vocabulary's; ``d hidden`` is this shard's part.
    The chunk is then one part (the collectives per chunk), sized for all its buffers.

    ``deterministic``: chunks of exactly ``PAIR_BLOCK_ROWS`` rows whatever N, the chunk size or the budget (the
    last one padded with zero rows of scale 0), so that a row's terms and ``d hidden`` do not depend on its batch.
    """
    n, vocab = hidden.shape[0], lin.vocab_size
    width = vocab if shard is None else shard.widest_shard
    # the part's buffers: both heads' rows, block_fn's work (three), with a softcap its derivative
    part_buffers = 5 + lin.buffers
    if deterministic:
        per_chunk, pad = PAIR_BLOCK_ROWS, -n % PAIR_BLOCK_ROWS
        hidden, other_hidden, row_scale = (torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
                                           for t in (hidden, other_hidden, row_scale))
        if hard_targets is not None:
            hard_targets = torch.cat([hard_targets, hard_targets.new_full((pad,), ignore_index)])
            hard_scale = torch.cat([hard_scale, hard_scale.new_zeros(pad)])
    else:
        per_chunk = int(rows_per_chunk(n, width, chunk_size=chunk_size,
                                       buffers=2 if shard is None else part_buffers,
                                       element_bytes=lin.weight.element_size() / PAIR_BUDGET_CHUNKS))
    per_chunk = max(1, min(per_chunk, hidden.shape[0]))
    per_part = per_chunk if shard is not None else \
        max(1, min(per_chunk, PAIR_PART_BYTES // (part_buffers * width * lin.weight.element_size())))
    acc = _GradAccumulator(hidden, lin, need_grad_hidden, need_grad_weight, need_grad_bias)
    work = torch.empty(3 + lin.buffers, per_part * vocab, dtype=lin.dtype, device=hidden.device)
    part = partial(_pair_part, lin=lin, block_fn=block_fn, ignore_index=ignore_index,
                   vocab_start=0 if shard is None else shard.vocab_start, shard=shard,
                   need_grads=need_grad_hidden or need_grad_weight or need_grad_bias)
    all_terms = []
    for rows in list(_chunks(hidden.shape[0], per_chunk)) or [slice(0, 0)]:  # no row: the terms' shape [k, 0]
        zs, zt = lin.logits(hidden[rows]), other.logits(other_hidden[rows].to(other.weight.dtype))
        scale, targets = row_scale[rows] * lin.grad_scale, None if hard_targets is None else hard_targets[rows]
        for sub in list(_chunks(zs.shape[0], per_part)) or [slice(0, 0)]:
            part_work = work[:, :zs[sub].numel()].view(work.shape[0], *zs[sub].shape)
            all_terms.append(part(zs[sub], zt[sub], part_work, scale[sub], None if targets is None else targets[sub],
                                  None if hard_scale is None else hard_scale[rows][sub]))
        if need_grad_hidden or need_grad_weight or need_grad_bias:  # zt holds the chunk's logit gradients
            acc.add(rows, slice(0, vocab), hidden[rows], zt)
        del zs, zt
    grads = acc.result()
    return PairResult(torch.cat(all_terms, 1)[:, :n], grads._replace(hidden=None if grads.hidden is None
                                                                        else grads.hidden[:n]))


def _softmax_(z: Tensor, probs: Tensor) -> Tensor:
    """In place: ``z [P, V]`` becomes its log-softmax and ``probs`` its softmax; returns the rows' lse ``[P]``. One
    exponential per element, the softmax's (on CPU twice as fast as ``exp``): the lse is the top logit minus the log
    of the top probability (``1 / sum exp(z - top)``)."""
    top = z.amax(1)
    torch.ops.aten._softmax.out(z, 1, False, out=probs)
    lse = top - probs.amax(1).log_()
    z.sub_(lse.unsqueeze(1))
    return lse


def _pair_part(zs: Tensor, zt: Tensor, work: Tensor, scale: Tensor, hard_targets: Tensor | None,
               hard_scale: Tensor | None, *, lin: _Linear, block_fn: PairBlock, ignore_index: int, vocab_start: int,
               shard: ShardMerge | None, need_grads: bool) -> Tensor:
    """``linear_pair_fused``'s elementwise work on a part ``[P, V']`` of a chunk's rows, in place: ``zs``, ``zt``
    the two heads' tempered logits, ``work [3 (+1), P, V']``, ``scale [P]`` the rows' ``row_scale`` times the
    first head's ``grad_scale``. Returns the part's terms ``[k, P]``; with ``need_grads``, ``zt`` then holds the
    loss's gradient w.r.t. the first head's raw logits."""
    d = None if lin.softcap is None else lin.softcap_grad(zs, out=work[3])
    hard = None
    if hard_targets is not None:  # the cross-entropy on the logits before the temperature
        tgt = _Targets.of(hard_targets, ignore_index, vocab_start, zs.shape[1])
        raw = torch.div(zs, lin.inv_temperature, out=work[0])
        hard = RowStats(torch.logsumexp(raw, 1), raw.gather(1, tgt.index).squeeze(1).masked_fill(~tgt.valid, 0))
    if shard is None:
        lse_s = _softmax_(zs, work[0])
        _softmax_(zt, work[1])
    else:  # the lse merged across the group first
        lse_s, lse_t = torch.logsumexp(zs, 1), torch.logsumexp(zt, 1)
        lse_s = shard.all_reduce_stats(RowStats(lse_s, torch.zeros_like(lse_s))).lse
        lse_t = shard.all_reduce_stats(RowStats(lse_t, torch.zeros_like(lse_t))).lse
        hard = None if hard is None else shard.all_reduce_stats(hard)
        for z, lse, probs in ((zs, lse_s, work[0]), (zt, lse_t, work[1])):
            torch.exp(z.sub_(lse.unsqueeze(1)), out=probs)
    log_ps, log_pt = zs, zt
    terms, grads_of = block_fn(log_ps, log_pt, work[:3])
    if shard is not None:
        terms = shard.all_reduce_sum(terms)
    if hard is not None:
        terms = torch.cat([terms, (hard.lse - hard.target_logit).unsqueeze(0)])
    if not need_grads:
        return terms
    grad = grads_of(terms, scale)  # in log_pt's storage: zt
    if hard is not None:  # + hard_scale (p_raw - onehot) logit_scale, p_raw = exp(z / inv_temperature - lse_raw)
        p_raw = log_ps.add_(lse_s.unsqueeze(1)).div_(lin.inv_temperature).sub_(hard.lse.unsqueeze(1)).exp_()
        hard_scale = hard_scale * lin.logit_scale
        grad.addcmul_(p_raw, hard_scale.unsqueeze(1))
        grad.scatter_add_(1, tgt.index, -torch.where(tgt.valid, hard_scale, 0.0).unsqueeze(1).to(grad.dtype))
    if d is not None:  # the softcap's derivative
        grad.mul_(d)
    return terms
