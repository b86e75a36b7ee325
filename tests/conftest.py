"""Shared fixtures. The Triton interpreter must be switched on before any kernel module is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastalign.ops.dispatch import available_backends  # noqa: E402

BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend usable in this process: "torch" always, "triton" on CUDA or under TRITON_INTERPRET=1."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread: tiny models stall on a busy 2-core machine with two (0.8 s per step instead of 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
