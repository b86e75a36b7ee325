"""The options of ``fastalign bench`` and ``python -m fastalign.bench``, and running what they describe."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .compiled import COMPILE_PAIRS
from .dpo import DPO_PAIRS
from .harness import ISSUE_PROBLEM, QUICK_PROBLEM, REGISTRY, Problem, memory_worker, render_markdown, run_benchmark
from .ppo import PPO_SEQUENCES
from .train_long import TRAIN_LONG_LAYERS

DESCRIPTION = ("Benchmark harness: each fused op against naive PyTorch and plain-matmul floors, in time and extra peak "
               "memory.")


ALL_OPS = ("logprobs", "ppo", "grpo", "dpo")
"""What ``--op all`` runs, in order (not ``dpo-long-pair`` nor ``train-long``: their reference variants need over
10 GB at their sizes; nor ``packed``, a training step; ask for them by name)."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastalign bench`` and ``python -m fastalign.bench``."""
    parser.add_argument("--op", choices=[*REGISTRY, "all"], default="logprobs",
                        help=f"which fused op to benchmark (default logprobs); 'all': {', '.join(ALL_OPS)} in "
                             f"sequence, one table each. logprobs: N rows; ppo: B={PPO_SEQUENCES} sequences "
                             f"of T=N/{PPO_SEQUENCES}, value head; dpo: B={DPO_PAIRS} pairs of T=N/{2 * DPO_PAIRS}, "
                             f"reference forward included; dpo-ranking: K=4 responses to B=2 prompts, T=N/8 (default "
                             f"N=8192). dpo-long-pair (one pair of T=N/2, default N=32768) is not part of 'all': its "
                             f"naive variant needs ~12 GB; ask for it by name. train-long (not in 'all' either): one "
                             f"DPO training step (forward, backward, AdamW) of a {TRAIN_LONG_LAYERS}-layer Llama-style "
                             f"model with hidden size H and vocabulary V on one pair of T=N/2 (default N=32768): "
                             f"reference loss, fused, + gradient checkpointing, + bf16. compile: one DPO step of the "
                             f"tiny Llama (hidden H, vocabulary V, {COMPILE_PAIRS} pairs of T=N/{2 * COMPILE_PAIRS}, "
                             f"default N=2048, H=64, V=4096) compiled with torch.compile vs eager. kto, simpo, cpo, "
                             f"orpo: 4 sequences (2 pairs) of T=N/4, the default one pass (target <= 0.90x naive "
                             f"time at <= 0.25x its memory) and chunk_size=256 (<= 0.10x memory at <= 1.20x time)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"N, tokens in the batch (default {ISSUE_PROBLEM.tokens}; "
                             f"{REGISTRY['dpo-ranking'].issue_problem.tokens} for dpo-ranking, "
                             f"{REGISTRY['dpo-long-pair'].issue_problem.tokens} for dpo-long-pair and train-long)")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"H, hidden size of the model (default {ISSUE_PROBLEM.hidden_size})")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"V, vocabulary size (default {ISSUE_PROBLEM.vocab_size})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of hidden states and weight (default float32, the targets are set for it; "
                             "bfloat16 with --gpu-model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run: cpu or cuda (default: cuda when available)")
    parser.add_argument("--bias", action="store_true", help="give the lm_head a bias (logprobs only)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the best is kept (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement (one process each)")
    parser.add_argument("--memory-jobs", type=int, default=None,
                        help="memory measurements run at the same time (default: one per CPU); 1 for the sizes whose "
                             "reference variant needs many GB (dpo-long-pair, train-long)")
    parser.add_argument("--json-out", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes, a smoke test (N={QUICK_PROBLEM.tokens}, H={QUICK_PROBLEM.hidden_size}, "
                             f"V={QUICK_PROBLEM.vocab_size}); explicit --tokens/--hidden/--vocab still win")
    parser.add_argument("--gpu-model", action="store_true",
                        help="print the GPU cost model of the triton kernels instead of running anything: per launch "
                             "FLOPs, bytes, atomics and the H100 roofline time, ESTIMATES (default sizes N=32768, "
                             "H=4096, V=128256, bfloat16; --tokens/--hidden/--vocab/--dtype override)")


def problem_from_arguments(args: argparse.Namespace, op: str | None = None) -> Problem:
    """The problem the options describe for ``op`` (default ``args.op``): unset sizes from ``--quick`` or the op's
    issue sizes."""
    op = args.op if op is None else op
    base = QUICK_PROBLEM if args.quick else REGISTRY[op].issue_problem if op in REGISTRY else ISSUE_PROBLEM
    return Problem(tokens=args.tokens or base.tokens, hidden_size=args.hidden or base.hidden_size,
                   vocab_size=args.vocab or base.vocab_size, dtype=args.dtype or "float32", device=args.device,
                   bias=args.bias)




def run_from_arguments(args: argparse.Namespace) -> dict:
    """Run the benchmark(s) the options describe, print the Markdown tables, write the JSON if asked; the results
    (with ``--op all``: ``{"ops": {op: results}}``, each op's as for a single op)."""
    if args.gpu_model:
        from .. import gpu_model

        problem = gpu_model.Problem(args.tokens or 32768, args.hidden or 4096, args.vocab or 128256,
                                    getattr(torch, args.dtype or "bfloat16"))
        print(gpu_model.render(problem), flush=True)
        return {}
    ops = ALL_OPS if args.op == "all" else (args.op,)
    everything = {}
    for op in ops:
        log = lambda message, op=op: print(f"[bench {op}] {message}", file=sys.stderr, flush=True)  # noqa: E731
        everything[op] = run_benchmark(op, problem_from_arguments(args, op), rounds=args.rounds,
                                       memory=not args.no_memory, memory_jobs=args.memory_jobs, log=log)
        print(render_markdown(everything[op]), flush=True)
    results = {"ops": everything} if args.op == "all" else everything[args.op]
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(results, out, indent=2)
            out.write("\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastalign.bench", description=DESCRIPTION)
    add_bench_arguments(parser)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        extra = memory_worker(args.op, args.mode, args.variant, problem_from_arguments(args))
        print(json.dumps({"extra_peak_bytes": extra}))
    else:
        run_from_arguments(args)
    return 0
