"""Ahead-of-time compile of every kernel for A100 (sm_80) and H100 (sm_90) in fp32, fp16 and bf16, with the
constexprs and launch options the launchers use on a GPU (their config functions, `interpret=False`).

Fails on a compile error, on any register spill (cubin STACK or LOCAL non-zero), on shared memory past what one
block may use, and when the SASS holds no tensor-core instruction (HMMA on sm_80, HGMMA or HMMA on sm_90; fp32
inputs use 3xTF32 tensor-core dots, so they are held to this too). A new kernel is one entry in VARIANTS.
"""
from functools import partial

import pytest
import torch
from aot import CompileSpec, compile_kernels

from fastalign.kernels.logprobs_backward import _logprobs_backward_kernel, logprobs_backward_config
from fastalign.kernels.lse_forward import _lse_forward_kernel, lse_forward_config

ARCHS = (80, 90)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block, A100 / H100
TENSOR_CORE_OPS = {80: ("HMMA",), 90: ("HGMMA", "HMMA")}


def _spec(kernel, types: dict, constexprs: dict, config, arch: int) -> CompileSpec:
    """Spec in the kernel's argument order; pointers and the hidden size H specialized as multiples of 16,
    as the JIT does for torch allocations and usual hidden sizes."""
    constexprs = {**constexprs, **config.constexprs()}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    aligned = tuple(name for name, ty in signature.items() if ty.startswith("*")) + ("H",)
    return CompileSpec(kernel, signature, constexprs, config.num_warps, config.num_stages, arch, aligned)


def lse_forward_spec(dtype: torch.dtype, arch: int, *, has_bias: bool, with_entropy: bool) -> CompileSpec:
    x = "*" + DTYPES[dtype]
    types = {"hidden_ptr": x, "weight_ptr": x, "bias_ptr": x, "targets_ptr": "*i64",
             "max_ptr": "*fp32", "sumexp_ptr": "*fp32", "sum_pz_ptr": "*fp32", "target_logit_ptr": "*fp32",
             "N": "i32", "V": "i32", "H": "i32", "tiles_per_split": "i32", "vocab_start": "i32",
             "ignore_index": "i32", "inv_temperature": "fp32"}
    return _spec(_lse_forward_kernel, types, {"HAS_BIAS": has_bias, "WITH_ENTROPY": with_entropy},
                 lse_forward_config(dtype), arch)


def logprobs_backward_spec(dtype: torch.dtype, arch: int, *, has_bias: bool, entropy_grad: bool,
                           grad_hidden: bool, grad_weight: bool, grad_bias: bool) -> CompileSpec:
    x = "*" + DTYPES[dtype]
    types = {"hidden_ptr": x, "weight_ptr": x, "bias_ptr": x, "targets_ptr": "*i64",
             "lse_ptr": "*fp32", "grad_logprobs_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "entropy_ptr": "*fp32",
             "grad_hidden_ptr": "*fp32", "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32",
             "N": "i32", "V": "i32", "H": "i32", "vocab_start": "i32", "ignore_index": "i32",
             "inv_temperature": "fp32"}
    flags = {"HAS_BIAS": has_bias, "HAS_ENTROPY_GRAD": entropy_grad, "COMPUTE_GRAD_HIDDEN": grad_hidden,
             "COMPUTE_GRAD_WEIGHT": grad_weight, "COMPUTE_GRAD_BIAS": grad_bias}
    return _spec(_logprobs_backward_kernel, types, flags, logprobs_backward_config(dtype), arch)


# name -> (dtype, arch) -> CompileSpec. The heaviest variant of each kernel, and the commonest lighter one.
VARIANTS = {
    "lse_forward[bias,entropy]": partial(lse_forward_spec, has_bias=True, with_entropy=True),
    "lse_forward[plain]": partial(lse_forward_spec, has_bias=False, with_entropy=False),
    "logprobs_backward[all]": partial(logprobs_backward_spec, has_bias=True, entropy_grad=True, grad_hidden=True,
                                      grad_weight=True, grad_bias=True),
    "logprobs_backward[frozen_weight]": partial(logprobs_backward_spec, has_bias=False, entropy_grad=False,
                                                grad_hidden=True, grad_weight=False, grad_bias=False),
}
CASES = [(name, dtype, arch) for name in VARIANTS for dtype in DTYPES for arch in ARCHS]


@pytest.fixture(scope="session")
def compiled() -> dict:
    """Every case compiled once per session (in parallel; Triton's disk cache makes later sessions quick)."""
    specs = {case: VARIANTS[case[0]](case[1], case[2]) for case in CASES}
    results = compile_kernels(list(specs.values()))
    return {case: results[spec] for case, spec in specs.items()}


@pytest.mark.parametrize("name,dtype,arch", CASES, ids=[f"{n}-{DTYPES[d]}-sm{a}" for n, d, a in CASES])
def test_compiles_without_spills_and_on_tensor_cores(compiled, name, dtype, arch):
    r = compiled[(name, dtype, arch)]
    usage = f"{name} {DTYPES[dtype]} sm_{arch}: {r.registers} registers, stack {r.stack}, local {r.local}, " \
            f"shared {r.shared}"
    assert not r.spills, f"register spill: {usage}"
    assert r.shared <= MAX_SHARED[arch], f"shared memory over the per-block limit {MAX_SHARED[arch]}: {usage}"
    assert r.count(*TENSOR_CORE_OPS[arch]) > 0, f"no tensor-core instruction {TENSOR_CORE_OPS[arch]} in SASS: {usage}"
