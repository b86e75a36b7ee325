"""pytest-benchmark suites of the fused log-prob op against naive PyTorch, over token counts.

    pytest benchmarks/ --benchmark-only                       # H=512, V=32768, N in 512..4096 (minutes on a CPU)
    pytest benchmarks/ --benchmark-only --bench-quick         # tiny sizes, seconds
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json

Fused and naive of one mode and size share a group, so pytest-benchmark prints them side by side. The variants are
those of ``fastalign.bench`` (same inputs, same steps); for peak memory and the targets, see ``fastalign bench``.
"""
from functools import lru_cache

import pytest

from fastalign.bench import REGISTRY, Problem

TOKENS = (512, 1024, 2048, 4096)
FULL = dict(hidden_size=512, vocab_size=32768)
QUICK = dict(hidden_size=64, vocab_size=2048)
QUICK_TOKENS_DIVISOR = 16
VARIANTS = ("fused", "naive")
LOGPROBS = REGISTRY["logprobs"]


def pytest_generate_tests(metafunc):
    if "problem" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick")
        problems = [Problem(tokens=n // QUICK_TOKENS_DIVISOR, **QUICK) if quick else Problem(tokens=n, **FULL)
                    for n in TOKENS]
        metafunc.parametrize("problem", problems,
                             ids=[f"N{p.tokens}-H{p.hidden_size}-V{p.vocab_size}" for p in problems])


@lru_cache(maxsize=None)
def logprob_inputs(problem: Problem):
    return LOGPROBS.make_inputs(problem)


def run_variant(benchmark, problem: Problem, mode: str, variant: str, rounds: int) -> None:
    step = LOGPROBS.modes[mode].variants[variant](logprob_inputs(problem))
    benchmark.group = f"logprobs {LOGPROBS.modes[mode].title}, N={problem.tokens}"
    benchmark.extra_info.update(op="logprobs", mode=mode, variant=variant, tokens=problem.tokens,
                                hidden_size=problem.hidden_size, vocab_size=problem.vocab_size, dtype=problem.dtype)
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_only(benchmark, problem, variant, bench_rounds):
    run_variant(benchmark, problem, "forward", variant, bench_rounds)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weight", ["trainable", "frozen"])
def test_forward_backward(benchmark, problem, weight, variant, bench_rounds):
    run_variant(benchmark, problem, weight, variant, bench_rounds)
