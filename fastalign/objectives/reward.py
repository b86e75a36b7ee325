"""Reward modeling: the Bradley-Terry loss on the scalar rewards of preference pairs (TRL's ``RewardTrainer``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       center_rewards_coefficient: float | None = None,
                       num_pairs: int | Tensor | None = None) -> Tensor:
    """``sum(-logsigmoid(r_c - r_r - margin)) / num_pairs``, plus ``center_rewards_coefficient *
    sum((r_c + r_r)^2) / num_pairs`` (Eisenstein et al. 2023, arXiv:2312.09244, eq. 2) when given.

    ``chosen``, ``rejected``: rewards ``[B]``; ``margin``: ``[B]`` or None (0). ``num_pairs``: the divisor of the
    sums (default ``B``: the means, as TRL's ``compute_loss``; a larger one makes the loss this batch's share of a
    mean over several micro-batches or ranks). Computed in fp32 (float64 stays float64)."""
    dtype = torch.float64 if chosen.dtype == torch.float64 else torch.float32
    chosen, rejected = chosen.to(dtype), rejected.to(dtype)
    difference = chosen - rejected if margin is None else chosen - rejected - margin.to(dtype)
    divisor = chosen.shape[0] if num_pairs is None else num_pairs
    loss = -F.logsigmoid(difference).sum() / divisor
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (chosen + rejected).square().sum() / divisor
    return loss


@torch.no_grad()
def reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """TRL's reward metrics of ``[B]`` pairs: ``accuracy`` (share with ``r_c > r_r``, ties wrong), ``margin`` (mean
    ``r_c - r_r``), ``min_reward``, ``mean_reward``, ``max_reward`` (over chosen and rejected)."""
    rewards = torch.cat([chosen, rejected]).float()
    difference = (chosen - rejected).float()
    return {"accuracy": (difference > 0).float().mean(), "margin": difference.mean(), "min_reward": rewards.min(),
            "mean_reward": rewards.mean(), "max_reward": rewards.max()}
