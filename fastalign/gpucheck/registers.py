"""Part 2 of the GPU check: the registers and spills of the kernels the check actually ran (``kernel.n_regs``,
``kernel.n_spills`` of each compiled specialization in Triton's cache) against the ahead-of-time compile's table
(docs/kernels.md, written by ``python tests/helpers/aot.py``): per kernel, dtype and arch, the range of registers of the
builds there. A spill fails; registers outside the table's range are reported (the table holds the heaviest and
commonest flag combinations, the run may take others)."""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

AOT_TABLE = Path(__file__).resolve().parents[2] / "docs" / "kernels.md"
_ROW = re.compile(r"^\| `[^`]*` \| `(?P<kernel>\w+)` \| (?P<dtype>\w+) \| \w+ \| sm_(?P<arch>\d+) \| (?P<regs>\d+) \| "
                  r"(?P<spill>[*\d]+) \|")
_POINTER_DTYPES = {"*fp32": "fp32", "*fp16": "fp16", "*bf16": "bf16"}


def aot_registers(path: Path = AOT_TABLE) -> dict[tuple[str, str, int], list[int]]:
    """``(kernel, dtype, arch) -> [min, max]`` registers over the AOT table's builds; empty when the table is absent
    (an installed package without the repository's docs)."""
    ranges: dict[tuple[str, str, int], list[int]] = {}
    if not path.exists():
        return ranges
    for line in path.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            key, regs = (m["kernel"], m["dtype"], int(m["arch"])), int(m["regs"])
            low, high = ranges.get(key, [regs, regs])
            ranges[key] = [min(low, regs), max(high, regs)]
    return ranges


def expected_registers(aot: dict, kernel: str, dtype: str, arch: int) -> list[int] | None:
    """The AOT range of ``kernel`` at ``dtype`` and ``arch``; over every dtype of the table when that one has no build
    (a kernel whose first floating argument is an fp32 workspace, e.g. the PPO epilogue's partials)."""
    if (kernel, dtype, arch) in aot:
        return aot[(kernel, dtype, arch)]
    ranges = [r for (k, _, a), r in aot.items() if k == kernel and a == arch]
    return [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None


def kernel_functions() -> dict[str, object]:
    """Every ``*_kernel`` of ``fastalign.kernels`` by name (JITFunctions; interpreted functions under the
    interpreter)."""
    import fastalign.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found.update({name: fn for name, fn in vars(module).items() if name.endswith("_kernel")})
    return found


def _dtype(signature: dict) -> str:
    """The first floating pointer argument's dtype: the lm_head inputs' (hidden or weight come first)."""
    return next((_POINTER_DTYPES[t] for t in signature.values() if t in _POINTER_DTYPES), "?")


def check_registers() -> dict:
    """One row per compiled specialization the process launched, with the AOT table's range beside it."""
    aot = aot_registers()
    rows = []
    for name, fn in sorted(kernel_functions().items()):
        for kernel_cache, *_ in getattr(fn, "device_caches", {}).values():
            for compiled in kernel_cache.values():
                compiled.run  # loads the binary if needed: n_regs and n_spills are read there  # noqa: B018
                dtype, arch = _dtype(compiled.src.signature), compiled.metadata.target.arch
                expected = expected_registers(aot, name, dtype, arch)
                rows.append({"kernel": name, "dtype": dtype, "arch": arch, "num_warps": compiled.metadata.num_warps,
                             "shared_bytes": compiled.metadata.shared, "registers": compiled.n_regs,
                             "spills": compiled.n_spills, "aot_registers": expected,
                             "within_aot": None if expected is None else expected[0] <= compiled.n_regs <= expected[1],
                             "passed": compiled.n_spills == 0})
    note = None
    if not rows:
        note = ("no compiled kernel in Triton's cache (the interpreter compiles nothing): the AOT table's ranges only"
                if aot else f"no compiled kernel, and no AOT table at {AOT_TABLE}")
    return {"rows": rows, "aot": {f"{k}/{d}/sm_{a}": r for (k, d, a), r in sorted(aot.items())},
            "kernels": sorted(kernel_functions()), "note": note, "stopped": None}
