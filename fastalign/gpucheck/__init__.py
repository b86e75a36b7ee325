"""``fastalign gpu-check``: what only a GPU can settle, in one command with a time budget per part (8 minutes in all
on one H100), and a report (``report.json``, ``report.md``) in one folder.

1. numerics (``numerics``): every op of the table ``ops.OPS`` on triton and on the torch backend against a float64
   reference, fp32 / fp16 / bf16, small shapes incl. odd H and V, values and gradients; the deterministic mode
   repeated and batch-invariant; vocab parallelism on two ranks;
2. registers (``registers``): ``n_regs`` / ``n_spills`` of the compiled kernels that ran against the AOT table;
3. speed (``speed``): log-probs, DPO, GRPO at N=16384, H=4096, V=128256, bf16, against the other libraries, with
   TFLOPS and the cost model's estimate; which backend ``auto`` should pick;
4. the report (``report``).

``--dry-run`` runs the same code on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set in a child process
before the kernels are imported) at tiny sizes: the suite runs it so that the command cannot rot.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

GPU_BUDGET_SECONDS = 480


@dataclass(frozen=True)
class Settings:
    """Sizes and per-part budgets (seconds) of a run."""

    shapes: list[tuple[int, int, int]]  # (N, H, V) of the numerics; every op's batch is cut from N tokens
    dtypes: list[torch.dtype]
    determinism_dtype: torch.dtype
    speed: tuple[int, int, int, str]  # N, H, V, dtype
    rounds: int
    budgets: dict[str, float] = field(default_factory=dict)


GPU = Settings(shapes=[(192, 128, 2048), (111, 100, 1001)], dtypes=[torch.float32, torch.float16, torch.bfloat16],
               determinism_dtype=torch.bfloat16, speed=(16384, 4096, 128256, "bfloat16"), rounds=5,
               budgets={"numerics": 150, "determinism": 30, "vocab_parallel": 60, "speed": 210})
DRY_RUN = Settings(shapes=[(9, 20, 67)], dtypes=[torch.float32, torch.bfloat16],
                   determinism_dtype=torch.float32, speed=(32, 16, 130, "float32"), rounds=1,
                   budgets={"numerics": 300, "determinism": 300, "vocab_parallel": 300, "speed": 300})
"""A dry run's budgets never stop a part on a loaded CPU (the suite checks that every part ran whole); it takes
about a minute with the machine to itself."""


def _machine(device: torch.device) -> dict:
    facts = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = "not installed"
    if device.type == "cuda":
        facts["gpu"] = f"{torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}"
        facts["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    else:
        from ..bench import cpu_model

        facts["cpu"] = f"{cpu_model()} (Triton interpreter: no GPU figure here)"
    return facts


def run_check(settings: Settings, device: torch.device) -> dict:
    """All parts in order; a part that raises is reported as failed and the others still run."""
    from .. import bench
    from . import numerics, registers, speed
    from .budget import Budget

    n, h, v, dtype = settings.speed
    speed_problem = bench.Problem(n, h, v, dtype=dtype, device=str(device))
    parts = {
        "numerics": lambda b: numerics.check_numerics(device, settings.shapes, settings.dtypes, b),
        "determinism": lambda b: numerics.check_determinism(device, settings.shapes[-1],
                                                            settings.determinism_dtype, b),
        "vocab_parallel": lambda b: numerics.check_vocab_parallel(settings.shapes[-1], settings.determinism_dtype, b),
        "registers": lambda b: registers.check_registers(),
        "speed": lambda b: speed.check_speed(speed_problem, settings.rounds, b),
    }
    start, results = time.monotonic(), {}
    for name, part in parts.items():
        part_start = time.monotonic()
        try:
            results[name] = part(Budget(settings.budgets.get(name, 30)))
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others' report
            results[name] = {"rows": [], "stopped": None, "error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = time.monotonic() - part_start
        print(f"gpu-check: {name} done in {results[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    passed = all("error" not in part and all(r.get("passed", True) for r in part["rows"] if "skipped" not in r)
                 for name, part in results.items() if name != "speed")
    return {"dry_run": device.type != "cuda", "machine": _machine(device), "passed": passed,
            "seconds": time.monotonic() - start, "speed_problem": f"N={n}, H={h}, V={v}, {dtype}, {device}",
            "parts": results}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same check on CPU under the Triton interpreter at tiny sizes (about a minute); "
                             "exercises the command, settles nothing about a GPU")
    parser.add_argument("--out-dir", default="fastalign-gpu-check",
                        help="folder of report.json and report.md (default: %(default)s)")


def run_from_arguments(args: argparse.Namespace) -> int:
    """0 when every check passed (speed is measured, never judged), 1 when one failed, 2 without a GPU."""
    if not args.dry_run and not torch.cuda.is_available():
        print("fastalign gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or use --dry-run to exercise it on CPU", file=sys.stderr)
        return 2
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton and the kernels are imported (the command imports neither):
        # set it here, or, when something imported triton already, run the check in a child process.
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            command = [sys.executable, "-m", "fastalign.gpucheck", "--dry-run", "--out-dir", args.out_dir]
            return subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}).returncode
    from . import report

    settings, device = (DRY_RUN, torch.device("cpu")) if args.dry_run else (GPU, torch.device("cuda"))
    result = run_check(settings, device)
    _, md_path = report.write(result, Path(args.out_dir))
    print(md_path.read_text())
    print(f"gpu-check: report in {Path(args.out_dir).resolve()}", file=sys.stderr)
    return 0 if result["passed"] else 1
