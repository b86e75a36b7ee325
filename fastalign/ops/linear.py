"""The lm_head primitives on either backend, behind one signature: row statistics forward, log-prob backward;
and the triton-only pieces of the fused PPO op (the PPO epilogue forward, the backward from a given lse). With a
vocabulary shard (``LinearOptions.shard``) the forward statistics are the global ones, merged across the group, and
the backward gives this shard's gradients (``vocab_parallel``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..objectives.ppo import LOG_RATIO_CLAMP, PPOLossConfig
from . import torch_backend
from .torch_backend import LinearGrads, RowStats, RowStatsSpec
from .vocab_parallel import VocabShard


@dataclass(frozen=True)
class LinearOptions:
    """How the logits ``softcap(logit_scale * (hidden @ weight.T + bias)) / temperature`` are formed and walked
    (backend already resolved); ``softcap(x) = logit_softcap * tanh(x / logit_softcap)``, none when None."""

    backend: str = "torch"
    temperature: float = 1.0
    ignore_index: int = -100
    chunk_size: int | None = None  # tokens per chunk on the torch backend; None sizes it from the memory budget
    shard: VocabShard | None = None  # this rank's vocabulary shard (vocab-parallel lm_head), None: the whole
    deterministic: bool = False  # batch-invariant, run-to-run deterministic (``torch_backend``; triton: fixed vocab
    # splits merged in order, the atomic-free backward of ``fastalign.kernels.logprobs_backward``)
    logit_scale: float = 1.0  # multiplies the raw logits (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``)
    logit_softcap: float | None = None  # Gemma 2/3's ``final_logit_softcapping``, after the scale

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def logit_args(self) -> dict:
        """The logit transform as the keyword arguments of the backends' entry points."""
        return dict(inv_temperature=self.inv_temperature, logit_scale=self.logit_scale,
                    logit_softcap=self.logit_softcap)

    @property
    def vocab_start(self) -> int:
        """Global vocabulary id of the weight's first row."""
        return 0 if self.shard is None else self.shard.vocab_start

    def finish_grads(self, grads: LinearGrads) -> LinearGrads:
        """Gradients of this weight (shard): with a vocab shard, ``d hidden`` reduced as ``shard`` says."""
        return grads if self.shard is None else self.shard.finish_grads(grads)


def lse_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, opts: LinearOptions, *,
                spec: RowStatsSpec = RowStatsSpec()) -> RowStats:
    """Per-row log-sum-exp, target logit and the statistics ``spec`` asks for, ``[N]`` each; over the whole
    vocabulary (merged across the group) with a vocab shard."""
    if opts.backend == "triton":
        from fastalign.kernels.lse_forward import linear_lse_forward

        stats = linear_lse_forward(hidden, weight, bias, targets, **opts.logit_args,
                                   ignore_index=opts.ignore_index, vocab_start=opts.vocab_start, spec=spec,
                                   deterministic=opts.deterministic)
    else:
        stats = torch_backend.linear_lse_forward(hidden, weight, bias, targets, **opts.logit_args,
                                                 ignore_index=opts.ignore_index, vocab_start=opts.vocab_start,
                                                 spec=spec, chunk_size=opts.chunk_size,
                                                 deterministic=opts.deterministic)
    return stats if opts.shard is None else opts.shard.all_reduce_stats(stats)


def logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, stats: RowStats,
                      grad_logprobs: Tensor, grad_entropy: Tensor | None, opts: LinearOptions, *,
                      need_hidden: bool, need_weight: bool, need_bias: bool, grad_lse: Tensor | None = None,
                      grad_logit_sum: Tensor | None = None) -> LinearGrads:
    """Gradients of ``hidden``, ``weight`` and ``bias`` for upstream per-token gradients (0 at ignored rows) w.r.t.
    the log-probs, the entropy, the lse and the sum of logits (``torch_backend.RowGrads``), from the global row
    statistics ``stats``; with a vocab shard, ``d weight``/``d bias`` of the shard (``finish_grads``)."""
    if opts.backend == "triton":
        return triton_logprobs_backward(hidden, weight, bias, targets, stats.lse, stats.entropy, grad_logprobs,
                                        grad_entropy, opts, need_hidden=need_hidden, need_weight=need_weight,
                                        need_bias=need_bias, grad_lse=grad_lse, grad_logit_sum=grad_logit_sum)
    return opts.finish_grads(torch_backend.linear_logprobs_backward(
        hidden, weight, bias, targets, stats, grad_logprobs, grad_entropy, **opts.logit_args,
        ignore_index=opts.ignore_index, vocab_start=opts.vocab_start, need_grad_hidden=need_hidden,
        need_grad_weight=need_weight, need_grad_bias=need_bias, chunk_size=opts.chunk_size,
        deterministic=opts.deterministic, grad_lse=grad_lse, grad_logit_sum=grad_logit_sum))


def triton_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                             entropy: Tensor | None, grad_logprobs: Tensor, grad_entropy: Tensor | None,
                             opts: LinearOptions, *, need_hidden: bool, need_weight: bool,
                             need_bias: bool, grad_lse: Tensor | None = None,
                             grad_logit_sum: Tensor | None = None) -> LinearGrads:
    """Triton: ``logprobs_backward`` from the global per-row ``lse`` and ``entropy`` ``[N]`` (the entropy is only
    used with ``grad_entropy``)."""
    from fastalign.kernels.logprobs_backward import linear_logprobs_backward

    return opts.finish_grads(LinearGrads(*linear_logprobs_backward(
        hidden, weight, bias, targets, lse, grad_logprobs, grad_entropy, None if grad_entropy is None else entropy,
        **opts.logit_args, ignore_index=opts.ignore_index, vocab_start=opts.vocab_start,
        need_grad_hidden=need_hidden, need_grad_weight=need_weight, need_grad_bias=need_bias,
        deterministic=opts.deterministic, grad_lse=grad_lse, grad_logit_sum=grad_logit_sum)))


def triton_ppo_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, opts: LinearOptions,
                       config: PPOLossConfig, *, old_logprobs: Tensor, advantages: Tensor,
                       ref_logprobs: Tensor | None, weights: Tensor, with_entropy: bool):
    """Triton: the log-sum-exp partials of the lm_head, then the PPO epilogue kernel on them, which merges the vocab
    splits and forms each token's weighted loss and its gradients. Returns the epilogue's per-token ``[N]`` outputs
    (``fastalign.kernels.ppo_epilogue.PPOEpilogueOutput``)."""
    from fastalign.kernels.ppo_epilogue import ppo_epilogue

    partials = triton_lse_partials(hidden, weight, bias, targets, opts, RowStatsSpec(entropy=with_entropy))
    return ppo_epilogue(partials, targets, old_logprobs, advantages, ref_logprobs, weights,
                        ignore_index=opts.ignore_index, cliprange=config.cliprange,
                        cliprange_high=config.cliprange_high, dual_clip=config.dual_clip, kl_coef=config.kl_coef,
                        kl_estimator=config.kl_estimator, entropy_coef=config.entropy_coef,
                        log_ratio_clamp=LOG_RATIO_CLAMP, with_entropy=with_entropy)


def triton_lse_partials(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, opts: LinearOptions,
                        spec: RowStatsSpec):
    """Triton: the vocab-split partials ``[num_splits, N]`` of the lm_head (``LsePartials``), for the epilogue
    kernels. With a vocab shard, the merged global statistics as a single split of max ``m`` (the global max logit
    with argmax, else the global lse), so that a merge returns them as they are: ``sumexp = exp(lse - m)``,
    ``sum_ez = sumexp (lse - m - H)``, ``sumexp2 = exp(lse2 - 2 m)``."""
    from fastalign.kernels.lse_forward import LsePartials, lse_forward_partials, merge_lse_partials

    partials = lse_forward_partials(hidden, weight, bias, targets, **opts.logit_args,
                                    ignore_index=opts.ignore_index, vocab_start=opts.vocab_start, spec=spec,
                                    deterministic=opts.deterministic)
    if opts.shard is None:
        return partials
    stats = opts.shard.all_reduce_stats(merge_lse_partials(partials, ordered=opts.deterministic))
    top = stats.lse if stats.argmax is None else stats.max_logit
    sumexp = torch.exp(stats.lse - top)
    sum_ez = None if stats.entropy is None else sumexp * ((stats.lse - top) - stats.entropy)
    sumexp2 = None if stats.lse2 is None else torch.exp(stats.lse2 - 2 * top)
    return LsePartials(*(None if t is None else t.unsqueeze(0) for t in (
        top, sumexp, sum_ez, stats.target_logit, sumexp2, stats.logit_sum, stats.argmax)))


def scale_precomputed_grads(grads: list[Tensor | None], grad_loss: Tensor) -> list[Tensor | None]:
    """Gradients formed in a loss's forward, times the upstream scalar ``grad_loss``.

    For the usual ``loss.backward()`` (``grad_loss == 1``) the saved tensors are returned as they are: no second
    ``[V, H]`` copy next to the saved weight gradient.
    """
    if bool(grad_loss == 1):
        return grads
    return [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
