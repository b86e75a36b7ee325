"""Token-chunk sizing for the chunked PyTorch backend: the ``[chunk, V]`` logits live one chunk at a time."""
from __future__ import annotations

import os

CHUNK_BUDGET_ENV = "FASTALIGN_CHUNK_BUDGET_MB"
DEFAULT_CHUNK_BUDGET_MB = 48
"""Default memory for the ``[chunk, V]`` fp32 temporaries of one chunk, in MiB (override with $FASTALIGN_CHUNK_BUDGET_MB).

48 MiB (384 rows at V=32k in one buffer) keeps a chunk's matmuls within about 10% of full-size matmul speed on this
project's 2-core CPU, while the whole op stays far below the naive ``[N, V]`` logits (512 MiB at N=4k, V=32k): the
fused PPO loss at N=4096, H=512, V=32768 peaks at about 0.09x the extra memory of the naive one (64 MiB: 0.10x)."""


def chunk_budget_bytes() -> int:
    """The chunk memory budget in bytes, from $FASTALIGN_CHUNK_BUDGET_MB or the default."""
    raw = os.environ.get(CHUNK_BUDGET_ENV)
    if raw is None:
        return DEFAULT_CHUNK_BUDGET_MB << 20
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"${CHUNK_BUDGET_ENV}: expected a number of MiB, got {raw!r}") from None
    if megabytes <= 0:
        raise ValueError(f"${CHUNK_BUDGET_ENV}: expected a positive number of MiB, got {raw!r}")
    return int(megabytes * (1 << 20))


def check_chunk_size(chunk_size) -> int | None:
    """None or a positive int (tokens per chunk)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return chunk_size


def rows_per_chunk(num_rows: int, vocab_size: int, *, chunk_size: int | None = None, buffers: int = 2,
                   element_bytes: int = 4) -> int:
    """Tokens per chunk: ``chunk_size`` when given, else as many as fit ``buffers`` ``[rows, V]`` temporaries in the budget.

    Always at least 1 and at most ``num_rows``.
    """
    if check_chunk_size(chunk_size) is not None:
        rows = chunk_size
    else:
        rows = chunk_budget_bytes() // max(1, buffers * vocab_size * element_bytes)
    return max(1, min(rows, num_rows))
