"""Run a function on P gloo ranks of this CPU, spawned from a test: the harness of the distributed tests.

Each rank is a fresh ``spawn`` process (the environment, so ``TRITON_INTERPRET``, and ``sys.path`` are inherited)
with one torch thread. ``fn`` must be a module-level function (it is pickled by name); what it returns is saved with
``torch.save`` and handed back by rank. A failing rank fails the test and the others are killed; so does a run that
outlives ``RUN_TIMEOUT`` (ranks whose collectives do not match wait for each other forever).
"""
from __future__ import annotations

import gc
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(seconds=60)  # of the default process group's collectives
RUN_TIMEOUT = 180.0  # seconds, of a whole run


def free_port() -> int:
    """A TCP port on the loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, init: bool, fn, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            gc.collect()  # what the run left (handles of collectives) is freed while the group is up
            dist.barrier()  # without it a rank that leaves first aborts the others' gloo threads
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, init: bool = True) -> list:
    """``fn(rank, world_size, *args)`` on ranks ``0 .. world_size - 1``; returns their results, by rank.

    ``init=True``: the default process group (gloo, loopback) is up when ``fn`` starts. ``init=False``: only the
    ``torchrun`` environment is set (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), for
    code that initializes the group itself.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ranks = mp.start_processes(_worker, args=(world_size, free_port(), init, fn, args, out_dir),
                                   nprocs=world_size, start_method="spawn", join=False)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in ranks.processes:
                    process.kill()
                raise TimeoutError(f"{world_size} ranks running {fn.__name__} did not finish in {RUN_TIMEOUT:.0f} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
