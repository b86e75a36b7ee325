"""Smoke tests of the benchmark harness and the ``fastalign`` command at tiny sizes (seconds, CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastalign import bench
from fastalign.cli import main

TINY = bench.Problem(tokens=32, hidden_size=16, vocab_size=64)
linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")


def test_every_variant_runs_and_fused_matches_naive():
    inputs = bench.make_logprob_inputs(TINY)
    for mode in bench.REGISTRY["logprobs"].modes.values():
        outputs = {name: factory(inputs)() for name, factory in mode.variants.items()}
        # log-probs [N] (forward only) or the gradients (fwd+bwd)
        torch.testing.assert_close(outputs[mode.candidate], outputs[mode.baseline], rtol=1e-4, atol=1e-5)


def test_table_has_every_variant_and_target_row():
    results = bench.run_benchmark("logprobs", TINY, rounds=1, memory=False)
    table = bench.render_markdown(results)
    modes = bench.REGISTRY["logprobs"].modes.values()
    for mode in modes:
        assert mode.title in table
        for name in mode.variants:
            assert f"| {name} |" in table
    target_rows = [line for line in table.splitlines() if line.endswith("| not measured |")]
    assert len(target_rows) == sum(1 for mode in modes for t in mode.targets if t.metric == "memory")
    assert sum(line.endswith(("| PASS |", "| **FAIL** |")) for line in table.splitlines()) == sum(
        1 for mode in modes for t in mode.targets if t.metric == "time")
    assert "indicative only" in table  # not the sizes


@linux_only
def test_peak_measure_sees_an_allocation():
    extra = bench.extra_peak_bytes(lambda: torch.ones(16 << 20), torch.device("cpu"))  # 64 MiB, touched
    assert 60 * bench.MiB <= extra < 200 * bench.MiB


@linux_only
def test_memory_worker_subprocess_returns_bytes():
    extra = bench.memory_in_subprocess("logprobs", "trainable", "naive", TINY)
    assert isinstance(extra, int) and extra >= 0


@linux_only
def test_cli_bench_quick_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--rounds", "1", "--json-out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| target (candidate: fused) |" in table and "not measured" not in table
    results = json.loads(out.read_text())
    assert results["op"] == "logprobs" and results["problem"]["tokens"] == bench.QUICK_PROBLEM.tokens
    assert 0.0 <= results["machine"]["others_cpu_share_while_timing"] <= 1.0
    for mode in results["modes"].values():
        for name, variant in mode["variants"].items():
            assert variant["seconds"] > 0 and len(variant["round_seconds"]) == 1
            if name in (mode["candidate"], mode["baseline"]):
                assert variant["extra_peak_bytes"] >= 0
        assert all(t["passed"] in (True, False) for t in mode["targets"])


def test_command_line_help_of_every_command():
    for command in ([], ["bench"], ["demo"], ["dpo"], ["ppo"]):
        done = subprocess.run([sys.executable, "-m", "fastalign.cli", *command, "--help"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: fastalign"), command
    done = subprocess.run([sys.executable, "-m", "fastalign.cli", "dpo", "--config", "/nonexistent.yaml"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "/nonexistent.yaml" in done.stderr
