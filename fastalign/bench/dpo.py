"""``--op dpo``, ``dpo-ranking``, ``dpo-long-pair``: the fused DPO loss (pairs, rankings, WPO) against TRL-style
PyTorch and Liger-Kernel when installed."""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import fused_linear_dpo_loss
from .harness import ISSUE_PROBLEM, REGISTRY, Mode, OpBench, Problem, Step, Target, VariantFactory
from .variants import installed, matmul_floor, placer


DPO_PAIRS = 2
"""The issue's layout: B=2 pairs, 2B=4 sequences of T = tokens / 4 (T=1024 at N=4096)."""
DPO_BETA = 0.1  # fused_linear_dpo_loss's default


class DPOInputs(NamedTuple):
    """``hidden``/``ref_hidden`` ``[K*B, T, H]`` (K groups of B rows, best first; pairs: B chosen then B rejected),
    a shared lm_head ``weight [V, H]``, ``targets [K*B, T]`` (every token a response token: no prompt rows for the
    fused op to skip)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    ref_hidden: Tensor
    backend: str
    responses: int = 2


def make_dpo_inputs(problem: Problem, pairs: int = DPO_PAIRS, responses: int = 2) -> DPOInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``; ``tokens`` split into ``responses * pairs``
    rows."""
    gen = torch.Generator().manual_seed(problem.seed)
    rows = responses * pairs
    length, h, v = max(problem.tokens // rows, 1), problem.hidden_size, problem.vocab_size
    place = placer(problem)
    return DPOInputs(place(torch.randn(rows, length, h, generator=gen)),
                     place(torch.randn(v, h, generator=gen) * h ** -0.5),
                     place(torch.randint(0, v, (rows, length), generator=gen)),
                     place(torch.randn(rows, length, h, generator=gen)), problem.backend, responses)


def fused_dpo(**options) -> VariantFactory:
    """fused_linear_dpo_loss, reference computed in the call, forward + backward (trainable hidden and weight)."""

    def factory(x: DPOInputs) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

        def step():
            out = fused_linear_dpo_loss(hidden, weight, x.targets, ref_hidden=x.ref_hidden, ref_weight=x.weight,
                                        beta=DPO_BETA, backend=x.backend, num_responses=x.responses, **options)
            return torch.autograd.grad(out.loss, [hidden, weight])

        return step

    return factory


def naive_dpo(x: DPOInputs) -> Step:
    """TRL-style DPO in plain PyTorch: materialized logits, log_softmax, gather, masked sums, then the
    Plackett-Luce loss of the K groups (the sigmoid loss for pairs); the reference's sums from ``ref_hidden`` and
    the same weight under no_grad; forward + backward."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    mask = x.targets != -100
    index = x.targets.clamp(min=0).unsqueeze(-1)

    def sums(h: Tensor, w: Tensor) -> Tensor:
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        return (logp.gather(-1, index).squeeze(-1) * mask).sum(-1)

    def step():
        policy = sums(hidden, weight)
        with torch.no_grad():
            ref = sums(x.ref_hidden, x.weight)
        rewards = DPO_BETA * (policy - ref).view(x.responses, -1)
        tail_lse = torch.logcumsumexp(rewards.flip(0), dim=0).flip(0)
        loss = -(rewards - tail_lse)[:-1].sum(0).mean()
        return torch.autograd.grad(loss, [hidden, weight])

    return step


def naive_wpo(x: DPOInputs) -> Step:
    """TRL-style WPO-weighted sigmoid DPO (pairs) in plain PyTorch: materialized logits, each pair's loss times the
    detached ``exp`` of its responses' mean ``log p_y - log sum_v p_v^2``; forward + backward."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    mask = x.targets != -100
    index = x.targets.clamp(min=0).unsqueeze(-1)

    def sums(h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        token = logp.gather(-1, index).squeeze(-1)
        aligned = ((token - torch.logsumexp(2 * logp, dim=-1)) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return (token * mask).sum(-1), aligned.detach()

    def step():
        policy, log_weight = sums(hidden, weight)
        with torch.no_grad():
            ref = sums(x.ref_hidden, x.weight)[0]
        chosen, rejected = (policy - ref).view(2, -1)
        pair_weight = log_weight.view(2, -1).sum(0).exp()
        loss = (pair_weight * -F.logsigmoid(DPO_BETA * (chosen - rejected))).mean()
        return torch.autograd.grad(loss, [hidden, weight])

    return step


def liger_dpo(compiled: bool) -> VariantFactory:
    """Liger-Kernel's LigerFusedLinearDPOLoss (whole pairs per chunk), when installed."""

    def factory(x: DPOInputs) -> Step:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, compiled=compiled)
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

        def step():
            out = loss_fn(weight, hidden, x.targets, ref_input=x.ref_hidden, ref_weight=x.weight)
            return torch.autograd.grad(out[0] if isinstance(out, tuple) else out, [hidden, weight])

        return step

    return factory


_LIGER_DPO = {"liger": liger_dpo(False), "liger compiled": liger_dpo(True)} if installed("liger_kernel") else {}
_BEAT_LIGER_DPO = tuple(Target(metric, name, 1.0) for name in _LIGER_DPO for metric in ("time", "memory"))

REGISTRY["dpo"] = OpBench(make_dpo_inputs, {
    "default": Mode(
        "DPO fwd+bwd with the reference forward, default settings (whole pairs)",
        {"fused": fused_dpo(), "naive": naive_dpo, **_LIGER_DPO, "4 matmuls": matmul_floor(4)},
        floor="4 matmuls",
        targets=(Target("time", "naive", 0.88), Target("memory", "naive", 0.50), *_BEAT_LIGER_DPO)),
    "chunk256": Mode(
        "DPO fwd+bwd with the reference forward, chunk_size=256 (two passes)",
        {"fused": fused_dpo(chunk_size=256), "naive": naive_dpo, "5 matmuls": matmul_floor(5)},
        floor="5 matmuls", targets=(Target("time", "naive", 1.15), Target("memory", "naive", 0.10))),
    "wpo": Mode(
        "DPO with WPO weighting and TRL's vocabulary metrics (lse(2z), sum of logits, arg-max in the same pass)",
        {"fused": fused_dpo(use_weighting=True, vocab_metrics=True), "plain sigmoid": fused_dpo(),
         "naive": naive_wpo, "4 matmuls": matmul_floor(4)},
        floor="4 matmuls",
        targets=(Target("time", "plain sigmoid", 1.10), Target("memory", "plain sigmoid", 1.05))),
})
# One pair of T=16384 (32768 tokens, its default): naive needs >= 10x the memory of fused (~12 GB for naive).
# A ranking of K=4 responses to B=2 prompts of T=1024 tokens (8192 tokens at its default problem).
REGISTRY["dpo-ranking"] = OpBench(lambda problem: make_dpo_inputs(problem, pairs=2, responses=4), {
    "default": Mode("DPO ranking (Plackett-Luce), K=4 responses to B=2 prompts, fwd+bwd with the reference forward",
                    {"fused": fused_dpo(), "naive": naive_dpo, "4 matmuls": matmul_floor(4)},
                    floor="4 matmuls", targets=(Target("memory", "naive", 0.10),)),
}, replace(ISSUE_PROBLEM, tokens=8192))
REGISTRY["dpo-long-pair"] = OpBench(lambda problem: make_dpo_inputs(problem, pairs=1), {
    "default": Mode("DPO, one long pair, fwd+bwd with the reference forward",
                    {"fused": fused_dpo(), "naive": naive_dpo, "4 matmuls": matmul_floor(4)},
                    floor="4 matmuls", targets=(Target("memory", "naive", 0.10),)),
}, issue_problem=replace(ISSUE_PROBLEM, tokens=32768))
