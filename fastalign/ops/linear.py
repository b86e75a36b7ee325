"""The lm_head primitives on either backend, behind one signature: row statistics forward, log-prob backward."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from . import torch_backend
from .torch_backend import LinearGrads, RowStats


@dataclass(frozen=True)
class LinearOptions:
    """How the logits ``(hidden @ weight.T + bias) / temperature`` are formed and walked (backend already resolved)."""

    backend: str = "torch"
    temperature: float = 1.0
    ignore_index: int = -100
    chunk_size: int | None = None  # tokens per chunk on the torch backend; None sizes it from the memory budget

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


def lse_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, opts: LinearOptions, *,
                with_entropy: bool) -> RowStats:
    """Per-row log-sum-exp, target logit and (with entropy) expected logit, ``[N]`` each."""
    if opts.backend == "triton":
        from fastalign.kernels.lse_forward import linear_lse_forward

        return RowStats(*linear_lse_forward(hidden, weight, bias, targets, inv_temperature=opts.inv_temperature,
                                            ignore_index=opts.ignore_index, with_entropy=with_entropy))
    return torch_backend.linear_lse_forward(hidden, weight, bias, targets, inv_temperature=opts.inv_temperature,
                                            ignore_index=opts.ignore_index, with_entropy=with_entropy,
                                            chunk_size=opts.chunk_size)


def logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, stats: RowStats,
                      grad_logprobs: Tensor, grad_entropy: Tensor | None, opts: LinearOptions, *,
                      need_hidden: bool, need_weight: bool, need_bias: bool) -> LinearGrads:
    """Gradients of ``hidden``, ``weight`` and ``bias`` for upstream per-token gradients (0 at ignored rows)."""
    if opts.backend == "triton":
        from fastalign.kernels.logprobs_backward import linear_logprobs_backward

        entropy = None if grad_entropy is None else stats.lse - stats.expected_logit
        return LinearGrads(*linear_logprobs_backward(
            hidden, weight, bias, targets, stats.lse, grad_logprobs, grad_entropy, entropy,
            inv_temperature=opts.inv_temperature, ignore_index=opts.ignore_index, need_grad_hidden=need_hidden,
            need_grad_weight=need_weight, need_grad_bias=need_bias))
    return torch_backend.linear_logprobs_backward(
        hidden, weight, bias, targets, stats, grad_logprobs, grad_entropy, inv_temperature=opts.inv_temperature,
        ignore_index=opts.ignore_index, need_grad_hidden=need_hidden, need_grad_weight=need_weight,
        need_grad_bias=need_bias, chunk_size=opts.chunk_size)
