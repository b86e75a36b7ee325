"""The lm_head core as registered operators (``torch.library.custom_op``, namespace ``fastalign``), so that
``torch.compile(fullgraph=True)`` traces through every fused op.

- ``fastalign::token_stats(hidden [N, H], weight [V, H], bias [V]?, targets [N], <options>, <spec>)``
  ``-> (logprobs [N], entropy [N], lse [N], target_logit [N], lse2 [N], logit_sum [N], max_logit [N], argmax [N])``:
  the statistics pass (``linear.lse_forward``) on the rows whose target is not ignored (all outputs 0 at the
  others); the statistics the spec does not ask for are empty ``[0]`` tensors. Differentiable in ``logprobs``,
  ``entropy``, ``lse`` and ``logit_sum`` (the other outputs are not).
- ``fastalign::logprobs_backward(hidden, weight, bias?, targets, lse, entropy, grad_logprobs, grad_entropy?,
  <options>, need_hidden, need_weight, need_bias, grad_lse?, grad_logit_sum?) -> (d_hidden [N, H],
  d_weight [V, H], d_bias [V])``: the pass
  that recomputes the logits (``linear.logprobs_backward``), gradients in the inputs' dtypes, empty ``[0]`` where
  not needed. It is ``token_stats``'s registered backward.

  With them the engine's compiled two-pass plan (``engine.registered_rows_loss``): ``token_stats``, the loss in
  plain PyTorch (traced by dynamo), then ``logprobs_backward``: four matmuls per row whose target is not ignored.
- ``fastalign::chunk_log_probs(hidden [C, H], weight, bias?, targets [C], <transform>, <spec>, softmax)`` ``->
  (the 7 statistics [C], block [C, V], p_norm [C]?, softcap_grad [C, V]?)`` and ``fastalign::chunk_grads(...,
  block, ..., row gradients [C], ..., grad_weight [V, H]) -> (d_hidden [C, H], d_bias [V])``: one chunk of the
  one-pass plan (``torch_backend.chunk_log_probs`` / ``chunk_grads``), the loss's row gradients traced between
  them (``one_pass_chunk``, ``engine.compiled_one_pass``): three matmuls per row. ``chunk_grads`` overwrites the
  block and adds the chunk's ``d weight`` to ``grad_weight`` (both declared mutated); no autograd formula (the
  engine carries the gradients).

Every op drops the rows whose target is ignored inside, where data-dependent shapes cost nothing (the chunk ops keep
the others' rows first in the block). ``<options>`` are ``LinearOptions`` as plain values (``options_args``); a
vocabulary shard travels as its process group's name and its bounds, and the ops run the shard's collectives inside
(the chunk ops take no shard). Outputs are fresh tensors.
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .linear import LinearOptions, logprobs_backward, lse_forward
from .torch_backend import RowGrads, RowStats, RowStatsSpec, chunk_grads, chunk_log_probs, compute_dtype
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
    logit_scale: float
    logit_softcap: Optional[float]


def options_args(opts: LinearOptions) -> OptionArgs:
    shard = opts.shard
    if shard is None:
        return OptionArgs(opts.backend, opts.temperature, opts.ignore_index, opts.chunk_size, opts.deterministic,
                          "", 0, 0, 0, False, opts.logit_scale, opts.logit_softcap)
    return OptionArgs(opts.backend, opts.temperature, opts.ignore_index, opts.chunk_size, opts.deterministic,
                      shard.group.group_name, shard.vocab_start, shard.vocab_size, shard.widest_shard,
                      shard.reduce_hidden_grad, opts.logit_scale, opts.logit_softcap)


def _options(args: OptionArgs) -> LinearOptions:
    shard = None
    if args.group_name:
        group = dist.distributed_c10d._resolve_process_group(args.group_name)
        shard = VocabShard(group, dist.get_rank(group), args.vocab_start, args.vocab_size, args.widest_shard,
                           args.reduce_hidden_grad)
    return LinearOptions(args.backend, args.temperature, args.ignore_index, args.chunk_size, shard,
                         args.deterministic, args.logit_scale, args.logit_softcap)


def _fresh(t: Tensor) -> Tensor:
    """``t``, or a copy when it does not own its whole storage (a view of a buffer: an op's outputs may alias
    neither its inputs nor each other)."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _kept_rows(targets: Tensor, ignore_index: int) -> Tensor | None:
    """The rows whose target is not ignored (``[M]`` int64), or None when every row counts. The ops run eagerly, so
    the data-dependent M is free here: a compiled op (DPO traces every position) computes no logits for prompts."""
    valid = targets != ignore_index
    return None if bool(valid.all()) else valid.nonzero().squeeze(1)


def _take(t: Tensor, keep: Tensor | None) -> Tensor:
    return t if keep is None else t.index_select(0, keep)


def _put(t: Tensor, keep: Tensor | None, rows: int) -> Tensor:
    """``t [M, ...]`` of the kept rows back in ``rows`` rows, 0 at the others."""
    return t if keep is None else t.new_zeros(rows, *t.shape[1:]).index_copy_(0, keep, t)


@torch.library.custom_op("fastalign::token_stats", mutates_args=())
def token_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, backend: str,
                temperature: float, ignore_index: int, chunk_size: Optional[int], deterministic: bool,
                group_name: str, vocab_start: int, vocab_size: int, widest_shard: int, reduce_hidden_grad: bool,
                logit_scale: float, logit_softcap: Optional[float], entropy: bool, lse2: bool, logit_sum: bool,
                argmax: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = _options(OptionArgs(backend, temperature, ignore_index, chunk_size, deterministic, group_name,
                               vocab_start, vocab_size, widest_shard, reduce_hidden_grad, logit_scale, logit_softcap))
    spec = RowStatsSpec(entropy, lse2, logit_sum, argmax)
    keep = _kept_rows(targets, ignore_index)
    stats = lse_forward(_take(hidden, keep), weight, bias, _take(targets, keep), opts, spec=spec)
    logprobs = _put(stats.target_logit - stats.lse, keep, targets.shape[0])
    ent = _put(stats.entropy, keep, targets.shape[0]) if entropy else stats.lse.new_empty(0)
    rest = [_fresh(_put(t, keep, targets.shape[0])) if t is not None else stats.lse.new_empty(0, dtype=dtype)
            for t, dtype in zip(stats[:2] + stats[3:], [stats.lse.dtype] * 5 + [torch.int64])]
    return (logprobs, ent, *rest)


@token_stats.register_fake
def _(hidden, weight, bias, targets, backend, temperature, ignore_index, chunk_size, deterministic, group_name,
      vocab_start, vocab_size, widest_shard, reduce_hidden_grad, logit_scale, logit_softcap, entropy, lse2, logit_sum,
      argmax):
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
        widest_shard: int, reduce_hidden_grad: bool, logit_scale: float, logit_softcap: Optional[float],
        need_hidden: bool, need_weight: bool, need_bias: bool, grad_lse: Optional[Tensor] = None,
        grad_logit_sum: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    opts = _options(OptionArgs(backend, temperature, ignore_index, chunk_size, deterministic, group_name,
                               vocab_start, vocab_size, widest_shard, reduce_hidden_grad, logit_scale, logit_softcap))
    keep = _kept_rows(targets, ignore_index)
    dtype = lse.dtype
    grad_lp = _take(grad_logprobs, keep).to(dtype)
    grad_ent = None
    if grad_entropy is not None and bool(grad_entropy.ne(0).any()):  # a zero entropy gradient costs no pass
        grad_ent = _take(grad_entropy, keep).to(dtype)
    grad_lse, grad_logit_sum = (None if g is None else _take(g, keep).to(dtype) for g in (grad_lse, grad_logit_sum))
    lse = _take(lse, keep)
    stats = RowStats(lse, torch.zeros_like(lse), _take(entropy, keep) if grad_ent is not None else None)
    d_hidden, d_weight, d_bias = logprobs_backward(_take(hidden, keep), weight, bias, _take(targets, keep), stats,
                                                   grad_lp, grad_ent, opts, need_hidden=need_hidden,
                                                   need_weight=need_weight, need_bias=need_bias, grad_lse=grad_lse,
                                                   grad_logit_sum=grad_logit_sum)
    if d_hidden is not None:
        d_hidden = _put(d_hidden, keep, hidden.shape[0])
    like = (hidden, weight, weight)  # a bias has the weight's dtype
    return tuple(g.to(t.dtype) if g is not None else t.new_empty(0) for g, t in zip((d_hidden, d_weight, d_bias), like))


@registered_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, backend, temperature, ignore_index,
      chunk_size, deterministic, group_name, vocab_start, vocab_size, widest_shard, reduce_hidden_grad, logit_scale,
      logit_softcap, need_hidden, need_weight, need_bias, grad_lse=None, grad_logit_sum=None):
    def grad(wanted, shape, like):
        return hidden.new_empty(shape if wanted else (0,), dtype=like.dtype)

    return (grad(need_hidden, hidden.shape, hidden), grad(need_weight, weight.shape, weight),
            grad(need_bias, (weight.shape[0],), weight))


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


@torch.library.custom_op("fastalign::chunk_log_probs", mutates_args=())
def registered_chunk_log_probs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                               temperature: float, ignore_index: int, logit_scale: float,
                               logit_softcap: Optional[float], entropy: bool, lse2: bool, logit_sum: bool,
                               argmax: bool, softmax: bool) -> list[Tensor]:
    n, vocab, dtype = hidden.shape[0], weight.shape[0], compute_dtype(hidden.dtype)
    keep = _kept_rows(targets, ignore_index)
    block = hidden.new_empty(n * vocab, dtype=dtype)  # the kept rows first (no logits for the others)
    softcap = hidden.new_empty(n * vocab if logit_softcap is not None else 0, dtype=dtype)
    stats, _, p_norm, _ = chunk_log_probs(
        _take(hidden, keep), weight, bias, _take(targets, keep), inv_temperature=1.0 / temperature,
        ignore_index=ignore_index, spec=RowStatsSpec(entropy, lse2, logit_sum, argmax), softmax=softmax,
        logit_scale=logit_scale, logit_softcap=logit_softcap, out=block,
        softcap_out=softcap if logit_softcap is not None else None)
    kinds = [dtype] * 6 + [torch.int64]
    rows = [block.new_empty(0, dtype=kind) if t is None else _fresh(_put(t, keep, n)) for t, kind in zip(stats, kinds)]
    return [*rows, block.view(n, vocab), block.new_empty(0) if p_norm is None else _fresh(_put(p_norm, keep, n)),
            softcap.view(n, vocab) if softcap.numel() else softcap]


@registered_chunk_log_probs.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, logit_scale, logit_softcap, entropy, lse2, logit_sum,
      argmax, softmax):
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    row = lambda wanted=True, kind=dtype: hidden.new_empty(n if wanted else 0, dtype=kind)  # noqa: E731
    block = lambda wanted=True: hidden.new_empty((n, weight.shape[0]) if wanted else (0,), dtype=dtype)  # noqa: E731
    return [row(), row(), row(entropy), row(lse2), row(logit_sum), row(argmax), row(argmax, torch.int64), block(),
            row(softmax and (entropy or lse2)), block(logit_softcap is not None)]


@torch.library.custom_op("fastalign::chunk_grads", mutates_args=("block", "grad_weight"))
def registered_chunk_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, block: Tensor,
                           p_norm: Tensor, softcap_grad: Tensor, lse: Tensor, entropy: Tensor, grad_logprobs: Tensor,
                           grad_entropy: Optional[Tensor], grad_lse: Optional[Tensor],
                           grad_logit_sum: Optional[Tensor], temperature: float, ignore_index: int,
                           logit_scale: float, logit_softcap: Optional[float], softmax: bool, need_hidden: bool,
                           grad_weight: Tensor, need_bias: bool) -> tuple[Tensor, Tensor]:
    keep = _kept_rows(targets, ignore_index)
    kept = hidden.shape[0] if keep is None else keep.numel()

    def first_rows(t: Tensor) -> Tensor | None:  # the kept rows' part of a [C, V] block
        return t.view(-1)[:kept * t.shape[1]].view(kept, t.shape[1]) if t.numel() else None

    stats = RowStats(_take(lse, keep), torch.zeros_like(lse), _take(entropy, keep) if entropy.numel() else None)
    # the traced loss gives zeros for values it does not use: a zero gradient costs no pass here
    used = [None if g is None or not bool(g.ne(0).any()) else _take(g, keep)
            for g in (grad_entropy, grad_lse, grad_logit_sum)]
    rows = first_rows(block)
    grads = chunk_grads(_take(hidden, keep), weight, bias, _take(targets, keep), None if softmax else rows,
                        rows if softmax else None, _take(p_norm, keep) if p_norm.numel() else None,
                        first_rows(softcap_grad), stats, RowGrads(_take(grad_logprobs, keep), *used),
                        inv_temperature=1.0 / temperature, ignore_index=ignore_index, need_grad_hidden=need_hidden,
                        grad_weight=grad_weight if grad_weight.numel() else None, need_grad_bias=need_bias,
                        logit_scale=logit_scale, logit_softcap=logit_softcap)
    d_hidden = None if grads.hidden is None else _put(grads.hidden, keep, hidden.shape[0])
    return tuple(hidden.new_empty(0, dtype=lse.dtype) if g is None else g for g in (d_hidden, grads.bias))


@registered_chunk_grads.register_fake
def _(hidden, weight, bias, targets, block, p_norm, softcap_grad, lse, entropy, grad_logprobs, grad_entropy, grad_lse,
      grad_logit_sum, temperature, ignore_index, logit_scale, logit_softcap, softmax, need_hidden, grad_weight,
      need_bias):
    def grad(wanted, shape):
        return hidden.new_empty(shape if wanted else (0,), dtype=lse.dtype)

    return grad(need_hidden, hidden.shape), grad(need_bias, (weight.shape[0],))


def one_pass_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, opts: LinearOptions,
                   spec: RowStatsSpec, need_hidden: bool, grad_weight: Tensor, need_bias: bool,
                   row_grads_of) -> tuple[Tensor, Tensor | None, RowStats, tuple]:
    """One chunk of the compiled one-pass plan (``engine.compiled_one_pass``): ``fastalign::chunk_log_probs`` on
    the chunk's rows ``hidden [C, H]`` (all three inputs detached), ``row_grads_of(logprobs, entropy, stats) ->
    RowGrads`` (traced: the loss's gradients at these rows), then ``fastalign::chunk_grads``, which adds the chunk's
    ``d weight`` to ``grad_weight [V, H]`` (unless empty). Without the entropy the chunk keeps ``p`` (the loss
    cannot train an entropy it does not get), with it ``log p``. Returns the rows' log-probs and entropy (0 at
    ignored rows), statistics and the chunk's ``(d hidden [C, H], d bias [V])`` (empty where not needed)."""
    args = (opts.temperature, opts.ignore_index, opts.logit_scale, opts.logit_softcap)
    softmax = not spec.entropy
    *fields, block, p_norm, softcap_grad = torch.ops.fastalign.chunk_log_probs(
        hidden, weight, bias, targets, *args, spec.entropy, spec.lse2, spec.logit_sum, spec.argmax, softmax)
    wanted = (True, True, spec.entropy, spec.lse2, spec.logit_sum, spec.argmax, spec.argmax)
    stats = RowStats(*(t if keep else None for t, keep in zip(fields, wanted)))
    valid = targets != opts.ignore_index
    logprobs = torch.where(valid, stats.target_logit - stats.lse, 0.0)
    entropy = torch.where(valid, stats.entropy, 0.0) if spec.entropy else None
    grads = row_grads_of(logprobs, entropy, stats)
    chunk = torch.ops.fastalign.chunk_grads(hidden, weight, bias, targets, block, p_norm, softcap_grad, stats.lse,
                                            fields[2], *grads, *args, softmax, need_hidden, grad_weight, need_bias)
    return logprobs, entropy, stats, chunk
