"""Chunked PyTorch backend of the fused linear log-prob ops: the same math as ``fastalign.kernels``, any device.

Tokens are processed ``chunk`` rows at a time (``fastalign.ops.chunking``), so the ``[chunk, V]`` logits are the
only vocabulary-sized temporaries. Logits ``z = (hidden @ weight.T + bias) * inv_temperature`` are formed in fp32
(float64 stays float64), reductions and the weight gradient are accumulated in that dtype.

The three entry points mirror the kernels and share their per-row statistics (mergeable across vocab shards):
``linear_lse_forward`` (log-sum-exp, target logit, expected logit), ``linear_logprobs_backward`` (recompute the
logits, then the gradients), and ``linear_logprobs_fused`` (a loss whose per-token gradient is known in the forward:
logits, ``d hidden`` and ``d weight`` in one pass, three matmuls).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .chunking import rows_per_chunk

TokenGrads = Callable[[slice, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
"""``(rows, logprobs [C], entropy [C] | None) -> (d loss / d logprobs [C], d loss / d entropy [C] | None)``."""


class RowStats(NamedTuple):
    """Per-row statistics of the tempered logits, each ``[N]``: mergeable across vocabulary shards."""

    lse: Tensor
    target_logit: Tensor  # 0 where the target is ignored or outside this shard
    expected_logit: Tensor | None  # sum_v softmax(z)_v z_v, only when entropy is asked for


class LinearGrads(NamedTuple):
    """Gradients in the compute dtype (fp32, or float64): ``[N, H]``, ``[V, H]``, ``[V]``; None where not needed."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, float64 for float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Linear:
    """The lm_head operands prepared once per call, and the chunk-level products with fp32 accumulation."""

    def __init__(self, weight: Tensor, bias: Tensor | None, inv_temperature: float):
        self.dtype = compute_dtype(weight.dtype)
        # No fp32 output for low-precision matmuls on CPU: upcast the weight once per call there.
        upcast = weight.device.type != "cuda" and weight.dtype != self.dtype
        self.weight = weight.to(self.dtype) if upcast else weight
        self.bias = None if bias is None else bias.to(self.dtype)
        self.inv_temperature = inv_temperature
        self._logits: Tensor | None = None  # [rows, V] buffer reused by every chunk (see ``logits``)

    def _mm(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dtype == self.dtype:
            return a @ b
        return torch.mm(a, b, out_dtype=self.dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        """Tempered logits ``[C, V]`` of a chunk of rows ``hidden [C, H]``, valid until the next call.

        They are written into one buffer reused by every chunk: on CPU, a fresh ``[C, V]`` tensor per chunk costs
        page faults worth a fifth of the matmul.
        """
        h = hidden.to(self.weight.dtype)
        if h.dtype == self.dtype:
            rows = h.shape[0]
            if self._logits is None or self._logits.shape[0] < rows:
                self._logits = None  # free the smaller buffer first
                self._logits = torch.empty(rows, self.weight.shape[0], dtype=self.dtype, device=h.device)
            z = self._logits[:rows]
            if self.bias is not None:
                torch.addmm(self.bias, h, self.weight.t(), out=z)
            else:
                torch.mm(h, self.weight.t(), out=z)
        else:  # low-precision matmul with an fp32 output (CUDA): no out= variant
            z = self._mm(h, self.weight.t())
            if self.bias is not None:
                z.add_(self.bias)
        if self.inv_temperature != 1.0:
            z.mul_(self.inv_temperature)
        return z

    def times_weight(self, rows: Tensor) -> Tensor:
        """``rows [C, V] @ weight [V, H]`` -> ``[C, H]`` in the compute dtype."""
        return self._mm(rows.to(self.weight.dtype), self.weight)


class _Targets(NamedTuple):
    """Targets of a chunk relative to this vocabulary shard."""

    index: Tensor  # [C, 1] int64, a safe column (0) where not valid
    valid: Tensor  # [C] bool: not ignored and inside [vocab_start, vocab_start + V)

    @classmethod
    def of(cls, targets: Tensor, ignore_index: int, vocab_start: int, vocab_size: int) -> _Targets:
        local = targets - vocab_start
        valid = (targets != ignore_index) & (local >= 0) & (local < vocab_size)
        return cls(torch.where(valid, local, 0).unsqueeze(1), valid)


def _chunks(num_rows: int, rows: int) -> Iterator[slice]:
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def _row_stats(z: Tensor, tgt: _Targets, with_entropy: bool, in_place: str | None = None) -> RowStats:
    """Statistics of one chunk of tempered logits ``z [C, V]``, left unchanged unless ``in_place`` (no entropy):
    ``"scratch"`` overwrites it (only the statistics are needed), ``"softmax"`` replaces it by ``softmax(z)``. In
    place, one fused row-wise log-softmax pass (each row is reduced while in cache) serves the lse, and one exp pass
    the probabilities: cheaper than ``torch.logsumexp``, which makes several passes and a ``[C, V]`` temporary."""
    target_logit = z.gather(1, tgt.index).squeeze(1).masked_fill(~tgt.valid, 0.0)
    if in_place is not None and not with_entropy:
        first = z[:, 0].clone()
        torch._log_softmax(z, 1, False, out=z)  # z <- z - lse, row by row (an aliased out is safe row-wise)
        lse = first - z[:, 0]
        if in_place == "softmax":
            z.exp_()
        return RowStats(lse, target_logit, None)
    if not with_entropy:
        return RowStats(torch.logsumexp(z, dim=1), target_logit, None)
    row_max = z.amax(dim=1, keepdim=True)
    unnormalized = (z - row_max).exp_()  # exp(z - max): one exp pass serves lse and entropy
    sum_exp = unnormalized.sum(dim=1)
    # sum_v exp(z_v - max) * z_v as a batched dot product: no second [C, V] temporary
    weighted = torch.bmm(unnormalized.unsqueeze(1), z.unsqueeze(2)).view(-1)
    return RowStats(row_max.squeeze(1) + sum_exp.log(), target_logit, weighted / sum_exp)


def _logit_grads(z: Tensor, stats: RowStats, tgt: _Targets, grad_logprobs: Tensor, grad_entropy: Tensor | None,
                 inv_temperature: float) -> Tensor:
    """Gradient w.r.t. the raw logits ``[C, V]``, computed in place of ``z``.

    ``dz = g_lp (onehot - p) - g_ent p (z - E_p[z])`` (entropy ``H = lse - E_p[z]``), times ``inv_temperature``.
    """
    if grad_entropy is None:
        grad = z.sub_(stats.lse.unsqueeze(1)).exp_().mul_(-grad_logprobs.unsqueeze(1))
    else:
        log_p = z.sub_(stats.lse.unsqueeze(1))
        p = log_p.exp()
        # z - E[z] = log p + lse - E[z]; then -(g_lp + g_ent (z - E[z])) p
        shift = (stats.lse - stats.expected_logit).unsqueeze(1)
        grad = log_p.add_(shift).mul_(grad_entropy.unsqueeze(1)).add_(grad_logprobs.unsqueeze(1)).mul_(p).neg_()
    grad.scatter_add_(1, tgt.index, torch.where(tgt.valid, grad_logprobs, 0.0).unsqueeze(1).to(grad.dtype))
    if inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return grad


class _GradAccumulator:
    """Buffers for ``d hidden [N, H]``, ``d weight [V, H]``, ``d bias [V]`` (compute dtype), filled chunk by chunk."""

    def __init__(self, hidden: Tensor, lin: _Linear, need_hidden: bool, need_weight: bool, need_bias: bool):
        kw = dict(dtype=lin.dtype, device=hidden.device)
        vocab, width = lin.weight.shape
        self.lin = lin
        self.hidden = torch.empty(hidden.shape[0], width, **kw) if need_hidden else None
        self.weight = torch.zeros(vocab, width, **kw) if need_weight else None
        self.bias = torch.zeros(vocab, **kw) if need_bias else None

    def add(self, rows: slice, hidden_rows: Tensor, logit_grads: Tensor) -> None:
        if self.hidden is not None:
            self.hidden[rows] = self.lin.times_weight(logit_grads)
        if self.weight is not None:
            self.weight.addmm_(logit_grads.t(), hidden_rows.to(self.lin.dtype))
        if self.bias is not None:
            self.bias.add_(logit_grads.sum(dim=0))

    def add_softmax(self, rows: slice, hidden_rows: Tensor, probs: Tensor, scale: Tensor, tgt: _Targets) -> None:
        """Add the gradients of logit gradients ``scale (onehot - probs)`` (``scale [C]``) without forming them: the
        per-row ``-scale`` goes to the ``[C, H]`` side of the products, the one-hot term to a gather and an
        ``index_add_`` (one ``[C, V]`` pass less)."""
        valid_scale = torch.where(tgt.valid, scale, 0.0).unsqueeze(1)
        target = tgt.index.squeeze(1)
        if self.hidden is not None:
            mean_weight = self.lin.times_weight(probs)  # sum_v p_v W_v
            self.hidden[rows] = self.lin.weight[target].to(self.lin.dtype).mul_(valid_scale).sub_(
                mean_weight.mul_(scale.unsqueeze(1)))
        if self.weight is not None:
            h = hidden_rows.to(self.lin.dtype)
            self.weight.addmm_(probs.t(), h * -scale.unsqueeze(1))
            self.weight.index_add_(0, target, h * valid_scale)
        if self.bias is not None:
            self.bias.addmv_(probs.t(), -scale)
            self.bias.index_add_(0, target, valid_scale.squeeze(1))

    def result(self) -> LinearGrads:
        return LinearGrads(self.hidden, self.weight, self.bias)


VOCAB_TILE = 4096
TILE_ROWS = 512
"""CPU tiles (vocabulary tiles outer, token chunks inner): a ``[512, 4096]`` fp32 block of logits (8 MiB) is still in
cache for the elementwise passes after its matmul; a whole ``[chunk, V]`` block (64 MiB) streams from DRAM in each."""


def merge_row_stats(a: RowStats, b: RowStats) -> RowStats:
    """Row statistics over the union of two disjoint vocabulary shards (what vocab parallelism all-reduces)."""
    lse = torch.logaddexp(a.lse, b.lse)
    expected = None
    if a.expected_logit is not None:
        expected = a.expected_logit * (a.lse - lse).exp() + b.expected_logit * (b.lse - lse).exp()
    return RowStats(lse, a.target_logit + b.target_logit, expected)


def linear_lse_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                       inv_temperature: float, ignore_index: int, vocab_start: int = 0, with_entropy: bool = False,
                       chunk_size: int | None = None) -> RowStats:
    """Row statistics of ``(hidden [N, H] @ weight[V, H].T + bias) * inv_temperature``, one token chunk at a time."""
    if weight.shape[0] > VOCAB_TILE:
        stats = None
        for start in range(0, weight.shape[0], VOCAB_TILE):
            tile = slice(start, start + VOCAB_TILE)
            part = linear_lse_forward(hidden, weight[tile], None if bias is None else bias[tile], targets,
                                      inv_temperature=inv_temperature, ignore_index=ignore_index,
                                      vocab_start=vocab_start + start, with_entropy=with_entropy,
                                      chunk_size=chunk_size or TILE_ROWS)
            stats = part if stats is None else merge_row_stats(stats, part)
        return stats
    lin = _Linear(weight, bias, inv_temperature)
    n, vocab = hidden.shape[0], weight.shape[0]
    lse = torch.empty(n, dtype=lin.dtype, device=hidden.device)
    target_logit = torch.empty_like(lse)
    expected = torch.empty_like(lse) if with_entropy else None
    for rows in _chunks(n, rows_per_chunk(n, vocab, chunk_size=chunk_size, buffers=2 if with_entropy else 1)):
        stats = _row_stats(lin.logits(hidden[rows]), _Targets.of(targets[rows], ignore_index, vocab_start, vocab),
                           with_entropy, in_place="scratch")
        lse[rows], target_logit[rows] = stats.lse, stats.target_logit
        if expected is not None:
            expected[rows] = stats.expected_logit
    return RowStats(lse, target_logit, expected)


def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, stats: RowStats,
                             grad_logprobs: Tensor, grad_entropy: Tensor | None = None, *, inv_temperature: float,
                             ignore_index: int, vocab_start: int = 0, need_grad_hidden: bool = True,
                             need_grad_weight: bool = True, need_grad_bias: bool = False,
                             chunk_size: int | None = None) -> LinearGrads:
    """Gradients for upstream ``grad_logprobs [N]`` (and ``grad_entropy [N]``), recomputing the logits chunk by chunk.

    ``stats`` are the (global) row statistics of the forward. Callers zero the upstream gradients at ignored rows.
    """
    if grad_entropy is None and weight.shape[0] > VOCAB_TILE:
        return _tiled_logprobs_backward(hidden, weight, bias, targets, stats.lse, grad_logprobs,
                                        inv_temperature=inv_temperature, ignore_index=ignore_index,
                                        vocab_start=vocab_start, need_grad_hidden=need_grad_hidden,
                                        need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias,
                                        chunk_size=chunk_size or TILE_ROWS)
    lin = _Linear(weight, bias, inv_temperature)
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _GradAccumulator(hidden, lin, need_grad_hidden, need_grad_weight, need_grad_bias)
    buffers = 2 if grad_entropy is not None else 1
    for rows in _chunks(n, rows_per_chunk(n, vocab, chunk_size=chunk_size, buffers=buffers)):
        chunk_stats = RowStats(*(None if s is None else s[rows] for s in stats))
        dz = _logit_grads(lin.logits(hidden[rows]), chunk_stats,
                          _Targets.of(targets[rows], ignore_index, vocab_start, vocab), grad_logprobs[rows],
                          None if grad_entropy is None else grad_entropy[rows], inv_temperature)
        acc.add(rows, hidden[rows], dz)
    return acc.result()


def _tiled_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                             grad_logprobs: Tensor, *, inv_temperature: float, ignore_index: int, vocab_start: int,
                             need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool,
                             chunk_size: int) -> LinearGrads:
    """``linear_logprobs_backward`` without entropy, vocabulary tiles outer and token chunks inner (the
    ``[chunk, tile]`` probabilities stay in cache). ``dz = g (onehot - p)`` is never formed: the per-row ``-g``
    goes to the ``[N, H]`` side of the products, the one-hot term to a row gather and an ``index_add_``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(weight.dtype)
    kw = dict(dtype=dtype, device=hidden.device)
    g = grad_logprobs.to(dtype) * inv_temperature
    h = hidden.to(dtype)
    neg_gh = h * (-g).unsqueeze(1) if need_grad_weight else None
    probs_times_weight = torch.zeros(n, weight.shape[1], **kw) if need_grad_hidden else None  # sum_v p_v W_v
    d_weight = torch.zeros(vocab, weight.shape[1], **kw) if need_grad_weight else None
    d_bias = torch.zeros(vocab, **kw) if need_grad_bias else None
    for start in range(0, vocab, VOCAB_TILE):
        tile = slice(start, start + VOCAB_TILE)
        lin = _Linear(weight[tile], None if bias is None else bias[tile], inv_temperature)
        for rows in _chunks(n, chunk_size):
            probs = lin.logits(hidden[rows]).sub_(lse[rows].unsqueeze(1)).exp_()
            if probs_times_weight is not None:
                probs_times_weight[rows] += lin.times_weight(probs)
            if d_weight is not None:
                d_weight[tile].addmm_(probs.t(), neg_gh[rows])
            if d_bias is not None:
                d_bias[tile].addmv_(probs.t(), -g[rows])
    tgt = _Targets.of(targets, ignore_index, vocab_start, vocab)
    index, g_target = tgt.index.squeeze(1), torch.where(tgt.valid, g, 0.0)
    d_hidden = None
    if probs_times_weight is not None:
        target_rows = weight[index].to(dtype)
        d_hidden = probs_times_weight.mul_((-g).unsqueeze(1)).add_(target_rows.mul_(g_target.unsqueeze(1)))
    if d_weight is not None:
        d_weight.index_add_(0, index, h * g_target.unsqueeze(1))
    if d_bias is not None:
        d_bias.index_add_(0, index, g_target)
    return LinearGrads(d_hidden, d_weight, d_bias)


class FusedResult(NamedTuple):
    """Per-token outputs ``[N]`` (0 at ignored rows) and the gradients of the loss."""

    logprobs: Tensor
    entropy: Tensor | None
    grads: LinearGrads


def linear_logprobs_fused(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                          token_grads: TokenGrads, *, inv_temperature: float, ignore_index: int,
                          with_entropy: bool = False, need_grad_hidden: bool = True, need_grad_weight: bool = True,
                          need_grad_bias: bool = False, chunk_size: int | None = None,
                          chunks: Sequence[slice] | None = None) -> FusedResult:
    """Log-probs (and entropy) and, in the same pass, the gradients of a loss whose per-token gradient is known.

    ``token_grads(rows, logprobs, entropy)`` returns ``d loss / d logprobs`` (and ``d loss / d entropy``) for the
    chunk ``rows``; it must give 0 at ignored rows. Three matmuls per chunk: logits, ``d hidden``, ``d weight``.
    ``chunks``: the row ranges to walk, in this order, together covering every row once (e.g. whole sequences);
    default: equal chunks of ``chunk_size`` rows or sized from the memory budget.
    """
    lin = _Linear(weight, bias, inv_temperature)
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _GradAccumulator(hidden, lin, need_grad_hidden, need_grad_weight, need_grad_bias)
    logprobs = torch.empty(n, dtype=lin.dtype, device=hidden.device)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    if chunks is None:
        chunks = _chunks(n, rows_per_chunk(n, vocab, chunk_size=chunk_size, buffers=2 if with_entropy else 1))
    for rows in chunks:
        tgt = _Targets.of(targets[rows], ignore_index, 0, vocab)
        z = lin.logits(hidden[rows])
        stats = _row_stats(z, tgt, with_entropy, in_place="softmax")
        logprobs[rows] = torch.where(tgt.valid, stats.target_logit - stats.lse, 0.0)
        if entropy is not None:
            entropy[rows] = torch.where(tgt.valid, stats.lse - stats.expected_logit, 0.0)
        grad_lp, grad_ent = token_grads(rows, logprobs[rows], None if entropy is None else entropy[rows])
        if with_entropy:
            acc.add(rows, hidden[rows], _logit_grads(z, stats, tgt, grad_lp, grad_ent, inv_temperature))
        else:  # z holds the probabilities
            acc.add_softmax(rows, hidden[rows], z, grad_lp * inv_temperature, tgt)
        del z  # chunks may grow (whole sequences): free this chunk's logits before a larger buffer is allocated
    return FusedResult(logprobs, entropy, acc.result())


class WeightMoments(NamedTuple):
    """Per-row ``[N, H]`` softmax moments of the weight rows: what ``d hidden`` needs when the weight is frozen."""

    mean: Tensor  # sum_v p_v W_v
    entropy: Tensor | None  # sum_v p_v (z_v - E_p[z]) W_v


def linear_weight_moments(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                          inv_temperature: float, ignore_index: int, with_entropy: bool = False,
                          chunk_size: int | None = None) -> tuple[RowStats, WeightMoments]:
    """Forward statistics plus the weight moments, so that with a frozen weight the backward is elementwise:

    ``d hidden = inv_temperature * (g_lp (W_y - mean) - g_ent entropy)``. Two matmuls (three with entropy).
    """
    if not with_entropy and weight.shape[0] > VOCAB_TILE:
        return _tiled_weight_moments(hidden, weight, bias, targets, inv_temperature=inv_temperature,
                                     ignore_index=ignore_index, chunk_size=chunk_size or TILE_ROWS)
    lin = _Linear(weight, bias, inv_temperature)
    n, vocab = hidden.shape[0], weight.shape[0]
    lse = torch.empty(n, dtype=lin.dtype, device=hidden.device)
    target_logit = torch.empty_like(lse)
    expected = torch.empty_like(lse) if with_entropy else None
    mean = torch.empty(n, weight.shape[1], dtype=lin.dtype, device=hidden.device)
    ent = torch.empty_like(mean) if with_entropy else None
    for rows in _chunks(n, rows_per_chunk(n, vocab, chunk_size=chunk_size, buffers=3 if with_entropy else 1)):
        z = lin.logits(hidden[rows])
        tgt = _Targets.of(targets[rows], ignore_index, 0, vocab)
        if not with_entropy:
            stats = _row_stats(z, tgt, False, in_place="softmax")  # z <- p: one exp pass, no [C, V] temporary
            lse[rows], target_logit[rows] = stats.lse, stats.target_logit
            mean[rows] = lin.times_weight(z)
            continue
        stats = _row_stats(z, tgt, with_entropy)
        lse[rows], target_logit[rows] = stats.lse, stats.target_logit
        p = (z - stats.lse.unsqueeze(1)).exp_()
        mean[rows] = lin.times_weight(p)
        if with_entropy:
            expected[rows] = stats.expected_logit
            ent[rows] = lin.times_weight(z.sub_(stats.expected_logit.unsqueeze(1)).mul_(p))
    return RowStats(lse, target_logit, expected), WeightMoments(mean, ent)


def _tiled_weight_moments(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                          inv_temperature: float, ignore_index: int,
                          chunk_size: int) -> tuple[RowStats, WeightMoments]:
    """``linear_weight_moments`` without entropy, vocabulary tiles outer and token chunks inner, so that each
    ``[chunk, tile]`` block of logits is reduced while in cache: online softmax (running max ``m``, sum ``s``) and
    ``acc = sum_v exp(z_v - m) W_v``, rescaled when the running max grows; ``mean = acc / s`` at the end."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(weight.dtype)
    kw = dict(dtype=dtype, device=hidden.device)
    row_max, sum_exp = torch.full((n,), float("-inf"), **kw), torch.zeros(n, **kw)
    target_logit, acc = torch.zeros(n, **kw), torch.zeros(n, weight.shape[1], **kw)
    for start in range(0, vocab, VOCAB_TILE):
        tile = slice(start, start + VOCAB_TILE)
        lin = _Linear(weight[tile], None if bias is None else bias[tile], inv_temperature)
        for rows in _chunks(n, chunk_size):
            z = lin.logits(hidden[rows])
            tgt = _Targets.of(targets[rows], ignore_index, start, lin.weight.shape[0])
            target_logit[rows] += z.gather(1, tgt.index).squeeze(1).masked_fill_(~tgt.valid, 0.0)
            new_max = torch.maximum(row_max[rows], z.amax(dim=1))
            rescale = (row_max[rows] - new_max).exp_()
            unnormalized = z.sub_(new_max.unsqueeze(1)).exp_()  # exp(z - running max), in place
            sum_exp[rows] = sum_exp[rows].mul_(rescale).add_(unnormalized.sum(dim=1))
            acc[rows] = acc[rows].mul_(rescale.unsqueeze(1)).add_(lin.times_weight(unnormalized))
            row_max[rows] = new_max
    lse = row_max + sum_exp.log()
    return RowStats(lse, target_logit, None), WeightMoments(acc.div_(sum_exp.unsqueeze(1)), None)


def hidden_grad_from_moments(weight: Tensor, targets: Tensor, moments: WeightMoments, grad_logprobs: Tensor,
                             grad_entropy: Tensor | None, *, inv_temperature: float, ignore_index: int) -> Tensor:
    """Elementwise ``d hidden [N, H]`` from the moments of ``linear_weight_moments`` (no matmul over V)."""
    valid = targets != ignore_index
    target_rows = weight[torch.where(valid, targets, 0)].to(moments.mean.dtype)
    grad = (target_rows - moments.mean).mul_(grad_logprobs.unsqueeze(1))
    if grad_entropy is not None:
        grad.sub_(moments.entropy * grad_entropy.unsqueeze(1))
    return grad.mul_(inv_temperature) if inv_temperature != 1.0 else grad
