"""Backend choice: ``"triton"`` (kernels in ``fastalign.kernels``), ``"torch"`` (chunked PyTorch) or ``"auto"``."""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "FASTALIGN_BACKEND"


def triton_interpreter_on() -> bool:
    """True when ``TRITON_INTERPRET=1``: the Triton kernels then run on CPU tensors (slowly, for testing)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on())


def available_backends() -> list[str]:
    """Concrete backends usable for CPU tensors in this process (plus "triton" when CUDA is present)."""
    backends = ["torch"]
    if triton_usable(torch.device("cpu")) or (torch.cuda.is_available() and triton_usable(torch.device("cuda"))):
        backends.append("triton")
    return backends


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (or ``$FASTALIGN_BACKEND`` when ``backend == "auto"``) to ``"triton"`` or ``"torch"``.

    ``"auto"`` picks triton on CUDA and torch elsewhere. Asking for triton where it cannot run raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV}: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and triton installed; "
            f"got tensors on {device}"
        )
    return backend
