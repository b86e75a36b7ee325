"""The registry of every launch the kernels' launchers make (`LAUNCHES`).

The registry is what the sm_80/sm_90 compile test (tests/kernels/test_kernels_compile.py) and the kernel table
(docs/kernels.md) compile: each `LaunchCase` calls a public launcher with real tensors of a given dtype and
`Shape`, under `runtime.capture_launches()`, which records the `kernel[grid](...)` calls instead of running them. The
compile test then binds the recorded arguments with Triton's own binder, so the signature, the constexprs and the
divisibility / equal-to-1 specializations are those the runtime builds on a GPU for those tensors.

A new kernel joins by adding one `_cases_*` function to `LAUNCHES`: a `LaunchCase` per flag combination its
launcher can reach, the heaviest (every optional block on) and the commonest marked; the compile test fails on a
`*_kernel` of `fastalign.kernels` that no case launches. A launcher whose tiles depend on the GPU asks
`runtime.target_arch(device)`. This module sits on top of the kernel modules (it imports them); none imports it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .divergence import Head, HardLabels, divergence_backward, divergence_terms
from .logprobs_backward import linear_logprobs_backward
from .lse_forward import LsePartials, lse_forward_partials
from .ppo_epilogue import KL_ESTIMATORS, ppo_epilogue
from .row_stats import RowStatsSpec


class Shape(NamedTuple):
    n: int  # tokens
    h: int  # hidden size
    v: int  # vocabulary (of this shard)


# What the specialization sees: N, H, V multiples of 16 or not (the binder marks multiples of 16 and turns 1 into
# a constant). "llama": Llama-3's vocabulary (a multiple of 16, 2004 tiles of 64); "odd": nothing a multiple of 16.
SHAPES = {"llama": Shape(2048, 256, 128256), "odd": Shape(37, 100, 1001)}


@dataclass(frozen=True)
class LaunchCase:
    """One flag combination of one launcher: `call(dtype, shape)` runs the launcher on empty tensors (it may launch
    several kernels, or one several times: the compile test builds each distinct launch)."""

    family: str  # the kernel family (module), e.g. "logprobs_backward"
    flags: str  # the options on, e.g. "bias,entropy_grad,d_hidden"; "plain" when none
    call: Callable[[torch.dtype, Shape], None]
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)  # the lm_head dtypes it is built for
    heaviest: bool = False  # every optional block on: the most code
    commonest: bool = False  # what most training runs launch

    @property
    def name(self) -> str:
        return f"{self.family}[{self.flags}]"


def _label(**flags: bool) -> str:
    return ",".join(name for name, on in flags.items() if on) or "plain"


def _lm_head(dtype: torch.dtype, shape: Shape, bias: bool):
    hidden, weight = torch.empty(shape.n, shape.h, dtype=dtype), torch.empty(shape.v, shape.h, dtype=dtype)
    return hidden, weight, torch.empty(shape.v, dtype=dtype) if bias else None, torch.zeros(shape.n, dtype=torch.int64)


def _cases_lse_forward() -> list[LaunchCase]:
    def case(bias: bool, stats: RowStatsSpec, softcap: bool, deterministic: bool) -> LaunchCase:
        def call(dtype: torch.dtype, shape: Shape) -> None:
            hidden, weight, b, targets = _lm_head(dtype, shape, bias)
            lse_forward_partials(hidden, weight, b, targets, inv_temperature=1.0, ignore_index=-100, spec=stats,
                                 deterministic=deterministic, logit_softcap=30.0 if softcap else None)

        every = bias and softcap and stats == RowStatsSpec(True, True, True, True)
        return LaunchCase("lse_forward", _label(bias=bias, **vars(stats), softcap=softcap,
                                                deterministic=deterministic), call,
                          heaviest=every and not deterministic,
                          commonest=not (bias or stats.any_extra or softcap))

    # deterministic only fixes the vocab split (tiles_per_split): the same code, another specialization
    return [case(bias, RowStatsSpec(*s), softcap, det) for bias in (False, True)
            for s in itertools.product((False, True), repeat=4) for softcap in (False, True) for det in (False, True)]


def _cases_logprobs_backward() -> list[LaunchCase]:
    def case(bias: bool, entropy_grad: bool, softcap: bool, row_grads: bool, d_hidden: bool, d_weight: bool,
             d_bias: bool, deterministic: bool) -> LaunchCase:
        def call(dtype: torch.dtype, shape: Shape) -> None:
            hidden, weight, b, targets = _lm_head(dtype, shape, bias)
            row = torch.empty(shape.n)
            linear_logprobs_backward(hidden, weight, b, targets, row, row, row if entropy_grad else None,
                                     row if entropy_grad else None, inv_temperature=1.0, ignore_index=-100,
                                     need_grad_hidden=d_hidden, need_grad_weight=d_weight, need_grad_bias=d_bias,
                                     deterministic=deterministic, logit_softcap=30.0 if softcap else None,
                                     grad_lse=row if row_grads else None, grad_logit_sum=row if row_grads else None)

        flags = dict(bias=bias, entropy_grad=entropy_grad, softcap=softcap, row_grads=row_grads, d_hidden=d_hidden,
                     d_weight=d_weight, d_bias=d_bias)
        # deterministic runs other kernels (the logit-gradient tiles and owned-tile matmuls): a heaviest and a
        # commonest of its own
        return LaunchCase("logprobs_backward", _label(**flags, deterministic=deterministic), call,
                          heaviest=all(flags.values()),
                          commonest=flags == dict(bias=False, entropy_grad=False, softcap=False, row_grads=False,
                                                  d_hidden=True, d_weight=True, d_bias=False))

    # d_bias needs a bias; at least one gradient (else the launcher launches nothing).
    return [case(bias, ent, cap, rg, dh, dw, db, det)
            for bias, ent, cap, rg, dh, dw, db, det in itertools.product((False, True), repeat=8)
            if (bias or not db) and (dh or dw or db)]


def _cases_ppo_epilogue() -> list[LaunchCase]:
    def case(dual_clip: bool, kl_estimator: str | None, entropy: bool) -> LaunchCase:
        def call(dtype: torch.dtype, shape: Shape) -> None:
            splits = torch.empty(2, shape.n)
            row = torch.empty(shape.n)
            ppo_epilogue(LsePartials(splits, splits, splits if entropy else None, splits),
                         torch.zeros(shape.n, dtype=torch.int64), row, row, row if kl_estimator else None, row,
                         ignore_index=-100, cliprange=0.2, cliprange_high=None, dual_clip=3.0 if dual_clip else None,
                         kl_coef=0.1 if kl_estimator else 0.0, kl_estimator=kl_estimator or "k3",
                         entropy_coef=0.01 if entropy else 0.0, log_ratio_clamp=20.0, with_entropy=entropy)

        flags = _label(dual_clip=dual_clip, **({kl_estimator: True} if kl_estimator else {}), entropy=entropy)
        # The partials and per-token inputs are fp32 whatever the lm_head's dtype: one build.
        return LaunchCase("ppo_epilogue", flags, call, dtypes=(torch.float32,),
                          heaviest=dual_clip and kl_estimator == "k3" and entropy,
                          commonest=not (dual_clip or kl_estimator or entropy))

    return [case(dual, kl, ent) for dual in (False, True) for kl in (None, *KL_ESTIMATORS) for ent in (False, True)]


def _cases_divergence() -> list[LaunchCase]:

    def heads(dtype: torch.dtype, shape: Shape, bias: bool, softcap: bool) -> tuple[Head, Head]:
        # The teacher twice as wide as the student (the bench's 512 / 1024), its transform the student's.
        student, teacher = Shape(shape.n, shape.h, shape.v), Shape(shape.n, 2 * shape.h, shape.v)
        return tuple(Head(*_lm_head(dtype, s, bias)[:3], 1.0, 30.0 if softcap else None) for s in (student, teacher))

    def terms_case(bias: bool, softcap: bool, mode: str, deterministic: bool) -> LaunchCase:
        def call(dtype: torch.dtype, shape: Shape) -> None:
            student, teacher = heads(dtype, shape, bias, softcap)
            row = torch.empty(shape.n)
            divergence_terms(student, teacher, row, row, inv_temperature=1.0, beta=BETAS[mode],
                             deterministic=deterministic)

        flags = _label(bias=bias, softcap=softcap, **{mode: True}, deterministic=deterministic)
        return LaunchCase("divergence_terms", flags, call, DTYPES,
                          heaviest=bias and softcap and mode == "jsd" and not deterministic)

    def backward_case(bias: bool, softcap: bool, mode: str, hard: bool, d_bias: bool,
                      deterministic: bool) -> LaunchCase:
        def call(dtype: torch.dtype, shape: Shape) -> None:
            student, teacher = heads(dtype, shape, bias, softcap)
            row = torch.empty(shape.n)
            labels = HardLabels(torch.zeros(shape.n, dtype=torch.int64), row, row) if hard else None
            divergence_backward(student, teacher, row, row, row, row, inv_temperature=1.0, beta=BETAS[mode],
                                hard=labels, need_grad_bias=d_bias, deterministic=deterministic)

        flags = dict(bias=bias, softcap=softcap, hard=hard, d_bias=d_bias)
        # deterministic runs other kernels (the logit-gradient tiles and owned-tile matmuls): a heaviest of its own
        return LaunchCase("divergence_backward", _label(**flags, **{mode: True}, deterministic=deterministic), call,
                          DTYPES, heaviest=all(flags.values()) and mode == "jsd")

    # Only the heaviest cases in bf16 are in the compile test's default builds (12 builds: each takes tens of
    # seconds); `python tests/helpers/aot.py --sweep` builds the rest (docs/kernels.md), fp32 / fp16 by hand.
    BETAS, DTYPES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}, (torch.bfloat16,)
    return ([terms_case(bias, cap, mode, det) for bias, cap, det in itertools.product((False, True), repeat=3)
             for mode in BETAS] +
            [backward_case(bias, cap, mode, hard, db, det)
             for bias, cap, hard, db, det in itertools.product((False, True), repeat=5) for mode in BETAS
             if bias or not db])


LAUNCHES: dict[str, Callable[[], list[LaunchCase]]] = {
    "lse_forward": _cases_lse_forward,
    "logprobs_backward": _cases_logprobs_backward,
    "ppo_epilogue": _cases_ppo_epilogue,
    "divergence": _cases_divergence,
}


def launch_cases() -> list[LaunchCase]:
    """Every registered case (each family's case names are unique)."""
    return [case for cases in LAUNCHES.values() for case in cases()]
