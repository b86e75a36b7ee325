"""Forward of the fused linear log-softmax: per-row log-sum-exp, target logit and the optional statistics of a
`RowStatsSpec` (entropy, logsumexp(2z), sum of logits, arg-max) of z = (hidden @ weight.T + bias) * inv_temperature,
one [BLOCK_N, BLOCK_V] logit tile at a time; with a logit transform (`logit_scale`, `logit_softcap`), of
z = softcap(logit_scale * (hidden @ weight.T + bias)) * inv_temperature, softcap(x) = c tanh(x / c), formed in the
tile before any statistic (`transform_args` folds the scalars; `transform_tile` applies them).

The statistics merge across vocabulary shards (and across the vocab splits of one launch); log-prob =
target_logit - lse once they are merged. The entropy is accumulated centred on the running max, as
sum_v exp(z - m) (z - m) (terms of one sign), never as lse - E_p[z], a difference of two numbers of size |z|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import KernelConfig, check_device, interpreting
from .row_stats import RowStats, RowStatsSpec


@dataclass(frozen=True)
class TileConfig(KernelConfig):
    """Tile sizes and launch options of the kernels that form logit tiles: `_lse_forward_kernel`, and in
    `logprobs_backward.py` the atomic and the logit-gradient kernels (the compile test builds exactly these)."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    GROUP_N: int  # token blocks per group of the grouped program order
    DOT_PRECISION: str
    num_warps: int
    num_stages: int


def lse_forward_config(dtype: torch.dtype, *, h: int, interpret: bool = False) -> TileConfig:
    """GPU config for inputs of `dtype` and hidden size `h`; `interpret=True` gives small tiles that keep the CPU
    interpreter fast. docs/kernels.md lists the registers each config takes (128 x 128 tiles reach 255 and spill
    on sm_80).

    fp32 inputs use 3xTF32 tensor-core dots (about fp32 accuracy, plain TF32 would not be), whose split operands
    need a smaller H chunk to stay clear of spills. When H is not a multiple of 16 the loads of a row are not
    vectorized and their pointers and masks fill the registers, so the chunk shrinks again: 16-bit inputs at
    BLOCK_H = 64 spill on sm_80 (16 to 64 bytes), and at 16 too since the grouped 1-D grid (16 bytes at 128
    registers, ptxas's choice), at 32 they take 204-253; fp32 at 16 take up to 244, at 8 up to 220.
    """
    precision = "tf32x3" if dtype == torch.float32 else "tf32"  # the precision only matters for fp32 operands
    if interpret:
        return TileConfig(16, 32, 16, 2, precision, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        block_h = 16 if h % 16 == 0 else 8
    else:
        block_h = 64 if h % 16 == 0 else 32
    return TileConfig(128, 64, block_h, 8, precision, num_warps=8, num_stages=3)


def transform_args(inv_temperature: float, logit_scale: float, logit_softcap: float | None) -> tuple[float, float]:
    """The transform's two kernel scalars `(out_scale, tanh_scale)`: the logits are `acc * out_scale`, or with a
    softcap (the kernels' `SOFTCAP` flag) `tanh(acc * tanh_scale) * out_scale`, whose derivative w.r.t. `acc` is
    `out_scale * tanh_scale * (1 - tanh^2)`."""
    if logit_softcap is None:
        return float(logit_scale * inv_temperature), 1.0
    return float(logit_softcap * inv_temperature), float(logit_scale / logit_softcap)


@triton.jit
def transform_tile(acc, out_scale, tanh_scale, SOFTCAP: tl.constexpr):
    """The transformed, tempered logits of the raw fp32 tile `acc` (`transform_args`)."""
    if SOFTCAP:  # tanh(x) = 1 - 2 / (exp(2x) + 1): +-1 where exp(2x) overflows or vanishes (no libdevice in the
        # interpreter); its absolute error, a few ulps of 1, is a few ulps of the cap in the logits. An approximate
        # reciprocal (2 ulp): the full-range division doubled the backward tile's instructions and spilled it.
        return (1.0 - tl.fdiv(2.0, tl.exp(2.0 * acc * tanh_scale) + 1.0, approx=True)) * out_scale
    return acc * out_scale


@triton.jit
def transform_grad(dz, z, out_scale, tanh_scale, SOFTCAP: tl.constexpr):
    """The gradient w.r.t. the raw tile `acc` of `dz`, the gradient w.r.t. its transform `z = transform_tile(acc)`:
    times `out_scale`, or with a softcap (tanh = z / out_scale) times `out_scale * tanh_scale * (1 - tanh^2)`."""
    if SOFTCAP:
        tanh = z * (1.0 / out_scale)
        return dz * (out_scale * tanh_scale) * (1.0 - tanh * tanh)
    return dz * out_scale


@triton.jit
def logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H, out_scale, tanh_scale,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The transformed, tempered logit tile fp32 [BLOCK_N, BLOCK_V] of token rows `rows` against vocab columns `cols`
    (`transform_tile` of hidden @ weight.T + bias over H chunks, fp32 accumulator); rows and columns outside
    `row_ok` / `col_ok` hold finite values (their loads give 0)."""
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * H  # int64: rows * H overflows int32 at scale
    weight_rows = weight_ptr + cols.to(tl.int64)[:, None] * H
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(hidden_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        h = h.to(weight_ptr.dtype.element_ty)  # 16-bit hidden with an fp32 weight: an fp32 product
        w = tl.load(weight_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return transform_tile(acc, out_scale, tanh_scale, SOFTCAP)


@triton.jit
def split_program(N, V, tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """This program's (vocab split, token rows [BLOCK_N], their mask, first column, end column) of a 1-D grid of
    cdiv(N, BLOCK_N) * num_splits programs in grouped order: consecutive programs take GROUP_N token blocks across
    the splits, so the programs running together share GROUP_N blocks of hidden rows and a few weight tiles per
    step in L2 (with the token blocks fastest, every SM would stream its own [BLOCK_N, H] block once per vocab
    tile; `fastalign.gpu_model`)."""
    pid = tl.program_id(0)
    num_splits = tl.cdiv(tl.cdiv(V, BLOCK_V), tiles_per_split)
    pid_n, split = tl.swizzle2d(pid // num_splits, pid % num_splits, tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    v_begin = split * tiles_per_split * BLOCK_V
    return split, rows, rows < N, v_begin, tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)


@triton.jit
def _lse_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,  # [N, H], [V, H], [V], [N] (all contiguous)
    max_ptr, sumexp_ptr, sum_ez_ptr, target_logit_ptr,  # partial statistics, fp32 [num_splits, N]
    sumexp2_ptr, logit_sum_ptr, argmax_ptr,  # optional partial statistics, [num_splits, N]: fp32, fp32, int64
    N, V, H, tiles_per_split, vocab_start, ignore_index, inv_temperature, tanh_scale,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_LSE2: tl.constexpr, WITH_LOGIT_SUM: tl.constexpr,
    WITH_ARGMAX: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program p: one (token block i, vocab split s), rows [i*BLOCK_N, (i+1)*BLOCK_N) against the s-th run of
    `tiles_per_split` vocab tiles."""
    split, rows, row_ok, v_begin, v_end = split_program(N, V, tiles_per_split, BLOCK_N, BLOCK_V, GROUP_N)

    # Shard-local target column; -1 when the row is ignored or its target lives in another shard.
    t = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    y = t - vocab_start
    y = tl.where((t != ignore_index) & (y >= 0) & (y < V), y, -1).to(tl.int32)  # int32: compared over a whole tile

    # Online softmax state per row: running max m, sum of exp(z - m), sum of exp(z - m) * (z - m), target logit.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_N], tl.float32)
    sum_ez = tl.zeros([BLOCK_N], tl.float32)
    target_logit = tl.zeros([BLOCK_N], tl.float32)
    # Optional: sum of exp(2 (z - m)), sum of z, column of the first max.
    sumexp2 = tl.zeros([BLOCK_N], tl.float32)
    logit_sum = tl.zeros([BLOCK_N], tl.float32)
    argmax = tl.zeros([BLOCK_N], tl.int32)

    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        # Logit tile: hidden[rows] @ weight[cols].T over H chunks, fp32 accumulator (`transform_args`' out_scale).
        z = logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H, inv_temperature, tanh_scale,
                       HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)

        # At most one column of the whole vocabulary matches y, so summing picks it.
        target_logit += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

        # Columns past V take no part in the softmax: they enter as -inf, so their exp is 0.
        z_soft = tl.where(col_ok[None, :], z, float("-inf"))
        if WITH_ARGMAX:
            tile_max, tile_arg = tl.max(z_soft, axis=1, return_indices=True, return_indices_tie_break_left=True)
            argmax = tl.where(tile_max > m, v0 + tile_arg, argmax)  # strict: a tie keeps the earlier column
        else:
            tile_max = tl.max(z_soft, axis=1)
        m_new = tl.maximum(m, tile_max)
        # Rescale the sums gathered under the old max (exp(-inf) = 0 on the first tile).
        alpha = tl.exp(m - m_new)
        e = tl.exp(z_soft - m_new[:, None])
        if WITH_ENTROPY:
            # Re-centre the old terms on m_new: exp(z - m_new) (z - m_new) = alpha exp(z - m) ((z - m) + (m - m_new)),
            # every term <= 0. Padding columns: e = 0 and z finite. First tile: nothing to re-centre (m = -inf).
            shift = tl.where(sumexp > 0, m - m_new, 0.0)
            sum_ez = alpha * (sum_ez + shift * sumexp) + tl.sum(e * (z - m_new[:, None]), axis=1)
        sumexp = sumexp * alpha + tl.sum(e, axis=1)
        if WITH_LSE2:
            sumexp2 = sumexp2 * (alpha * alpha) + tl.sum(e * e, axis=1)
        if WITH_LOGIT_SUM:
            logit_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        m = m_new

    out = split.to(tl.int64) * N + rows
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sumexp_ptr + out, sumexp, mask=row_ok)
    tl.store(target_logit_ptr + out, target_logit, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(sum_ez_ptr + out, sum_ez, mask=row_ok)
    if WITH_LSE2:
        tl.store(sumexp2_ptr + out, sumexp2, mask=row_ok)
    if WITH_LOGIT_SUM:
        tl.store(logit_sum_ptr + out, logit_sum, mask=row_ok)
    if WITH_ARGMAX:
        tl.store(argmax_ptr + out, vocab_start + argmax.to(tl.int64), mask=row_ok)


@triton.jit
def merge_split_partials(max_ptr, sumexp_ptr, sum_ez_ptr, target_logit_ptr, rows, row_ok, N, num_splits,
                         WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr):
    """Merge the vocab splits of tokens `rows` (fp32 [num_splits, N] partials; split s of row r sits at s * N + r,
    int64 offsets stepped by N per split). Returns (lse, entropy, target_logit) [BLOCK_N] (entropy 0 without
    WITH_ENTROPY). Padding rows get finite values."""
    # Global max first, then each split's sums rescaled to it.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    offs = rows.to(tl.int64)
    for _ in range(num_splits):
        m = tl.maximum(m, tl.load(max_ptr + offs, mask=row_ok, other=0.0))
        offs += N
    sumexp = tl.zeros([BLOCK_N], tl.float32)
    sum_ez = tl.zeros([BLOCK_N], tl.float32)
    target_logit = tl.zeros([BLOCK_N], tl.float32)
    offs = rows.to(tl.int64)
    for _ in range(num_splits):
        m_split = tl.load(max_ptr + offs, mask=row_ok, other=0.0)
        scale = tl.exp(m_split - m)
        split_sumexp = tl.load(sumexp_ptr + offs, mask=row_ok, other=1.0)  # 1: padding rows stay finite
        if WITH_ENTROPY:
            # The split's sum of exp(z - m_s) (z - m_s), re-centred on the global max (terms of one sign).
            split_sum_ez = tl.load(sum_ez_ptr + offs, mask=row_ok, other=0.0)
            sum_ez += scale * (split_sum_ez + (m_split - m) * split_sumexp)
        sumexp += split_sumexp * scale
        # The target lies in one split; the others hold 0.
        target_logit += tl.load(target_logit_ptr + offs, mask=row_ok, other=0.0)
        offs += N
    # H = lse - E_p[z] = log(sumexp) - E_p[z - m]: two terms >= 0.
    entropy = tl.log(sumexp) - sum_ez / sumexp if WITH_ENTROPY else tl.zeros([BLOCK_N], tl.float32)
    return m + tl.log(sumexp), entropy, target_logit


DETERMINISTIC_SPLIT_COLUMNS = 4096
"""Vocabulary columns per split in deterministic mode (64 under the interpreter): a fixed split whatever N, so a
row's statistics do not depend on its batch (32 splits at V = 128256)."""


def tiles_per_split(n_row_blocks: int, n_vocab_tiles: int, block_v: int, sms: int | None, *,
                    deterministic: bool, group_n: int) -> int:
    """Vocab tiles per split of one launch. Deterministic: a fixed `DETERMINISTIC_SPLIT_COLUMNS` columns (64
    under the interpreter) whatever N. Else sized so that small N still fills the GPU: about two programs per SM
    (`sms` streaming multiprocessors; None: 4 programs, the interpreter's, to exercise the merge), and so that at
    large N one wave of `sms` programs spans at most `group_n` token blocks (at least sms / group_n splits: the
    grouped order's L2 sharing); every split non-empty."""
    if deterministic:
        columns = 64 if interpreting() else DETERMINISTIC_SPLIT_COLUMNS
        return max(1, columns // block_v)
    wanted = 4 if sms is None else 2 * sms
    grouped = 1 if sms is None else math.ceil(sms / group_n)
    splits = min(n_vocab_tiles, max(grouped, math.ceil(wanted / n_row_blocks)))
    return math.ceil(n_vocab_tiles / splits)


class LsePartials(NamedTuple):
    """Per-(vocab split, row) statistics of one `lse_forward_partials` launch, fp32 [num_splits, N] each."""

    max: Tensor  # max_v z over the split's columns
    sumexp: Tensor  # sum_v exp(z - max)
    sum_ez: Tensor | None  # sum_v exp(z - max) * (z - max), <= 0 (only with entropy)
    target_logit: Tensor  # z[target] when the target lies in the split, else 0
    sumexp2: Tensor | None = None  # sum_v exp(2 (z - max)) (only with lse2)
    logit_sum: Tensor | None = None  # sum_v z (only with logit_sum)
    argmax: Tensor | None = None  # int64 global id of the split's first max (only with argmax)


def lse_forward_partials(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                         inv_temperature: float, ignore_index: int, vocab_start: int = 0,
                         spec: RowStatsSpec = RowStatsSpec(), deterministic: bool = False, logit_scale: float = 1.0,
                         logit_softcap: float | None = None) -> LsePartials:
    """Split statistics of z = (hidden @ weight.T + bias) * inv_temperature without materializing z (transformed by
    `logit_scale` and `logit_softcap`, see the module docstring).

    hidden [N, H], weight [V, H] (rows are global vocab ids vocab_start .. vocab_start + V - 1), bias [V] or None, all
    of one dtype (fp32/fp16/bf16), or fp16/bf16 hidden with an fp32 weight and bias (fp32 products); targets [N]
    int64 global vocab ids. Non-contiguous inputs are copied (`.contiguous()`). Returns the fp32 [num_splits, N]
    partials, to merge with `merge_lse_partials` (or in the epilogue kernels, via `merge_split_partials`); the
    optional ones are None unless `spec` asks for them.

    `deterministic=True`: every split covers a fixed number of columns whatever N (batch invariance).

    Writes: each program of the 1-D grid cdiv(N, BLOCK_N) * num_splits owns one (token block i, split s) (grouped
    order, a bijection) and alone writes the partial statistics of rows i*BLOCK_N .. (i+1)*BLOCK_N - 1 for vocab
    split s (no atomics).
    """
    check_device(hidden.device)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    (n, h), v = hidden.shape, weight.shape[0]
    cfg = lse_forward_config(weight.dtype, h=h, interpret=interpreting())

    n_row_blocks = triton.cdiv(n, cfg.BLOCK_N)
    n_vocab_tiles = triton.cdiv(v, cfg.BLOCK_V)
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else None
    per_split = tiles_per_split(max(n_row_blocks, 1), n_vocab_tiles, cfg.BLOCK_V, sms, deterministic=deterministic,
                                group_n=cfg.GROUP_N)
    splits = triton.cdiv(n_vocab_tiles, per_split)

    def buffer(wanted: bool = True, dtype: torch.dtype = torch.float32) -> Tensor | None:
        return torch.empty(splits, n, device=hidden.device, dtype=dtype) if wanted else None

    partials = LsePartials(buffer(), buffer(), buffer(spec.entropy), buffer(), buffer(spec.lse2),
                           buffer(spec.logit_sum), buffer(spec.argmax, torch.int64))
    if n > 0:
        unused = partials.max  # stands in for the pointers a constexpr flag switches off (never dereferenced)
        _lse_forward_kernel[(n_row_blocks * splits,)](
            hidden, weight, bias if bias is not None else hidden, targets,
            *(unused if p is None else p for p in partials),
            n, v, h, per_split, vocab_start, ignore_index,
            *transform_args(inv_temperature, logit_scale, logit_softcap),
            HAS_BIAS=bias is not None, WITH_ENTROPY=spec.entropy, WITH_LSE2=spec.lse2,
            WITH_LOGIT_SUM=spec.logit_sum, WITH_ARGMAX=spec.argmax, SOFTCAP=logit_softcap is not None,
            **cfg.constexprs(), **cfg.launch_options(),
        )
    return partials


def _sum_splits(t: Tensor, ordered: bool) -> Tensor:
    """Sum of [num_splits, N] over the splits; `ordered`: split 0 first, then 1, ... elementwise, so a row's sum
    never depends on N (a device reduction may pick its order by shape)."""
    if not ordered:
        return t.sum(dim=0)
    total = t[0]
    for split in t[1:]:
        total = total + split
    return total


def merge_lse_partials(partials: LsePartials, ordered: bool = False) -> RowStats:
    """Merge the splits: rescale each split's sums to the global max (as `merge_split_partials` does in a kernel);
    `ordered`: the splits summed in a fixed order (deterministic mode, `_sum_splits`).

    Returns the [N] statistics (fp32; argmax int64), the optional ones None where the partials hold none. The
    arg-max is the first split's (the smallest id) among those whose max is the global max.
    """
    m = partials.max.amax(dim=0)
    scale = torch.exp(partials.max - m)
    sumexp = _sum_splits(partials.sumexp * scale, ordered)
    entropy = lse2 = logit_sum = max_logit = argmax = None
    if partials.sum_ez is not None:  # re-centred on m: terms of one sign; H = log(sumexp) - E_p[z - m]
        sum_ez = _sum_splits(scale * (partials.sum_ez + (partials.max - m) * partials.sumexp), ordered)
        entropy = torch.log(sumexp) - sum_ez / sumexp
    if partials.sumexp2 is not None:
        lse2 = 2 * m + torch.log(_sum_splits(partials.sumexp2 * scale * scale, ordered))
    if partials.logit_sum is not None:
        logit_sum = _sum_splits(partials.logit_sum, ordered)
    if partials.argmax is not None:
        first = (partials.max == m).to(torch.uint8).argmax(dim=0, keepdim=True)  # the first split at the max
        max_logit, argmax = m, partials.argmax.gather(0, first).squeeze(0)
    return RowStats(m + torch.log(sumexp), _sum_splits(partials.target_logit, ordered), entropy, lse2, logit_sum, max_logit,
                    argmax)


def linear_lse_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                       inv_temperature: float, ignore_index: int, vocab_start: int = 0,
                       spec: RowStatsSpec = RowStatsSpec(), deterministic: bool = False, logit_scale: float = 1.0,
                       logit_softcap: float | None = None) -> RowStats:
    """Per-row statistics of z = (hidden @ weight.T + bias) * inv_temperature without materializing z (transformed
    by `logit_scale` and `logit_softcap`).

    Inputs as `lse_forward_partials`. Returns [N] tensors (`RowStats`), fp32 unless stated:
      lse            logsumexp_v z,
      target_logit   z[targets - vocab_start], 0 when the row is ignored or its target is outside this shard,
      and, each only if `spec` asks for it (else None):
      entropy        -sum_v softmax(z)_v log softmax(z)_v,
      lse2           logsumexp_v 2 z_v,
      logit_sum      sum_v z_v,
      max_logit, argmax   max_v z_v and the int64 global id of its first occurrence.

    `deterministic=True`: batch-invariant (fixed split, splits merged in a fixed order): a row's statistics are
    bitwise the same whatever the other rows.

    Writes: as `lse_forward_partials`; the splits are then merged here in PyTorch (`merge_lse_partials`).
    """
    partials = lse_forward_partials(hidden, weight, bias, targets, inv_temperature=inv_temperature,
                                    ignore_index=ignore_index, vocab_start=vocab_start, spec=spec,
                                    deterministic=deterministic, logit_scale=logit_scale,
                                    logit_softcap=logit_softcap)
    return merge_lse_partials(partials, ordered=deterministic)
