"""Backward of the fused linear log-softmax (log-prob and entropy gradients) without materializing the logits.

Every scheme recomputes each [BLOCK_N, BLOCK_V] logit tile once and turns it into the logit gradient dz
(`logit_grad_tile`); the gradients are then dz @ weight (d hidden), dz.T @ hidden (d weight), dz.T @ 1 (d bias):
three tile matmuls per logit tile in all.

Default: one kernel over all (token block, vocab block) tiles that adds its products with fp32 atomics, as in
apple/ml-cross-entropy: every tile is a program (the GPU fills at any N) and no workspace, but the sums land in
a run-dependent order (nondeterministic last bits) and it issues one atomic per output element per tile (the GPU
cost model, `fastalign.gpu_model`, estimates it atomic-bound at large shapes).
`deterministic=True`: atomic-free. dz of a chunk of rows goes to a workspace and three owned-tile matmuls
(`matmul.py`) read it: each output element written by one program, sums in a fixed order, bitwise the same on
every run; the cost model estimates it L2-bound (not atomic-bound) at its 128 x 128 logit-gradient and
128 x 256 matmul tiles (16-bit).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lse_forward import TileConfig, logit_tile, lse_forward_config, transform_args, transform_grad
from .matmul import matmul_into
from .runtime import check_device, interpreting, target_arch


def logprobs_backward_config(dtype: torch.dtype, *, h: int, arch: int,
                             interpret: bool = False) -> TileConfig:
    """GPU config for inputs of `dtype`, hidden size `h`, compute capability `arch` (80, 90); `interpret=True` gives
    small tiles that keep the CPU interpreter fast. docs/kernels.md lists the registers each config takes.

    fp32 inputs use 3xTF32 tensor-core dots (about fp32 accuracy, plain TF32 would not be), whose split operands
    need small H chunks (BLOCK_H = 8: 16 spilled on sm_80 and sm_90 when H is not a multiple of 16). On sm_90 a
    64 x 64 tile puts all three dots on wgmma (warp-group MMA needs 64 rows: with BLOCK_V = 32 the d_weight dot,
    of BLOCK_V rows, fell back to mma.sync); on sm_80 that tile spills, 128 x 32 does not. When H is not a multiple
    of 16 the loads of a row are not vectorized and their pointers and masks fill the registers (16-bit: 229-255
    at BLOCK_H = 32): BLOCK_H = 16 brings them down to 177-208.
    """
    precision = "tf32x3" if dtype == torch.float32 else "tf32"  # the precision only matters for fp32 operands
    if interpret:
        return TileConfig(16, 32, 16, 2, precision, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        if arch >= 90:
            return TileConfig(64, 64, 8, 8, precision, num_warps=8, num_stages=3)
        return TileConfig(128, 32, 8, 8, precision, num_warps=8, num_stages=3)
    return TileConfig(128, 64, 32 if h % 16 == 0 else 16, 8, precision, num_warps=8, num_stages=3)


WORKSPACE_BYTES = 512 << 20
"""Default budget of the atomic-free backward's logit-gradient workspace (512 MiB: 2048 rows at V = 128256 in bf16,
whose [2048, 4096] hidden rows then stay in L2 while the vocabulary streams by; `fastalign.gpu_model`)."""


def logit_grad_config(dtype: torch.dtype, *, h: int, interpret: bool = False, softcap: bool = False) -> TileConfig:
    """`_logit_grad_kernel`'s tiles: 16-bit inputs 128 x 128 (64 FLOPs per byte loaded, against the forward's 43:
    the GPU cost model's L2 traffic), registers about 185 / 169 per thread (sm_80 / sm_90, from the compile test;
    the forward's online-softmax tile spills at 128 x 128, this one stores dz and keeps no running state). fp32,
    the interpreter and a softcap (its tanh and derivative spilled 8 bytes at 128 x 128 on sm_90 with H not a
    multiple of 16): the forward's (`lse_forward_config`)."""
    cfg = lse_forward_config(dtype, h=h, interpret=interpret)
    if interpret or dtype == torch.float32 or softcap:
        return cfg
    return replace(cfg, BLOCK_V=128)


@triton.jit
def grouped_tile(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """This program's (token block, vocab tile) of a 1-D grid in grouped order: consecutive programs walk GROUP_N
    token blocks down one vocab tile, then the next tile, so the programs running together share hidden and weight
    tiles in L2. Returns rows [BLOCK_N], cols [BLOCK_V] (shard-local) and their validity masks."""
    pid = tl.program_id(0)
    num_v_blocks = tl.cdiv(V, BLOCK_V)
    pid_n, pid_v = tl.swizzle2d(pid // num_v_blocks, pid % num_v_blocks, tl.cdiv(N, BLOCK_N), num_v_blocks, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    return rows, cols, rows < N, cols < V


@triton.jit
def logit_grad_tile(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_logprobs_ptr, grad_entropy_ptr,
                    entropy_ptr, grad_lse_ptr, grad_logit_sum_ptr, rows, cols, row_ok, col_ok, H, vocab_start,
                    ignore_index, inv_temperature, tanh_scale, HAS_BIAS: tl.constexpr,
                    HAS_ENTROPY_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ROW_GRADS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Logit gradient dz = d loss / d (hidden @ weight.T + bias), fp32 [BLOCK_N, BLOCK_V], of token rows `rows`
    (valid where `row_ok`) against shard-local vocab columns `cols` (valid where `col_ok`); exactly 0 at invalid
    or ignored rows and invalid columns. Pointers and scalars as in `_logprobs_backward_kernel`; `inv_temperature`
    and `tanh_scale` are the transform's scalars (`lse_forward.transform_args`)."""
    # Recompute the logit tile z = (hidden @ weight.T + bias) * inv_temperature (transformed), fp32 accumulator.
    z = logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H, inv_temperature, tanh_scale,
                   HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)

    # Shard-local target column (int32: compared over a whole tile). Ignored rows and targets past V match
    # nothing that survives the `keep` mask below.
    t = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    y = (t - vocab_start).to(tl.int32)

    # dz = g_lp * (onehot(y) - p) - g_ent * p * (z - lse + entropy), with p = softmax(z) from the global lse.
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(grad_logprobs_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_ENTROPY_GRAD:
        g_ent = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_ent[:, None] * p * (z - lse[:, None] + entropy[:, None])
    if HAS_ROW_GRADS:  # + g_lse * p (a z-loss) + g_sum (the sum of logits: label smoothing)
        g_lse = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
        g_sum = tl.load(grad_logit_sum_ptr + rows, mask=row_ok, other=0.0)
        dz += g_lse[:, None] * p + g_sum[:, None]
    # dz is the gradient w.r.t. the transformed, tempered z. Chain rule through the temperature (and the transform:
    # with a softcap, tanh = z / out_scale, its derivative 1 - tanh^2). Padding and ignored rows (whose lse may be
    # anything) and padding columns contribute nothing: where() also drops an inf/nan p there.
    keep = (row_ok & (t != ignore_index))[:, None] & col_ok[None, :]
    return tl.where(keep, transform_grad(dz, z, inv_temperature, tanh_scale, SOFTCAP), 0.0)


@triton.jit
def _logprobs_backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,  # [N, H], [V, H], [V], [N] (all contiguous)
    lse_ptr, grad_logprobs_ptr, grad_entropy_ptr, entropy_ptr, grad_lse_ptr, grad_logit_sum_ptr,  # fp32 [N]
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,  # fp32 [N, H], [V, H], [V], zero-initialized
    N, V, H, vocab_start, ignore_index, inv_temperature, tanh_scale,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ROW_GRADS: tl.constexpr,
    COMPUTE_GRAD_HIDDEN: tl.constexpr, COMPUTE_GRAD_WEIGHT: tl.constexpr, COMPUTE_GRAD_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program p: one (token block, vocab block) tile; adds its share to the gradients with atomics."""
    # Grouped order also spreads the atomics of the programs running together over several blocks of rows.
    rows, cols, row_ok, col_ok = grouped_tile(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    dz = logit_grad_tile(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_logprobs_ptr,
                         grad_entropy_ptr, entropy_ptr, grad_lse_ptr, grad_logit_sum_ptr, rows, cols, row_ok, col_ok,
                         H, vocab_start, ignore_index, inv_temperature, tanh_scale, HAS_BIAS, HAS_ENTROPY_GRAD,
                         SOFTCAP, HAS_ROW_GRADS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)

    add_tile_grads(dz, hidden_ptr, weight_ptr, grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, rows, cols, row_ok,
                   col_ok, H, COMPUTE_GRAD_HIDDEN, COMPUTE_GRAD_WEIGHT, COMPUTE_GRAD_BIAS, BLOCK_H, DOT_PRECISION)


@triton.jit
def add_tile_grads(dz, hidden_ptr, weight_ptr, grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, rows, cols, row_ok,
                   col_ok, H, COMPUTE_GRAD_HIDDEN: tl.constexpr, COMPUTE_GRAD_WEIGHT: tl.constexpr,
                   COMPUTE_GRAD_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the products of the logit-gradient tile `dz` fp32 [BLOCK_N, BLOCK_V] (0 at invalid rows and columns) to
    the fp32 gradients with atomics: dz @ weight[cols] to grad_hidden[rows], dz.T @ hidden[rows] to
    grad_weight[cols], its column sums to grad_bias[cols]."""
    rows64 = rows.to(tl.int64)  # int64: rows * H and cols * H overflow int32 at scale
    cols64 = cols.to(tl.int64)
    if COMPUTE_GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    dz_in = dz.to(weight_ptr.dtype.element_ty)  # tensor-core operand in the weight's dtype, fp32 accumulation
    if COMPUTE_GRAD_HIDDEN:
        # grad_hidden[rows] += dz @ weight[cols], one H chunk at a time.
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            w = tl.load(weight_ptr + cols64[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            tl.atomic_add(grad_hidden_ptr + rows64[:, None] * H + ks[None, :],
                          tl.dot(dz_in, w, input_precision=DOT_PRECISION),
                          mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
    if COMPUTE_GRAD_WEIGHT:
        # grad_weight[cols] += dz.T @ hidden[rows], one H chunk at a time.
        dz_t = tl.trans(dz_in)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            h = tl.load(hidden_ptr + rows64[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(weight_ptr.dtype.element_ty)
            tl.atomic_add(grad_weight_ptr + cols64[:, None] * H + ks[None, :],
                          tl.dot(dz_t, h, input_precision=DOT_PRECISION),
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


@triton.jit
def _logit_grad_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,  # [N, H], [V, H], [V], [N] (all contiguous)
    lse_ptr, grad_logprobs_ptr, grad_entropy_ptr, entropy_ptr, grad_lse_ptr, grad_logit_sum_ptr,  # fp32 [N]
    dz_ptr,  # out: [N, V] in the weight's dtype
    N, V, H, vocab_start, ignore_index, inv_temperature, tanh_scale,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ROW_GRADS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program p: the logit gradient of one (token block, vocab tile), stored once (no atomics)."""
    rows, cols, row_ok, col_ok = grouped_tile(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    dz = logit_grad_tile(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_logprobs_ptr,
                         grad_entropy_ptr, entropy_ptr, grad_lse_ptr, grad_logit_sum_ptr, rows, cols, row_ok, col_ok,
                         H, vocab_start, ignore_index, inv_temperature, tanh_scale, HAS_BIAS, HAS_ENTROPY_GRAD,
                         SOFTCAP, HAS_ROW_GRADS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                             grad_logprobs: Tensor, grad_entropy: Tensor | None = None,
                             entropy: Tensor | None = None, *, inv_temperature: float, ignore_index: int,
                             vocab_start: int = 0, need_grad_hidden: bool = True, need_grad_weight: bool = True,
                             need_grad_bias: bool = False, deterministic: bool = False,
                             workspace_bytes: int | None = None, logit_scale: float = 1.0,
                             logit_softcap: float | None = None, grad_lse: Tensor | None = None,
                             grad_logit_sum: Tensor | None = None,
                             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of sum_n g_lp[n] * logprob[n] + g_ent[n] * entropy[n] + g_lse[n] * lse[n] + g_sum[n] * logit_sum[n]
    w.r.t. hidden, weight and bias (`logit_sum` = sum_v z_v).

    hidden [N, H], weight [V, H] (rows are global vocab ids vocab_start ..), bias [V] or None, all of one dtype
    (fp32/fp16/bf16) or fp16/bf16 hidden with an fp32 weight and bias; targets [N] int64; lse, grad_logprobs and
    (both or neither) grad_entropy, entropy, and the optional grad_lse, grad_logit_sum: fp32 [N], lse and entropy
    being the GLOBAL per-row values; the logits transformed by `logit_scale` and `logit_softcap` as in
    `lse_forward` (lse and logit_sum are of the transformed, tempered logits). Callers zero the upstream gradients
    at ignored rows; those rows get exactly 0 either way. Non-contiguous inputs are copied (`.contiguous()`).
    Returns fp32 grad_hidden [N, H], grad_weight [V, H], grad_bias [V], each None unless asked for.

    Writes (default): program p of the 1-D grid cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V) owns one (token block, vocab
    block) tile and adds into grad_hidden[token block], grad_weight[vocab block] and grad_bias[vocab block] with
    fp32 atomic adds only (outputs start at zero); nothing else is written.
    `deterministic=True`: no atomics, bitwise the same gradients on every run (`_atomic_free_backward`), at the
    price of a workspace of about `workspace_bytes` (None: `WORKSPACE_BYTES`; at least one token block).
    """
    check_device(hidden.device)
    if (grad_entropy is None) != (entropy is None):
        raise ValueError("grad_entropy and entropy: expected both or neither, got only one")
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    lse, grad_logprobs = lse.float().contiguous(), grad_logprobs.float().contiguous()
    if grad_entropy is not None:
        grad_entropy, entropy = grad_entropy.float().contiguous(), entropy.float().contiguous()
    row_grads = None  # [2, N]: g_lse, g_sum (one flag: a missing one is zeros)
    if grad_lse is not None or grad_logit_sum is not None:
        row_grads = torch.stack([torch.zeros_like(lse) if g is None else g.float() for g in (grad_lse, grad_logit_sum)])
    (n, h), v = hidden.shape, weight.shape[0]
    need_grad_bias = need_grad_bias and bias is not None

    def zeros_if(needed: bool, *shape: int) -> Tensor | None:
        return torch.zeros(*shape, device=hidden.device, dtype=torch.float32) if needed else None

    grad_hidden, grad_weight, grad_bias = zeros_if(need_grad_hidden, n, h), zeros_if(need_grad_weight, v, h), \
        zeros_if(need_grad_bias, v)
    if n == 0 or not (need_grad_hidden or need_grad_weight or need_grad_bias):
        return grad_hidden, grad_weight, grad_bias

    if deterministic:
        _atomic_free_backward(hidden, weight, bias, targets, lse, grad_logprobs, grad_entropy, entropy, row_grads,
                              grad_hidden, grad_weight, grad_bias,
                              transform=transform_args(inv_temperature, logit_scale, logit_softcap),
                              softcap=logit_softcap is not None, ignore_index=ignore_index, vocab_start=vocab_start,
                              workspace_bytes=WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes)
        return grad_hidden, grad_weight, grad_bias
    cfg = logprobs_backward_config(weight.dtype, h=h, arch=target_arch(hidden.device), interpret=interpreting())
    grid = (triton.cdiv(n, cfg.BLOCK_N) * triton.cdiv(v, cfg.BLOCK_V),)
    unused = lse  # stands in for the pointers a constexpr flag switches off (never dereferenced)
    _logprobs_backward_kernel[grid](
        hidden, weight, bias if bias is not None else unused, targets,
        lse, grad_logprobs, grad_entropy if grad_entropy is not None else unused,
        entropy if entropy is not None else unused, row_grads[0] if row_grads is not None else unused,
        row_grads[1] if row_grads is not None else unused,
        grad_hidden if grad_hidden is not None else unused, grad_weight if grad_weight is not None else unused,
        grad_bias if grad_bias is not None else unused,
        n, v, h, vocab_start, ignore_index, *transform_args(inv_temperature, logit_scale, logit_softcap),
        HAS_BIAS=bias is not None, HAS_ENTROPY_GRAD=grad_entropy is not None, SOFTCAP=logit_softcap is not None,
        HAS_ROW_GRADS=row_grads is not None,
        COMPUTE_GRAD_HIDDEN=need_grad_hidden, COMPUTE_GRAD_WEIGHT=need_grad_weight, COMPUTE_GRAD_BIAS=need_grad_bias,
        **cfg.constexprs(), **cfg.launch_options(),
    )
    return grad_hidden, grad_weight, grad_bias


def workspace_rows(v: int, dtype: torch.dtype, workspace_bytes: int, block_n: int) -> int:
    """Rows of the atomic-free backward's logit-gradient workspace [rows, V]: as many whole token blocks as fit in
    `workspace_bytes` (at least one). Depends on V, the dtype and the budget only, never on N."""
    per_row = v * torch.empty((), dtype=dtype).element_size()
    return max(1, workspace_bytes // (per_row * block_n)) * block_n


def _atomic_free_backward(hidden, weight, bias, targets, lse, grad_logprobs, grad_entropy, entropy, row_grads,
                          grad_hidden, grad_weight, grad_bias, *, transform, softcap, ignore_index, vocab_start,
                          workspace_bytes):
    """The atomic-free scheme, into the zero-initialized fp32 outputs that are not None (`transform`: the scalars of
    `lse_forward.transform_args`, `softcap`: the SOFTCAP flag). The rows go in chunks of `workspace_rows`, in row
    order; per chunk:
      1. `_logit_grad_kernel`: dz [rows, V] (the weight's dtype, as the atomic kernel feeds its tensor cores), each
         logit tile recomputed once;
      2. grad_hidden[chunk] = dz @ weight (K = V), grad_weight += dz.T @ hidden[chunk], grad_bias += dz.T @ 1
         (`matmul_into`: each output tile owned by one program, its K walked in order; the chunks add in row order).
    Three matmuls as the atomic kernel; extra traffic: dz written once and read twice, grad_weight read and written
    once per chunk."""
    interpret = interpreting()
    (n, h), v = hidden.shape, weight.shape[0]
    cfg = logit_grad_config(weight.dtype, h=h, interpret=interpret, softcap=softcap)
    chunk = workspace_rows(v, weight.dtype, workspace_bytes, cfg.BLOCK_N)
    dz = torch.empty(min(chunk, n), v, device=hidden.device, dtype=weight.dtype)
    unused = lse
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        m = rows.stop - start
        _logit_grad_kernel[(triton.cdiv(m, cfg.BLOCK_N) * triton.cdiv(v, cfg.BLOCK_V),)](
            hidden[rows], weight, bias if bias is not None else unused, targets[rows], lse[rows],
            grad_logprobs[rows], grad_entropy[rows] if grad_entropy is not None else unused,
            entropy[rows] if entropy is not None else unused, row_grads[0, rows] if row_grads is not None else unused,
            row_grads[1, rows] if row_grads is not None else unused, dz,
            m, v, h, vocab_start, ignore_index, *transform,
            HAS_BIAS=bias is not None, HAS_ENTROPY_GRAD=grad_entropy is not None, SOFTCAP=softcap,
            HAS_ROW_GRADS=row_grads is not None,
            **cfg.constexprs(), **cfg.launch_options(),
        )
        add_workspace_grads(dz[:m], hidden[rows], weight, None if grad_hidden is None else grad_hidden[rows],
                            grad_weight, grad_bias, interpret=interpret)


def add_workspace_grads(dz: Tensor, hidden: Tensor, weight: Tensor, grad_hidden: Tensor | None,
                        grad_weight: Tensor | None, grad_bias: Tensor | None, *, interpret: bool) -> None:
    """The atomic-free products of one chunk's logit gradients `dz [M, V]` (the weight's dtype) and its rows
    `hidden [M, H]`: grad_hidden [M, H] = dz @ weight, grad_weight += dz.T @ hidden, grad_bias += dz.T @ 1 (each
    None: skipped), with `matmul_into` (owned tiles, K in order)."""
    if grad_hidden is not None:
        matmul_into(grad_hidden, dz, weight, accumulate=False, interpret=interpret)
    if grad_weight is not None:
        matmul_into(grad_weight, dz.T, hidden, accumulate=True, interpret=interpret)
    if grad_bias is not None:
        ones = torch.ones(dz.shape[0], 1, device=dz.device, dtype=dz.dtype)
        matmul_into(grad_bias[:, None], dz.T, ones, accumulate=True, interpret=interpret)
