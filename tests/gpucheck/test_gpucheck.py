"""``fastalign gpu-check``: the dry run (the same code on CPU under the Triton interpreter, tiny sizes) end to end,
the refusal without a GPU, and the numerics part catching a wrong backend."""
import json

import pytest
import torch

from fastalign import cli
from fastalign.gpucheck import numerics, ops, registers
from fastalign.gpucheck.budget import Budget
from fastalign.gpucheck.speed import speed_ops


@pytest.mark.slow
def test_dry_run_writes_a_passing_report_covering_every_op(tmp_path, capsys):
    """The command in this process (conftest set TRITON_INTERPRET=1, as the command does when run from a shell)."""
    assert cli.main(["gpu-check", "--dry-run", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    parts, names = report["parts"], {case.name for case in ops.OPS}
    assert report["dry_run"] and report["passed"]
    for part in ("numerics", "determinism", "vocab_parallel", "speed"):
        assert parts[part]["stopped"] is None and "error" not in parts[part], (part, parts[part])
    rows = parts["numerics"]["rows"]
    assert {r["op"] for r in rows} == names
    measured = [r for r in rows if "skipped" not in r]
    assert {(r["dtype"], r["backend"]) for r in measured} == {("fp32", "triton"), ("fp32", "torch"),
                                                             ("bf16", "torch")}  # the interpreter has no bf16
    assert all(r["passed"] and r["worst_error"] <= r["tolerance"] for r in measured)
    assert all(set(r["errors"]) >= {"loss", "d_hidden", "d_weight", "d_bias"} for r in measured)
    assert all(r["passed"] for r in parts["determinism"]["rows"]) and len(parts["determinism"]["rows"]) == len(names)
    assert [r for r in parts["determinism"]["rows"] if r["op"] == "logprobs"][0]["batch_invariant"] is True
    assert {r["op"] for r in parts["vocab_parallel"]["rows"] if r["passed"]} == names
    assert parts["registers"]["rows"] == [] and parts["registers"]["note"]  # nothing compiled under the interpreter
    assert set(parts["registers"]["kernels"]) <= {k.split("/")[0] for k in parts["registers"]["aot"]}
    speed = parts["speed"]["rows"]
    fastalign = [r for r in speed if r["variant"].startswith("fastalign")]
    assert len(fastalign) == 3 * len(speed_ops()) and all(r["seconds"] > 0 and "error" not in r for r in fastalign)
    modelled = {op for op, spec in speed_ops().items() if spec.estimate is not None}
    assert modelled and all(r["model_seconds"] > 0 for r in fastalign
                            if "triton" in r["variant"] and r["op"] in modelled)
    assert all("model_seconds" not in r for r in fastalign if r["op"] not in modelled)
    assert all(r["seconds"] > 0 for r in speed if r["variant"] == "naive PyTorch")
    assert len(parts["speed"]["auto"]) == len(speed_ops())
    markdown = (tmp_path / "report.md").read_text()
    assert markdown in printed and "## 3. Speed" in markdown and "auto would change" in markdown


def test_without_cuda_the_command_refuses_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["gpu-check", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--dry-run" in err
    assert not any(tmp_path.iterdir())


def test_numerics_fail_a_backend_that_is_off_by_a_little(monkeypatch):
    def off(hidden, weight, bias, targets, x, backend, **options):
        logprobs = torch.log_softmax((hidden @ weight.T + bias).float(), -1).gather(-1, targets.clamp(min=0)[..., None])
        logprobs = logprobs.squeeze(-1) * (targets != -100)
        scale = 1.001 if backend == "triton" else 1.0  # a 0.1% error on one backend only
        return {"loss": (logprobs * scale).sum(), "logprobs": logprobs * scale}

    monkeypatch.setattr(numerics, "OPS", (ops.OpCase("off", 2, lambda gen, t, v: {}, off, prompt=0),))
    rows = numerics.check_numerics(torch.device("cpu"), [(6, 8, 33)], [torch.float32], Budget(60))["rows"]
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["torch"]["passed"] and by_backend["torch"]["worst_error"] < 1e-6
    assert not by_backend["triton"]["passed"] and 5e-4 < by_backend["triton"]["worst_error"] < 2e-3
    assert by_backend["triton"]["triton_vs_torch"] > 5e-4


def test_aot_table_ranges_cover_the_kernels():
    ranges = registers.aot_registers()
    for kernel in registers.kernel_functions():
        for arch in (80, 90):
            low, high = registers.expected_registers(ranges, kernel, "bf16", arch)
            assert 0 < low <= high <= 255
    assert ranges[("_lse_forward_kernel", "bf16", 90)] != ranges[("_lse_forward_kernel", "fp32", 90)]
    assert registers.expected_registers(ranges, "_no_such_kernel", "bf16", 90) is None
