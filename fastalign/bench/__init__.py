"""Benchmark harness: each fused op against naive PyTorch and plain-matmul floors, in time and extra peak memory.

Laid out like the ops: ``harness`` (problem, modes and targets, ``REGISTRY``, timing, memory workers, machine
facts, the Markdown table), ``variants`` (matmul floors and builders shared by the families), one module of cases
per op family (``logprobs``, ``ppo``, ``grpo`` with ``rloo``, ``dpo``, ``kto``, ``cpo`` with SimPO and ORPO, ``ce``,
``distill``, ``train_long``, ``packed``, ``compiled``, ``trl``), each registering its ops in ``REGISTRY``, and
``cli`` (the options of ``fastalign bench``). The pytest-benchmark suites of ``benchmarks/`` use the same cases.

What is compared is data: ``REGISTRY`` maps an op name to its inputs builder and its modes; a mode (forward only,
fwd+bwd with a trainable or frozen weight...) holds its variants (``name -> factory``), which of them is the
candidate, the baseline and the floor, and the targets the candidate must meet. Adding an op is a few lines in its
family's module: an inputs builder (its inputs need ``hidden`` and ``weight`` for the matmul floors), one variant
factory per implementation, one ``Mode`` per mode, e.g.::

    REGISTRY["ppo"] = OpBench(make_ppo_inputs, {"fwd+bwd": Mode(
        "PPO loss, fwd+bwd", {"fused": fused_ppo, "naive": naive_ppo, "3 matmuls": matmul_floor(3)},
        floor="3 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15)))})

Measurements:
  * time: the variants of a mode run interleaved in one process, ``rounds`` times after one warm-up call each;
    the minimum per variant is kept (the machine is noisy: the same call can swing 30%).
  * memory: each variant runs once in a fresh subprocess (``python -m fastalign.bench --memory-worker ...``).
    Extra peak memory is the peak during the call minus what was in use once the inputs were allocated: peak RSS
    (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) on Linux CPUs, ``max_memory_allocated`` on CUDA.

``python -m fastalign.bench --help`` (or ``fastalign bench --help``) lists the options; ``--op all`` runs
``ALL_OPS`` (logprobs, ppo, grpo, dpo) in sequence, one table each (``dpo-long-pair`` only by name: ~12 GB for naive).
"""
# The families register their ops in this order: the order of REGISTRY, of ``--op``'s choices and of the tables.
from . import logprobs, ppo, grpo, dpo, kto, cpo, ce, distill, train_long, packed, compiled, trl  # noqa: F401, I001
from .ce import cce_ce, naive_ce
from .cli import ALL_OPS, add_bench_arguments, main, run_from_arguments
from .distill import DISTILL_BETA, liger_distill, make_distill_inputs, naive_distill
from .dpo import fused_dpo, liger_dpo, make_dpo_inputs, naive_dpo
from .grpo import fused_grpo, make_grpo_inputs, naive_grpo
from .harness import (ISSUE_PROBLEM, MiB, QUICK_PROBLEM, QUICK_VERDICT, REGISTRY, Mode, OpBench, Problem, Step, Target,
                      VariantFactory, cpu_model, extra_peak_bytes, memory_in_subprocess, render_markdown,
                      run_benchmark)
from .logprobs import logprobs_forward_backward, make_logprob_inputs, naive_logprobs
from .variants import fused_loss, matmul_floor

__all__ = ["ALL_OPS", "DISTILL_BETA", "ISSUE_PROBLEM", "MiB", "QUICK_PROBLEM", "QUICK_VERDICT", "REGISTRY", "Mode",
           "OpBench", "Problem", "Step", "Target", "VariantFactory", "add_bench_arguments", "cce_ce", "cpu_model",
           "extra_peak_bytes", "fused_dpo", "fused_grpo", "fused_loss", "liger_distill", "liger_dpo",
           "logprobs_forward_backward", "main", "make_distill_inputs", "make_dpo_inputs", "make_grpo_inputs",
           "make_logprob_inputs", "matmul_floor", "memory_in_subprocess", "naive_ce", "naive_distill", "naive_dpo",
           "naive_grpo", "naive_logprobs", "render_markdown", "run_benchmark", "run_from_arguments"]
