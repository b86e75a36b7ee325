"""Ahead-of-time compile of the registered kernel launches (`fastalign.kernels.launches`) for A100 (sm_80) and H100
(sm_90) in fp32, fp16 and bf16, each bound from real tensors by Triton's own binder (tests/helpers/aot.py), at two
shapes: "llama" (N, H, V multiples of 16, Llama-3's vocabulary) and "odd" (N = 37, H = 100, V = 1001: nothing a
multiple of 16, so no vectorized loads on the hidden dimension).

A build fails on a compile error, on any register spill (cubin STACK or LOCAL non-zero), on shared memory past
what one block may use, or on a `tl.dot` of the source that does not lower to tensor cores: `mma` (mma.sync) on
sm_80; `wgmma` on sm_90 (for fp32 inputs too: their tf32x3 dots run on tensor cores, three per dot).

Which flag combinations: each family's heaviest (every optional block on: each flag only adds code) and its
commonest (no bias, no entropy, both gradients for the backward), at every dtype, shape and arch. Every other flag
combination (656 builds at the odd shape, the one with the most registers: too slow for the suite) is compiled by
`python tests/helpers/aot.py --doc docs/kernels.md --sweep`. Its last run, before main's grouped-order forward and
128-wide logit-gradient tiles, found no spill, each kernel's register maximum the heaviest's or up to 11 above it
(the allocation is not monotone in the code); docs/kernels.md now holds the default builds only.
"""
import pkgutil
from importlib import import_module

import pytest
from helpers.aot import ARCHS, Build, BuildResult, compile_builds, registered_builds

import fastalign.kernels

MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block, A100 / H100
WANTED_DOT = {80: "mma", 90: "wgmma"}

BUILDS = registered_builds()
# The deliberately broken builds: registered launches with their launch options overridden.
FMA_DOTS = [Build("logprobs_backward[d_hidden,d_weight]", "fp32", "llama", arch, (("DOT_PRECISION", "ieee"),))
            for arch in ARCHS]  # fp32 dots forced onto FMA
HUGE_TILE = Build("lse_forward[plain]", "bf16", "llama", 90, (("BLOCK_N", 256), ("BLOCK_V", 256), ("BLOCK_H", 64),
                                                               ("num_warps", 4)))  # accumulator: 512 fp32/thread
BROKEN = FMA_DOTS + [HUGE_TILE]


def problems(build: Build, r: BuildResult) -> list[str]:
    """What is wrong with a compiled build (empty: nothing)."""
    found = []
    if r.spills:
        found.append(f"register spill: stack {r.stack} B, local {r.local} B at {r.registers} registers")
    if r.shared > MAX_SHARED[build.arch]:
        found.append(f"shared memory {r.shared} B over the per-block limit {MAX_SHARED[build.arch]} B")
    found += [f"tl.dot at {src} lowers to {lowering}, expected {WANTED_DOT[build.arch]}"
              for src, lowering in r.dots.items() if lowering != WANTED_DOT[build.arch]]
    return found


@pytest.fixture(scope="session")
def compiled() -> dict:
    """Every default build compiled once per session (in parallel; Triton's disk cache makes later sessions quick),
    in the same round of workers as the deliberately broken builds (`BROKEN`)."""
    return {build: results for build, results in compile_builds(BUILDS + BROKEN).items() if build not in BROKEN}


def build_id(b: Build) -> str:
    return f"{b.case}-{b.dtype}-{b.shape}-sm{b.arch}"


@pytest.mark.parametrize("build", BUILDS, ids=build_id)
def test_compiles_without_spills_and_every_dot_on_tensor_cores(compiled, build):
    for r in compiled[build]:  # each distinct kernel launch of the case
        assert not problems(build, r), f"{build} {r.kernel}: {problems(build, r)}\n{r.signature}\n{r.launch}"


@pytest.mark.parametrize("build", BUILDS, ids=build_id)
def test_deterministic_launches_hold_no_atomics(compiled, build):
    """The deterministic mode's kernels (fixed-split forward, atomic-free backward) hold no PTX `atom`/`red`; the
    atomic backward, the control, does."""
    atomics = [r.ptx_atomics for r in compiled[build]]
    if "deterministic" in build.case or not build.case.startswith(("logprobs_backward", "divergence_backward")):
        assert atomics == [0] * len(atomics)
    else:
        assert atomics[0] > 0


def test_every_kernel_is_registered_and_built_as_the_runtime_binds_it(compiled):
    """Every `*_kernel` of fastalign.kernels is launched by a registered case; the builds carry the runtime's
    specializations (pointers and multiples of 16 marked /16 at "llama", H unmarked at "odd"); every kernel with a
    matmul shows its dots (so the per-dot check above cannot pass on an empty list)."""
    defined = {name for mod in pkgutil.iter_modules(fastalign.kernels.__path__)
               for name in vars(import_module(f"fastalign.kernels.{mod.name}")) if name.endswith("_kernel")}
    assert {r.kernel for results in compiled.values() for r in results} == defined

    for build, results in compiled.items():
        for r in results:
            if r.kernel in ("_lse_forward_kernel", "_logprobs_backward_kernel", "_logit_grad_kernel"):
                assert f" H:i32{'/16' if build.shape == 'llama' else ''} " in f" {r.signature} ", r.signature
            if r.kernel != "_ppo_epilogue_kernel":
                assert r.dots and r.count("HMMA", "HGMMA") > 0


@pytest.fixture(scope="module")
def broken() -> dict:
    return compile_builds(BROKEN)


@pytest.mark.parametrize("build", FMA_DOTS, ids=build_id)
def test_checks_reject_a_dot_forced_to_fma(broken, build):
    (r,) = broken[build]
    assert "DOT_PRECISION=ieee" in r.launch
    assert len(r.dots) == 3 and set(r.dots.values()) == {"fma"}
    assert len([p for p in problems(build, r) if "lowers to fma" in p]) == 3


def test_checks_reject_a_spill_from_a_huge_tile(broken):
    (r,) = broken[HUGE_TILE]
    assert "BLOCK_N=256 BLOCK_V=256" in r.launch
    assert any(p.startswith("register spill") for p in problems(HUGE_TILE, r)), (r.registers, r.stack, r.local)
