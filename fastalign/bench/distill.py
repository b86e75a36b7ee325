"""``--op distill``: the fused distillation loss (generalized JSD) against both models' materialized logits and
Liger-Kernel when installed."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..functional import fused_linear_distill_loss
from .harness import REGISTRY, Mode, OpBench, Problem, Step, Target
from .logprobs import make_logprob_inputs
from .variants import fused_loss, installed, placer


DISTILL_BETA = 0.5  # the symmetric JSD: TRL's and Liger's beta agree there


class DistillInputs(NamedTuple):
    """Student ``hidden [N, H]`` and ``weight [V, H]``, teacher ``teacher_hidden [N, 2H]`` and ``teacher_weight
    [V, 2H]`` (the issue's sizes: a teacher twice as wide), ``targets [N]`` (Liger's API wants them)."""

    hidden: Tensor
    weight: Tensor
    teacher_hidden: Tensor
    teacher_weight: Tensor
    targets: Tensor
    backend: str


def make_distill_inputs(problem: Problem) -> DistillInputs:
    """Random inputs with logits of unit scale for both models, from ``problem.seed``."""
    x = make_logprob_inputs(problem)
    gen = torch.Generator().manual_seed(problem.seed + 2)
    n, h, v = problem.tokens, 2 * problem.hidden_size, problem.vocab_size
    place = placer(problem)
    return DistillInputs(x.hidden, x.weight, place(torch.randn(n, h, generator=gen)),
                         place(torch.randn(v, h, generator=gen) * h ** -0.5), x.targets, x.backend)


def naive_distill(x: DistillInputs) -> Step:
    """TRL's non-chunked way: both models' logits materialized, log-softmax, the generalized JSD; fwd + bwd of the
    student."""
    from ..objectives.distill import divergence_terms

    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

    def step():
        log_ps = torch.log_softmax((hidden @ weight.T).float(), -1)
        with torch.no_grad():
            log_pt = torch.log_softmax((x.teacher_hidden @ x.teacher_weight.T).float(), -1)
        return torch.autograd.grad(divergence_terms(log_ps, log_pt, DISTILL_BETA)[0].mean(), [hidden, weight])

    return step


def liger_distill(x: DistillInputs) -> Step:
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked PyTorch, compiled chunks), soft loss only."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=DISTILL_BETA)
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(loss_fn(hidden, weight, x.teacher_hidden, x.teacher_weight, x.targets),
                                       [hidden, weight])


def distill_floor(x: DistillInputs) -> Step:
    """The distillation loss's four matmuls: the student's and the teacher's logits (the teacher's twice as wide),
    ``d hidden`` and ``d weight`` of the student, into buffers allocated at set-up."""
    logits = torch.mm(x.hidden, x.weight.t())
    d_hidden, d_weight = torch.empty_like(x.hidden), torch.empty_like(x.weight)

    def step():
        torch.mm(x.hidden, x.weight.t(), out=logits)
        torch.mm(x.teacher_hidden, x.teacher_weight.t(), out=logits)
        torch.mm(logits, x.weight, out=d_hidden)
        torch.mm(logits.t(), x.hidden, out=d_weight)

    return step


_DISTILL_PEERS = {"liger": liger_distill} if installed("liger_kernel") else {}
REGISTRY["distill"] = OpBench(make_distill_inputs, {"fwd+bwd": Mode(
    f"Distillation, generalized JSD (beta={DISTILL_BETA}), teacher twice as wide, fwd+bwd of the student",
    {"fused": fused_loss(lambda x, hidden, weight: fused_linear_distill_loss(
        hidden, weight, x.teacher_hidden, x.teacher_weight, beta=DISTILL_BETA, backend="torch")),
     "naive": naive_distill, **_DISTILL_PEERS, "4 matmuls": distill_floor},
    floor="4 matmuls", targets=(Target("time", "4 matmuls", 1.15), Target("memory", "naive", 0.10),
                                *(Target("time", name, 1.0) for name in _DISTILL_PEERS)))})
