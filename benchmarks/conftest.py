"""Options of the pytest-benchmark suites: ``--bench-quick`` (or ``FASTALIGN_BENCH_QUICK=1``) for tiny sizes."""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=os.environ.get("FASTALIGN_BENCH_QUICK") == "1",
                     help="fastalign benchmarks at tiny sizes that run in seconds (also FASTALIGN_BENCH_QUICK=1)")
    parser.addoption("--bench-rounds", type=int, default=int(os.environ.get("FASTALIGN_BENCH_ROUNDS", "3")),
                     help="timed rounds per fastalign benchmark, after one warm-up (also FASTALIGN_BENCH_ROUNDS)")


@pytest.fixture(scope="session")
def bench_quick(request) -> bool:
    return request.config.getoption("--bench-quick")


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    return request.config.getoption("--bench-rounds")
