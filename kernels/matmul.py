"""C (+)= A @ B with fp32 accumulation and no atomics: every output tile is owned by one program, which walks the
reduction dimension in order, so the result is bitwise the same on every run (the atomic-free backward's
d hidden, d weight and d bias products)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launches import KernelConfig


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


def matmul_config(dtype: torch.dtype, interpret: bool = False, aligned: bool = True) -> MatmulConfig:
    """GPU config for operands of `dtype` (fp32 operands: 3xTF32 tensor-core dots, about fp32 accuracy, whose split
    operands need smaller tiles); `interpret=True`: small tiles for the CPU interpreter. `aligned`: every stride
    other than 1 a multiple of 16 and the pointers 16-byte aligned (`is_aligned`), so that Triton's runtime
    specializes them and vectorizes the loads and the C tile's store: 16-bit operands then take 128 x 128 tiles
    (64 FLOPs per byte loaded, the GPU cost model's L2 traffic; 128 x 64 tiles do 43), else 128 x 64.

    Registers per thread (sm_80 / sm_90, from the compile test): 16-bit aligned 128 x 128 at most 212 / 146, the
    128 x 64 fallback about 161 / 166 (128 x 128 without the alignment spilled on the accumulating product); fp32
    about 127 / 117. 128 x 256 spilled on the accumulating product even aligned (240 / 264 bytes), and no tile with
    the >= 99 FLOPs per byte a 10 TB/s L2 needs to feed 989 TFLOPS fits in the registers (256 x 256: a 256-register
    fp32 accumulator per thread at 8 warps)."""
    precision = "tf32x3" if dtype == torch.float32 else "tf32"  # the precision only matters for fp32 operands
    if interpret:
        return MatmulConfig(16, 16, 16, 2, precision, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return MatmulConfig(64, 64, 16, 8, precision, num_warps=8, num_stages=3)
    if aligned:
        return MatmulConfig(128, 128, 32, 8, precision, num_warps=8, num_stages=3)
    return MatmulConfig(128, 64, 32, 8, precision, num_warps=8, num_stages=3)


def is_aligned(*tensors: Tensor) -> bool:
    """Whether Triton's runtime specializes every pointer of `tensors` as 16-byte aligned and every stride as 1 or
    a multiple of 16 (the condition of `matmul_config`'s large tiles)."""
    return all(t.data_ptr() % 16 == 0 and all(s == 1 or s % 16 == 0 for s in t.stride()) for t in tensors)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,  # A [M, K], B [K, P] (any strides, one dtype), C fp32 [M, P] (unit column stride)
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
    m0 = i * BLOCK_M
    p0 = j * BLOCK_P
    rm = tl.arange(0, BLOCK_M)
    rp = tl.arange(0, BLOCK_P)
    ks = tl.arange(0, BLOCK_K)
    m_ok = m0 + rm < M
    p_ok = p0 + rp < P
    # The block's origin in int64 (offsets grow with N * V), the offsets inside a tile in int32; the pointers then
    # step by one K tile.
    a_tile = a_ptr + m0.to(tl.int64) * stride_am + (rm[:, None] * stride_am + ks[None, :] * stride_ak)
    b_tile = b_ptr + p0.to(tl.int64) * stride_bp + (ks[:, None] * stride_bk + rp[None, :] * stride_bp)
    acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_tile, mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    c = c_ptr + m0.to(tl.int64) * stride_cm + p0 + (rm[:, None] * stride_cm + rp[None, :])
    ok = m_ok[:, None] & p_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=ok, other=0.0)  # after this launch's own sum: a fixed order across launches
    tl.store(c, acc, mask=ok)


def matmul_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool, interpret: bool = False) -> None:
    """out (+)= a @ b for a [M, K], b [K, P] of one dtype (any strides), out fp32 [M, P] with unit column stride.

    Writes: each program of the 1-D grid cdiv(M, BLOCK_M) * cdiv(P, BLOCK_P) alone writes one tile of out, once,
    after summing its K tiles in order (no atomics).
    """
    (m, k), p = a.shape, b.shape[1]
    cfg = matmul_config(a.dtype, interpret=interpret, aligned=is_aligned(a, b, out))
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(p, cfg.BLOCK_P),)
    _matmul_kernel[grid](a, b, out, m, p, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
                         ACCUMULATE=accumulate, **cfg.constexprs(), **cfg.launch_options())
