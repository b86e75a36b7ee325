"""Part 1 of the GPU check: every op of ``ops.OPS`` on the triton and torch backends against a float64 reference,
forward values and gradients; the deterministic mode repeated and batch-invariant; vocab parallelism over two ranks.

The reference is the torch backend in float64 on the same inputs rounded to the run's dtype (the suite checks that
backend against independent naive float64 references on CPU). The error of a value is its largest absolute
difference from the reference over the reference's largest magnitude (a loss: over max(|loss|, 1e-3)).
"""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ..ops.dispatch import triton_interpreter_on
from .budget import Budget
from .ops import OPS, OpCase, Problem, make_problem

TOLERANCE = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
"""Largest relative error (see the module docstring) a dtype's run may have against the float64 reference: a few
roundings of the run's dtype (gradients are returned in it) above fp32 accumulation."""

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def evaluate(case: OpCase, problem: Problem, dtype: torch.dtype, device: torch.device, **options) -> dict[str, Tensor]:
    """The op's named values and its gradients ``d_hidden``, ``d_weight``, ``d_bias`` (detached)."""
    hidden, weight, bias, targets, extras = problem.cast(dtype, device)
    values = case.run(hidden, weight, bias, targets, extras, **options)
    grads = torch.autograd.grad(values["loss"], [hidden, weight, bias])
    return {**{k: v.detach() for k, v in values.items()}, "d_hidden": grads[0], "d_weight": grads[1],
            "d_bias": grads[2]}


def relative_error(value: Tensor, reference: Tensor) -> float:
    diff = (value.double().cpu() - reference.double().cpu()).abs().max().item()
    floor = 1e-3 if reference.dim() == 0 else 1e-12
    return diff / max(reference.double().abs().max().item(), floor)


def errors(values: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    return {name: relative_error(values[name], reference[name]) for name in reference}


def triton_runs(dtype: torch.dtype) -> bool:
    """Whether the triton backend runs in ``dtype`` here (the interpreter's bf16 is wrong: triton-lang/triton#11584)."""
    return not (triton_interpreter_on() and dtype == torch.bfloat16)


def check_numerics(device: torch.device, shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype],
                   budget: Budget) -> dict:
    """One row per (op, shape, dtype, backend): the error of each value and gradient, the worst, pass/fail."""
    rows, items = [], [(c, s, d) for c in OPS for s in shapes for d in dtypes]
    for done, (case, shape, dtype) in enumerate(items):
        if budget.expired():
            return {"rows": rows, "stopped": budget.stop_note(done, len(items))}
        problem = make_problem(case, *shape)
        reference = evaluate(case, problem.rounded(dtype), torch.float64, device, backend="torch")
        results, made = {}, {}
        for backend in ("triton", "torch"):
            row = {"op": case.name, "shape": "x".join(map(str, shape)), "dtype": DTYPE_NAMES[dtype],
                   "backend": backend, "tolerance": TOLERANCE[dtype]}
            if backend == "triton" and not triton_runs(dtype):
                rows.append({**row, "skipped": "bf16 is not supported by the Triton interpreter"})
                continue
            try:
                results[backend] = evaluate(case, problem, dtype, device, backend=backend)
                errs = errors(results[backend], reference)
                worst = max(errs, key=errs.get)
                row.update(errors=errs, worst=worst, worst_error=errs[worst], passed=errs[worst] <= TOLERANCE[dtype])
            except Exception as exc:  # noqa: BLE001 - reported, the check goes on
                row.update(passed=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            made[backend] = row
        if len(results) == 2:  # triton against torch in the same dtype
            made["triton"]["triton_vs_torch"] = max(errors(results["triton"], results["torch"]).values())
    return {"rows": rows, "stopped": None}


def check_determinism(device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype, budget: Budget) -> dict:
    """Deterministic triton: every op twice, bitwise equal values and gradients; the log-probs and entropy of the
    first sequence alone bitwise equal to those it has in the whole batch."""
    rows = []
    for done, case in enumerate(OPS):
        if budget.expired():
            return {"rows": rows, "stopped": budget.stop_note(done, len(OPS))}
        problem = make_problem(case, *shape)
        row = {"op": case.name, "dtype": DTYPE_NAMES[dtype]}
        try:
            first, second = (evaluate(case, problem, dtype, device, backend="triton", deterministic=True)
                             for _ in range(2))
            row["repeat_bitwise"] = [k for k in first if not torch.equal(first[k], second[k])] or True
            if case.name == "logprobs":
                alone = Problem(problem.hidden[:1], problem.weight, problem.bias, problem.targets[:1],
                                {k: v[:1] for k, v in problem.extras.items()})
                single = evaluate(case, alone, dtype, device, backend="triton", deterministic=True)
                row["batch_invariant"] = all(torch.equal(single[k], first[k][:1]) for k in ("logprobs", "entropy"))
            row["passed"] = row["repeat_bitwise"] is True and row.get("batch_invariant", True)
        except Exception as exc:  # noqa: BLE001
            row.update(passed=False, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return {"rows": rows, "stopped": None}


def _vocab_parallel_rank(rank: int, world: int, port: int, shape, dtype, out: str, deadline: float) -> None:
    """One rank: each op unsharded and on this rank's uneven vocabulary shard (the first third on rank 0)."""
    cuda = torch.cuda.is_available()
    nccl = cuda and torch.cuda.device_count() >= world
    device = torch.device(f"cuda:{rank}" if nccl else ("cuda:0" if cuda else "cpu"))
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rows = []
    try:
        for case in OPS:
            late = torch.tensor([float(Budget.now() > deadline)], device=device)
            dist.all_reduce(late, op=dist.ReduceOp.MAX)  # every rank stops at the same op
            if late.item():
                break
            problem = make_problem(case, *shape)
            vocab = problem.weight.shape[0]
            bounds = [0, vocab // 3, vocab][rank:rank + 2]
            shard = Problem(problem.hidden, problem.weight[bounds[0]:bounds[1]], problem.bias[bounds[0]:bounds[1]],
                            problem.targets, problem.extras)
            row = {"op": case.name, "dtype": DTYPE_NAMES[dtype], "ranks": world, "collectives": "nccl" if nccl else
                   "gloo"}
            try:
                whole = evaluate(case, problem, dtype, device, backend="triton")
                part = evaluate(case, shard, dtype, device, backend="triton", process_group=dist.group.WORLD)
                whole["d_weight"], whole["d_bias"] = (whole[k][bounds[0]:bounds[1]] for k in ("d_weight", "d_bias"))
                errs = errors(part, whole)
                row.update(errors=errs, worst_error=max(errs.values()),
                           passed=max(errs.values()) <= TOLERANCE[dtype])
            except Exception as exc:  # noqa: BLE001
                row.update(passed=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            dist.barrier()
    finally:
        torch.save(rows, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def check_vocab_parallel(shape: tuple[int, int, int], dtype: torch.dtype, budget: Budget) -> dict:
    """Every op on 2 ranks (NCCL on 2+ GPUs, else gloo: on one GPU both ranks share it; on CPU the interpreter), each
    rank's values and gradient shards against the unsharded op's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        try:
            # fork is quick (the ranks inherit the imports) but unsafe once CUDA is initialized: then spawn
            method = "spawn" if torch.cuda.is_initialized() else "fork"
            mp.start_processes(_vocab_parallel_rank, args=(2, port, shape, dtype, out, budget.deadline), nprocs=2,
                               start_method=method)
        except Exception:  # noqa: BLE001
            return {"rows": [], "stopped": None, "error": traceback.format_exc(limit=2)}
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    rows = [dict(r0, passed=r0["passed"] and r1["passed"], worst_error=max(r0.get("worst_error", 0),
                                                                           r1.get("worst_error", 0)))
            for r0, r1 in zip(*ranks)]
    stopped = None if len(rows) == len(OPS) else budget.stop_note(len(rows), len(OPS))
    return {"rows": rows, "stopped": stopped}
