"""Ahead-of-time compile of every kernel for A100 (sm_80) and H100 (sm_90) in fp32, fp16 and bf16, with the
constexprs and launch options the launchers use on a GPU (their config functions, `interpret=False`).

Fails on a compile error, on any register spill (cubin STACK or LOCAL non-zero), on shared memory past what one
block may use, and, for kernels with a matmul, when the SASS holds no tensor-core instruction (HMMA on sm_80, HGMMA
or HMMA on sm_90; fp32 inputs use 3xTF32 tensor-core dots, so they are held to this too). A new kernel is one entry
in VARIANTS.

The kernels of the triton backend's deterministic mode (DETERMINISTIC) must hold no atomic at all: no PTX `atom` or
`red` instruction, for sm_80 and sm_90 (the atomic backward is the control: it has them).
"""
import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import pytest
import torch
from aot import CompileSpec, compile_kernels

from fastalign.kernels.logprobs_backward import (_logit_grad_kernel, _logprobs_backward_kernel, logit_grad_config,
                                                 logprobs_backward_config)
from fastalign.kernels.lse_forward import _lse_forward_kernel, lse_forward_config
from fastalign.kernels.matmul import _matmul_kernel, matmul_config
from fastalign.kernels.ppo_epilogue import _ppo_epilogue_kernel
from fastalign.kernels.row_stats import RowStatsSpec
from fastalign.kernels.token_epilogue import token_epilogue_config

ARCHS = (80, 90)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block, A100 / H100
TENSOR_CORE_OPS = {80: ("HMMA",), 90: ("HGMMA", "HMMA")}


def _spec(kernel, types: dict, constexprs: dict, config, arch: int) -> CompileSpec:
    """Spec in the kernel's argument order; pointers and the hidden size H (if any) specialized as multiples of 16,
    as the JIT does for torch allocations and usual hidden sizes."""
    constexprs = {**constexprs, **config.constexprs()}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    aligned = tuple(name for name, ty in signature.items() if ty.startswith("*") or name == "H")
    return CompileSpec(kernel, signature, constexprs, config.num_warps, config.num_stages, arch, aligned)


def lse_forward_spec(dtype: torch.dtype, arch: int, *, has_bias: bool, stats: RowStatsSpec) -> CompileSpec:
    x = "*" + DTYPES[dtype]
    types = {"hidden_ptr": x, "weight_ptr": x, "bias_ptr": x, "targets_ptr": "*i64",
             "max_ptr": "*fp32", "sumexp_ptr": "*fp32", "sum_ez_ptr": "*fp32", "target_logit_ptr": "*fp32",
             "sumexp2_ptr": "*fp32", "logit_sum_ptr": "*fp32", "argmax_ptr": "*i64",
             "N": "i32", "V": "i32", "H": "i32", "tiles_per_split": "i32", "vocab_start": "i32",
             "ignore_index": "i32", "inv_temperature": "fp32"}
    flags = {"HAS_BIAS": has_bias, "WITH_ENTROPY": stats.entropy, "WITH_LSE2": stats.lse2,
             "WITH_LOGIT_SUM": stats.logit_sum, "WITH_ARGMAX": stats.argmax}
    return _spec(_lse_forward_kernel, types, flags, lse_forward_config(dtype), arch)


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


def logit_grad_spec(dtype: torch.dtype, arch: int, *, has_bias: bool, entropy_grad: bool) -> CompileSpec:
    x = "*" + DTYPES[dtype]
    types = {"hidden_ptr": x, "weight_ptr": x, "bias_ptr": x, "targets_ptr": "*i64",
             "lse_ptr": "*fp32", "grad_logprobs_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "entropy_ptr": "*fp32",
             "dz_ptr": x, "N": "i32", "V": "i32", "H": "i32", "vocab_start": "i32", "ignore_index": "i32",
             "inv_temperature": "fp32"}
    flags = {"HAS_BIAS": has_bias, "HAS_ENTROPY_GRAD": entropy_grad}
    return _spec(_logit_grad_kernel, types, flags, logit_grad_config(dtype), arch)


def matmul_spec(dtype: torch.dtype, arch: int, *, product: str, aligned: bool = True) -> CompileSpec:
    """The atomic-free backward's three products, with the strides (and sizes) equal to 1 that the runtime turns
    into constants: d hidden = dz @ weight, d weight += dz.T @ hidden, d bias += dz.T @ ones. `aligned`: the other
    strides (H, V) specialized as multiples of 16, as the runtime does at H = 4096, V = 128256, with the tiles
    `matmul_config` takes then; else (odd H or V) its fallback tiles."""
    x = "*" + DTYPES[dtype]
    types = {"a_ptr": x, "b_ptr": x, "c_ptr": "*fp32", "M": "i32", "P": "i32", "K": "i32", "stride_am": "i32",
             "stride_ak": "i32", "stride_bk": "i32", "stride_bp": "i32", "stride_cm": "i32"}
    ones = {"d_hidden": {"stride_ak": 1, "stride_bp": 1, "ACCUMULATE": False},
            "d_weight": {"stride_am": 1, "stride_bp": 1, "ACCUMULATE": True},
            "d_bias": {"P": 1, "stride_am": 1, "stride_bk": 1, "stride_bp": 1, "stride_cm": 1, "ACCUMULATE": True}}
    spec = _spec(_matmul_kernel, types, ones[product], matmul_config(dtype, aligned=aligned), arch)
    strides = tuple(n for n, ty in spec.signature.items() if aligned and n.startswith("stride") and ty != "constexpr")
    return dataclasses.replace(spec, aligned=spec.aligned + strides)


def ppo_epilogue_spec(dtype: torch.dtype, arch: int, *, dual_clip: bool, kl_estimator: str | None,
                      with_entropy: bool) -> CompileSpec:
    """`dtype` is that of the partials and per-token inputs: fp32 whatever the lm_head's dtype."""
    f = "*" + DTYPES[dtype]
    types = {"max_ptr": f, "sumexp_ptr": f, "sum_ez_ptr": f, "target_logit_ptr": f, "targets_ptr": "*i64",
             "old_logprobs_ptr": f, "advantages_ptr": f, "ref_logprobs_ptr": f, "weights_ptr": f,
             "logprobs_ptr": f, "entropy_ptr": f, "lse_ptr": f, "loss_ptr": f, "grad_logprobs_ptr": f,
             "grad_entropy_ptr": f, "clipped_ptr": "*i1", "dual_clipped_ptr": "*i1",
             "N": "i32", "num_splits": "i32", "ignore_index": "i32", "clip_low": "fp32", "clip_high": "fp32",
             "dual_clip": "fp32", "kl_coef": "fp32", "entropy_coef": "fp32", "log_ratio_clamp": "fp32"}
    flags = {"HAS_DUAL_CLIP": dual_clip, "HAS_REF": kl_estimator is not None, "KL_ESTIMATOR": kl_estimator or "k3",
             "WITH_ENTROPY": with_entropy}
    return _spec(_ppo_epilogue_kernel, types, flags, token_epilogue_config(), arch)


class Variant(NamedTuple):
    spec: Callable[[torch.dtype, int], CompileSpec]
    dtypes: tuple = tuple(DTYPES)  # the input dtypes it is built for
    tensor_cores: bool = True  # False for kernels without a matmul (the elementwise epilogues)


# name -> Variant. The heaviest variant of each kernel, and the commonest lighter one.
VARIANTS = {
    "lse_forward[bias,entropy]": Variant(partial(lse_forward_spec, has_bias=True, stats=RowStatsSpec(entropy=True))),
    "lse_forward[bias,all_stats]": Variant(partial(lse_forward_spec, has_bias=True, stats=RowStatsSpec(
        entropy=True, lse2=True, logit_sum=True, argmax=True))),
    "lse_forward[plain]": Variant(partial(lse_forward_spec, has_bias=False, stats=RowStatsSpec())),
    "logprobs_backward[all]": Variant(partial(logprobs_backward_spec, has_bias=True, entropy_grad=True,
                                              grad_hidden=True, grad_weight=True, grad_bias=True)),
    "logprobs_backward[frozen_weight]": Variant(partial(logprobs_backward_spec, has_bias=False, entropy_grad=False,
                                                        grad_hidden=True, grad_weight=False, grad_bias=False)),
    "logit_grad[bias,entropy]": Variant(partial(logit_grad_spec, has_bias=True, entropy_grad=True)),
    "logit_grad[plain]": Variant(partial(logit_grad_spec, has_bias=False, entropy_grad=False)),
    "matmul[d_hidden]": Variant(partial(matmul_spec, product="d_hidden")),
    "matmul[d_weight]": Variant(partial(matmul_spec, product="d_weight")),
    "matmul[d_hidden,odd]": Variant(partial(matmul_spec, product="d_hidden", aligned=False)),
    "matmul[d_weight,odd]": Variant(partial(matmul_spec, product="d_weight", aligned=False)),
    "matmul[d_bias]": Variant(partial(matmul_spec, product="d_bias"), (torch.float32, torch.bfloat16)),
    "ppo_epilogue[dual_clip,k3,entropy]": Variant(partial(ppo_epilogue_spec, dual_clip=True, kl_estimator="k3",
                                                          with_entropy=True), (torch.float32,), tensor_cores=False),
    "ppo_epilogue[plain]": Variant(partial(ppo_epilogue_spec, dual_clip=False, kl_estimator=None,
                                           with_entropy=False), (torch.float32,), tensor_cores=False),
}
CASES = [(name, dtype, arch) for name, variant in VARIANTS.items() for dtype in variant.dtypes for arch in ARCHS]


@pytest.fixture(scope="session")
def compiled() -> dict:
    """Every case compiled once per session (in parallel; Triton's disk cache makes later sessions quick)."""
    specs = {case: VARIANTS[case[0]].spec(case[1], case[2]) for case in CASES}
    results = compile_kernels(list(specs.values()))
    return {case: results[spec] for case, spec in specs.items()}


@pytest.mark.parametrize("name,dtype,arch", CASES, ids=[f"{n}-{DTYPES[d]}-sm{a}" for n, d, a in CASES])
def test_compiles_without_spills_and_on_tensor_cores(compiled, name, dtype, arch):
    r = compiled[(name, dtype, arch)]
    usage = f"{name} {DTYPES[dtype]} sm_{arch}: {r.registers} registers, stack {r.stack}, local {r.local}, " \
            f"shared {r.shared}"
    assert not r.spills, f"register spill: {usage}"
    assert r.shared <= MAX_SHARED[arch], f"shared memory over the per-block limit {MAX_SHARED[arch]}: {usage}"
    if VARIANTS[name].tensor_cores:
        assert r.count(*TENSOR_CORE_OPS[arch]) > 0, \
            f"no tensor-core instruction {TENSOR_CORE_OPS[arch]} in SASS: {usage}"


DETERMINISTIC = ("lse_forward", "logit_grad", "matmul", "ppo_epilogue")
"""Kernel families the deterministic mode runs: the fixed-split forward, the PPO epilogue and the atomic-free
backward (its logit-gradient tiles and owned-tile matmuls)."""
DETERMINISTIC_CASES = [case for case in CASES if case[0].split("[")[0] in DETERMINISTIC]


@pytest.mark.parametrize("name,dtype,arch", DETERMINISTIC_CASES,
                         ids=[f"{n}-{DTYPES[d]}-sm{a}" for n, d, a in DETERMINISTIC_CASES])
def test_deterministic_kernels_hold_no_atomics(compiled, name, dtype, arch):
    assert compiled[(name, dtype, arch)].ptx_atomics == 0, f"{name} {DTYPES[dtype]} sm_{arch}: atom/red in PTX"


@pytest.mark.parametrize("arch", ARCHS)
def test_the_atomics_check_sees_the_atomic_backward(compiled, arch):
    assert compiled[("logprobs_backward[all]", torch.bfloat16, arch)].ptx_atomics > 0
