"""Variant factories and modes shared by the op families: plain-matmul floors, input placement, a fused loss's
forward + backward, TRL's sequence sums on materialized logits, the modes of a sequence-level loss."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .harness import Mode, Problem, Step, Target, VariantFactory


def matmul_floor(count: int) -> VariantFactory:
    """``count`` plain ``[N, H] x [H, V]`` matmuls (``torch.mm``) into a ``[N, V]`` buffer allocated and touched at
    set-up: the compute floor of an op that needs ``count`` matmuls of that size. Inputs need ``hidden`` (``[N, H]``
    or ``[B, T, H]``, flattened to ``N = B*T`` rows) and ``weight``."""

    def factory(inputs) -> Step:
        hidden, weight_t = inputs.hidden.reshape(-1, inputs.hidden.shape[-1]), inputs.weight.t()
        out = torch.mm(hidden, weight_t)

        def step():
            for _ in range(count):
                torch.mm(hidden, weight_t, out=out)

        return step

    return factory


def placer(problem: Problem) -> Callable[[Tensor], Tensor]:
    """Moves a CPU tensor made from the seed to ``problem``'s device, floats to its dtype (ids keep theirs)."""

    def place(t: Tensor) -> Tensor:
        return t.to(device=problem.device, dtype=problem.torch_dtype if t.is_floating_point() else t.dtype)

    return place


def installed(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def naive_sequence_sums(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """TRL's ``get_batch_logps``: materialized logits, log_softmax, gather, masked sums ``[B]``."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    mask = targets != -100
    return (logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1), mask


def fused_loss(call: Callable[..., Any]) -> VariantFactory:
    """A fused loss op, forward + backward (trainable hidden and weight): ``call(inputs, hidden, weight)`` returns
    the op's output."""

    def factory(x) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(call(x, hidden, weight).loss, [hidden, weight])

    return factory


def sequence_loss_modes(title: str, fused: Callable[..., VariantFactory], naive: VariantFactory) -> dict[str, Mode]:
    """A sequence-level loss with the default chunks (whole groups, one pass) and with ``chunk_size=256`` (two
    passes), each against naive PyTorch and its matmul floor. The targets, one pair per plan (a token's gradient
    depends on its whole sequence: one pass holds a group's ``[rows, V]``, O(chunk) memory takes two passes): the
    one pass <= 0.90x naive time at <= 0.25x its memory, ``chunk_size=`` <= 0.10x naive memory at <= 1.20x its time."""
    return {"default": Mode(f"{title}, default settings (whole groups, one pass)",
                            {"fused": fused(), "naive": naive, "3 matmuls": matmul_floor(3)},
                            floor="3 matmuls",
                            targets=(Target("time", "naive", 0.90), Target("memory", "naive", 0.25))),
            "chunk256": Mode(f"{title}, chunk_size=256 (two passes)",
                             {"fused": fused(chunk_size=256), "naive": naive, "4 matmuls": matmul_floor(4)},
                             floor="4 matmuls",
                             targets=(Target("memory", "naive", 0.10), Target("time", "naive", 1.20)))}
