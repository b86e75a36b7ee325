"""pytest-benchmark suites of the fused PPO and DPO losses against naive PyTorch, forward + backward.

    pytest benchmarks/test_bench_losses.py --benchmark-only                # H=512, V=32768, N=4096 (minutes on a CPU)
    pytest benchmarks/test_bench_losses.py --benchmark-only --bench-quick  # tiny sizes, seconds

PPO: B=4 sequences of T=N/4 with the value head; DPO: B=2 pairs of T=N/4, the reference forward included, in the
default (whole pairs) and chunk_size=256 (two passes) modes. Fused and naive of one mode share a group, so
pytest-benchmark prints them side by side. The variants are those of ``fastalign.bench`` (same inputs, same steps);
for peak memory and the targets, see ``fastalign bench --op ppo`` / ``--op dpo``.
"""
from functools import lru_cache

import pytest

from fastalign.bench import ISSUE_PROBLEM, QUICK_PROBLEM, REGISTRY, Problem

VARIANTS = ("fused", "naive")
CASES = [("ppo", "fwd+bwd"), ("dpo", "default"), ("dpo", "chunk256")]


@pytest.fixture(scope="session")
def problem(bench_quick) -> Problem:
    return QUICK_PROBLEM if bench_quick else ISSUE_PROBLEM


@lru_cache(maxsize=None)
def op_inputs(op: str, problem: Problem):
    return REGISTRY[op].make_inputs(problem)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("op", "mode"), CASES, ids=[f"{op}-{mode}" for op, mode in CASES])
def test_forward_backward(benchmark, problem, op, mode, variant, bench_rounds):
    spec = REGISTRY[op].modes[mode]
    step = spec.variants[variant](op_inputs(op, problem))
    benchmark.group = f"{op} {spec.title}, N={problem.tokens}"
    benchmark.extra_info.update(op=op, mode=mode, variant=variant, tokens=problem.tokens,
                                hidden_size=problem.hidden_size, vocab_size=problem.vocab_size, dtype=problem.dtype)
    benchmark.pedantic(step, rounds=bench_rounds, iterations=1, warmup_rounds=1)
