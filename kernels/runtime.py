"""The kernels' runtime: where they may run (`check_device`, `interpreting`), which GPU their launchers tile for
(`target_arch`), the base of their launch configs (`KernelConfig`), and `capture_launches`, which records launches
instead of running them (the AOT compile of `launches.py`'s registry).

A leaf: it imports no kernel module, so that every kernel module may import it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import fields
from typing import NamedTuple

import torch

_captured: list | None = None  # the launches recorded by an active `capture_launches()`
_capture_arch = 0  # the arch an active `capture_launches()` compiles for


class KernelConfig:
    """Base of the kernels' launch configs (frozen dataclasses): every field but ``num_warps`` and ``num_stages`` (the
    launch options) is a constexpr of the kernel."""

    def constexprs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("num_warps", "num_stages")}

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}


def interpreting() -> bool:
    """True under the Triton CPU interpreter (TRITON_INTERPRET=1 when the kernel modules were imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(device: torch.device) -> None:
    """ValueError unless the kernels can run on `device`: CUDA, or any device under the interpreter (or during
    `capture_launches`, which runs nothing)."""
    if device.type != "cuda" and not interpreting() and _captured is None:
        raise ValueError(f"fastalign.kernels: expected CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def target_arch(device: torch.device) -> int:
    """The compute capability the launch compiles for, as 80 (A100) or 90 (H100): the CUDA device's, the one an
    active `capture_launches(arch)` names, or 0 (the interpreter). The tile choices of the launchers depend on it."""
    if _captured is not None:
        return _capture_arch
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


class Launch(NamedTuple):
    """One recorded `kernel[grid](*args, **kwargs)` call."""

    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def capture_launches(arch: int):
    """Record the kernel launches made inside the block (a list of `Launch`) instead of running them, the launchers
    choosing their tiles for a GPU of compute capability `arch` (80, 90); their outputs stay unwritten. For AOT
    compiles on a machine without a GPU, with TRITON_INTERPRET unset."""
    from triton.runtime.jit import JITFunction

    global _captured, _capture_arch
    if interpreting():
        raise RuntimeError("capture_launches: unset TRITON_INTERPRET (the interpreter launches no JITFunction)")
    run = JITFunction.run
    _captured = []

    def record(self, *args, grid, warmup, **kwargs):
        _captured.append(Launch(self, args, kwargs))

    JITFunction.run = record
    _capture_arch = arch
    try:
        yield _captured
    finally:
        JITFunction.run = run
        _captured, _capture_arch = None, 0
