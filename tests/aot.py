"""Ahead-of-time compile of Triton kernels for NVIDIA GPUs on a machine without one, and what the cubin says.

`compile_kernels(specs)` compiles each `CompileSpec` (a kernel, its signature, its constexprs, num_warps, arch) and
returns a `CompileResult` per spec: registers, stack / local memory (spills), shared memory and the SASS opcodes.

The compiles run in subprocesses with TRITON_INTERPRET unset: under the interpreter `@triton.jit` returns an
`InterpretedFunction`, and `triton.compile` of a function rebuilt from it fails on the first nested jit call
(even `tl.cdiv`). Results are cached for the session here and across sessions by Triton's own cache.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel specialization to compile. `kernel` is the `@triton.jit` object (plain or interpreted);
    `aligned` names the arguments the JIT would specialize as multiples of 16 (pointers, a hidden size...)."""

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    arch: int  # 80 (A100) or 90 (H100)
    aligned: tuple = ()

    def to_json(self) -> str:
        fn = self.kernel.fn  # the python function behind both JITFunction and InterpretedFunction
        return json.dumps({"module": fn.__module__, "name": fn.__name__, "signature": self.signature,
                           "constexprs": self.constexprs, "num_warps": self.num_warps,
                           "num_stages": self.num_stages, "arch": self.arch, "aligned": list(self.aligned)},
                          sort_keys=True)

    def __hash__(self) -> int:
        return hash(self.to_json())


@dataclasses.dataclass(frozen=True)
class CompileResult:
    registers: int
    stack: int  # bytes of stack frame per thread; non-zero means spills
    local: int  # bytes of local memory per thread; non-zero means spills
    shared: int  # bytes of shared memory (Triton's dynamic allocation plus static)
    opcodes: dict  # SASS opcode (without modifiers) -> count
    ptx_atomics: int  # PTX `atom`/`red` instructions

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    def count(self, *opcodes: str) -> int:
        return sum(self.opcodes.get(op, 0) for op in opcodes)


_CACHE: dict[str, CompileResult] = {}


def compile_kernels(specs: list[CompileSpec]) -> dict[CompileSpec, CompileResult]:
    """Compile every spec not compiled yet in this session (in parallel subprocesses, one per CPU)."""
    todo = sorted({s.to_json() for s in specs} - _CACHE.keys())
    if todo:
        workers = min(len(todo), os.cpu_count() or 1)
        batches = [todo[i::workers] for i in range(workers)]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for batch, results in zip(batches, pool.map(_compile_in_subprocess, batches)):
                _CACHE.update(zip(batch, (CompileResult(**r) for r in results)))
    return {s: _CACHE[s.to_json()] for s in specs}


def _compile_in_subprocess(batch: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], input="\n".join(batch), capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _compile_one(spec: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    assert isinstance(kernel, triton.runtime.jit.JITFunction), f"{spec['name']} is {type(kernel)}, not a JITFunction"
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec["aligned"]}
    src = triton.compiler.ASTSource(fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"],
                                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                       "enable_fp_fusion": True})

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout

    res = {key: int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    # SASS lines look like `/*0120*/  @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;`: count the opcode before the dot.
    instruction = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    opcodes = collections.Counter(m.group(1) for m in instruction.finditer(sass))
    atomics = re.findall(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", compiled.asm["ptx"], flags=re.MULTILINE)
    return {"registers": res["REG"], "stack": res["STACK"], "local": res["LOCAL"],
            "shared": compiled.metadata.shared + res["SHARED"], "opcodes": dict(opcodes),
            "ptx_atomics": len(atomics)}


if __name__ == "__main__":  # worker: JSON specs on stdin, one per line; a JSON list of results as last stdout line
    results = [_compile_one(json.loads(line)) for line in sys.stdin.read().splitlines() if line.strip()]
    print(json.dumps(results))
