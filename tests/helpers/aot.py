"""Ahead-of-time compile of the registered kernel launches for NVIDIA GPUs on a machine without one, and what the
compiler output says.

A `Build` names a registered `fastalign.kernels.launches.LaunchCase`, an lm_head dtype, a shape of `SHAPES`, an
arch (80: A100, 90: H100) and optional launch-option overrides (the deliberately broken builds of the tests). The
worker runs the launcher under `runtime.capture_launches()` and binds the recorded `kernel[grid](...)` call with
Triton's own binder for that arch, exactly as `JITFunction.run` does on a GPU: the signature, the constexprs and the
divisibility-by-16 / equal-to-1 specializations of the real tensors. `compile_builds` returns a `BuildResult` per
build: registers, stack / local memory (spills), shared memory, SASS opcodes, and how each `tl.dot` of the source
was lowered, read from the TTGIR: `wgmma` (ttng.warp_group_dot), `mma` (tt.dot on an nvidia_mma layout:
mma.sync), or `fma` (tt.dot on a blocked layout: no tensor cores).

The compiles run in subprocesses with TRITON_INTERPRET unset: under the interpreter `@triton.jit` gives
`InterpretedFunction`s, which neither launch through `JITFunction.run` nor compile. Results are cached for the
session here and across sessions by Triton's own cache.

`python tests/helpers/aot.py --doc docs/kernels.md` writes the per-kernel table (`--sweep` adds every flag combination).
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

ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class Build:
    case: str  # LaunchCase.name, e.g. "logprobs_backward[d_hidden,d_weight]"
    dtype: str  # "fp32", "fp16" or "bf16": the lm_head's
    shape: str  # a key of fastalign.kernels.launches.SHAPES
    arch: int  # 80 or 90
    overrides: tuple = ()  # ((launch keyword, value), ...) replacing the launcher's: constexprs or num_warps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    kernel: str
    signature: str  # the specialized arguments: `name:type` plus `/16` (divisibility) or `=value` (constant)
    launch: str  # the launcher's constexprs and num_warps / num_stages
    registers: int
    stack: int  # bytes of stack frame per thread; non-zero means spills
    local: int  # bytes of local memory per thread; non-zero means spills
    shared: int  # bytes of shared memory (Triton's dynamic allocation plus static)
    opcodes: dict  # SASS opcode (without modifiers) -> count
    dots: dict  # source position "file.py:line" of each tl.dot -> its lowering: "wgmma", "mma", "fma", "missing"
    ptx_atomics: int  # PTX `atom` / `red` instructions

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    def count(self, *opcodes: str) -> int:
        return sum(self.opcodes.get(op, 0) for op in opcodes)


def registered_builds(*, sweep: bool = False) -> list[Build]:
    """Each registered family's heaviest and commonest case at every dtype, shape and arch (what the compile test
    checks); with `sweep`, every case at every dtype and arch, at the "odd" shape."""
    from fastalign.kernels.launches import SHAPES, launch_cases

    names = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
    return [Build(c.name, names[str(d)], s, a) for c in launch_cases() if sweep or c.heaviest or c.commonest
            for d in c.dtypes for s in (("odd",) if sweep else SHAPES) for a in ARCHS]


_CACHE: dict[str, tuple[BuildResult, ...]] = {}


def compile_builds(builds: list[Build]) -> dict[Build, tuple[BuildResult, ...]]:
    """Compile every build not compiled yet in this session (in parallel subprocesses, one per CPU): a result per
    distinct kernel launch of the build's case, in launch order. Builds of one dtype, shape and arch go to the same
    worker, which compiles a launch that several of them make (the matmuls of the deterministic backward...) once."""
    todo = sorted({b.to_json() for b in builds} - _CACHE.keys())
    if todo:
        workers = min(len(todo), os.cpu_count() or 1)
        groups = collections.defaultdict(list)
        for build in todo:
            fields = json.loads(build)
            groups[fields["dtype"], fields["shape"], fields["arch"]].append(build)
        batches = [[] for _ in range(workers)]
        for group in sorted(groups.values(), key=len, reverse=True):  # the largest first, to the emptiest worker
            min(batches, key=len).extend(group)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for batch, results in zip(batches, pool.map(_compile_in_subprocess, batches)):
                _CACHE.update(zip(batch, (tuple(BuildResult(**r) for r in launches) for launches in results)))
    return {b: _CACHE[b.to_json()] for b in builds}


def _compile_in_subprocess(batch: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--worker"], input="\n".join(batch), capture_output=True,
                          text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- worker side (TRITON_INTERPRET unset) ----

def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _bind(build: Build) -> list:
    """The distinct recorded launches of `build`'s case (a chunked launcher repeats some), each bound as
    `JITFunction.run` binds it on a GPU of `build.arch`."""
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fastalign.kernels.launches import SHAPES, launch_cases
    from fastalign.kernels.runtime import capture_launches

    case = next(c for c in launch_cases() if c.name == build.case)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[build.dtype]
    with capture_launches(build.arch) as launches:
        case.call(dtype, SHAPES[build.shape])
    assert launches, f"{build.case}: no kernel launch"
    target = GPUTarget("cuda", build.arch, 32)
    backend = make_backend(target)
    bound_launches = {}
    for kernel, args, kwargs in launches:
        kwargs = {**kwargs, **dict(build.overrides), "debug": kernel.debug or knobs.runtime.debug,  # as run() does
                  "instrumentation_mode": knobs.compilation.instrumentation_mode,
                  "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}
        bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
            *args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        key = (kernel.fn.__qualname__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        bound_launches.setdefault(key, (kernel, target, options, signature, constexprs, attrs))
    return list(bound_launches.values())


def _describe(kernel, options, signature: dict, constexprs: dict, attrs: dict) -> tuple[str, str]:
    args, launch = [], []
    for i, name in enumerate(kernel.arg_names):
        if signature[name] != "constexpr":
            divisible = any(attr == ["tt.divisibility", 16] for attr in attrs.get((i,), []))
            args.append(f"{name}:{signature[name]}" + ("/16" if divisible else ""))
        elif kernel.params[i].is_constexpr:
            launch.append(f"{name}={constexprs[(i,)]}")
        else:  # a runtime argument the binder turned into a constant (an argument equal to 1)
            args.append(f"{name}={constexprs[(i,)]}")
    launch += [f"num_warps={options.num_warps}", f"num_stages={options.num_stages}"]
    return " ".join(args), " ".join(launch)


def _locations(ir: str) -> dict[str, str]:
    """`#locN` alias -> "file.py:line" of the source position it names (through name and callsite wrappers)."""
    raw = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)$", ir, re.M))

    def resolve(alias: str, depth: int = 0) -> str:
        text = raw.get(alias, "")
        pos = re.search(r'"([^"]+\.py)":(\d+):\d+', text)
        if pos:
            return f"{Path(pos.group(1)).name}:{pos.group(2)}"
        ref = re.search(r"(#loc\d*)\b", text)
        return resolve(ref.group(1), depth + 1) if ref and depth < 20 else "?"

    return {alias: resolve(alias) for alias in raw}


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<[^,>]+(?:, (#[\w.]+))?>.* loc\((#loc\d*)\)")


def _dot_lowerings(ttir: str, ttgir: str) -> dict[str, str]:
    """Source position of every tl.dot (from the TTIR) -> the weakest lowering of the TTGIR dots it became (fp32
    inputs at tf32x3 become three dots)."""
    layouts = dict(re.findall(r"^(#[\w.]+) = (#ttg\.\w+)", ttgir, re.M))
    ir_locs, gpu_locs = _locations(ttir), _locations(ttgir)
    rank = {"missing": 0, "fma": 1, "mma": 2, "wgmma": 3}
    dots = {ir_locs.get(loc, "?"): "missing" for _, _, loc in _DOT.findall(ttir)}
    seen: dict[str, str] = {}
    for op, layout, loc in _DOT.findall(ttgir):
        lowering = "wgmma" if op == "ttng.warp_group_dot" else \
            "mma" if layouts.get(layout) == "#ttg.nvidia_mma" else "fma"
        src = gpu_locs.get(loc, "?")
        seen[src] = min(seen.get(src, lowering), lowering, key=rank.get)
    return {src: seen.get(src, "missing") for src in dots}


def _compile_one(kernel, target, options, signature: dict, constexprs: dict, attrs: dict) -> dict:
    import triton

    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                        attrs=attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout

    res = {key: int(re.search(rf"\b{key}:(\d+)", sass).group(1)) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    # SASS lines look like `/*0120*/  @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;`: count the opcode before the dot.
    instruction = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    signature_text, launch_text = _describe(kernel, options, signature, constexprs, attrs)
    return {"kernel": kernel.fn.__name__, "signature": signature_text, "launch": launch_text,
            "registers": res["REG"], "stack": res["STACK"], "local": res["LOCAL"],
            "shared": compiled.metadata.shared + res["SHARED"],
            "opcodes": dict(collections.Counter(m.group(1) for m in instruction.finditer(sass))),
            "dots": _dot_lowerings(compiled.asm["ttir"], compiled.asm["ttgir"]),
            "ptx_atomics": len(re.findall(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", compiled.asm["ptx"], re.M))}


def _worker() -> None:
    """JSON builds on stdin, one per line; a JSON list of results as the last stdout line. A launch that several
    builds make is compiled once."""
    builds = [Build(**{**json.loads(line), "overrides": tuple(map(tuple, json.loads(line)["overrides"]))})
              for line in sys.stdin.read().splitlines() if line.strip()]
    done: dict[tuple, dict] = {}

    def compiled(kernel, target, options, signature, constexprs, attrs) -> dict:
        key = (kernel.fn.__qualname__, target.arch, repr(options), repr(signature), repr(constexprs), repr(attrs))
        if key not in done:
            done[key] = _compile_one(kernel, target, options, signature, constexprs, attrs)
        return done[key]

    print(json.dumps([[compiled(*launch) for launch in _bind(b)] for b in builds]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        from kernel_table import main  # the doc generator (tests/helpers/kernel_table.py)

        main(sys.argv[1:])
