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
