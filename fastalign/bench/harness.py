"""The benchmark harness: what is compared (``Problem``, ``Target``, ``Mode``, ``OpBench``, ``REGISTRY``), how it is
measured (time: the variants of a mode interleaved, best of the rounds; memory: peak in a fresh process per variant;
the CPU model and the machine's load) and the Markdown table of the results."""
from __future__ import annotations

import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch


Step = Callable[[], object]
"""One measured call of a variant; its result is dropped."""
VariantFactory = Callable[[Any], Step]
"""``factory(inputs) -> step``: untimed set-up of a variant on an op's inputs, returning the step to measure."""

MiB = 1 << 20
BUSY_SHARE = 0.10
"""Above this share of the CPUs used by other processes while timing, the table warns that its timings are unreliable."""


@dataclass(frozen=True)
class Problem:
    """One benchmark size and placement: ``hidden [tokens, hidden_size]``, ``weight [vocab_size, hidden_size]``."""

    tokens: int
    hidden_size: int
    vocab_size: int
    dtype: str = "float32"
    device: str = "cpu"
    bias: bool = False
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def backend(self) -> str:
        """The fused ops' backend: the chunked torch backend on CPU (never the Triton interpreter), auto elsewhere."""
        return "torch" if self.device == "cpu" else "auto"

    def describe(self) -> str:
        return (f"N={self.tokens} tokens, H={self.hidden_size}, V={self.vocab_size}, {self.dtype}"
                f"{', with bias' if self.bias else ''}, {self.device}, {self.backend} backend")


ISSUE_PROBLEM = Problem(tokens=4096, hidden_size=512, vocab_size=32768)
"""The sizes at which the targets are set (fp32, N=4096, H=512, V=32768)."""
QUICK_PROBLEM = Problem(tokens=256, hidden_size=64, vocab_size=2048)
"""Tiny sizes: a smoke test of the whole table (timings there are dominated by overheads)."""


@dataclass(frozen=True)
class Target:
    """The candidate's ``metric`` ("time" or "memory") must be at most ``limit`` times that of ``reference``."""

    metric: str
    reference: str
    limit: float


@dataclass(frozen=True)
class Mode:
    """One way of calling an op: its variants in table order, and how the candidate is judged."""

    title: str
    variants: dict[str, VariantFactory]
    floor: str | None  # the variant that is the compute floor (plain matmuls), if any
    targets: tuple[Target, ...]
    candidate: str = "fused"
    baseline: str = "naive"
    also_memory: tuple[str, ...] = ()  # more variants whose memory is measured

    @property
    def memory_variants(self) -> tuple[str, ...]:
        """Variants whose extra peak memory is measured: the candidate, the baseline, every other reference of a
        memory target and ``also_memory`` (the floors' is not of interest)."""
        references = [t.reference for t in self.targets if t.metric == "memory"]
        return tuple(dict.fromkeys([self.candidate, self.baseline, *references, *self.also_memory]))


@dataclass(frozen=True)
class OpBench:
    """An op's inputs builder (``Problem -> inputs``, shared by all its variants), its modes, and the sizes at which
    its targets are set (the default problem of ``fastalign bench --op <op>``)."""

    make_inputs: Callable[[Problem], Any]
    modes: dict[str, Mode]
    issue_problem: Problem = ISSUE_PROBLEM


REGISTRY: dict[str, OpBench] = {}
"""Op name -> its benchmark; each family module of ``fastalign.bench`` registers its ops here."""


# --- measuring -------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(op: str, mode: str, problem: Problem, rounds: int, *, inputs=None) -> dict[str, list[float]]:
    """Seconds per call of every variant of ``mode``, ``rounds`` each, interleaved (round-robin) after a warm-up."""
    spec = REGISTRY[op]
    inputs = spec.make_inputs(problem) if inputs is None else inputs
    device = torch.device(problem.device)
    steps = {name: factory(inputs) for name, factory in spec.modes[mode].variants.items()}
    for step in steps.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            gc.collect()
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def extra_peak_bytes(step: Step, device: torch.device) -> int:
    """Peak memory during ``step()`` minus the memory in use just before it, in bytes.

    CUDA: ``max_memory_allocated`` after a reset. Linux CPU: ``VmHWM`` (peak RSS) after resetting it to the
    current RSS by writing "5" to ``/proc/self/clear_refs``. Meaningful in a fresh process whose allocator returns
    freed blocks to the system (``memory_in_subprocess`` sees to it).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("measuring CPU memory needs Linux (/proc/self/clear_refs); pass --no-memory")
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    step()
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def memory_worker(op: str, mode: str, variant: str, problem: Problem) -> int:
    """Extra peak bytes of one variant in this process: a tiny warm-up call (libraries, threads), then the real one."""
    factory = REGISTRY[op].modes[mode].variants[variant]
    tiny = replace(problem, tokens=4, hidden_size=8, vocab_size=16)
    factory(REGISTRY[op].make_inputs(tiny))()
    step = factory(REGISTRY[op].make_inputs(problem))
    return extra_peak_bytes(step, torch.device(problem.device))


def memory_in_subprocess(op: str, mode: str, variant: str, problem: Problem) -> int:
    """``memory_worker`` in a fresh ``python -m fastalign.bench --memory-worker`` process; extra peak bytes.

    glibc's mmap threshold is pinned at 64 KiB there, so that freed tensors go back to the system at once and
    RSS follows the live tensors (with its default dynamic threshold, freed blocks may stay resident). The worker
    starts in the directory holding this very ``fastalign`` package, so that it imports the same code.
    """
    command = [sys.executable, "-m", "fastalign.bench", "--memory-worker", "--op", op, "--mode", mode,
               "--variant", variant, *problem_arguments(problem)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    package_parent = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=package_parent)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed ({' '.join(command)}):\n{done.stderr}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["extra_peak_bytes"])


def problem_arguments(problem: Problem) -> list[str]:
    """The command-line options that rebuild ``problem`` (for the memory worker)."""
    return ["--tokens", str(problem.tokens), "--hidden", str(problem.hidden_size), "--vocab", str(problem.vocab_size),
            "--dtype", problem.dtype, "--device", problem.device, *(["--bias"] if problem.bias else [])]


class OthersCpuShare:
    """Context manager: the share of all CPUs that other processes kept busy while it was open (``share``, 0..1).

    From the machine's busy time in ``/proc/stat`` minus this process's own CPU time; None where there is no
    ``/proc/stat``. On a shared machine this tells whether the timings measured the code or the neighbours.
    """

    share: float | None = None

    @staticmethod
    def _machine_busy_seconds() -> float | None:
        if not os.path.exists("/proc/stat"):
            return None
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_cpu_seconds() -> float:
        own = os.times()
        return own.user + own.system

    def __enter__(self) -> OthersCpuShare:
        self._start = (time.perf_counter(), self._machine_busy_seconds(), self._own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = time.perf_counter(), self._machine_busy_seconds(), self._own_cpu_seconds()
        wall0, busy0, own0 = self._start
        if busy is not None and wall > wall0:
            others = (busy - busy0) - (own - own0)
            self.share = min(1.0, max(0.0, others / ((wall - wall0) * os.cpu_count())))


def cpu_model() -> str:
    """The CPU model: ``lscpu``'s "Model name", else ``platform.processor()``, else "unknown CPU"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    model = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return model.group(1).strip() if model else platform.processor() or "unknown CPU"


def machine_facts(device: str) -> dict:
    """CPU model and count, load average, torch build and threads, device name: the context a timing needs."""
    facts = {"cpu": cpu_model(), "nproc": os.cpu_count(), "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
             "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        facts["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def summarize_mode(mode: Mode, seconds: dict[str, list[float]], memory: dict[str, int]) -> dict:
    """The JSON record of one mode: per-variant best time and memory, the candidate's ratios and its targets."""
    variants = {name: {"seconds": min(seconds[name]), "round_seconds": seconds[name],
                       "extra_peak_bytes": memory.get(name)} for name in mode.variants}

    def ratio(metric: str, reference: str) -> float | None:
        key = "seconds" if metric == "time" else "extra_peak_bytes"
        return _ratio(variants[mode.candidate][key], variants[reference][key])

    targets = []
    for target in mode.targets:
        value = ratio(target.metric, target.reference)
        targets.append({**asdict(target), "ratio": value, "passed": None if value is None else value <= target.limit})
    return {
        "title": mode.title, "candidate": mode.candidate, "baseline": mode.baseline, "floor": mode.floor,
        "variants": variants,
        "ratios": {"time_vs_baseline": ratio("time", mode.baseline),
                   "time_vs_floor": ratio("time", mode.floor) if mode.floor else None,
                   "memory_vs_baseline": ratio("memory", mode.baseline)},
        "targets": targets,
    }


def run_benchmark(op: str = "logprobs", problem: Problem = ISSUE_PROBLEM, *, rounds: int = 3, memory: bool = True,
                  memory_jobs: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Time every mode of ``op`` (and measure memory in subprocesses, ``memory_jobs`` at a time, default one per
    CPU; 1 keeps the peak of the whole run at the largest variant's); the results as a JSON-ready dict."""
    if op not in REGISTRY:
        raise ValueError(f"op: expected one of {sorted(REGISTRY)}, got {op!r}")
    if rounds < 1:
        raise ValueError(f"rounds: expected a positive int, got {rounds!r}")
    memory_jobs = os.cpu_count() if memory_jobs is None else memory_jobs
    if isinstance(memory_jobs, bool) or not isinstance(memory_jobs, int) or memory_jobs < 1:
        raise ValueError(f"memory_jobs: expected None or an int >= 1, got {memory_jobs!r}")
    log = log or (lambda message: None)
    spec = REGISTRY[op]
    memory_bytes: dict[str, dict[str, int]] = {name: {} for name in spec.modes}
    if memory:
        jobs = [(mode_name, variant) for mode_name, mode in spec.modes.items() for variant in mode.memory_variants]
        log(f"memory: {len(jobs)} variants, each in a fresh process, {memory_jobs} at a time")
        with ThreadPoolExecutor(max_workers=memory_jobs) as pool:
            measured = pool.map(lambda job: memory_in_subprocess(op, *job, problem), jobs)
            for done, ((mode_name, variant), extra) in enumerate(zip(jobs, measured), 1):
                memory_bytes[mode_name][variant] = extra
                log(f"memory: {done}/{len(jobs)} {mode_name} {variant}: {extra / MiB:.0f} MiB")
    inputs = spec.make_inputs(problem)
    modes = {}
    with OthersCpuShare() as contention:
        for mode_name, mode in spec.modes.items():
            log(f"time: {mode.title}, {len(mode.variants)} variants x {rounds} rounds (+1 warm-up)")
            seconds = time_mode(op, mode_name, problem, rounds, inputs=inputs)
            modes[mode_name] = summarize_mode(mode, seconds, memory_bytes[mode_name])
    machine = {**machine_facts(problem.device), "others_cpu_share_while_timing": contention.share}
    return {"op": op, "problem": asdict(problem), "at_issue_sizes": _same_sizes(problem, spec.issue_problem),
            "rounds": rounds, "memory_measured": memory, "machine": machine, "modes": modes}


def _same_sizes(problem: Problem, other: Problem) -> bool:
    keys = ("tokens", "hidden_size", "vocab_size", "dtype")
    return all(getattr(problem, k) == getattr(other, k) for k in keys)


# --- rendering -------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _setting_lines(results: dict) -> list[str]:
    problem, machine = Problem(**results["problem"]), results["machine"]
    load = " ".join(f"{x:.2f}" for x in machine.get("load_average", [])) or "?"
    others = machine["others_cpu_share_while_timing"]
    lines = [
        f"CPU: {machine['cpu']}; torch {machine['torch']}, {machine['torch_threads']} threads.",
        "",
        f"{problem.describe()}. Time: best of {results['rounds']} rounds, the variants of a mode interleaved in one "
        f"process; spread: slowest round over the best. Extra peak memory: peak during the call minus the inputs "
        f"(gradients included), one fresh process per variant.",
        f"Machine: {machine['cpu']}{', ' + machine['gpu'] if 'gpu' in machine else ''}; "
        f"{machine['nproc']} CPUs; load average (1, 5, 15 min) {load} after the run; other processes used "
        f"{'?' if others is None else format(others, '.0%')} of the CPUs while timing.",
    ]
    if others is not None and others > BUSY_SHARE:
        lines.append(f"**Busy machine**: other processes used {others:.0%} of the CPUs while timing; the timings and "
                     f"their ratios are unreliable.")
    return lines


def _variant_rows(mode: dict) -> list[str]:
    variants = mode["variants"]
    baseline, floor = variants[mode["baseline"]], variants.get(mode["floor"], {}).get("seconds")
    rows = []
    for i, (name, v) in enumerate(variants.items()):
        memory = v["extra_peak_bytes"]
        rows.append(f"| {mode['title'] if i == 0 else ''} | {name} | {v['seconds']:.3f} "
                    f"| {max(v['round_seconds']) / v['seconds'] - 1:.0%} "
                    f"| {_fmt(_ratio(v['seconds'], baseline['seconds']), '.2f')} "
                    f"| {_fmt(_ratio(v['seconds'], floor), '.2f')} "
                    f"| {_fmt(None if memory is None else memory / MiB, '.1f')} "
                    f"| {_fmt(_ratio(memory, baseline['extra_peak_bytes']), '.3f')} |")
    return rows


QUICK_VERDICT = "n/a at quick sizes"  # a target's verdict at sizes other than its own: a smoke test, not a mark


def _target_rows(mode: dict, verdicts: bool) -> list[str]:
    """One row per target (PASS/FAIL only with ``verdicts``: at the targets' sizes; else "n/a at quick sizes")."""
    rows = []
    for t in mode["targets"]:
        what = "extra peak memory" if t["metric"] == "memory" else "time"
        result = {True: "PASS", False: "**FAIL**", None: "not measured"}[t["passed"]]
        if not verdicts and t["passed"] is not None:
            result = QUICK_VERDICT
        rows.append(f"| {mode['title']}: {what} / {t['reference']} | {_fmt(t['ratio'], '.3f')} "
                    f"| <= {t['limit']:.2f} | {result} |")
    if any(t["metric"] == "time" and t["reference"] == mode["baseline"] for t in mode["targets"]):
        return rows  # time / baseline is already a target row
    versus_baseline = mode["ratios"]["time_vs_baseline"]
    rows.append(f"| {mode['title']}: time / {mode['baseline']} | {versus_baseline:.3f} | no target "
                f"| {'slower' if versus_baseline > 1 else 'faster'} than {mode['baseline']} |")
    return rows


def render_markdown(results: dict) -> str:
    """The results as Markdown: CPU and torch, the setting and machine, a table of variants, a table of targets
    (PASS/FAIL at the targets' sizes)."""
    modes = results["modes"].values()
    lines = [f"### fastalign bench: {results['op']}", "", *_setting_lines(results), "",
             "| mode | variant | time (s) | spread | time / naive | time / floor | extra peak memory (MiB) "
             "| memory / naive |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             *(row for mode in modes for row in _variant_rows(mode)), "",
             "| target (candidate: fused) | measured | limit | result |",
             "| --- | ---: | ---: | --- |",
             *(row for mode in modes for row in _target_rows(mode, results["at_issue_sizes"]))]
    if not results["at_issue_sizes"]:
        issue = REGISTRY[results["op"]].issue_problem
        lines += ["", f"The targets are set at N={issue.tokens}, H={issue.hidden_size}, V={issue.vocab_size}, "
                      f"{issue.dtype}; at these sizes the ratios are indicative only and get no verdict."]
    return "\n".join(lines) + "\n"
