"""Two heads over one vocabulary (distillation): TRL 1.16's generalized JSD between a student's and a teacher's
softmax (`fastalign.objectives.distill`, the single source of the formulas), tile by tile, and its gradient into the
student only.

With `lse_s`, `lse_t` the rows' global log-sum-exp of both heads' transformed, tempered logits (two launches of
`lse_forward`: the statistics pass), each (token block, vocab tile) recomputes both logit tiles (`logit_tile`), forms
`log p_s = z_s - lse_s`, `log p_t = z_t - lse_t` and, per `MODE`:
- `divergence_terms`: the per-row sums over the vocabulary of the divergence and of `KL(p_s || m)` (the JSD's
  gradient needs it; `m = (1 - beta) p_s + beta p_t`), partial per vocab split, summed afterwards (in split order
  when deterministic); shards of a vocabulary add theirs;
- `divergence_backward`: `d loss / d z_s` = `row_scale` times the divergence's closed-form gradient (+ the hard-label
  cross-entropy's `hard_scale (p_raw - onehot)` on the logits before the temperature), through the student's
  transform (`transform_grad`), then `dz @ W_s`, `dz.T @ h_s`, `dz.T @ 1` with atomics (`add_tile_grads`), or
  atomic-free through a workspace (`add_workspace_grads`) when deterministic. Nothing for the teacher.
Memory: O(tile) besides the [N] row vectors and the gradients (the deterministic workspace as in
`logprobs_backward`); never an [N, V].
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import check_device, interpreting
from .logprobs_backward import (WORKSPACE_BYTES, add_tile_grads, add_workspace_grads, grouped_tile,
                                workspace_rows)
from .lse_forward import (TileConfig, logit_tile, lse_forward_config, split_program, tiles_per_split, transform_args,
                          transform_grad)

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2  # the kernels' MODE: beta 0, beta 1, in between


class Head(NamedTuple):
    """One model's lm_head problem: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, its transform."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    logit_scale: float = 1.0
    logit_softcap: float | None = None


class HardLabels(NamedTuple):
    """The hard-label cross-entropy's part of the gradient: ``targets [N]`` int64 global ids, ``lse_raw [N]`` fp32
    (the student's global lse before the temperature), ``scale [N]`` fp32 (0 at ignored targets)."""

    targets: Tensor
    lse_raw: Tensor
    scale: Tensor


def divergence_config(student: Head, teacher: Head, *, interpret: bool = False, terms: bool = False) -> TileConfig:
    """Tiles of the kernels (two logit tiles live at once): the forward's H chunk for the wider of the two dtypes
    (fp32 anywhere: 3xTF32 dots) and hidden sizes that are multiples of 16 or not; 64 x 64 logit tiles, 8 warps,
    on sm_80 and sm_90 alike (docs/kernels.md lists their registers); small tiles under the interpreter. `terms`:
    the terms kernel's, 16-bit at 4 stages (at 3, ptxas capped it at 128 registers on sm_80 and spilled 8-24 B);
    the fp32 gradient tiles at 2 stages (at 3 the atomic backward spilled 40 B on sm_80 at 255 registers)."""
    wide = torch.float32 if torch.float32 in (student.weight.dtype, teacher.weight.dtype) else student.weight.dtype
    aligned = student.hidden.shape[1] % 16 == 0 and teacher.hidden.shape[1] % 16 == 0
    cfg = lse_forward_config(wide, h=16 if aligned else 1, interpret=interpret)
    if interpret:
        return cfg
    stages = (4 if wide != torch.float32 else 3) if terms else (2 if wide == torch.float32 else 3)
    return replace(cfg, BLOCK_N=64, BLOCK_V=64, num_warps=8, num_stages=stages)


def _mode(beta: float) -> int:
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD


@triton.jit
def _log_mixture(log_ps, log_pt, log_1mb, log_b):
    """log((1 - beta) p_s + beta p_t) from the log-probs (`log_1mb`, `log_b`: log(1 - beta), log(beta))."""
    a = log_ps + log_1mb
    b = log_pt + log_b
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _pair_log_probs(s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, lse_s_ptr,
                    lse_t_ptr, rows, cols, row_ok, col_ok, HS, HT, s_out_scale, s_tanh_scale, t_out_scale,
                    t_tanh_scale, S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SOFTCAP: tl.constexpr,
                    T_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Both heads' tiles: the student's logits z_s and the global log-probs log p_s, log p_t, fp32 [BLOCK_N,
    BLOCK_V] (finite at invalid rows and columns)."""
    zs = logit_tile(s_hidden_ptr, s_weight_ptr, s_bias_ptr, rows, cols, row_ok, col_ok, HS, s_out_scale,
                    s_tanh_scale, S_BIAS, S_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    zt = logit_tile(t_hidden_ptr, t_weight_ptr, t_bias_ptr, rows, cols, row_ok, col_ok, HT, t_out_scale,
                    t_tanh_scale, T_BIAS, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    return zs, zs - lse_s[:, None], zt - lse_t[:, None]


@triton.jit
def _divergence_terms_kernel(
    s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr,  # [N, HS], [V, HS], ... [V]
    lse_s_ptr, lse_t_ptr,  # fp32 [N], global
    div_ptr, aux_ptr,  # out: fp32 [num_splits, N]
    N, V, HS, HT, tiles_per_split, s_out_scale, s_tanh_scale, t_out_scale, t_tanh_scale, beta, log_1mb, log_b,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr,
    MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program p: one (token block, vocab split) in grouped order (as `_lse_forward_kernel`); the split's sums of
    the divergence and (JSD) of KL(p_s || m) per row."""
    split, rows, row_ok, v_begin, v_end = split_program(N, V, tiles_per_split, BLOCK_N, BLOCK_V, GROUP_N)
    div = tl.zeros([BLOCK_N], tl.float32)
    aux = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        _, log_ps, log_pt = _pair_log_probs(
            s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, lse_s_ptr, lse_t_ptr,
            rows, cols, row_ok, col_ok, HS, HT, s_out_scale, s_tanh_scale, t_out_scale, t_tanh_scale, S_BIAS, T_BIAS,
            S_SOFTCAP, T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        if MODE == 0:  # KL(p_t || p_s)
            d = tl.exp(log_pt) * (log_pt - log_ps)
        elif MODE == 1:  # KL(p_s || p_t)
            d = tl.exp(log_ps) * (log_ps - log_pt)
        else:  # beta KL(p_t || m) + (1 - beta) KL(p_s || m)
            log_m = _log_mixture(log_ps, log_pt, log_1mb, log_b)
            kl_s = tl.exp(log_ps) * (log_ps - log_m)
            aux += tl.sum(tl.where(col_ok[None, :], kl_s, 0.0), axis=1)
            d = beta * tl.exp(log_pt) * (log_pt - log_m) + (1.0 - beta) * kl_s
        div += tl.sum(tl.where(col_ok[None, :], d, 0.0), axis=1)  # padding columns take no part
    out = split.to(tl.int64) * N + rows
    tl.store(div_ptr + out, div, mask=row_ok)
    if MODE == 2:
        tl.store(aux_ptr + out, aux, mask=row_ok)


@triton.jit
def _divergence_grad_tile(
    s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, lse_s_ptr, lse_t_ptr, aux_ptr,
    row_scale_ptr, targets_ptr, lse_raw_ptr, hard_scale_ptr, rows, cols, row_ok, col_ok, HS, HT, vocab_start,
    ignore_index, temperature, s_out_scale, s_tanh_scale, t_out_scale, t_tanh_scale, beta, log_1mb, log_b,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr,
    MODE: tl.constexpr, HARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """d loss / d (h_s @ W_s.T + b_s), fp32 [BLOCK_N, BLOCK_V], 0 at invalid rows and columns."""
    zs, log_ps, log_pt = _pair_log_probs(
        s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, lse_s_ptr, lse_t_ptr, rows,
        cols, row_ok, col_ok, HS, HT, s_out_scale, s_tanh_scale, t_out_scale, t_tanh_scale, S_BIAS, T_BIAS, S_SOFTCAP,
        T_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    ps = tl.exp(log_ps)
    # The divergence's gradient w.r.t. the tempered z_s (`objectives.distill.divergence_logit_grads`).
    if MODE == 0:
        g = ps - tl.exp(log_pt)
    elif MODE == 1:
        aux = tl.load(aux_ptr + rows, mask=row_ok, other=0.0)
        g = ps * (log_ps - log_pt - aux[:, None])
    else:
        aux = tl.load(aux_ptr + rows, mask=row_ok, other=0.0)
        g = (1.0 - beta) * ps * (log_ps - _log_mixture(log_ps, log_pt, log_1mb, log_b) - aux[:, None])
    g = g * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HARD:  # + hard_scale (p_raw - onehot) on z_s * temperature, whose derivative is temperature times z_s's
        t = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
        y = tl.where(t != ignore_index, t - vocab_start, -1).to(tl.int32)  # -1: matches no column
        lse_raw = tl.load(lse_raw_ptr + rows, mask=row_ok, other=0.0)
        hard_scale = tl.load(hard_scale_ptr + rows, mask=row_ok, other=0.0) * temperature
        p_raw = tl.exp(zs * temperature - lse_raw[:, None])
        g += hard_scale[:, None] * (p_raw - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    keep = row_ok[:, None] & col_ok[None, :]
    return tl.where(keep, transform_grad(g, zs, s_out_scale, s_tanh_scale, S_SOFTCAP), 0.0)


@triton.jit
def _divergence_backward_kernel(
    s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, lse_s_ptr, lse_t_ptr, aux_ptr,
    row_scale_ptr, targets_ptr, lse_raw_ptr, hard_scale_ptr,  # fp32 [N] (targets int64)
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,  # fp32 [N, HS], [V, HS], [V], zero-initialized
    dz_ptr,  # STORE_DZ: out [N, V] in the student weight's dtype
    N, V, HS, HT, vocab_start, ignore_index, temperature, s_out_scale, s_tanh_scale, t_out_scale, t_tanh_scale, beta,
    log_1mb, log_b,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr,
    MODE: tl.constexpr, HARD: tl.constexpr, STORE_DZ: tl.constexpr, COMPUTE_GRAD_HIDDEN: tl.constexpr,
    COMPUTE_GRAD_WEIGHT: tl.constexpr, COMPUTE_GRAD_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program p: one (token block, vocab tile); adds its share to the student's gradients with atomics, or with
    STORE_DZ stores its logit gradient once (no atomics)."""
    rows, cols, row_ok, col_ok = grouped_tile(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    dz = _divergence_grad_tile(
        s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, lse_s_ptr, lse_t_ptr, aux_ptr,
        row_scale_ptr, targets_ptr, lse_raw_ptr, hard_scale_ptr, rows, cols, row_ok, col_ok, HS, HT, vocab_start,
        ignore_index, temperature, s_out_scale, s_tanh_scale, t_out_scale, t_tanh_scale, beta, log_1mb, log_b,
        S_BIAS, T_BIAS, S_SOFTCAP, T_SOFTCAP, MODE, HARD, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    if STORE_DZ:
        tl.store(dz_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    else:
        add_tile_grads(dz, s_hidden_ptr, s_weight_ptr, grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, rows, cols,
                       row_ok, col_ok, HS, COMPUTE_GRAD_HIDDEN, COMPUTE_GRAD_WEIGHT, COMPUTE_GRAD_BIAS, BLOCK_H,
                       DOT_PRECISION)


def _contiguous(head: Head) -> Head:
    bias = None if head.bias is None else head.bias.contiguous()
    return head._replace(hidden=head.hidden.contiguous(), weight=head.weight.contiguous(), bias=bias)


def _pair_args(student: Head, teacher: Head, inv_temperature: float, beta: float) -> tuple[tuple, tuple, dict]:
    """The launches' shared (pointers, scalars after the sizes, constexprs)."""
    unused = student.hidden  # stands in for a missing bias (never dereferenced)
    pointers = (student.hidden, student.weight, unused if student.bias is None else student.bias,
                teacher.hidden, teacher.weight, unused if teacher.bias is None else teacher.bias)
    log_1mb, log_b = (math.log(1 - beta), math.log(beta)) if 0 < beta < 1 else (0.0, 0.0)
    scalars = (*transform_args(inv_temperature, student.logit_scale, student.logit_softcap),
               *transform_args(inv_temperature, teacher.logit_scale, teacher.logit_softcap), float(beta), log_1mb,
               log_b)
    flags = dict(S_BIAS=student.bias is not None, T_BIAS=teacher.bias is not None,
                 S_SOFTCAP=student.logit_softcap is not None, T_SOFTCAP=teacher.logit_softcap is not None,
                 MODE=_mode(beta))
    return pointers, scalars, flags


def divergence_terms(student: Head, teacher: Head, lse_s: Tensor, lse_t: Tensor, *, inv_temperature: float,
                     beta: float, deterministic: bool = False) -> Tensor:
    """Per-row sums over this weight's vocabulary columns ``[2, N]`` fp32: the divergence and ``aux`` (JSD:
    ``KL(p_s || m)``; the KLs: the divergence again), from the GLOBAL ``lse_s``, ``lse_t`` fp32 ``[N]`` of the
    tempered, transformed logits. Heads as ``lse_forward``'s inputs (one vocabulary: the same rows of it), hidden
    sizes may differ. ``deterministic``: fixed vocab splits summed in split order (batch-invariant rows).

    Writes: each program of the 1-D grid cdiv(N, BLOCK_N) * num_splits owns one (token block, split) and alone
    writes its rows' partial sums for that split (no atomics); the splits are summed here in PyTorch.
    """
    check_device(student.hidden.device)
    student, teacher = _contiguous(student), _contiguous(teacher)
    n, v = student.hidden.shape[0], student.weight.shape[0]
    cfg = divergence_config(student, teacher, interpret=interpreting(), terms=True)
    n_row_blocks = triton.cdiv(n, cfg.BLOCK_N)
    n_vocab_tiles = triton.cdiv(v, cfg.BLOCK_V)
    sms = torch.cuda.get_device_properties(student.hidden.device).multi_processor_count \
        if student.hidden.is_cuda else None
    per_split = tiles_per_split(max(n_row_blocks, 1), n_vocab_tiles, cfg.BLOCK_V, sms, deterministic=deterministic,
                                group_n=cfg.GROUP_N)
    splits = triton.cdiv(n_vocab_tiles, per_split)
    partials = torch.zeros(2, splits, n, device=student.hidden.device, dtype=torch.float32)
    if n > 0:
        pointers, scalars, flags = _pair_args(student, teacher, inv_temperature, beta)
        _divergence_terms_kernel[(n_row_blocks * splits,)](
            *pointers, lse_s.float().contiguous(), lse_t.float().contiguous(), partials[0], partials[1],
            n, v, student.hidden.shape[1], teacher.hidden.shape[1], per_split, *scalars,
            **flags, **cfg.constexprs(), **cfg.launch_options(),
        )
    total = partials[:, 0]
    for split in range(1, splits):  # in split order: a row's sum never depends on N
        total = total + partials[:, split]
    if _mode(beta) != JSD:  # the KLs' aux is the divergence itself
        total = total[:1].expand(2, n)
    return total.contiguous()


def divergence_backward(student: Head, teacher: Head, lse_s: Tensor, lse_t: Tensor, aux: Tensor, row_scale: Tensor,
                        *, inv_temperature: float, beta: float, hard: HardLabels | None = None,
                        ignore_index: int = -100, vocab_start: int = 0, need_grad_hidden: bool = True,
                        need_grad_weight: bool = True, need_grad_bias: bool = False, deterministic: bool = False,
                        workspace_bytes: int | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. the student's hidden, weight and bias of ``sum_n row_scale[n] divergence[n]`` (+ with
    ``hard``: ``sum_n hard.scale[n] CE_n``, the cross-entropy of ``hard.targets`` on the student's logits before the
    temperature), from the GLOBAL ``lse_s``, ``lse_t`` and ``aux`` (``divergence_terms``'s second row) fp32 ``[N]``.
    The teacher gets nothing. Returns fp32 ``[N, HS]``, ``[V, HS]``, ``[V]`` (None unless asked for; this weight's
    vocabulary rows, global ids ``vocab_start ..``).

    Writes (default): program p of the 1-D grid cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V) owns one (token block, vocab
    tile) and adds into the three outputs with fp32 atomic adds only (they start at zero).
    `deterministic=True`: no atomics: per chunk of rows (`workspace_rows`), `_divergence_backward_kernel` with
    STORE_DZ writes each dz tile once into a workspace, then `add_workspace_grads` (owned output tiles, K in order).
    """
    check_device(student.hidden.device)
    student, teacher = _contiguous(student), _contiguous(teacher)
    (n, hs), v = student.hidden.shape, student.weight.shape[0]
    need_grad_bias = need_grad_bias and student.bias is not None

    def zeros_if(needed: bool, *shape: int) -> Tensor | None:
        return torch.zeros(*shape, device=student.hidden.device, dtype=torch.float32) if needed else None

    grads = zeros_if(need_grad_hidden, n, hs), zeros_if(need_grad_weight, v, hs), zeros_if(need_grad_bias, v)
    if n == 0 or not (need_grad_hidden or need_grad_weight or need_grad_bias):
        return grads
    rowwise = [t.float().contiguous() for t in (lse_s, lse_t, aux, row_scale)]
    if hard is None:
        rowwise += [rowwise[0]] * 3  # unused (HARD off; never dereferenced)
    else:
        rowwise += [hard.targets.contiguous(), hard.lse_raw.float().contiguous(), hard.scale.float().contiguous()]
    pointers, scalars, flags = _pair_args(student, teacher, inv_temperature, beta)
    flags["HARD"] = hard is not None
    cfg = divergence_config(student, teacher, interpret=interpreting())
    sizes = (v, hs, teacher.hidden.shape[1], vocab_start, ignore_index, 1.0 / inv_temperature)
    unused = rowwise[0]
    if not deterministic:
        _divergence_backward_kernel[(triton.cdiv(n, cfg.BLOCK_N) * triton.cdiv(v, cfg.BLOCK_V),)](
            *pointers, *rowwise, *(unused if g is None else g for g in grads), unused, n, *sizes, *scalars,
            **flags, STORE_DZ=False, COMPUTE_GRAD_HIDDEN=grads[0] is not None,
            COMPUTE_GRAD_WEIGHT=grads[1] is not None, COMPUTE_GRAD_BIAS=grads[2] is not None,
            **cfg.constexprs(), **cfg.launch_options(),
        )
        return grads
    interpret = interpreting()
    chunk = workspace_rows(v, student.weight.dtype, WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes,
                           cfg.BLOCK_N)
    dz = torch.empty(min(chunk, n), v, device=student.hidden.device, dtype=student.weight.dtype)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        m = rows.stop - start
        _divergence_backward_kernel[(triton.cdiv(m, cfg.BLOCK_N) * triton.cdiv(v, cfg.BLOCK_V),)](
            student.hidden[rows], *pointers[1:3], teacher.hidden[rows], *pointers[4:], *(t[rows] for t in rowwise),
            unused, unused, unused, dz, m, *sizes, *scalars, **flags, STORE_DZ=True, COMPUTE_GRAD_HIDDEN=False,
            COMPUTE_GRAD_WEIGHT=False, COMPUTE_GRAD_BIAS=False, **cfg.constexprs(), **cfg.launch_options(),
        )
        add_workspace_grads(dz[:m], student.hidden[rows], student.weight,
                            None if grads[0] is None else grads[0][rows], grads[1], grads[2], interpret=interpret)
    return grads
