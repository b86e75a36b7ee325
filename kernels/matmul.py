"""C (+)= A @ B with fp32 accumulation and no atomics: every output tile is owned by one program, which walks the
reduction dimension in order, so the result is bitwise the same on every run (the atomic-free backward's
d hidden, d weight and d bias products)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import KernelConfig, target_arch


@dataclass(frozen=True)
class MatmulConfig(KernelConfig):
    """Tile sizes and launch options of `_matmul_kernel` (the compile test builds exactly these)."""

    BLOCK_M: int
    BLOCK_P: int
    BLOCK_K: int
    GROUP_M: int
    DOT_PRECISION: str
    num_warps: int
    num_stages: int


def matmul_config(dtype: torch.dtype, *, arch: int, p: int, interpret: bool = False,
                  aligned: bool = True) -> MatmulConfig:
    """GPU config for operands of `dtype`, compute capability `arch` (80, 90) and `p` output columns (fp32
    operands: 3xTF32 tensor-core dots, about fp32 accuracy, whose split operands need smaller tiles);
    `interpret=True`: small tiles for the CPU interpreter. `aligned`: every stride other than 1 a multiple of 16 and
    the pointers 16-byte aligned (`is_aligned`), so that Triton's runtime specializes them and vectorizes the loads
    and the C tile's store: 16-bit operands then take 128 x 256 tiles when `p` >= 256 (85 FLOPs per byte loaded,
    the GPU cost model's L2 traffic; 128 x 128 tiles do 64, 128 x 64 43), else 128 x 128; unaligned, 128 x 64.

    Registers per thread (from the compile test): 16-bit 128 x 256 about 200 / 238 on sm_90 (plain / accumulating
    product; Triton's H100 matmul tutorial tile, 128 x 256 x 64, 3 stages) and 241 / 254 on sm_80 (BLOCK_K = 32,
    4 stages; BLOCK_K = 64 spilled 32-96 bytes on the accumulating product); fp32 about 127 / 117 (sm_80 / sm_90).
    A 10 TB/s L2 feeds 989 TFLOPS only at >= 99 FLOPs per byte: 256 x 256 (128) needs a 256-register fp32
    accumulator per thread at 8 warps."""
    precision = "tf32x3" if dtype == torch.float32 else "tf32"  # the precision only matters for fp32 operands
    if interpret:
        return MatmulConfig(16, 16, 16, 2, precision, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return MatmulConfig(64, 64, 16, 8, precision, num_warps=8, num_stages=3)
    if not aligned:
        return MatmulConfig(128, 64, 32, 8, precision, num_warps=8, num_stages=3)
    if p >= 256:
        if arch >= 90:
            return MatmulConfig(128, 256, 64, 8, precision, num_warps=8, num_stages=3)
        return MatmulConfig(128, 256, 32, 8, precision, num_warps=8, num_stages=4)
    return MatmulConfig(128, 128, 32, 8, precision, num_warps=8, num_stages=3)


def is_aligned(*tensors: Tensor) -> bool:
    """Whether Triton's runtime specializes every pointer of `tensors` as 16-byte aligned and every stride as 1 or
    a multiple of 16 (the condition of `matmul_config`'s large tiles)."""
    return all(t.data_ptr() % 16 == 0 and all(s == 1 or s % 16 == 0 for s in t.stride()) for t in tensors)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,  # A [M, K], B [K, P] (any strides, one dtype or fp32 A), C fp32 [M, P] (unit column stride)
    M, P, K, stride_am, stride_ak, stride_bk, stride_bp, stride_cm,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program p: C tile (i, j) = (C +) sum over K tiles, in order, of A tile @ B tile."""
    # 1-D grid; consecutive programs walk GROUP_M row blocks across all column blocks, so the A rows they share stay
    # in L2 (with the rows fastest, a [V, H] product would fetch A once per column block).
    pid = tl.program_id(0)
    num_p = tl.cdiv(P, BLOCK_P)
    i, j = tl.swizzle2d(pid // num_p, pid % num_p, tl.cdiv(M, BLOCK_M), num_p, GROUP_M)
    # Rows and columns past the edge wrap around, so that every load stays in bounds without a row or column mask
    # (a 128 x 256 accumulator has no registers to spare for them); the store drops those rows and columns. int64
    # row indices: the offsets grow with N * V.
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = j * BLOCK_P + tl.arange(0, BLOCK_P)
    rm = (rows % M).to(tl.int64)
    rp = cols % P
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak
    b_tile = b_ptr + rp.to(tl.int64)[None, :] * stride_bp + ks[:, None] * stride_bk
    # ACCUMULATE: the sum starts from C's tile and adds this launch's K tiles in order (a fixed order across
    # launches; C's tile added after the loop spilled next to a 128 x 256 accumulator).
    if ACCUMULATE:
        acc = tl.load(c_ptr + rm[:, None] * stride_cm + rp[None, :])
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_tile, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_tile, mask=k_ok[:, None], other=0.0).to(a_ptr.dtype.element_ty)  # 16-bit B with fp32 A
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    # The store's pointers are formed anew (sharing the load's would keep them live through the loop).
    tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], acc,
             mask=(rows < M)[:, None] & (cols < P)[None, :])


def matmul_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool, interpret: bool = False) -> None:
    """out (+)= a @ b for a [M, K], b [K, P] of one dtype (or fp32 a, 16-bit b: cast to fp32 in the tiles; any
    strides), out fp32 [M, P] with unit column stride.

    Writes: each program of the 1-D grid cdiv(M, BLOCK_M) * cdiv(P, BLOCK_P) alone writes one tile of out, once,
    after summing its K tiles in order (no atomics).
    """
    (m, k), p = a.shape, b.shape[1]
    cfg = matmul_config(a.dtype, arch=target_arch(out.device), p=p, interpret=interpret,
                        aligned=is_aligned(a, b, out))
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(p, cfg.BLOCK_P),)
    _matmul_kernel[grid](a, b, out, m, p, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
                         ACCUMULATE=accumulate, **cfg.constexprs(), **cfg.launch_options())
