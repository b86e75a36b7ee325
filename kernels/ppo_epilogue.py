"""PPO epilogue of the fused linear log-softmax: per token, merge the vocab-split partials of `lse_forward_partials`
into lse, log-prob and entropy, then apply the PPO math and form the token's loss and its gradient weights.

The math is that of `fastalign.objectives.ppo.ppo_token_losses` (the single source of truth), with the gradients
derived by hand: d loss / d logp and d loss / d entropy, exactly as autograd gives them through its torch.where
branches and clamps. The backward kernel (`logprobs_backward`) then takes them as its upstream gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lse_forward import LsePartials, merge_split_partials
from .runtime import KernelConfig, check_device, interpreting

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class TokenEpilogueConfig(KernelConfig):
    """Block size and launch options of the epilogue kernel (the compile test builds exactly these)."""

    BLOCK_N: int
    num_warps: int
    num_stages: int


def token_epilogue_config(interpret: bool = False) -> TokenEpilogueConfig:
    """GPU config (4 tokens per thread); `interpret=True` gives small blocks, so that short test inputs still span
    several programs."""
    if interpret:
        return TokenEpilogueConfig(16, num_warps=1, num_stages=1)
    return TokenEpilogueConfig(512, num_warps=4, num_stages=1)


@triton.jit
def _expm1(x):
    """exp(x) - 1 without the cancellation near 0 (the interpreter has no libdevice): Taylor series to x^8 / 8!
    for |x| < 0.5 (truncation about 1e-8 relative), exp(x) - 1 beyond (no cancellation there)."""
    p = 1.0 / 40320
    p = p * x + 1.0 / 5040
    p = p * x + 1.0 / 720
    p = p * x + 1.0 / 120
    p = p * x + 1.0 / 24
    p = p * x + 1.0 / 6
    p = p * x + 0.5
    return tl.where(tl.abs(x) < 0.5, x + x * x * p, tl.exp(x) - 1.0)


@triton.jit
def _ppo_epilogue_kernel(
    max_ptr, sumexp_ptr, sum_ez_ptr, target_logit_ptr,  # split partials, fp32 [num_splits, N]
    targets_ptr, old_logprobs_ptr, advantages_ptr, ref_logprobs_ptr, weights_ptr,  # [N]: int64, fp32 x 4
    logprobs_ptr, entropy_ptr, lse_ptr, loss_ptr, grad_logprobs_ptr, grad_entropy_ptr,  # out, fp32 [N]
    clipped_ptr, dual_clipped_ptr,  # out, bool [N]
    N, num_splits, ignore_index,
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, log_ratio_clamp,
    HAS_DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program i: tokens [i*BLOCK_N, (i+1)*BLOCK_N), every output of each."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N

    # Merge the vocab splits: global lse, target logit and (with entropy) entropy.
    lse, entropy, target_logit = merge_split_partials(max_ptr, sumexp_ptr, sum_ez_ptr, target_logit_ptr,
                                                      rows, row_ok, N, num_splits, WITH_ENTROPY, BLOCK_N)

    # Log-prob of the target, 0 at ignored rows.
    t = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    valid = t != ignore_index
    logp = tl.where(valid, target_logit - lse, 0.0)

    old = tl.load(old_logprobs_ptr + rows, mask=row_ok, other=0.0)
    adv = tl.load(advantages_ptr + rows, mask=row_ok, other=0.0)
    w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0)

    # Ratio r = exp(clamp(logp - old, -C, C)); autograd's clamp passes the gradient only on [-C, C].
    log_ratio = logp - old
    ratio = tl.exp(tl.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp))
    d_ratio = tl.where((log_ratio >= -log_ratio_clamp) & (log_ratio <= log_ratio_clamp), ratio, 0.0)

    # Clipped surrogate: the branch -A clip(r) where it exceeds -A r (ties take -A r). When it is taken,
    # clip(r) != r, so r is outside the clip range and the branch is constant in logp: zero gradient.
    unclipped = -adv * ratio
    clipped_loss = -adv * tl.clamp(ratio, clip_low, clip_high)
    clipped = clipped_loss > unclipped
    loss = tl.where(clipped, clipped_loss, unclipped)
    grad_lp = tl.where(clipped, 0.0, -adv * d_ratio)

    # Dual clip: for A < 0 the loss is capped at -c A, constant in logp.
    if HAS_DUAL_CLIP:
        floor = -dual_clip * adv
        dual_clipped = (adv < 0) & (loss > floor)
        loss = tl.where(dual_clipped, floor, loss)
        grad_lp = tl.where(dual_clipped, 0.0, grad_lp)
    else:
        dual_clipped = tl.zeros([BLOCK_N], tl.int1)

    # KL(pi || pi_ref) estimate and its derivative in logp.
    if HAS_REF:
        ref = tl.load(ref_logprobs_ptr + rows, mask=row_ok, other=0.0)
        if KL_ESTIMATOR == "k1":
            # k1 = logp - ref
            kl = logp - ref
            d_kl = 1.0
        elif KL_ESTIMATOR == "k2":
            # k2 = (logp - ref)^2 / 2
            kl = 0.5 * (logp - ref) * (logp - ref)
            d_kl = logp - ref
        else:
            # k3 = expm1(x) - x with x = clamp(ref - logp, -C, C); d k3 / d logp = -expm1(x) inside the clamp.
            x = ref - logp
            x_c = tl.clamp(x, -log_ratio_clamp, log_ratio_clamp)
            em1 = _expm1(x_c)
            kl = em1 - x_c
            d_kl = tl.where((x >= -log_ratio_clamp) & (x <= log_ratio_clamp), -em1, 0.0)
        loss += kl_coef * kl
        grad_lp += kl_coef * d_kl

    # Entropy (0 at ignored rows) and its bonus -c_H * entropy.
    if WITH_ENTROPY:
        entropy = tl.where(valid, entropy, 0.0)
        loss -= entropy_coef * entropy
        tl.store(entropy_ptr + rows, entropy, mask=row_ok)
        tl.store(grad_entropy_ptr + rows, -entropy_coef * w, mask=row_ok)  # times the aggregation weight

    tl.store(logprobs_ptr + rows, logp, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    # Scale by the aggregation weight: the caller's loss is sum_n w_n * loss_n.
    tl.store(loss_ptr + rows, w * loss, mask=row_ok)
    tl.store(grad_logprobs_ptr + rows, w * grad_lp, mask=row_ok)
    tl.store(clipped_ptr + rows, clipped, mask=row_ok)
    tl.store(dual_clipped_ptr + rows, dual_clipped, mask=row_ok)


class PPOEpilogueOutput(NamedTuple):
    """Per-token outputs of `ppo_epilogue`, each [N]: fp32 unless stated."""

    logprobs: Tensor  # 0 at ignored rows
    entropy: Tensor | None  # 0 at ignored rows; with `with_entropy` only
    lse: Tensor  # global log-sum-exp of the tempered logits
    loss: Tensor  # weights * (pg_loss + kl_coef * kl - entropy_coef * entropy)
    grad_logprobs: Tensor  # d sum(loss) / d logprobs
    grad_entropy: Tensor | None  # d sum(loss) / d entropy = -entropy_coef * weights; with `with_entropy` only
    clipped: Tensor  # bool: the clipped branch is active (policy/clipfrac)
    dual_clipped: Tensor  # bool: the dual-clip floor is active (all False without dual_clip)


def ppo_epilogue(partials: LsePartials, targets: Tensor, old_logprobs: Tensor, advantages: Tensor,
                 ref_logprobs: Tensor | None, weights: Tensor, *, ignore_index: int, cliprange: float,
                 cliprange_high: float | None, dual_clip: float | None, kl_coef: float, kl_estimator: str,
                 entropy_coef: float, log_ratio_clamp: float, with_entropy: bool) -> PPOEpilogueOutput:
    """Per-token log-prob, entropy, lse, weighted PPO loss and its gradients from the split partials.

    partials: fp32 [num_splits, N] (`sum_ez` needed with `with_entropy`); targets [N] int64; old_logprobs,
    advantages, ref_logprobs (or None: no KL term) and weights (aggregation weights) [N], made fp32 contiguous.
    Options as `fastalign.objectives.ppo.PPOLossConfig` (cliprange_high None: symmetric; dual_clip None: off);
    `log_ratio_clamp` is `fastalign.objectives.ppo.LOG_RATIO_CLAMP`, passed in by the caller.

    Writes: program i of the 1-D grid cdiv(N, BLOCK_N) alone writes every output element of tokens
    i*BLOCK_N .. (i+1)*BLOCK_N - 1 (no atomics).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (kl_coef={kl_coef}), got None")
    if entropy_coef != 0 and not with_entropy:
        raise ValueError(f"with_entropy: expected True when entropy_coef != 0 (entropy_coef={entropy_coef}), got False")
    if with_entropy and partials.sum_ez is None:
        raise ValueError("partials.sum_ez: required with with_entropy (run lse_forward_partials with_entropy=True)")
    device, n = partials.max.device, partials.max.shape[1]
    check_device(device)

    def out(dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.empty(n, device=device, dtype=dtype)

    result = PPOEpilogueOutput(out(), out() if with_entropy else None, out(), out(), out(),
                               out() if with_entropy else None, out(torch.bool), out(torch.bool))
    if n > 0:
        cfg = token_epilogue_config(interpret=interpreting())
        unused = result.lse  # stands in for the pointers a constexpr flag switches off (never dereferenced)
        part_max, part_sumexp, part_target = (p.contiguous() for p in (partials.max, partials.sumexp,
                                                                         partials.target_logit))
        part_sum_ez = partials.sum_ez.contiguous() if with_entropy else unused
        old, adv, w = (t.float().contiguous() for t in (old_logprobs, advantages, weights))
        ref = ref_logprobs.float().contiguous() if ref_logprobs is not None else unused
        _ppo_epilogue_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](
            part_max, part_sumexp, part_sum_ez, part_target,
            targets.contiguous(), old, adv, ref, w,
            result.logprobs, result.entropy if with_entropy else unused, result.lse, result.loss,
            result.grad_logprobs, result.grad_entropy if with_entropy else unused,
            result.clipped, result.dual_clipped,
            n, part_max.shape[0], ignore_index,
            1.0 - cliprange, 1.0 + (cliprange if cliprange_high is None else cliprange_high),
            1.0 if dual_clip is None else float(dual_clip), float(kl_coef), float(entropy_coef),
            float(log_ratio_clamp),
            HAS_DUAL_CLIP=dual_clip is not None, HAS_REF=ref_logprobs is not None, KL_ESTIMATOR=kl_estimator,
            WITH_ENTROPY=with_entropy, **cfg.constexprs(), **cfg.launch_options(),
        )
    return result
