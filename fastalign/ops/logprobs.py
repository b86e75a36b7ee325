"""Fused per-token log-probs (and entropy) from hidden states and the lm_head weight: the autograd function."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import torch_backend
from .chunking import check_chunk_size
from .dispatch import resolve_backend
from .linear import LinearOptions, logprobs_backward, lse_forward
from .registered import registered_token_stats
from .torch_backend import RowStats, RowStatsSpec
from .validation import (LinearInputs, check_logit_transform, check_temperature, require_bool,
                         validate_linear_inputs)
from .vocab_parallel import vocab_shard


DETERMINISTIC_ENV = "FASTALIGN_DETERMINISTIC"


def resolve_deterministic(deterministic) -> bool:
    """``deterministic`` (a bool, or None: on when ``torch.are_deterministic_algorithms_enabled()`` or
    ``$FASTALIGN_DETERMINISTIC=1``)."""
    if deterministic is None:
        raw = os.environ.get(DETERMINISTIC_ENV, "0")
        if raw not in ("0", "1"):
            raise ValueError(f"${DETERMINISTIC_ENV}: expected 0 or 1, got {raw!r}")
        deterministic = raw == "1" or torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool or None, got {type(deterministic).__name__}")
    return deterministic


def prepare_linear(hidden, weight, targets, bias, *, temperature, ignore_index, backend, chunk_size, check_finite,
                   process_group=None, reduce_hidden_grad=True, deterministic=False, logit_scale=1.0,
                   logit_softcap=None) -> tuple[LinearInputs, LinearOptions]:
    """Validate the lm_head inputs of an op and resolve its options (shared by every fused op); with a
    ``process_group``, ``weight``/``bias`` are this rank's vocabulary shard (one all-gather of the shard sizes)."""
    deterministic = resolve_deterministic(deterministic)
    require_bool("check_finite", check_finite)
    require_bool("reduce_hidden_grad", reduce_hidden_grad)
    shard = vocab_shard(process_group, weight, bias, reduce_hidden_grad=reduce_hidden_grad, check_finite=check_finite)
    inputs = validate_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                                    check_finite=check_finite, vocab_size=None if shard is None else shard.vocab_size)
    resolved = resolve_backend(backend, inputs.hidden.device)
    opts = LinearOptions(resolved, check_temperature(temperature), int(ignore_index), check_chunk_size(chunk_size),
                         shard, deterministic, *check_logit_transform(logit_scale, logit_softcap))
    if opts.backend == "triton" and inputs.hidden.dtype == torch.float64:
        raise TypeError("hidden: backend='triton' takes float32, float16 or bfloat16 inputs, got torch.float64 "
                        "(use backend='torch' for float64)")
    return inputs, opts


def token_outputs(stats: RowStats, valid: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[N]`` and entropy ``[N]`` from row statistics, 0 at ignored rows."""
    logprobs = torch.where(valid, stats.target_logit - stats.lse, 0.0)
    entropy = torch.where(valid, stats.entropy, 0.0) if with_entropy else None
    return logprobs, entropy


class LinearLogProbs(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, targets [N]) -> logprobs [N]`` (and ``entropy [N]``).

    Saves the inputs and per-row statistics only. With a frozen weight and bias on the torch backend the forward
    also forms the per-row softmax moments of the weight, so the backward is elementwise (two matmuls in all); not
    with a vocab shard, whose moments would need the global lse inside the pass, nor with a softcap, whose
    derivative varies per logit (three matmuls then).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, opts: LinearOptions,
                with_entropy: bool):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        valid = targets != opts.ignore_index
        ctx.opts, ctx.with_entropy, ctx.dtypes = opts, with_entropy, (hidden.dtype, weight.dtype, weight.dtype)
        ctx.frozen_weight = (opts.backend == "torch" and opts.shard is None and opts.logit_softcap is None
                             and need_hidden and not (need_weight or need_bias))
        if ctx.frozen_weight:
            stats, moments = torch_backend.linear_weight_moments(
                hidden, weight, bias, targets, inv_temperature=opts.inv_temperature, ignore_index=opts.ignore_index,
                spec=RowStatsSpec(entropy=with_entropy), chunk_size=opts.chunk_size, deterministic=opts.deterministic,
                logit_scale=opts.logit_scale)
            ctx.save_for_backward(weight, targets, valid, *moments)
        else:
            stats = lse_forward(hidden, weight, bias, targets, opts, spec=RowStatsSpec(entropy=with_entropy))
            ctx.save_for_backward(hidden, weight, bias, targets, valid, *stats[:3])
        ctx.set_materialize_grads(False)
        logprobs, entropy = token_outputs(stats, valid, with_entropy)
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None = None):
        opts = ctx.opts
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.frozen_weight:
            weight, targets, valid, *moments = ctx.saved_tensors
            dtype = moments[0].dtype
        else:
            hidden, weight, bias, targets, valid, *stats = ctx.saved_tensors
            stats = RowStats(*stats)
            dtype = stats.lse.dtype
        # Upstream gradients in the compute dtype, 0 at ignored rows (and for an unused output).
        zeros = torch.zeros(targets.shape, dtype=dtype, device=targets.device)
        grad_lp = zeros if grad_logprobs is None else torch.where(valid, grad_logprobs.to(dtype), 0.0)
        grad_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.to(dtype), 0.0)
        if ctx.frozen_weight:
            grad_hidden = torch_backend.hidden_grad_from_moments(
                weight, targets, torch_backend.WeightMoments(*moments), grad_lp, grad_ent,
                inv_temperature=opts.inv_temperature, ignore_index=opts.ignore_index, logit_scale=opts.logit_scale)
            return grad_hidden.to(ctx.dtypes[0]), None, None, None, None, None
        grads = logprobs_backward(hidden, weight, bias, targets, stats, grad_lp, grad_ent, opts,
                                  need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        cast = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return cast[0], cast[1], cast[2], None, None, None


def linear_logprobs(inputs: LinearInputs, opts: LinearOptions, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Flat ``[N]`` log-probs (and entropy), through autograd only when a gradient can be needed."""
    if torch.compiler.is_compiling():  # the registered op (ops.registered): two passes when differentiated
        logprobs, entropy, _ = registered_token_stats(inputs.hidden, inputs.weight, inputs.bias, inputs.targets,
                                                      opts, RowStatsSpec(entropy=with_entropy))
        return logprobs, entropy
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (inputs.hidden, inputs.weight, inputs.bias))
    if needs_grad:
        out = LinearLogProbs.apply(inputs.hidden, inputs.weight, inputs.bias, inputs.targets, opts, with_entropy)
        return out if with_entropy else (out, None)
    stats = lse_forward(inputs.hidden, inputs.weight, inputs.bias, inputs.targets, opts,
                        spec=RowStatsSpec(entropy=with_entropy))
    return token_outputs(stats, inputs.targets != opts.ignore_index, with_entropy)
