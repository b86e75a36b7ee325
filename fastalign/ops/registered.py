"""The lm_head core as registered operators (``torch.library.custom_op``, namespace ``fastalign``), so that
``torch.compile(fullgraph=True)`` traces through every fused op.

- ``fastalign::token_stats(hidden [N, H], weight [V, H], bias [V]?, targets [N], <options>, <spec>)``
  ``-> (logprobs [N], entropy [N], lse [N], target_logit [N], lse2 [N], logit_sum [N], max_logit [N], argmax [N])``:
  the statistics pass (``linear.lse_forward``); the statistics the spec does not ask for are empty ``[0]``
  tensors. Differentiable in ``logprobs``, ``entropy``, ``lse`` and ``logit_sum`` (the other outputs are not).
- ``fastalign::logprobs_backward(hidden, weight, bias?, targets, lse, entropy, grad_logprobs, grad_entropy?,
  <options>, need_hidden, need_weight, need_bias, grad_lse?, grad_logit_sum?) -> (d_hidden [N, H],
  d_weight [V, H], d_bias [V])``: the pass
  that recomputes the logits (``linear.logprobs_backward``), gradients in the inputs' dtypes, empty ``[0]`` where
  not needed. It is ``token_stats``'s registered backward.

Under ``torch.compile`` the engine's plan is therefore always the two-pass one (``engine.registered_rows_loss``):
``token_stats``, the loss in plain PyTorch (traced by dynamo), then ``logprobs_backward``: four matmuls per row.
``<options>`` are ``LinearOptions`` as plain values (``options_args``); a vocabulary shard travels as its process
group's name and its bounds, and the ops run the shard's collectives inside. Both ops only read their inputs and
return fresh tensors.
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .linear import LinearOptions, logprobs_backward, lse_forward
from .torch_backend import RowStats, RowStatsSpec, compute_dtype
from .vocab_parallel import VocabShard


class OptionArgs(NamedTuple):
    """``LinearOptions`` as the registered ops' scalar arguments (``group_name`` "" without a vocabulary shard)."""

    backend: str
    temperature: float
    ignore_index: int
    chunk_size: Optional[int]
    deterministic: bool
    group_name: str
    vocab_start: int
    vocab_size: int
    widest_shard: int
    reduce_hidden_grad: bool


def options_args(opts: LinearOptions) -> OptionArgs:
    shard = opts.shard
    if shard is None:
        return OptionArgs(opts.backend, opts.temperature, opts.ignore_index, opts.chunk_size, opts.deterministic,
                          "", 0, 0, 0, False)
    return OptionArgs(opts.backend, opts.temperature, opts.ignore_index, opts.chunk_size, opts.deterministic,
                      shard.group.group_name, shard.vocab_start, shard.vocab_size, shard.widest_shard,
                      shard.reduce_hidden_grad)


def _options(args: OptionArgs) -> LinearOptions:
    shard = None
    if args.group_name:
        group = dist.distributed_c10d._resolve_process_group(args.group_name)
        shard = VocabShard(group, dist.get_rank(group), args.vocab_start, args.vocab_size, args.widest_shard,
                           args.reduce_hidden_grad)
    return LinearOptions(args.backend, args.temperature, args.ignore_index, args.chunk_size, shard,
                         args.deterministic)


def _fresh(t: Tensor) -> Tensor:
    """``t``, or a copy when it does not own its whole storage (a view of a buffer: an op's outputs may alias
    neither its inputs nor each other)."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


@torch.library.custom_op("fastalign::token_stats", mutates_args=())
def token_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, backend: str,
                temperature: float, ignore_index: int, chunk_size: Optional[int], deterministic: bool,
                group_name: str, vocab_start: int, vocab_size: int, widest_shard: int, reduce_hidden_grad: bool,
                entropy: bool, lse2: bool, logit_sum: bool, argmax: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                Tensor, Tensor, Tensor, Tensor]:
    opts = _options(OptionArgs(backend, temperature, ignore_index, chunk_size, deterministic, group_name,
                               vocab_start, vocab_size, widest_shard, reduce_hidden_grad))
    spec = RowStatsSpec(entropy, lse2, logit_sum, argmax)
    stats = lse_forward(hidden, weight, bias, targets, opts, spec=spec)
    valid = targets != ignore_index
    logprobs = torch.where(valid, stats.target_logit - stats.lse, 0.0)
    ent = torch.where(valid, stats.entropy, 0.0) if entropy else stats.lse.new_empty(0)
    rest = [_fresh(t) if t is not None else stats.lse.new_empty(0, dtype=dtype)
            for t, dtype in zip(stats[:2] + stats[3:], [stats.lse.dtype] * 5 + [torch.int64])]
    return (logprobs, ent, *rest)


@token_stats.register_fake
def _(hidden, weight, bias, targets, backend, temperature, ignore_index, chunk_size, deterministic, group_name,
      vocab_start, vocab_size, widest_shard, reduce_hidden_grad, entropy, lse2, logit_sum, argmax):
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    row = lambda wanted=True, kind=dtype: hidden.new_empty(n if wanted else 0, dtype=kind)  # noqa: E731
    return (row(), row(entropy), row(), row(), row(lse2), row(logit_sum), row(argmax), row(argmax, torch.int64))


def _setup_stats(ctx, inputs, output):
    hidden, weight, bias, targets, *options = inputs
    count = len(OptionArgs._fields)
    ctx.options, ctx.has_entropy = options[:count], options[count]  # the spec's entropy flag follows the options
    logprobs, entropy, lse = output[:3]
    ctx.mark_non_differentiable(output[3], output[4], output[6], output[7])
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)


def _stats_backward(ctx, grad_logprobs, grad_entropy, grad_lse, _target_logit, _lse2, grad_logit_sum, *_):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    d_hidden, d_weight, d_bias = torch.ops.fastalign.logprobs_backward(
        hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy if ctx.has_entropy else None,
        *ctx.options, need[0], need[1], need[2] and ctx.has_bias, grad_lse,
        grad_logit_sum if grad_logit_sum is not None and grad_logit_sum.numel() else None)
    grads = (d_hidden if need[0] else None, d_weight if need[1] else None,
             d_bias if need[2] and ctx.has_bias else None)
    return (*grads, *([None] * (len(ctx.needs_input_grad) - 3)))


token_stats.register_autograd(_stats_backward, setup_context=_setup_stats)


@torch.library.custom_op("fastalign::logprobs_backward", mutates_args=())
def registered_logprobs_backward(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, entropy: Tensor,
        grad_logprobs: Tensor, grad_entropy: Optional[Tensor], backend: str, temperature: float, ignore_index: int,
        chunk_size: Optional[int], deterministic: bool, group_name: str, vocab_start: int, vocab_size: int,
        widest_shard: int, reduce_hidden_grad: bool, need_hidden: bool, need_weight: bool,
        need_bias: bool, grad_lse: Optional[Tensor] = None,
        grad_logit_sum: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    opts = _options(OptionArgs(backend, temperature, ignore_index, chunk_size, deterministic, group_name,
                               vocab_start, vocab_size, widest_shard, reduce_hidden_grad))
    valid = targets != ignore_index
    dtype = lse.dtype
    grad_lp = torch.where(valid, grad_logprobs.to(dtype), 0.0)
    grad_ent = None
    if grad_entropy is not None and bool(grad_entropy.ne(0).any()):  # a zero entropy gradient costs no pass
        grad_ent = torch.where(valid, grad_entropy.to(dtype), 0.0)
    row_grads = [None if g is None else torch.where(valid, g.to(dtype), 0.0) for g in (grad_lse, grad_logit_sum)]
    stats = RowStats(lse, torch.zeros_like(lse), entropy if grad_ent is not None else None)
    grads = logprobs_backward(hidden, weight, bias, targets, stats, grad_lp, grad_ent, opts,
                              need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                              grad_lse=row_grads[0], grad_logit_sum=row_grads[1])
    like = (hidden, weight, weight)
    return tuple(g.to(t.dtype) if g is not None else t.new_empty(0) for g, t in zip(grads, like))


@registered_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, backend, temperature, ignore_index,
      chunk_size, deterministic, group_name, vocab_start, vocab_size, widest_shard, reduce_hidden_grad,
      need_hidden, need_weight, need_bias, grad_lse=None, grad_logit_sum=None):
    def grad(wanted, shape):
        return hidden.new_empty(shape if wanted else (0,), dtype=weight.dtype)

    return (grad(need_hidden, hidden.shape), grad(need_weight, weight.shape),
            grad(need_bias, (weight.shape[0],)))


def registered_token_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                           opts: LinearOptions, spec: RowStatsSpec) -> tuple[Tensor, Tensor | None, RowStats]:
    """``(logprobs [N], entropy [N] | None, stats)`` through ``fastalign::token_stats``: log-probs and entropy
    differentiable (0 at ignored rows), the row statistics (global with a shard) detached but for ``lse`` and
    ``logit_sum``, None where not asked."""
    out = torch.ops.fastalign.token_stats(hidden, weight, bias, targets, *options_args(opts), spec.entropy,
                                          spec.lse2, spec.logit_sum, spec.argmax)
    wanted = (True, True, spec.entropy, spec.lse2, spec.logit_sum, spec.argmax, spec.argmax)
    differentiable = (True, False, False, False, True, False, False)  # lse, logit_sum
    stats = RowStats(*((t if grad else t.detach()) if keep else None
                       for t, keep, grad in zip(out[2:4] + out[1:2] + out[4:], wanted, differentiable)))
    return out[0], out[1] if spec.entropy else None, stats
