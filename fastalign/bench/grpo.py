"""``--op grpo`` (dapo, GSPO) and ``--op rloo``: completion losses against TRL's way on materialized logits."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..functional import fused_linear_grpo_loss, fused_linear_rloo_loss
from ..objectives.grpo import GRPOLossConfig, grpo_loss
from ..objectives.rloo import rloo_loss
from .harness import REGISTRY, Mode, OpBench, Problem, Step, Target, VariantFactory
from .ppo import make_ppo_inputs
from .variants import fused_loss, matmul_floor, placer, sequence_loss_modes


GRPO_SEQUENCES = 8
"""The issue's layout: B=8 completions of T = tokens / 8 (T=512 at N=4096), every token a completion token."""


class GRPOInputs(NamedTuple):
    """Inputs of the GRPO loss: ``hidden [B, T, H]``, ``weight [V, H]``, sampled ``targets [B, T]``, ``old_logprobs``
    (the current log-probs plus noise, so that some ratios are clipped), one advantage per completion ``[B]``."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    backend: str


def make_grpo_inputs(problem: Problem, sequences: int = GRPO_SEQUENCES) -> GRPOInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``."""
    ppo = make_ppo_inputs(problem, sequences)
    gen = torch.Generator().manual_seed(problem.seed + 1)
    return GRPOInputs(ppo.hidden, ppo.weight, ppo.targets, ppo.old_logprobs,
                      placer(problem)(torch.randn(sequences, generator=gen)), problem.backend)


def fused_grpo(**options) -> VariantFactory:
    """fused_linear_grpo_loss (entropy computed for TRL's metric, as TRL does), forward + backward."""

    def factory(x: GRPOInputs) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

        def step():
            out = fused_linear_grpo_loss(hidden, weight, x.targets, x.advantages, old_logprobs=x.old_logprobs,
                                         backend=x.backend, **options)
            return torch.autograd.grad(out.loss, [hidden, weight])

        return step

    return factory


def naive_completion_loss(loss_of: Callable[[Tensor, Tensor, Tensor, GRPOInputs], Tensor]) -> VariantFactory:
    """TRL's way: materialized logits, log_softmax, gather, entropy, then ``loss_of(logprobs, entropy, mask,
    inputs)`` (the same formulas as the fused op's); fwd + bwd."""

    def factory(x: GRPOInputs) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
        index, mask = x.targets.unsqueeze(-1), torch.ones(x.targets.shape, device=x.targets.device)

        def step():
            logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
            logprobs = logp.gather(-1, index).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            return torch.autograd.grad(loss_of(logprobs, entropy, mask, x), [hidden, weight])

        return step

    return factory


def naive_grpo(**options) -> VariantFactory:
    """TRL's GRPO on materialized logits (:func:`naive_completion_loss`)."""
    config = GRPOLossConfig(**options)
    return naive_completion_loss(lambda logprobs, entropy, mask, x: grpo_loss(
        logprobs, x.advantages.float(), mask, config, old_logprobs=x.old_logprobs.float(), entropy=entropy).loss)


GRPO_SEQUENCE_LEVEL = dict(loss_type="grpo", importance_sampling_level="sequence")
REGISTRY["grpo"] = OpBench(make_grpo_inputs, {
    "dapo": Mode(
        "GRPO loss, dapo, token-level ratios, fwd+bwd",
        {"fused": fused_grpo(loss_type="dapo"), "naive": naive_grpo(loss_type="dapo"), "3 matmuls": matmul_floor(3)},
        floor="3 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15))),
    "gspo": Mode(
        "GRPO loss, grpo, sequence-level ratios (GSPO), fwd+bwd (whole sequences per chunk)",
        {"fused": fused_grpo(**GRPO_SEQUENCE_LEVEL), "naive": naive_grpo(**GRPO_SEQUENCE_LEVEL),
         "3 matmuls": matmul_floor(3)},
        floor="3 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15))),
})


# --- RLOO: GRPO's inputs (old log-probs summed per completion) -------------------------------------------------


def fused_rloo(**options) -> VariantFactory:
    """fused_linear_rloo_loss (entropy computed for TRL's metric, as TRL does), forward + backward."""
    return fused_loss(lambda x, hidden, weight: fused_linear_rloo_loss(
        hidden, weight, x.targets, x.advantages, old_logprobs=x.old_logprobs, backend=x.backend, **options))


NAIVE_RLOO = naive_completion_loss(lambda logprobs, entropy, mask, x: rloo_loss(
    logprobs, x.advantages.float(), mask, old_logps=x.old_logprobs.float().sum(-1), entropy=entropy).loss)
REGISTRY["rloo"] = OpBench(make_grpo_inputs, sequence_loss_modes(
    "RLOO fwd+bwd, sequence ratio, old log-probs precomputed", fused_rloo, NAIVE_RLOO))
