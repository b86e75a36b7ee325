"""The ``fastalign`` command. ``fastalign <command> --help`` explains each command."""
from __future__ import annotations

import argparse
import sys

from . import bench
from .gpucheck import add_arguments as gpucheck_arguments
from .trainers import config_file


def run_bench(args: argparse.Namespace) -> int:
    bench.run_from_arguments(args)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """SFT, DPO, a reward model, PPO, GRPO and distillation on a tiny model built in code, and the memory comparison."""
    print("fastalign demo: importing transformers", flush=True)  # seconds on a busy machine: say so first
    from .demo import run_demo as demo  # imports transformers: only for this command

    demo(json_out=args.json_out, out_dir=args.out_dir, quick=args.quick, seed=args.seed)
    return 0


def run_gpu_check(args: argparse.Namespace) -> int:
    from . import gpucheck

    return gpucheck.run_from_arguments(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastalign",
        description="fastalign: fused log-prob, PPO and DPO losses computed from hidden states and the lm_head "
                    "weight, without materializing the [tokens, vocab] logits.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    bench_parser = commands.add_parser(
        "bench", help="time and memory of the fused ops against plain PyTorch, as a Markdown table",
        description="Benchmark a fused op against the naive PyTorch computation (which materializes the logits) and "
                    "against plain matmuls of the same size (the compute floor), in several modes (forward only, "
                    "forward+backward with a trainable or frozen lm_head weight). Prints a Markdown table with the "
                    "targets marked PASS or FAIL. Defaults are the sizes the targets are set for (N=4096 tokens, "
                    "H=512, V=32768, float32); --quick takes tiny sizes, a smoke test (72 s measured on a 2-core "
                    "AMD EPYC).")
    bench.add_bench_arguments(bench_parser)
    bench_parser.set_defaults(handler=run_bench)

    gpu_parser = commands.add_parser(
        "gpu-check", help="settle on a CUDA machine what CPUs cannot (numerics, registers, speed), 8 minutes at most",
        description="On a CUDA machine, in at most 8 minutes on one H100 (a budget per part): every op on the "
                    "triton and torch backends against float64 (fp32/fp16/bf16, values and gradients), the "
                    "deterministic mode, vocab parallelism on two ranks; the registers and spills of the kernels "
                    "that ran against the ahead-of-time table; the speed of log-probs, DPO and GRPO at N=16384, "
                    "H=4096, V=128256 bf16 against naive PyTorch, Liger-Kernel, Cut Cross-Entropy and TRL where "
                    "installed. Writes report.json and report.md to --out-dir and prints the Markdown.")
    gpucheck_arguments(gpu_parser)
    gpu_parser.set_defaults(handler=run_gpu_check)

    demo_parser = commands.add_parser(
        "demo", help="SFT, DPO, a reward model, PPO against it, GRPO and on-policy distillation on a tiny model built "
                     "in code, plus a fused-vs-reference memory comparison",
        description="Builds a tiny Llama-style model and a tokenizer in code (nothing is downloaded), trains it "
                    "with SFT on a synthetic counting task and, from the same init, with DPO, trains a reward model "
                    "on the same preferences, then, from the DPO policy, PPO against that learned reward and GRPO "
                    "against the task's rule (both scored under the rule), distills the GRPO policy into a 1-layer "
                    "student, prints held-out results and writes a plot of the training curves. Last, it "
                    "measures the peak memory of one DPO training step at 2 x 8192 tokens and a 32k vocabulary with "
                    "the fused loss and with the reference (materialized logits) loss, each in a fresh process.")
    demo_parser.add_argument("--json-out", metavar="PATH", help="also write the results as JSON to PATH")
    demo_parser.add_argument("--out-dir", default="fastalign-demo", help="where the plot and training outputs go "
                                                                         "(default: %(default)s)")
    demo_parser.add_argument("--quick", action="store_true",
                             help="shorter reward model, GRPO and distillation and a 2 x 512-token memory comparison")
    demo_parser.add_argument("--seed", type=int, default=0,
                             help="the models' initialization; the trainers' seed is 42 + this (default: %(default)s)")
    demo_parser.set_defaults(handler=run_demo)

    for kind in config_file.KINDS:
        trainer_parser = commands.add_parser(kind, help=config_file.HELP[kind],
                                             description=config_file.DESCRIPTIONS[kind],
                                             formatter_class=argparse.RawDescriptionHelpFormatter)
        config_file.add_arguments(trainer_parser, kind)
        trainer_parser.set_defaults(handler=config_file.run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
