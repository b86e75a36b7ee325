"""Exact bfloat16 arithmetic under the Triton interpreter, for tests only (triton 3.9's interpreter).

The interpreter holds bf16 tensors as their raw uint16 bits (loads and stores move the bits unchanged, which is
right), but two operations on them are wrong (triton-lang/triton#11584):
- `tl.dot` on bf16 operands (`InterpreterBuilder.create_dot`) calls `np.matmul` on the uint16 bit patterns, so it
  multiplies integers, not numbers;
- the fp32 -> bf16 cast (`InterpreterBuilder.cast_impl`, behind `.to(tl.bfloat16)`) truncates the mantissa, where
  the GPU (cvt.rn.bf16.f32) rounds to nearest even.
`exact_bf16()` patches both: bf16 dot operands are widened to fp32 (exact: a bf16 is an fp32 with 16 zero low
bits), so the products are exact and accumulate in fp32 as on the tensor cores; the cast rounds to nearest even
(NaN kept a NaN). The `bf16_interpreter` fixture applies it for one test.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import triton.language as tl
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """The fp32 values of bf16 bit patterns (uint16): the bits are fp32's high half."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, rounded to nearest, ties to even (a carry into the exponent is the correct
    rounding up, to infinity at the top); NaN stays a quiet NaN of the same sign."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits >> np.uint32(16) | np.uint32(0x0040)) & np.uint32(0xFFFF)
    return np.where(np.isnan(x), nan, rounded).astype(np.uint16)


@contextlib.contextmanager
def exact_bf16():
    """Patch the interpreter's bf16 dot (exact widening to fp32) and fp32 -> bf16 cast (round to nearest even)."""
    dot, cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def widened(h: TensorHandle) -> TensorHandle:
        return TensorHandle(bf16_bits_to_fp32(h.data), tl.float32) if h.dtype.scalar == tl.bfloat16 else h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(fp32_to_bf16_bits(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = dot, cast


@pytest.fixture
def bf16_interpreter():
    with exact_bf16():
        yield
