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
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

BF16 = torch.bfloat16
U_BF16 = 2.0**-8
FP32_REL = 1e-5
# (n, h, v, bias, inv_temperature, n_ignored): none a multiple of the interpreter tiles (16 x 32 x 16).
SHAPES = {"odd": (37, 19, 97, True, 1 / 0.7, 5), "multi_tile": (40, 40, 130, False, 2.0, 3)}


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


def reference(hidden, weight, bias, targets, inv_t, loss_fn):
    """float64 autograd of `loss_fn(logp [N, V], z [N, V])` over the logits z = (h W^T + b) inv_t; returns the
    gradients of hidden, weight, bias and of the untempered logits h W^T + b (the dz the kernels round)."""
    leaves = [x.double().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    raw = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0.0)
    raw.retain_grad()
    z = raw * inv_t
    loss_fn(torch.log_softmax(z, 1), z).backward()
    grads = [x.grad for x in leaves] + [None] * (3 - len(leaves))
    return grads + [raw.grad]


def assert_within_bf16_bound(actual, expected, dz, operand, rounded_to_bf16=False):
    """|actual - expected| <= (u_bf16 + 1e-5) (|dz| @ |operand|) elementwise (+ u_bf16 |expected| when the result
    itself is rounded to bf16); the bound under 5% of max |expected|."""
    bound = (U_BF16 + FP32_REL) * (dz.abs() @ operand.double().abs()) + (U_BF16 * expected.abs() if rounded_to_bf16
                                                                           else 0.0)
    assert bound.max() < 0.05 * expected.abs().max(), "tolerance too loose to catch a sign or a factor"
    assert actual.dtype == (BF16 if rounded_to_bf16 else torch.float32) and torch.isfinite(actual).all()
    excess = (actual.double() - expected).abs() - bound
    assert excess.max() <= 0, f"over the bf16 bound by {excess.max():.3g} (max |g| {expected.abs().max():.3g})"


