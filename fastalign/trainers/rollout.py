"""PPO rollout math on ``[B, T]`` response tensors: EOS truncation, the KL penalty in the reward, GAE.

Follows TRL's ``PPOTrainer`` (``trl/trainer/ppo_trainer.py``): the score of a response is added to the reward of
its last token, every token's reward carries ``-kl_coef * kl``; ``mask [B, T]`` marks the response tokens (up to
and including the first EOS), and values and rewards are 0 past it, so the episode ends there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..objectives.ppo import kl_penalty


def truncate_at_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``responses [B, T]`` with the tokens after each row's first EOS set to ``pad_token_id``; the response mask
    ``[B, T]`` (bool, EOS included) and ``has_eos [B]`` (bool)."""
    is_eos = responses == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return responses.masked_fill(after_eos, pad_token_id), ~after_eos, is_eos.any(-1)


def rewards_with_kl(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float,
                    kl_estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl`` on every response token plus ``scores [B]`` on the last one;
    and the per-token ``kl [B, T]`` (``kl_estimator`` ``k1``/``k2``/``k3`` of ``logprobs - ref_logprobs``), both 0
    outside ``mask``. Every row needs at least one response token."""
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator).masked_fill(~mask, 0.0)
    rewards = -kl_coef * kl
    last = mask.long().sum(-1, keepdim=True) - 1
    return rewards.scatter_add(-1, last, scores.to(rewards.dtype).unsqueeze(-1)), kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16) over ``[B, T]``.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and ``r`` taken as
    0 outside ``mask`` (the episode ends after the last response token). Returns ``(advantages, returns =
    advantages + values)``, both 0 outside ``mask``.
    """
    values = values.masked_fill(~mask, 0.0)
    rewards = rewards.masked_fill(~mask, 0.0)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages.masked_fill(~mask, 0.0)
    return advantages, (advantages + values).masked_fill(~mask, 0.0)
