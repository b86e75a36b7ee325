"""Launch configuration shared by the per-token epilogue kernels (PPO): elementwise work over tokens."""
from __future__ import annotations

from dataclasses import dataclass

from .launches import KernelConfig


@dataclass(frozen=True)
class TokenEpilogueConfig(KernelConfig):
    """Block size and launch options of an epilogue kernel (the compile test builds exactly these)."""

    BLOCK_N: int
    num_warps: int
    num_stages: int


def token_epilogue_config(interpret: bool = False) -> TokenEpilogueConfig:
    """GPU config (4 tokens per thread); `interpret=True` gives small blocks, so that short test inputs still span
    several programs."""
    if interpret:
        return TokenEpilogueConfig(16, num_warps=1, num_stages=1)
    return TokenEpilogueConfig(512, num_warps=4, num_stages=1)
