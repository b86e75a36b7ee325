"""RLOO on per-token log-probs: TRL 1.16's ``RLOOTrainer`` (``trl/trainer/rloo_trainer.py``), term for term, as two
functions: :func:`rloo_advantages` (``_generate_and_score_completions``: rewards to advantages) and :func:`rloo_loss`
(``_compute_loss``: the clipped sequence-level surrogate and its metrics).

Advantages, for ``N`` completions, the ``G = num_generations`` completions of a prompt consecutive:

1. ``R = sum_f w_f r_f`` over the reward functions (NaN scores skipped); ``R = NaN`` where every function returned
   NaN (an unscorable completion);
2. ``R = clamp(R, *reward_clip_range)``;
3. ``R = R - beta * kl`` with ``kl = sum_t (log pi_old - log pi_ref)`` over the completion tokens (the first-order
   log-ratio, summed per sequence: KL in the reward, not in the loss);
4. the leave-one-out baseline ``b_i = (sum_{j != i} R_j) / (n - 1)`` over the group's ``n`` scorable completions,
   ``A = R - b``;
5. with ``normalize_advantages``: ``A = (A - mean A) / (std A + 1e-4)`` over the whole batch (unbiased std);
6. NaN advantages (unscorable completions, groups with one scorable completion) become 0.

Loss, for the ``B`` completions of one micro-batch: ``logps = sum_t mask * log pi`` per completion, the ratio
``r = exp(logps - old_logps)`` of whole sequences (a sum of token log-ratios, not GSPO's mean), clipped to
``[1 - epsilon, 1 + epsilon_high]``, ``loss = mean_b -min(r A, clip(r) A)`` over all ``B`` completions (one without
completion tokens has ``r = 1`` and no gradient, and still counts in the mean, as TRL).

Where TRL and the RLOO paper (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740) differ, this module follows
TRL 1.16: the paper's estimator is REINFORCE, ``-A logps``, with no ratio and no clip (TRL's clipped ratio has the
same gradient on-policy, at ``r = 1``); ``normalize_advantages``, ``reward_clip_range``, ``epsilon_high`` and the
handling of unscorable completions are TRL's additions. One deliberate deviation: a ``reward_clip_range`` whose
minimum exceeds its maximum is refused (TRL's ``clamp`` would silently set every reward to the maximum). TRL's MoE
router loss (``router_aux_loss_coef``) is the model's, not the loss head's: it stays the caller's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .aggregation import nanstd


def _number(name: str, value, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RLOOOptions:
    """RLOO's options with TRL 1.16's ``RLOOConfig`` names and defaults (the single source of these defaults: the op
    and the trainer's config take theirs from here).

    epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]`` of the sequence ratio (``epsilon_high``
    None: ``epsilon``). beta: the KL coefficient in the reward. num_generations: completions per prompt (the group
    of the leave-one-out baseline; 1 gives zero advantages, as TRL's evaluation). normalize_advantages: scale the
    batch's advantages to mean 0, std 1. reward_clip_range: ``(min, max)`` clamp of the summed reward, or None.
    """

    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.05
    num_generations: int = 2
    normalize_advantages: bool = False
    reward_clip_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _number("epsilon", self.epsilon, minimum=0.0)
        if self.epsilon_high is not None:
            _number("epsilon_high", self.epsilon_high, minimum=0.0)
        _number("beta", self.beta)
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) or \
                self.num_generations < 1:
            raise ValueError(f"num_generations: expected an int >= 1, got {self.num_generations!r}")
        if not isinstance(self.normalize_advantages, bool):
            raise TypeError(f"normalize_advantages: expected a bool, got {self.normalize_advantages!r}")
        clip = self.reward_clip_range
        if clip is not None:
            if not isinstance(clip, (tuple, list)) or len(clip) != 2:
                raise ValueError(f"reward_clip_range: expected None or (min, max), got {clip!r}")
            for bound in clip:
                _number("reward_clip_range", bound)
            if clip[0] > clip[1]:
                raise ValueError(f"reward_clip_range: expected min <= max, got {clip!r}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class RLOOAdvantages(NamedTuple):
    """Output of :func:`rloo_advantages`: ``advantages [N]`` and TRL's reward metrics (0-d tensors): ``reward`` and
    ``reward_std`` (of the weighted rewards before clipping and KL), ``frac_reward_zero_std`` (groups whose rewards,
    after clipping and KL, have std 0)."""

    advantages: Tensor
    metrics: dict[str, Tensor]


def rloo_advantages(rewards_per_func: Tensor, reward_weights: Tensor, options: RLOOOptions = RLOOOptions(), *,
                    kl: Tensor | None = None) -> RLOOAdvantages:
    """RLOO's advantages of ``N`` completions (the whole generation batch of every process).

    Args:
        rewards_per_func: ``[N, F]`` scores of ``F`` reward functions (NaN: not applicable), the ``num_generations``
            completions of a prompt consecutive.
        reward_weights: ``[F]``.
        options: ``beta``, ``num_generations``, ``normalize_advantages``, ``reward_clip_range`` (``RLOOOptions``).
        kl: ``[N]`` per-completion ``sum_t (log pi_old - log pi_ref)`` over its completion tokens; required when
            ``beta != 0``.
    """
    n, g = rewards_per_func.shape[0], options.num_generations
    if n % g:
        raise ValueError(f"rewards_per_func: expected a multiple of num_generations={g} completions, got {n}")
    if options.beta != 0 and kl is None:
        raise ValueError(f"kl: required when beta != 0 (beta={options.beta}), got None")
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    weighted = (rewards_per_func * reward_weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    weighted = weighted.masked_fill(unscorable, float("nan"))
    rewards = weighted
    if options.reward_clip_range:
        rewards = rewards.clamp(min=options.reward_clip_range[0], max=options.reward_clip_range[1])
    if options.beta != 0:
        rewards = rewards - options.beta * kl.to(rewards)
    grouped = rewards.view(-1, g)
    std_rewards = nanstd(grouped, dim=1) if g > 1 else torch.zeros_like(grouped[:, 0])
    if g > 1:
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
        advantages = rewards - baselines.view(-1)
    else:
        advantages = torch.zeros_like(rewards)
    if options.normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    metrics = {"reward": torch.nanmean(weighted), "reward_std": nanstd(weighted),
               "frac_reward_zero_std": is_std_zero.float().mean()}
    return RLOOAdvantages(advantages, metrics)


class RLOOResult(NamedTuple):
    """Output of :func:`rloo_loss`: the scalar loss (differentiable w.r.t. ``logprobs``), TRL's metrics (detached
    0-d tensors) and the completions' log-probs ``logps [B]`` (detached)."""

    loss: Tensor
    metrics: dict[str, Tensor]
    logps: Tensor


def rloo_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor, options: RLOOOptions = RLOOOptions(), *,
              old_logps: Tensor | None = None, entropy: Tensor | None = None,
              num_sequences: int | None = None) -> RLOOResult:
    """The RLOO loss of a micro-batch of ``B`` completions and TRL's metrics.

    Args:
        logprobs: ``[B, T]`` per-token log-probs of the completions (differentiable).
        advantages: ``[B]``, one per completion (:func:`rloo_advantages`).
        mask: ``[B, T]`` completion tokens (bool or 0/1).
        options: ``epsilon``, ``epsilon_high`` (``RLOOOptions``).
        old_logps: ``[B]`` the completions' log-probs at sampling time (TRL's ``old_logps``: sums over the mask);
            None: on-policy (``logps`` detached, ratio exactly 1).
        entropy: ``[B, T]`` per-token entropy, for the ``entropy`` metric only.
        num_sequences: the completions of the whole batch when these are a part of it (the loss's mean divides by
            it); default B.

    Returns:
        ``RLOOResult(loss, metrics, logps)``; metrics under TRL's names: ``entropy`` (entropy given),
        ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``,
        ``clip_ratio/region_mean`` (shares of the ``B`` completions; min and max of those 0/1 values).
    """
    m = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    logps = (logprobs * m).sum(1)
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - options.epsilon, 1 + options.eps_high)
    losses = -torch.min(coef_1 * adv, coef_2 * adv)
    loss = losses.mean() if num_sequences is None else losses.sum() / num_sequences
    with torch.no_grad():
        metrics = {}
        if entropy is not None:
            metrics["entropy"] = (entropy * m).sum() / m.sum().clamp(min=1.0)
        low = ((coef_1 < 1 - options.epsilon) & (adv < 0)).to(m.dtype)
        high = ((coef_1 > 1 + options.eps_high) & (adv > 0)).to(m.dtype)
        metrics.update({"clip_ratio/low_mean": low.mean(), "clip_ratio/low_min": low.min(),
                        "clip_ratio/high_mean": high.mean(), "clip_ratio/high_max": high.max(),
                        "clip_ratio/region_mean": (low.bool() | high.bool()).to(m.dtype).mean()})
    return RLOOResult(loss, {k: v.detach() for k, v in metrics.items()}, logps.detach())
