"""``--op ppo``: the fused PPO loss with a value head against plain PyTorch."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..functional import fused_linear_logprobs, fused_linear_ppo_loss
from .harness import REGISTRY, Mode, OpBench, Problem, Step, Target
from .variants import matmul_floor, placer


PPO_SEQUENCES = 4
"""The issue's layout: B=4 sequences of T = tokens / 4 (T=1024 at N=4096)."""
PPO_CLIPRANGE, PPO_CLIPRANGE_VALUE, PPO_VF_COEF = 0.2, 0.2, 0.1  # fused_linear_ppo_loss's defaults


class PPOInputs(NamedTuple):
    """Inputs of the PPO loss with a linear value head on the same hidden states (every token a response token)."""

    hidden: Tensor  # [B, T, H]
    weight: Tensor  # [V, H]
    targets: Tensor  # [B, T] sampled ids
    old_logprobs: Tensor  # [B, T]: the current log-probs plus noise, so that some ratios are clipped
    advantages: Tensor  # [B, T]
    value_weight: Tensor  # [H]
    value_bias: Tensor  # []
    old_values: Tensor  # [B, T]
    returns: Tensor  # [B, T]
    backend: str


def make_ppo_inputs(problem: Problem, sequences: int = PPO_SEQUENCES) -> PPOInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``; ``tokens`` split into ``sequences`` rows."""
    gen = torch.Generator().manual_seed(problem.seed)
    length, h, v = max(problem.tokens // sequences, 1), problem.hidden_size, problem.vocab_size
    place = placer(problem)
    hidden = place(torch.randn(sequences, length, h, generator=gen))
    weight = place(torch.randn(v, h, generator=gen) * h ** -0.5)
    targets = place(torch.randint(0, v, (sequences, length), generator=gen))
    with torch.no_grad():
        current = fused_linear_logprobs(hidden, weight, targets, backend=problem.backend).float().cpu()
    noise = lambda scale: scale * torch.randn(sequences, length, generator=gen)  # noqa: E731
    return PPOInputs(hidden, weight, targets, place(current + noise(0.3)), place(noise(1.0)),
                     place(torch.randn(h, generator=gen) * h ** -0.5), place(torch.zeros(())),
                     place(noise(1.0)), place(noise(1.0)), problem.backend)


def _ppo_leaves(x: PPOInputs) -> list[Tensor]:
    """Trainable copies of hidden, lm_head weight, value-head weight and bias."""
    return [t.detach().requires_grad_(True) for t in (x.hidden, x.weight, x.value_weight, x.value_bias)]


def fused_ppo(x: PPOInputs) -> Step:
    """fused_linear_ppo_loss with the value head, token-mean, forward + backward."""
    leaves = _ppo_leaves(x)
    hidden, weight, value_weight, value_bias = leaves

    def step():
        out = fused_linear_ppo_loss(hidden, weight, x.targets, x.old_logprobs, x.advantages,
                                    value_head_weight=value_weight, value_head_bias=value_bias,
                                    old_values=x.old_values, returns=x.returns, cliprange=PPO_CLIPRANGE,
                                    cliprange_value=PPO_CLIPRANGE_VALUE, vf_coef=PPO_VF_COEF, backend=x.backend)
        return torch.autograd.grad(out.loss, leaves)

    return step


def naive_ppo(x: PPOInputs) -> Step:
    """PPO in plain PyTorch: materialized logits, log_softmax, gather, ratio, clipped surrogate, clipped value loss
    of the linear value head, token-mean; forward + backward."""
    leaves = _ppo_leaves(x)
    hidden, weight, value_weight, value_bias = leaves
    index = x.targets.unsqueeze(-1)

    def step():
        logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(-1, index).squeeze(-1)
        ratio = torch.exp(logprobs - x.old_logprobs)
        clipped_ratio = ratio.clamp(1 - PPO_CLIPRANGE, 1 + PPO_CLIPRANGE)
        policy = torch.maximum(-x.advantages * ratio, -x.advantages * clipped_ratio)
        values = (hidden @ value_weight + value_bias).float()
        values_clipped = x.old_values + (values - x.old_values).clamp(-PPO_CLIPRANGE_VALUE, PPO_CLIPRANGE_VALUE)
        value = 0.5 * torch.maximum((values - x.returns) ** 2, (values_clipped - x.returns) ** 2)
        loss = policy.mean() + PPO_VF_COEF * value.mean()
        return torch.autograd.grad(loss, leaves)

    return step


REGISTRY["ppo"] = OpBench(make_ppo_inputs, {
    "fwd+bwd": Mode(
        "PPO loss with value head, fwd+bwd",
        {"fused": fused_ppo, "naive": naive_ppo, "3 matmuls": matmul_floor(3)},
        floor="3 matmuls",
        targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15), Target("time", "naive", 1.0))),
})
