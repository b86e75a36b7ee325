"""Part 4 of the GPU check: the report, as JSON (``report.json``) and Markdown (``report.md``) in one folder."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _ms(row: dict, key: str) -> str:
    return _fmt(row[key] * 1e3 if row.get(key) is not None else None, ".4g")


def _status(row: dict) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"**FAIL** ({row['error']})"
    return "pass" if row.get("passed") else "**FAIL**"


def _stopped(part: dict) -> list[str]:
    notes = [f"*{part['stopped']}*"] if part.get("stopped") else []
    return notes + ([f"*part failed: {part['error']}*"] if part.get("error") else [])


def render(report: dict) -> str:
    parts, lines = report["parts"], [f"# fastalign gpu-check{' (dry run)' if report['dry_run'] else ''}", ""]
    lines += [f"- {key}: {value}" for key, value in report["machine"].items()]
    lines += [f"- verdict: **{'PASS' if report['passed'] else 'FAIL'}** ({report['seconds']:.0f} s)", ""]

    numerics = parts["numerics"]
    lines += ["## 1. Numerics against float64", "", *_stopped(numerics),
              "| op | shape (N x H x V) | dtype | backend | worst value | its error | tolerance | triton vs torch "
              "| status |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | {r.get('worst', '-')} | "
              f"{_fmt(r.get('worst_error'), '.2e')} | {r['tolerance']:.0e} | {_fmt(r.get('triton_vs_torch'), '.2e')} "
              f"| {_status(r)} |" for r in numerics.get("rows", [])]
    determinism = parts["determinism"]
    lines += ["", "### Deterministic mode (triton): repeated bitwise, batch-invariant", "", *_stopped(determinism),
              "| op | dtype | repeat bitwise | batch-invariant | status |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['op']} | {r['dtype']} | {r.get('repeat_bitwise', '-')} | {r.get('batch_invariant', '-')} | "
              f"{_status(r)} |" for r in determinism.get("rows", [])]
    vocab = parts["vocab_parallel"]
    lines += ["", "### Vocab-parallel (2 ranks, uneven split) against the unsharded op", "", *_stopped(vocab),
              "| op | dtype | collectives | worst error | status |", "| --- | --- | --- | ---: | --- |"]
    lines += [f"| {r['op']} | {r['dtype']} | {r['collectives']} | {_fmt(r.get('worst_error'), '.2e')} | "
              f"{_status(r)} |" for r in vocab.get("rows", [])]

    registers = parts["registers"]
    lines += ["", "## 2. Registers and spills of the kernels that ran, against the AOT table", "",
              *_stopped(registers), *([f"*{registers['note']}*", ""] if registers.get("note") else []),
              "| kernel | dtype | arch | warps | shared KiB | registers | spills | AOT registers | within | status |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    lines += [f"| `{r['kernel']}` | {r['dtype']} | sm_{r['arch']} | {r['num_warps']} | {r['shared_bytes'] / 1024:.1f} "
              f"| {r['registers']} | {r['spills']} | {r['aot_registers'] or '-'} | {r['within_aot']} | {_status(r)} |"
              for r in registers.get("rows", [])]

    speed = parts["speed"]
    lines += ["", f"## 3. Speed ({report['speed_problem']})", "", *_stopped(speed),
              "| op | variant | ms (min) | ms (median) | rounds | extra peak MiB | useful TFLOPS | cost model ms | "
              "status |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in speed.get("rows", []):
        memory = _fmt(None if "extra_peak_bytes" not in r else r["extra_peak_bytes"] / 2**20, ".0f")
        status = _status(r) if "skipped" in r or "error" in r else "measured"
        lines.append(f"| {r['op']} | {r['variant']} | {_ms(r, 'seconds')} | {_ms(r, 'median_seconds')} | "
                     f"{r.get('rounds', '-')} | {memory} | {_fmt(r.get('tflops'))} | {_ms(r, 'model_seconds')} | "
                     f"{status} |")
    lines += ["", "### backend=\"auto\" on CUDA (picks triton): what the measurements say", "",
              *(["*dry run: interpreter and CPU times, which say nothing about a GPU*", ""] if report["dry_run"]
                else []),
              "| op | faster | triton ms | triton deterministic ms | torch ms | auto would change | deterministic "
              "faster than default |", "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for a in speed.get("auto", []):
        change = "-" if a["auto_would_change"] is None else ("**yes**" if a["auto_would_change"] else "no")
        lines.append(f"| {a['op']} | {a['faster'] or '-'} | {_ms(a, 'triton_seconds')} | "
                     f"{_ms(a, 'deterministic_seconds')} | {_ms(a, 'torch_seconds')} | {change} | "
                     f"{a.get('deterministic_faster', '-')} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(render(report))
    return json_path, md_path
