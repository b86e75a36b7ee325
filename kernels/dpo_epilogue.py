"""DPO epilogue of the fused linear log-softmax: per token, merge the vocab-split partials of `lse_forward_partials`
into lse and log-prob, and add the log-prob into its sequence's sum (the segment reduction), so that the per-token
log-probs never make a round trip through memory before the reduction.

The per-token lse and target logit are still written: the backward (`logprobs_backward`) needs them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lse_forward import LsePartials, merge_split_partials
from .token_epilogue import token_epilogue_config


@triton.jit
def _dpo_epilogue_kernel(
    max_ptr, sumexp_ptr, target_logit_ptr,  # split partials, fp32 [num_splits, N]
    targets_ptr, seq_ids_ptr,  # [N] int64: vocab ids, sequence of each token
    lse_ptr, target_out_ptr,  # out, fp32 [N]
    seq_sums_ptr,  # out, fp32 [num_sequences], zero-initialized, accumulated with atomics
    N, num_splits, ignore_index,
    BLOCK_N: tl.constexpr,
):
    """Program i: tokens [i*BLOCK_N, (i+1)*BLOCK_N): their lse and target logit, and their log-probs added into
    their sequences' sums."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N

    # Merge the vocab splits into the global lse and target logit (no entropy: sum_pz is never read).
    lse, _sumexp, _sum_pz, target_logit = merge_split_partials(max_ptr, sumexp_ptr, max_ptr, target_logit_ptr,
                                                               rows, row_ok, N, num_splits, False, BLOCK_N)

    # Log-prob of the target, 0 at ignored rows.
    t = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    logp = tl.where(t != ignore_index, target_logit - lse, 0.0)

    # Segment reduction: tokens of one sequence may span several programs, hence the atomics.
    seq = tl.load(seq_ids_ptr + rows, mask=row_ok, other=0)
    tl.atomic_add(seq_sums_ptr + seq, logp, mask=row_ok)

    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(target_out_ptr + rows, target_logit, mask=row_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dpo_sequence_sums(partials: LsePartials, targets: Tensor, seq_ids: Tensor, num_sequences: int, *,
                      ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token lse and target logit, and per-sequence sums of the token log-probs, from the split partials.

    partials: fp32 [num_splits, M] (`sum_pz` unused); targets [M] int64 (ignore_index rows add 0); seq_ids [M]
    int64 in [0, num_sequences). Returns fp32 lse [M], target_logit [M] and sums [num_sequences]
    (sums[s] = sum of target_logit - lse over the non-ignored tokens of sequence s; 0 for a sequence without any).

    Writes: program i of the 1-D grid cdiv(M, BLOCK_N) alone writes lse and target_logit of tokens
    i*BLOCK_N .. (i+1)*BLOCK_N - 1 (exactly one program per element); sums are accumulated by every program through
    fp32 `tl.atomic_add` (so their summation order, hence their last bits, may vary from run to run on a GPU).
    """
    device, m = partials.max.device, partials.max.shape[1]
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"fastalign.kernels: expected CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    lse = torch.empty(m, device=device, dtype=torch.float32)
    target_logit = torch.empty(m, device=device, dtype=torch.float32)
    sums = torch.zeros(num_sequences, device=device, dtype=torch.float32)
    if m > 0:
        cfg = token_epilogue_config(interpret=_interpreting())
        part_max, part_sumexp, part_target = (p.contiguous() for p in (partials.max, partials.sumexp,
                                                                         partials.target_logit))
        _dpo_epilogue_kernel[(triton.cdiv(m, cfg.BLOCK_N),)](
            part_max, part_sumexp, part_target, targets.contiguous(), seq_ids.contiguous(),
            lse, target_logit, sums,
            m, part_max.shape[0], ignore_index,
            **cfg.constexprs(), **cfg.launch_options(),
        )
    return lse, target_logit, sums
