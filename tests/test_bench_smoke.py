"""Smoke tests of the benchmark harness and the ``fastalign`` command at tiny sizes (seconds, CPU)."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastalign import bench
from fastalign.bench import dpo, packed, ppo
from fastalign.cli import build_parser, main

TINY = bench.Problem(tokens=32, hidden_size=16, vocab_size=64)
linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")


def recording(spec: bench.OpBench, outputs: dict) -> bench.OpBench:
    """``spec`` with every variant's step recording its last result in ``outputs[mode][variant]``."""
    def wrap(mode: str, name: str, factory):
        def wrapped_factory(inputs):
            step = factory(inputs)

            def wrapped_step():
                outputs.setdefault(mode, {})[name] = step()
            return wrapped_step
        return wrapped_factory

    return replace(spec, modes={mode: replace(m, variants={name: wrap(mode, name, f) for name, f in m.variants.items()})
                                for mode, m in spec.modes.items()})


@pytest.mark.parametrize("op", sorted(bench.REGISTRY))
def test_every_op_runs_through_the_harness_renders_and_fused_matches_naive(op, monkeypatch):
    """Each ``fastalign bench --op`` once at tiny sizes through the harness (every variant, one round, no memory):
    its table has every variant and target row, and the candidate's result (log-probs, gradients, loss) equals the
    baseline's."""
    outputs: dict = {}
    spec = bench.REGISTRY[op]
    if op == "compile":  # an inductor build takes minutes on a busy CPU: its step is test_compile.py's; here the table
        eager = spec.modes["dpo-step"].variants["eager"]
        spec = replace(spec, modes={"dpo-step": replace(spec.modes["dpo-step"], variants={"compiled": eager,
                                                                                         "eager": eager})})
    monkeypatch.setitem(bench.REGISTRY, op, recording(spec, outputs))
    results = bench.run_benchmark(op, TINY, rounds=1, memory=False)
    table = bench.render_markdown(results)
    modes = bench.REGISTRY[op].modes
    assert table.startswith(f"### fastalign bench: {op}\n")
    for name, mode in modes.items():
        assert mode.title in table
        for variant in mode.variants:
            assert f"| {variant} |" in table
        torch.testing.assert_close(outputs[name][mode.candidate], outputs[name][mode.baseline], rtol=1e-4, atol=1e-5)
    target_rows = [line for line in table.splitlines() if line.endswith("| not measured |")]
    assert len(target_rows) == sum(1 for mode in modes.values() for t in mode.targets if t.metric == "memory")
    # not the issue's sizes: no verdict on the timed targets
    assert sum(line.endswith(f"| {bench.QUICK_VERDICT} |") for line in table.splitlines()) == sum(
        1 for mode in modes.values() for t in mode.targets if t.metric == "time")
    assert "PASS" not in table and "FAIL" not in table and "indicative only" in table
    issue_sized = bench.render_markdown({**results, "at_issue_sizes": True})  # the same numbers, as if at size
    assert sum(line.endswith(("| PASS |", "| **FAIL** |")) for line in issue_sized.splitlines()) == sum(
        1 for mode in modes.values() for t in mode.targets if t.metric == "time")
    assert bench.QUICK_VERDICT not in issue_sized


def test_every_op_is_a_choice_of_the_command():
    parser = build_parser()
    bench_parser = parser._subparsers._group_actions[0].choices["bench"]
    op = next(a for a in bench_parser._actions if a.dest == "op")
    assert list(op.choices) == [*bench.REGISTRY, "all"]
    assert set(bench.REGISTRY) == {"logprobs", "ppo", "grpo", "rloo", "dpo", "dpo-ranking", "dpo-long-pair", "kto",
                                   "simpo", "cpo", "orpo", "ce", "distill", "train-long", "packed", "compile", "trl"}


def test_cpu_model_is_lscpus_model_name():
    model = bench.cpu_model()
    assert model and model != "unknown CPU"
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    assert "Model name:" not in lscpu or model in lscpu


def test_loss_inputs_follow_the_issue_layout():
    x = ppo.make_ppo_inputs(TINY)
    assert x.hidden.shape == (ppo.PPO_SEQUENCES, TINY.tokens // ppo.PPO_SEQUENCES, TINY.hidden_size)
    x = dpo.make_dpo_inputs(TINY)
    assert x.hidden.shape == x.ref_hidden.shape == (2 * dpo.DPO_PAIRS, TINY.tokens // (2 * dpo.DPO_PAIRS),
                                                    TINY.hidden_size)
    assert bench.REGISTRY["dpo-long-pair"].make_inputs(TINY).hidden.shape[0] == 2
    assert bench.REGISTRY["dpo-long-pair"].issue_problem.tokens == 32768
    ranking = bench.REGISTRY["dpo-ranking"]
    assert ranking.make_inputs(TINY).hidden.shape[0] == 8 and ranking.issue_problem.tokens == 8192  # T=1024


def test_memory_is_measured_for_every_memory_target_reference():
    mode = bench.Mode("m", {"fused": None, "naive": None, "other": None, "floor": None}, floor="floor",
                      targets=(bench.Target("memory", "other", 1.0), bench.Target("time", "floor", 1.0)))
    assert mode.memory_variants == ("fused", "naive", "other")


@pytest.mark.parametrize("jobs", [0, 1.5, True])
def test_memory_jobs_must_be_a_positive_int(jobs):
    with pytest.raises(ValueError, match=rf"memory_jobs: expected None or an int >= 1, got {jobs!r}"):
        bench.run_benchmark("logprobs", TINY, memory_jobs=jobs)


@linux_only
def test_peak_measure_sees_an_allocation():
    extra = bench.extra_peak_bytes(lambda: torch.ones(16 << 20), torch.device("cpu"))  # 64 MiB, touched
    assert 60 * bench.MiB <= extra < 200 * bench.MiB


def test_cli_bench_all_runs_logprobs_ppo_dpo(tmp_path, capsys):
    out = tmp_path / "bench.json"
    sizes = ["--tokens", str(TINY.tokens), "--hidden", str(TINY.hidden_size), "--vocab", str(TINY.vocab_size)]
    assert main(["bench", "--op", "all", *sizes, "--rounds", "1", "--no-memory", "--json-out", str(out)]) == 0
    table = capsys.readouterr().out
    for op in bench.ALL_OPS:
        assert f"### fastalign bench: {op}\n\nCPU: {bench.cpu_model()}; torch {torch.__version__}, " in table
    assert "dpo-long-pair" not in table
    assert list(json.loads(out.read_text())["ops"]) == list(bench.ALL_OPS) == ["logprobs", "ppo", "grpo", "dpo"]


@linux_only
def test_cli_bench_quick_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--op", "ppo", "--quick", "--rounds", "1", "--memory-jobs", "1", "--json-out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| target (candidate: fused) |" in table and "not measured" not in table
    assert "PASS" not in table and "FAIL" not in table and f"| {bench.QUICK_VERDICT} |" in table
    header = table.splitlines()[2]  # under the title: CPU model, torch version and threads
    assert header == f"CPU: {bench.cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads."
    results = json.loads(out.read_text())
    assert results["op"] == "ppo" and results["problem"]["tokens"] == bench.QUICK_PROBLEM.tokens
    assert 0.0 <= results["machine"]["others_cpu_share_while_timing"] <= 1.0
    for mode in results["modes"].values():
        for name, variant in mode["variants"].items():
            assert variant["seconds"] > 0 and len(variant["round_seconds"]) == 1
            if name in (mode["candidate"], mode["baseline"]):
                assert variant["extra_peak_bytes"] >= 0
        assert all(t["passed"] in (True, False) for t in mode["targets"])


def test_command_line_help_of_every_command(capsys):
    done = subprocess.run([sys.executable, "-m", "fastalign.cli", "--help"], capture_output=True, text=True,
                          timeout=120)  # the module runs as a program; the verbs' help in this process
    assert done.returncode == 0 and done.stdout.startswith("usage: fastalign"), done.stderr
    for command in (["bench"], ["demo"], ["dpo"], ["ppo"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: fastalign"), command
    done = subprocess.run([sys.executable, "-m", "fastalign.cli", "dpo", "--config", "/nonexistent.yaml"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "/nonexistent.yaml" in done.stderr


@pytest.mark.usefixtures("one_thread")
def test_packed_bench_draws_uneven_pairs_and_both_steps_train_the_same():
    """16 pairs, lengths log-uniform in [N/64, N] from the seed; the packed and the padded step give the same loss
    (each on its own copy of the model) and both update the weights."""
    problem = bench.Problem(tokens=256, hidden_size=16, vocab_size=64)
    lengths = packed.packed_lengths(problem)
    assert len(lengths) == 2 * packed.PACKED_PAIRS and min(lengths) >= 4 and max(lengths) <= 256
    assert max(lengths) / min(lengths) > 8 and lengths == packed.packed_lengths(problem)
    x = packed.make_packed_inputs(problem)
    assert x.batch["input_ids"].shape == (2 * packed.PACKED_PAIRS, max(lengths))
    assert x.batch["attention_mask"].sum(1).tolist() == lengths
    padded_step, packed_step = (packed.packed_step(padding_free)(x) for padding_free in (False, True))
    first = [padded_step(), packed_step()]
    torch.testing.assert_close(first[1], first[0], rtol=1e-5, atol=1e-6)
    assert padded_step() != first[0]  # the step trained



@pytest.mark.slow
@linux_only
def test_packed_bench_memory_worker_runs_a_training_step():
    extra = bench.memory_in_subprocess("packed", "step", "packed", bench.Problem(tokens=64, hidden_size=16,
                                                                                  vocab_size=64))
    assert isinstance(extra, int) and extra > 0
