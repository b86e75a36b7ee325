"""PPO math on per-token tensors: policy ratio, clipped surrogate, value loss, KL estimators; and their aggregated
forms (``policy_loss_value``, ``value_loss_terms``) and TRL-named metrics (``ppo_metrics``), which the fused op, its
tests and the trainers' reference path all call.

The per-token functions are elementwise: inputs of any (broadcastable) shape, ``[B, T]`` or flat ``[N]``, in float32
or float64; outputs are per-token and differentiable with autograd. Reduce them with
``fastalign.objectives.aggregation``. Names follow TRL's ``PPOTrainer`` (``trl/trainer/ppo_trainer.py``)
and verl's ``core_algos`` (``verl/trainer/ppo/core_algos.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .aggregation import check_loss_agg, masked_mean

LOG_RATIO_CLAMP = 20.0
"""Bound on ``|log ratio|`` before ``exp`` (as verl): ratios stay within ``[e^-20, e^20]`` (about 2e-9 to
4.9e8), finite in float32; beyond the bound the ratio is constant and gets no gradient."""

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_clip_args(cliprange: float, cliprange_high: float | None, dual_clip: float | None) -> None:
    if not cliprange >= 0:
        raise ValueError(f"cliprange: expected a number >= 0, got {cliprange}")
    if cliprange_high is not None and not cliprange_high >= 0:
        raise ValueError(f"cliprange_high: expected a number >= 0 or None, got {cliprange_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip: expected a number > 1 or None, got {dual_clip}")


def _check_kl_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")


def policy_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Importance ratio ``pi / pi_old = exp(clamp(logprobs - old_logprobs, -C, C))``, ``C = LOG_RATIO_CLAMP``."""
    return torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


class PolicyLoss(NamedTuple):
    """Per-token outputs of ``clipped_policy_loss``, all of the broadcast input shape."""

    loss: torch.Tensor
    """Per-token policy loss (to minimize)."""
    ratio: torch.Tensor
    """``policy_ratio(logprobs, old_logprobs)``."""
    clipped: torch.Tensor
    """Bool: the clipped branch is active (``-A clip(r) > -A r``); its masked mean is ``policy/clipfrac``."""
    dual_clipped: torch.Tensor
    """Bool: the dual-clip floor ``-c A`` is active (only for ``A < 0``); all False without ``dual_clip``."""


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_high: float | None = None,
    dual_clip: float | None = None,
) -> PolicyLoss:
    """PPO clipped surrogate per token (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7).

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = policy_ratio(logprobs, old_logprobs)``,
    ``eps_low = cliprange`` and ``eps_high = cliprange_high`` if given, else ``cliprange`` (asymmetric
    "clip-higher": DAPO, Yu et al. 2025). With ``dual_clip = c > 1`` (Ye et al. 2020, "Mastering Complex
    Control in MOBA Games with Deep Reinforcement Learning", dual-clip PPO), tokens with ``A < 0`` get
    ``min(loss, -c A)``. Where a clip is active the loss is constant in ``logprobs`` (zero gradient);
    elsewhere ``d loss / d logprobs = -A r``.
    """
    _check_clip_args(cliprange, cliprange_high, dual_clip)
    eps_high = cliprange if cliprange_high is None else cliprange_high
    ratio = policy_ratio(logprobs, old_logprobs)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + eps_high)
    clipped = clipped_loss > unclipped_loss
    # torch.where rather than torch.maximum: at ties maximum splits the gradient between both branches.
    loss = torch.where(clipped, clipped_loss, unclipped_loss)
    if dual_clip is None:
        dual_clipped = torch.zeros_like(clipped)
    else:
        floor = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (loss > floor)
        loss = torch.where(dual_clipped, floor, loss)
    return PolicyLoss(loss, ratio, clipped, dual_clipped)


class ValueLoss(NamedTuple):
    """Per-token outputs of ``clipped_value_loss``."""

    loss: torch.Tensor
    """Per-token value loss (to minimize)."""
    clipped: torch.Tensor
    """Bool: the clipped branch is active; its masked mean is ``val/clipfrac``."""


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    cliprange_value: float = 0.2,
) -> ValueLoss:
    """Clipped value loss per token, as in TRL's ``PPOTrainer`` and OpenAI baselines' PPO2.

    ``loss = 0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)``, ``c = cliprange_value``.
    """
    if not cliprange_value >= 0:
        raise ValueError(f"cliprange_value: expected a number >= 0, got {cliprange_value}")
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (values_clipped - returns) ** 2
    clipped = clipped_loss > unclipped_loss
    return ValueLoss(0.5 * torch.where(clipped, clipped_loss, unclipped_loss), clipped)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman 2020, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html).

    With ``d = logprobs - ref_logprobs``: ``k1 = d`` (unbiased, can be negative), ``k2 = d^2 / 2`` (biased, low
    variance), ``k3 = exp(-d) + d - 1`` (unbiased, >= 0; verl's ``low_var_kl`` without its clamp of the result).
    For ``k3`` the exponent is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` like the policy ratio.
    """
    _check_kl_estimator(estimator)
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    log_ratio = torch.clamp(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # expm1(x) - x rather than exp(x) - x - 1: accurate near d = 0 and never rounds below 0
    return torch.expm1(log_ratio) - log_ratio


@dataclass(frozen=True)
class PPOLossConfig:
    """Options of the PPO loss; field names follow TRL's ``PPOConfig`` where TRL has them.

    ``kl_coef`` weights a KL term *in the loss* (verl's ``use_kl_loss``, GRPO's ``beta``); a trainer that
    puts the KL penalty into the rewards instead (TRL's PPO) keeps it at 0 here. ``vf_coef`` and ``loss_agg``
    are for the caller that combines the aggregated policy and value losses.
    """

    cliprange: float = 0.2
    cliprange_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    loss_agg: str = "token-mean"

    def __post_init__(self) -> None:
        _check_clip_args(self.cliprange, self.cliprange_high, self.dual_clip)
        _check_kl_estimator(self.kl_estimator)
        check_loss_agg(self.loss_agg)
        if not self.cliprange_value >= 0:
            raise ValueError(f"cliprange_value: expected a number >= 0, got {self.cliprange_value}")
        for name in ("kl_coef", "entropy_coef", "vf_coef"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number, got {getattr(self, name)}")
        for name in ("kl_coef", "vf_coef"):  # a negative weight rewards the KL / the value error (TRL: >= 0)
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")


class PPOTokenLosses(NamedTuple):
    """Per-token outputs of ``ppo_token_losses``."""

    loss: torch.Tensor
    """Total policy-side loss ``pg_loss + kl_coef * kl - entropy_coef * entropy``."""
    pg_loss: torch.Tensor
    """Clipped surrogate, ``clipped_policy_loss(...).loss``."""
    kl: torch.Tensor | None
    """``kl_penalty(logprobs, ref_logprobs, kl_estimator)``, or None without ``ref_logprobs``."""
    ratio: torch.Tensor
    clipped: torch.Tensor
    dual_clipped: torch.Tensor


def ppo_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    config: PPOLossConfig = PPOLossConfig(),
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> PPOTokenLosses:
    """Per-token policy-side PPO loss ``pg_loss + kl_coef * kl - entropy_coef * entropy`` and its pieces.

    Each term is included whenever its input is given (``ref_logprobs``, ``entropy``), so that with
    ``logprobs`` and ``entropy`` requiring grad, ``torch.autograd.grad((weights * out.loss).sum(),
    [logprobs, entropy])`` yields every token's gradient weights (``-entropy_coef * weights`` for entropy,
    zero when the coefficient is 0). A non-zero ``kl_coef`` / ``entropy_coef`` without its input raises
    ``ValueError``.
    """
    if config.kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when kl_coef != 0 (kl_coef={config.kl_coef})")
    if config.entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy is required when entropy_coef != 0 (entropy_coef={config.entropy_coef})")
    pg = clipped_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        cliprange=config.cliprange,
        cliprange_high=config.cliprange_high,
        dual_clip=config.dual_clip,
    )
    loss = pg.loss
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, config.kl_estimator)
        loss = loss + config.kl_coef * kl
    if entropy is not None:
        loss = loss - config.entropy_coef * entropy
    return PPOTokenLosses(loss, pg.loss, kl, pg.ratio, pg.clipped, pg.dual_clipped)


class PPOTokens(NamedTuple):
    """Per-token PPO inputs, flat ``[N]``: ``weights`` are the aggregation weights (0 where masked)."""

    old_logprobs: Tensor
    advantages: Tensor
    ref_logprobs: Tensor | None
    weights: Tensor

    def rows(self, rows: slice) -> PPOTokens:
        return PPOTokens(*(None if t is None else t[rows] for t in self))


def policy_loss_value(tokens: PPOTokens, config: PPOLossConfig, logprobs: Tensor, entropy: Tensor | None) -> Tensor:
    """The aggregated policy-side loss (surrogate + KL + entropy terms) for given per-token log-probs."""
    token_loss = ppo_token_losses(logprobs, tokens.old_logprobs, tokens.advantages, config,
                                  ref_logprobs=tokens.ref_logprobs, entropy=entropy).loss
    return (tokens.weights * token_loss).sum()


def ppo_metrics(tokens: PPOTokens, config: PPOLossConfig, mask: Tensor, logprobs: Tensor, entropy: Tensor | None,
                value_terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached scalar metrics under TRL's names, masked means over the response tokens: fp32 (float64 for float64
    log-probs), as every op's metrics."""
    parts = ppo_token_losses(logprobs, tokens.old_logprobs, tokens.advantages, config,
                             ref_logprobs=tokens.ref_logprobs, entropy=entropy)
    log_ratio = logprobs - tokens.old_logprobs
    metrics = {
        "loss/policy": (tokens.weights * parts.pg_loss).sum(),
        "policy/approxkl": masked_mean(0.5 * log_ratio ** 2, mask),
        "policy/clipfrac": masked_mean(parts.clipped.to(logprobs.dtype), mask),
        "policy/ratio_mean": masked_mean(parts.ratio, mask),
    }
    if config.dual_clip is not None:
        metrics["policy/dual_clipfrac"] = masked_mean(parts.dual_clipped.to(logprobs.dtype), mask)
    if parts.kl is not None:
        metrics["objective/kl"] = masked_mean(parts.kl, mask)
    if entropy is not None:
        metrics["objective/entropy"] = masked_mean(entropy, mask)
    metrics.update(value_terms)
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    return {k: v.detach().to(dtype) for k, v in metrics.items()}


class ValueHeadInputs(NamedTuple):
    """A linear value head ``weight [K, H]``, ``bias [K]`` and its targets ``old_values``, ``returns`` ``[..., K]``
    (``[...]`` for a scalar head)."""

    weight: Tensor
    bias: Tensor | None
    old_values: Tensor
    returns: Tensor


class ValueTerms(NamedTuple):
    loss: Tensor  # aggregated value loss (differentiable w.r.t. hidden and the value head)
    metrics: dict[str, Tensor]
    values: Tensor  # [N, K] detached


def value_loss_terms(hidden: Tensor, head: ValueHeadInputs, weights: Tensor, mask: Tensor,
                     cliprange_value: float) -> ValueTerms:
    """Clipped value loss of a linear value head on ``hidden [N, H]``: values ``[N, K]``.

    One ``[N, H] x [H, K]`` product from the same hidden rows (K is 1 for a scalar head); the per-token loss is the
    mean over the K outputs, aggregated with the policy's weights.
    """
    dtype = weights.dtype
    k = head.weight.shape[0]
    values = torch.nn.functional.linear(hidden.to(dtype), head.weight.to(dtype),
                                        None if head.bias is None else head.bias.to(dtype))
    old_values, returns = head.old_values.reshape(-1, k).to(dtype), head.returns.reshape(-1, k).to(dtype)
    vl = clipped_value_loss(values, old_values, returns, cliprange_value=cliprange_value)
    per_token = vl.loss.mean(dim=1)
    mask_k = mask.unsqueeze(1).expand_as(vl.clipped)
    metrics = {
        "loss/value": (weights * per_token.detach()).sum(),
        "val/clipfrac": masked_mean(vl.clipped.to(dtype), mask_k),
        "val/vpred": masked_mean(values.detach(), mask_k),
        "val/error": masked_mean((values.detach() - returns) ** 2, mask_k),
    }
    return ValueTerms((weights * per_token).sum(), metrics, values.detach())
