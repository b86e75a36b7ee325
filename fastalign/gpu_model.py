"""GPU cost model of the triton backend: per kernel launch, FLOPs, HBM bytes, L2 bytes and atomics, and the roofline
time each implies on an H100 SXM. **Every number is an estimate** from the kernels' own tile constants and grids
(their config functions), never a measurement; `fastalign bench --gpu-model` prints the table.

Traffic model (the assumptions, so that a reader can disagree with them):
  * Each program walks a list of *visits*; a visit streams whole operand blocks over the reduction dimension (a
    token block's hidden rows [BLOCK_N, H], a vocab tile's weight rows [BLOCK_V, H], a matmul's A rows / B columns)
    and may read-modify-write output blocks (atomics, accumulation). L2 bytes: every block every visit requests.
  * Programs run in waves of one per SM, in launch order (`tl.swizzle2d` orders included), and the programs of a
    wave take their visits in lockstep: a block several of them use at one step is fetched from HBM once.
  * Across steps, the blocks of the previous step stay in L2 when that step's blocks fit in half the L2; otherwise
    every block of a step is fetched again. Outputs are written to HBM once; atomic and accumulated blocks are read
    and written (8 bytes per fp32 element) whenever fetched.
  * Time of a launch: the largest of FLOPs / tensor-core peak, HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth,
    atomics / atomic throughput (perfect overlap of the others: a lower bound). FLOPs are the tile matmuls, padded
    to whole tiles; elementwise work is left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class GPU:
    """Peak rates. Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOPS dense bf16/fp16, 495 TFLOPS
    dense TF32, 3.35 TB/s HBM3) and the Hopper architecture whitepaper (132 SMs, 50 MB L2). The L2 bandwidth and
    the atomic throughput are not published: ASSUMPTIONS, see `l2_bytes_per_s` and `atomics_per_s`."""

    name: str = "H100 SXM"
    flops_16bit: float = 989e12  # dense bf16/fp16 tensor cores
    flops_tf32: float = 495e12  # dense TF32; fp32 inputs run 3xTF32 dots (3 TF32 products each)
    hbm_bytes_per_s: float = 3.35e12
    l2_bytes_per_s: float = 10e12  # ASSUMPTION: third-party write-ups quote ~12 TB/s; taken a little lower
    atomics_per_s: float = 10e12 / 8  # ASSUMPTION: one fp32 `red` costs a 4-byte read and write of L2 bandwidth
    l2_bytes: int = 50 * 10**6
    sms: int = 132
    arch: int = 90  # compute capability, for the launchers' tile choices

    def flops_per_s(self, dtype: torch.dtype) -> float:
        return self.flops_tf32 / 3 if dtype == torch.float32 else self.flops_16bit


H100 = GPU()


@dataclass(frozen=True)
class Problem:
    tokens: int  # N
    hidden: int  # H
    vocab: int  # V
    dtype: torch.dtype = torch.bfloat16

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class LaunchCost:
    """One kernel (or a run of identical launches) of one pass. Sums with `+` (same pass and kernel)."""

    pass_name: str
    kernel: str
    flops: float
    hbm_bytes: float
    l2_bytes: float
    atomics: float

    def times(self, gpu: GPU, dtype: torch.dtype) -> dict[str, float]:
        """Seconds each resource alone would take."""
        return {"compute": self.flops / gpu.flops_per_s(dtype), "HBM": self.hbm_bytes / gpu.hbm_bytes_per_s,
                "L2": self.l2_bytes / gpu.l2_bytes_per_s, "atomics": self.atomics / gpu.atomics_per_s}

    def estimate(self, gpu: GPU, dtype: torch.dtype) -> tuple[float, str]:
        """(roofline seconds, the resource that sets it)."""
        bound, seconds = max(self.times(gpu, dtype).items(), key=lambda kv: kv[1])
        return seconds, bound


Visit = tuple  # the keys of the blocks one visit touches; a key's first element names its kind


def traffic(programs: Iterable[list[Visit]], block_bytes: Callable[[tuple], int], gpu: GPU) -> tuple[float, float]:
    """(HBM bytes, L2 bytes) of programs in launch order, each a list of visits (the module docstring's model)."""
    hbm = l2 = 0
    previous, previous_fits = set(), False
    wave: list[list[Visit]] = []

    def run_wave():
        nonlocal hbm, l2, previous, previous_fits
        for step in range(max(len(p) for p in wave)):
            visits = [p[step] for p in wave if step < len(p)]
            l2 += sum(block_bytes(key) for visit in visits for key in visit)
            current = {key for visit in visits for key in visit}
            hbm += sum(block_bytes(key) for key in (current - previous if previous_fits else current))
            previous, previous_fits = current, sum(block_bytes(key) for key in current) <= gpu.l2_bytes / 2

    for program in programs:
        wave.append(program)
        if len(wave) == gpu.sms:
            run_wave()
            wave = []
    if wave:
        run_wave()
    return hbm, l2


def swizzle2d(i: int, j: int, size_i: int, size_j: int, size_g: int) -> tuple[int, int]:
    """`tl.swizzle2d`: the (i, j) a program of a row-major (i, j) grid takes under grouped ordering."""
    ij = i * size_j + j
    group = ij // (size_g * size_j)
    first = group * size_g
    size_g = min(size_i - first, size_g)
    ij %= size_g * size_j if size_g else 1
    return first + ij % size_g, ij // size_g


def _pad(x: int, block: int) -> int:
    return math.ceil(x / block) * block


def lse_forward_cost(p: Problem, gpu: GPU, *, deterministic: bool, pass_name: str) -> LaunchCost:
    """`_lse_forward_kernel`: program (row block i, split s), in swizzled order, walks its split's vocab tiles."""
    from fastalign.kernels.lse_forward import lse_forward_config, tiles_per_split

    cfg = lse_forward_config(p.dtype, h=p.hidden)
    rows, tiles = math.ceil(p.tokens / cfg.BLOCK_N), math.ceil(p.vocab / cfg.BLOCK_V)
    per_split = tiles_per_split(rows, tiles, cfg.BLOCK_V, gpu.sms, deterministic=deterministic, group_n=cfg.GROUP_N)
    splits = math.ceil(tiles / per_split)
    programs = ([(("h", i), ("w", t)) for t in range(s * per_split, min(tiles, (s + 1) * per_split))]
                for i, s in (swizzle2d(pid // splits, pid % splits, rows, splits, cfg.GROUP_N)
                             for pid in range(rows * splits)))
    sizes = {"h": cfg.BLOCK_N * p.hidden * p.itemsize, "w": cfg.BLOCK_V * p.hidden * p.itemsize}
    hbm, l2 = traffic(programs, lambda key: sizes[key[0]], gpu)
    out = 4 * 4 * splits * p.tokens  # four fp32 partials per (split, row)
    flops = 2 * _pad(p.tokens, cfg.BLOCK_N) * _pad(p.vocab, cfg.BLOCK_V) * _pad(p.hidden, cfg.BLOCK_H)
    return LaunchCost(pass_name, f"lse_forward ({splits} vocab splits)", flops, hbm + out, l2 + out, 0)


def ppo_epilogue_cost(p: Problem, gpu: GPU, *, deterministic: bool, pass_name: str) -> LaunchCost:
    """`_ppo_epilogue_kernel`, elementwise per token: reads 4 fp32 partials per split, the int64 target and 4 fp32
    inputs; writes 6 fp32 outputs and 2 bool flags."""
    from fastalign.kernels.lse_forward import lse_forward_config, tiles_per_split

    cfg = lse_forward_config(p.dtype, h=p.hidden)
    tiles = math.ceil(p.vocab / cfg.BLOCK_V)
    splits = math.ceil(tiles / tiles_per_split(math.ceil(p.tokens / cfg.BLOCK_N), tiles, cfg.BLOCK_V, gpu.sms,
                                               deterministic=deterministic, group_n=cfg.GROUP_N))
    moved = p.tokens * (4 * 4 * splits + 8 + 4 * 4 + 4 * 6 + 2)
    return LaunchCost(pass_name, "ppo_epilogue", 0, moved, moved, 0)


def atomic_backward_cost(p: Problem, gpu: GPU, *, pass_name: str) -> LaunchCost:
    """`_logprobs_backward_kernel` (both gradients, no bias): program = one swizzled (token block, vocab tile) tile:
    logits, then d hidden and d weight products with one fp32 atomic per output element."""
    from fastalign.kernels.logprobs_backward import logprobs_backward_config

    cfg = logprobs_backward_config(p.dtype, h=p.hidden, arch=gpu.arch)
    rows, tiles = math.ceil(p.tokens / cfg.BLOCK_N), math.ceil(p.vocab / cfg.BLOCK_V)
    # The logits loop streams both blocks; the d hidden loop the weight tile again, the d weight loop the hidden
    # block again (in L2 bytes; assumed L2 hits). The atomics' targets count in HBM (line fills and write-backs).
    programs = ([(("h", i), ("w", j), ("dh", i), ("dw", j))] for i, j in
                (swizzle2d(pid // tiles, pid % tiles, rows, tiles, cfg.GROUP_N) for pid in range(rows * tiles)))
    sizes = {"h": cfg.BLOCK_N * p.hidden * p.itemsize, "w": cfg.BLOCK_V * p.hidden * p.itemsize,
             "dh": 8 * cfg.BLOCK_N * p.hidden, "dw": 8 * cfg.BLOCK_V * p.hidden}
    hbm, _ = traffic(programs, lambda key: sizes[key[0]], gpu)
    l2 = 2 * rows * tiles * (sizes["h"] + sizes["w"])  # the atomics' own L2 work is the atomics term
    tile_flops = 2 * cfg.BLOCK_N * cfg.BLOCK_V * _pad(p.hidden, cfg.BLOCK_H)
    atomics = rows * tiles * (cfg.BLOCK_N + cfg.BLOCK_V) * p.hidden
    return LaunchCost(pass_name, "logprobs_backward (atomics)", 3 * rows * tiles * tile_flops, hbm, l2, atomics)


def _matmul_cost(m: int, pdim: int, k: int, p: Problem, gpu: GPU, *, accumulate: bool, pass_name: str,
                 kernel: str) -> LaunchCost:
    """`_matmul_kernel` C [m, pdim] (+)= A [m, k] @ B [k, pdim], swizzled programs, one visit each; the tiles of
    `matmul_config` for the backward's operands, whose strides are H and V (aligned when both are multiples of 16)."""
    from fastalign.kernels.matmul import matmul_config

    cfg = matmul_config(p.dtype, arch=gpu.arch, p=pdim, aligned=p.hidden % 16 == 0 and p.vocab % 16 == 0)
    mb, pb = math.ceil(m / cfg.BLOCK_M), math.ceil(pdim / cfg.BLOCK_P)
    programs = ([(("a", i), ("b", j))] for i, j in
                (swizzle2d(pid // pb, pid % pb, mb, pb, cfg.GROUP_M) for pid in range(mb * pb)))
    sizes = {"a": cfg.BLOCK_M * k * p.itemsize, "b": cfg.BLOCK_P * k * p.itemsize}
    hbm, l2 = traffic(programs, lambda key: sizes[key[0]], gpu)
    out = (8 if accumulate else 4) * m * pdim
    flops = 2 * _pad(m, cfg.BLOCK_M) * _pad(pdim, cfg.BLOCK_P) * _pad(k, cfg.BLOCK_K)
    return LaunchCost(pass_name, kernel, flops, hbm + out, l2 + out, 0)


def atomic_free_backward_cost(p: Problem, gpu: GPU, *, pass_name: str) -> list[LaunchCost]:
    """The deterministic backward (both gradients, no bias), per chunk of `workspace_rows` rows: the logit
    gradient tiles into the workspace, then d hidden = dz @ weight and d weight += dz.T @ hidden."""
    from fastalign.kernels.logprobs_backward import WORKSPACE_BYTES, logit_grad_config, workspace_rows

    cfg = logit_grad_config(p.dtype, h=p.hidden)
    chunk = workspace_rows(p.vocab, p.dtype, WORKSPACE_BYTES, cfg.BLOCK_N)

    def one_chunk(m: int) -> list[LaunchCost]:
        rows, tiles = math.ceil(m / cfg.BLOCK_N), math.ceil(p.vocab / cfg.BLOCK_V)
        programs = ([(("h", i), ("w", j))] for i, j in
                    (swizzle2d(pid // tiles, pid % tiles, rows, tiles, cfg.GROUP_N) for pid in range(rows * tiles)))
        sizes = {"h": cfg.BLOCK_N * p.hidden * p.itemsize, "w": cfg.BLOCK_V * p.hidden * p.itemsize}
        hbm, l2 = traffic(programs, lambda key: sizes[key[0]], gpu)
        dz = m * p.vocab * p.itemsize
        flops = 2 * _pad(m, cfg.BLOCK_N) * _pad(p.vocab, cfg.BLOCK_V) * _pad(p.hidden, cfg.BLOCK_H)
        return [LaunchCost(pass_name, "logit_grad: dz into the workspace", flops, hbm + dz, l2 + dz, 0),
                _matmul_cost(m, p.hidden, p.vocab, p, gpu, accumulate=False, pass_name=pass_name,
                             kernel="matmul: d_hidden = dz @ W"),
                _matmul_cost(p.vocab, p.hidden, m, p, gpu, accumulate=True, pass_name=pass_name,
                             kernel="matmul: d_weight += dz.T @ h")]

    full, rest = divmod(p.tokens, chunk)
    runs = [(n, one_chunk(m)) for n, m in ((full, chunk), (1 if rest else 0, rest)) if n]
    return [LaunchCost(pass_name, f"{launches[0].kernel} (x{full + (1 if rest else 0)} chunks)",
                       *(sum(n * getattr(c, field) for (n, _), c in zip(runs, launches))
                         for field in ("flops", "hbm_bytes", "l2_bytes", "atomics")))
            for launches in zip(*(costs for _, costs in runs))]


def model(p: Problem, gpu: GPU = H100) -> dict[str, list[LaunchCost]]:
    """Launch costs of each pass: the statistics forward (default and deterministic split), the PPO epilogue, the
    log-prob backward with atomics (default) and atomic-free (deterministic)."""
    return {
        "forward": [lse_forward_cost(p, gpu, deterministic=False, pass_name="statistics forward")],
        "forward, deterministic": [lse_forward_cost(p, gpu, deterministic=True,
                                                    pass_name="statistics forward, deterministic")],
        "ppo epilogue": [ppo_epilogue_cost(p, gpu, deterministic=False, pass_name="PPO epilogue")],
        "backward, atomics": [atomic_backward_cost(p, gpu, pass_name="backward, atomics (default)")],
        "backward, atomic-free": atomic_free_backward_cost(p, gpu, pass_name="backward, atomic-free "
                                                                                "(deterministic)"),
    }


def total_seconds(costs: Iterable[LaunchCost], gpu: GPU, dtype: torch.dtype) -> float:
    """Launches one after another: the sum of their roofline times."""
    return sum(c.estimate(gpu, dtype)[0] for c in costs)


def render(p: Problem, gpu: GPU = H100) -> str:
    """The Markdown table of every launch and the op totals, all labelled estimates."""
    passes = model(p, gpu)
    dtype = p.dtype
    lines = [f"GPU cost model (ESTIMATES, not measurements): N={p.tokens}, H={p.hidden}, V={p.vocab}, "
             f"{str(dtype).removeprefix('torch.')}, {gpu.name}: {gpu.flops_per_s(dtype) / 1e12:.0f} TFLOPS "
             f"(tensor cores, dense), HBM {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, L2 {gpu.l2_bytes_per_s / 1e12:.0f} TB/s"
             f" (assumed), fp32 atomics {gpu.atomics_per_s / 1e12:.2f}e12/s (assumed)", "",
             "| pass | kernel | GFLOP | HBM GB | L2 GB | atomics | compute ms | HBM ms | L2 ms | atomics ms "
             "| est. ms | bound |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for costs in passes.values():
        for c in costs:
            t = c.times(gpu, dtype)
            seconds, bound = c.estimate(gpu, dtype)
            lines.append(f"| {c.pass_name} | {c.kernel} | {c.flops / 1e9:,.0f} | {c.hbm_bytes / 1e9:,.1f} | "
                         f"{c.l2_bytes / 1e9:,.1f} | {c.atomics:.2e} | {t['compute'] * 1e3:.1f} | "
                         f"{t['HBM'] * 1e3:.1f} | {t['L2'] * 1e3:.1f} | {t['atomics'] * 1e3:.1f} | "
                         f"{seconds * 1e3:.1f} | {bound} |")
    ms = {name: total_seconds(costs, gpu, dtype) * 1e3 for name, costs in passes.items()}
    lines += ["", "| op (estimated totals) | default | deterministic |", "| --- | ---: | ---: |",
              f"| log-prob backward | {ms['backward, atomics']:.1f} ms | {ms['backward, atomic-free']:.1f} ms |",
              f"| log-prob forward + backward | {ms['forward'] + ms['backward, atomics']:.1f} ms | "
              f"{ms['forward, deterministic'] + ms['backward, atomic-free']:.1f} ms |",
              f"| PPO forward + backward (epilogue included) | "
              f"{ms['forward'] + ms['ppo epilogue'] + ms['backward, atomics']:.1f} ms | "
              f"{ms['forward, deterministic'] + ms['ppo epilogue'] + ms['backward, atomic-free']:.1f} ms |"]
    return "\n".join(lines)
