"""``--op logprobs``: the fused log-prob op against materialized logits, forward only and fwd+bwd (trainable or frozen
weight)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import fused_linear_logprobs
from .harness import REGISTRY, Mode, OpBench, Problem, Step, Target, VariantFactory
from .variants import matmul_floor, placer


class LogprobInputs(NamedTuple):
    """Inputs of the log-prob op (no tensor requires grad; the variants make their own leaves)."""

    hidden: Tensor  # [N, H]
    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    targets: Tensor  # [N] int64
    grad_logprobs: Tensor  # [N] fp32 random upstream gradient on the log-probs
    backend: str


def make_logprob_inputs(problem: Problem) -> LogprobInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``."""
    gen = torch.Generator().manual_seed(problem.seed)
    n, h, v = problem.tokens, problem.hidden_size, problem.vocab_size
    place = placer(problem)
    hidden = place(torch.randn(n, h, generator=gen))
    weight = place(torch.randn(v, h, generator=gen) * h ** -0.5)
    bias = place(torch.randn(v, generator=gen)) if problem.bias else None
    targets = place(torch.randint(0, v, (n,), generator=gen))
    grad_logprobs = torch.randn(n, generator=gen).to(problem.device)
    return LogprobInputs(hidden, weight, bias, targets, grad_logprobs, problem.backend)


def fused_logprobs(x: LogprobInputs, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[N]`` log-probs from the fused op."""
    return fused_linear_logprobs(hidden, weight, x.targets, bias=bias, backend=x.backend)


def naive_logprobs(x: LogprobInputs, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[N]`` log-probs in plain PyTorch: the ``[N, V]`` logits and log-softmax are materialized."""
    logits = F.linear(hidden, weight, bias)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, x.targets.unsqueeze(-1)).squeeze(-1)


LogprobImpl = Callable[[LogprobInputs, Tensor, Tensor, Tensor | None], Tensor]


def logprobs_forward(impl: LogprobImpl) -> VariantFactory:
    """Forward only, under ``torch.no_grad()``."""

    def factory(x: LogprobInputs) -> Step:
        def step():
            with torch.no_grad():
                return impl(x, x.hidden, x.weight, x.bias)

        return step

    return factory


def logprobs_forward_backward(impl: LogprobImpl, *, train_weight: bool) -> VariantFactory:
    """Forward, then the gradients for the random upstream gradient: of ``hidden``, and of ``weight`` and ``bias``
    when ``train_weight`` (otherwise they are frozen)."""

    def factory(x: LogprobInputs) -> Step:
        hidden = x.hidden.detach().requires_grad_(True)
        weight = x.weight.detach().requires_grad_(train_weight)
        bias = None if x.bias is None else x.bias.detach().requires_grad_(train_weight)
        leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]

        def step():
            return torch.autograd.grad(impl(x, hidden, weight, bias), leaves, x.grad_logprobs)

        return step

    return factory


REGISTRY["logprobs"] = OpBench(make_logprob_inputs, {
    "trainable": Mode(
        "fwd+bwd, trainable weight",
        {"fused": logprobs_forward_backward(fused_logprobs, train_weight=True),
         "naive": logprobs_forward_backward(naive_logprobs, train_weight=True),
         "4 matmuls": matmul_floor(4)},
        floor="4 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "4 matmuls", 1.15))),
    "frozen": Mode(
        "fwd+bwd, frozen weight",
        {"fused": logprobs_forward_backward(fused_logprobs, train_weight=False),
         "naive": logprobs_forward_backward(naive_logprobs, train_weight=False),
         "2 matmuls": matmul_floor(2)},
        floor="2 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "2 matmuls", 1.20))),
    "forward": Mode(
        "forward only (no_grad)",
        {"fused": logprobs_forward(fused_logprobs),
         "naive": logprobs_forward(naive_logprobs),
         "1 matmul": matmul_floor(1)},
        floor="1 matmul", targets=(Target("memory", "naive", 0.10), Target("time", "1 matmul", 1.20))),
})
