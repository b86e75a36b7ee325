"""Part 3 of the GPU check: time and extra peak memory of log-probs fwd+bwd, SFT cross-entropy, DPO, GRPO and
distillation for fastalign (triton, default and deterministic; the torch backend on the same device), naive
PyTorch, and Liger-Kernel, Cut Cross-Entropy and TRL's ``ChunkedLogProbFunction`` where installed, each with its
achieved TFLOPS and, for fastalign triton, the cost model's estimate (``fastalign.gpu_model``) beside it where the
model covers the op (not the two-head distillation).

TFLOPS are *useful* FLOPs over the measured time: the matmuls an op needs at least (``2 N H V`` each): three for a
trained op (logits, d hidden, d weight), four for DPO (plus the reference's logits), five for distillation from a
teacher twice as wide (its logits count twice), whatever an implementation really runs (a two-pass plan recomputes
the logits).
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import bench, gpu_model
from ..functional import fused_linear_cross_entropy, fused_linear_distill_loss, fused_linear_logprobs
from .budget import Budget

FASTALIGN_VARIANTS = {"fastalign triton": ("triton", False), "fastalign triton deterministic": ("triton", True),
                      "fastalign torch": ("torch", False)}
"""name -> (backend, deterministic)."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _fused_logprobs(backend: str, deterministic: bool) -> bench.VariantFactory:
    return bench.logprobs_forward_backward(
        lambda x, hidden, weight, bias: fused_linear_logprobs(hidden, weight, x.targets, bias=bias, backend=backend,
                                                              deterministic=deterministic),
        train_weight=True)


def _fused_ce(backend: str, deterministic: bool) -> bench.VariantFactory:
    return bench.fused_loss(lambda x, hidden, weight: fused_linear_cross_entropy(
        hidden, weight, x.targets, backend=backend, deterministic=deterministic))


def _fused_distill(backend: str, deterministic: bool) -> bench.VariantFactory:
    return bench.fused_loss(lambda x, hidden, weight: fused_linear_distill_loss(
        hidden, weight, x.teacher_hidden, x.teacher_weight, beta=bench.DISTILL_BETA, backend=backend,
        deterministic=deterministic))


def _fused_loss(factory: Callable[..., bench.VariantFactory], **options) -> Callable[..., bench.VariantFactory]:
    """A bench factory of a fused loss (which takes its backend from the inputs) on a given backend."""

    def make(backend: str, deterministic: bool) -> bench.VariantFactory:
        return lambda x: factory(deterministic=deterministic, **options)(x._replace(backend=backend))

    return make


def _liger_logprobs(x, hidden, weight, bias):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, x.targets, bias)


def _liger_ce(x) -> bench.Step:
    """Liger-Kernel's fused linear cross-entropy, mean over the tokens; fwd + bwd."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda: torch.autograd.grad(loss(weight, hidden, x.targets), [hidden, weight])


def _cce_logprobs(x, hidden, weight, bias):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, x.targets, bias=bias, reduction="none")


def _trl_logprobs(x, hidden, weight, bias):
    from trl.kernels import ChunkedLogProbFunction

    # TRL's own tile width (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE); only the log-probs asked for.
    return ChunkedLogProbFunction.apply(hidden, weight, bias, x.targets, 1.0, 32768, None, 1.0, ())[0]


@dataclass(frozen=True)
class SpeedOp:
    make_inputs: Callable[[bench.Problem], object]
    variants: dict[str, bench.VariantFactory | None]  # None: not installed here
    useful_matmuls: int
    estimate: Callable[[dict, bool], float] | None  # (cost model passes' seconds, deterministic) -> seconds


def _forward_backward(seconds: dict, deterministic: bool) -> float:
    if deterministic:
        return seconds["forward, deterministic"] + seconds["backward, atomic-free"]
    return seconds["forward"] + seconds["backward, atomics"]


def _dpo_estimate(seconds: dict, deterministic: bool) -> float:
    """The policy's forward and backward and the reference's forward."""
    return _forward_backward(seconds, deterministic) + seconds["forward, deterministic" if deterministic else "forward"]


def speed_ops() -> dict[str, SpeedOp]:
    def fused(factory):
        return {name: factory(*options) for name, options in FASTALIGN_VARIANTS.items()}

    logprob_naive = bench.logprobs_forward_backward(bench.naive_logprobs, train_weight=True)
    optional = lambda module, impl: (bench.logprobs_forward_backward(impl, train_weight=True)  # noqa: E731
                                     if _installed(module) else None)
    return {
        "log-probs fwd+bwd": SpeedOp(bench.make_logprob_inputs, {
            **fused(_fused_logprobs), "naive PyTorch": logprob_naive,
            "Liger-Kernel (fused linear CE)": optional("liger_kernel", _liger_logprobs),
            "Cut Cross-Entropy": optional("cut_cross_entropy", _cce_logprobs),
            "TRL ChunkedLogProbFunction": optional("trl", _trl_logprobs)}, 3, _forward_backward),
        "SFT cross-entropy fwd+bwd": SpeedOp(bench.make_logprob_inputs, {
            **fused(_fused_ce), "naive PyTorch": bench.naive_ce,
            "Liger-Kernel (fused linear CE)": _liger_ce if _installed("liger_kernel") else None,
            "Cut Cross-Entropy": bench.cce_ce if _installed("cut_cross_entropy") else None}, 3, _forward_backward),
        "DPO fwd+bwd (reference forward included)": SpeedOp(bench.make_dpo_inputs, {
            **fused(_fused_loss(bench.fused_dpo)), "naive PyTorch": bench.naive_dpo,
            "Liger-Kernel": bench.liger_dpo(False) if _installed("liger_kernel") else None}, 4, _dpo_estimate),
        "GRPO fwd+bwd (dapo)": SpeedOp(bench.make_grpo_inputs, {
            **fused(_fused_loss(bench.fused_grpo, loss_type="dapo")),
            "naive PyTorch": bench.naive_grpo(loss_type="dapo")}, 3, _forward_backward),
        "distillation fwd+bwd (generalized JSD, teacher 2H)": SpeedOp(bench.make_distill_inputs, {
            **fused(_fused_distill), "naive PyTorch": bench.naive_distill,
            "Liger-Kernel (fused linear JSD)": bench.liger_distill if _installed("liger_kernel") else None}, 5, None),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(factory: bench.VariantFactory, inputs, device: torch.device, rounds: int, budget: Budget) -> dict:
    """Minimum and median seconds of ``rounds`` calls after a warm-up (fewer when the budget runs out), and the
    extra peak memory of a call on CUDA."""
    step = factory(inputs)
    step()  # warm-up: compiles, autotunes, allocates
    _synchronize(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        if budget.expired():
            break
    times.sort()
    result = {"seconds": times[0], "median_seconds": times[len(times) // 2], "rounds": len(times)}
    if device.type == "cuda":
        result["extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return result


def check_speed(problem: bench.Problem, rounds: int, budget: Budget) -> dict:
    """One row per (op, variant) with seconds, TFLOPS and the cost model's estimate; per op, which backend of
    fastalign measured faster and whether ``backend="auto"`` (triton on CUDA) would then change."""
    device = torch.device(problem.device)
    model = gpu_model.Problem(problem.tokens, problem.hidden_size, problem.vocab_size, problem.torch_dtype)
    passes = {name: gpu_model.total_seconds(costs, gpu_model.H100, model.dtype)
              for name, costs in gpu_model.model(model).items()}
    ops, rows, auto = speed_ops(), [], []
    items = [(op, name) for op, spec in ops.items() for name in spec.variants]
    done = 0
    for op, spec in ops.items():
        inputs = None
        for name, factory in spec.variants.items():
            row = {"op": op, "variant": name}
            if factory is None:
                rows.append({**row, "skipped": "not installed"})
                done += 1
                continue
            if budget.expired():
                return {"rows": rows, "auto": auto, "stopped": budget.stop_note(done, len(items))}
            try:
                inputs = inputs or spec.make_inputs(problem)
                row.update(time_variant(factory, inputs, device, rounds, budget))
                flops = spec.useful_matmuls * 2 * problem.tokens * problem.hidden_size * problem.vocab_size
                row["tflops"] = flops / row["seconds"] / 1e12
                if name.startswith("fastalign triton") and spec.estimate is not None:
                    row["model_seconds"] = spec.estimate(passes, name.endswith("deterministic"))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as exc:  # noqa: BLE001 - reported, the check goes on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            done += 1
        auto.append(_auto_decision(op, [r for r in rows if r["op"] == op]))
    return {"rows": rows, "auto": auto, "stopped": None}


def _auto_decision(op: str, rows: list[dict]) -> dict:
    """``backend="auto"`` picks triton (default plan) on CUDA: which fastalign plan measured fastest, whether the
    torch backend beat triton (then auto would change) and whether triton's deterministic plan beat its default
    (the cost model predicts it at these sizes: the default backward's fp32 atomics)."""
    seconds = {r["variant"]: r.get("seconds") for r in rows if r["variant"] in FASTALIGN_VARIANTS}
    triton, det, torch_ = (seconds.get(k) for k in FASTALIGN_VARIANTS)
    if triton is None or torch_ is None:
        return {"op": op, "faster": None, "auto_would_change": None}
    return {"op": op, "faster": "triton" if triton <= torch_ else "torch", "triton_seconds": triton,
            "torch_seconds": torch_, "deterministic_seconds": det, "auto_would_change": torch_ < triton,
            "deterministic_faster": None if det is None else det < triton}
