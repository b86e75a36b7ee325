"""Fused DPO loss (and rankings) from hidden states: the completion tokens' log-probs through the shared engine
(``fastalign.ops.engine``), the loss of ``fastalign.objectives.dpo`` on them.

Layout: ``hidden [K*B, T, H]`` and ``targets [K*B, T]`` hold K groups of B rows, best first (K = 2: the chosen
responses of B pairs, then the rejected ones). Only completion tokens (target != ignore_index) get logits, gathered
prompt by prompt (its K responses one after the other): a prompt's rows are one group of the engine, so the torch
backend makes one pass of whole groups (three matmuls) where a group fits the memory budget, else two passes; the
losses that couple the whole batch (``aot`` and ``aot_unpaired`` sort it, ``bco_pair``'s running mean averages it)
and WPO-weighted ``sft`` take two passes. A reference model's log-probs are computed forward only, on the same
rows.

Packed (padding-free) batches (``fastalign.ops.segments``): ``hidden [N, H]`` and ``targets [N]`` hold the K*B
sequences in the same order (the chosen ones, then the rejected ones: TRL's concatenated order), described by
``cu_seqlens`` or ``position_ids``; only the per-token log-probs are placed into the padded ``[K*B, L]`` layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.dpo import (VOCABULARY_METRICS, DPOOptions, DPOResult, RunningMean, dpo_metrics, dpo_sequence_loss,
                              sequence_logps, vocabulary_metrics)
from .engine import Coupling, RowValues, fused_rows_loss
from .linear import LinearOptions
from .segments import PackedLayout, packed_layout, validate_sequence_layout
from .torch_backend import RowStats, RowStatsSpec, compute_dtype
from .validation import (FLOAT_DTYPES, LinearInputs, check_lm_head_dtypes, require_finite, require_logprobs,
                         require_same_device, require_shape, require_tensor)

BATCH_COUPLED_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})


@dataclass(frozen=True)
class DPOOpConfig:
    """The loss options, how a sequence's token log-probs are reduced (sums, or means with ``average_log_prob``),
    the normalizers of the whole accumulated batch (``num_pairs`` of the pair losses, ``num_chosen_tokens`` of the
    chosen NLL; default this batch's), ``bco_pair``'s running mean (or None) and whether to compute the metrics over
    the vocabulary."""

    options: DPOOptions
    average_log_prob: bool = False
    num_pairs: int | Tensor | None = None
    num_chosen_tokens: int | Tensor | None = None
    bco_state: RunningMean | None = None
    vocab_metrics: bool = False

    @property
    def batch_coupled(self) -> bool:
        """Whether a group's gradient depends on other groups' log-probs: sorting (aot), the running mean (bco_pair
        with a state), WPO's weights on the batch-wide sft term (the chosen NLL times the mean pair weight)."""
        types = set(self.options.loss_types)
        return (bool(types & BATCH_COUPLED_LOSS_TYPES) or (self.bco_state is not None and "bco_pair" in types)
                or (self.options.use_weighting and "sft" in types))


class PreferenceRows(NamedTuple):
    """The completion tokens of a ``[K*B, T]`` batch (a packed batch's padded layout), gathered prompt by prompt (its
    K responses in rank order)."""

    index: Tensor  # [M] flat position (in [0, K*B*T)) of each completion token
    mask: Tensor  # [K*B, T] bool completion mask
    group_rows: list[int] | None  # completion tokens per prompt, in gathered order
    rows: Tensor  # [M] the row of hidden of each (``index``, or its packed row)

    @classmethod
    def of(cls, targets: Tensor, ignore_index: int, num_responses: int,
           layout: PackedLayout | None = None) -> PreferenceRows:
        """``targets [K*B, T]``, or packed ``[N]`` (any shape of N elements) with its ``layout``. Under
        ``torch.compile`` every position, prompt by prompt (no data-dependent shape: the ignored rows' log-probs
        are 0; ``group_rows`` K*T each), or every packed row in packed order with ``group_rows`` None (the
        sequences' lengths are data: the compiled engine takes two passes)."""
        if layout is not None:
            targets = layout.to_padded(targets.reshape(-1), ignore_index)
        rows, length = targets.shape
        mask = targets != ignore_index
        order = torch.arange(rows * length, device=targets.device).view(num_responses, rows // num_responses, length)
        order = order.transpose(0, 1).reshape(-1)  # prompt by prompt, then response, then position
        if torch.compiler.is_compiling():
            if layout is not None:  # every packed row, in packed order (the compiled plan has no groups)
                return cls(layout.index, mask, None, torch.arange(layout.index.numel(), device=targets.device))
            return cls(order, mask, [num_responses * length] * (rows // num_responses), order)
        index = order[mask.reshape(-1)[order]]
        group_rows = mask.sum(dim=1).view(num_responses, -1).sum(dim=0).tolist()
        return cls(index, mask, group_rows, index if layout is None else layout.packed_rows(index))

    def as_batch(self, values: Tensor) -> Tensor:
        """``[M]`` gathered values as ``[K*B, T]`` (0 off the completion mask), differentiably."""
        batch = values.new_zeros(self.mask.numel()).index_put((self.index,), values).view(self.mask.shape)
        return torch.where(self.mask, batch, 0.0) if torch.compiler.is_compiling() else batch  # compiled: every row

    def part(self, values: Tensor, rows: slice | None, groups: slice | None) -> tuple[Tensor, Tensor]:
        """The values of the rows ``rows`` (``RowValues``; whole prompts ``groups``, G of the B) as ``[K*G, T]``
        (0 off the completion mask), differentiably, and those G prompts' completion mask ``[K*G, T]``: K groups of
        G rows as the whole batch's layout. Without ``groups``, ``as_batch`` and the whole mask."""
        if groups is None:
            return self.as_batch(values), self.mask
        b, length = len(self.group_rows), self.mask.shape[1]
        k, g = self.mask.shape[0] // b, groups.stop - groups.start
        index = self.index[rows]  # the chunk's positions (k, prompt, t) in [K*B*T], to (k, prompt - start, t)
        rank, position = torch.div(index, b * length, rounding_mode="floor"), index % (b * length)
        local = (rank * g - groups.start) * length + position
        mask = self.mask.view(k, b, length)[:, groups].reshape(k * g, length)
        return values.new_zeros(mask.numel()).index_put((local,), values).view(mask.shape), mask


class DPOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_dpo_loss` returns."""

    loss: Tensor  # scalar, differentiable w.r.t. hidden, weight and bias
    chosen_rewards: Tensor  # [B] beta * (policy - reference) of the best responses, detached
    rejected_rewards: Tensor  # [B] of the worst
    chosen_logps: Tensor  # [B] sequence log-probs (sums; means with average_log_prob) of the best, detached
    rejected_logps: Tensor  # [B] of the worst
    metrics: dict[str, Tensor]  # detached 0-d tensors, TRL names
    rewards: Tensor  # [K, B] every response's implicit reward
    logps: Tensor  # [K, B] every response's sequence log-prob
    bco_state: RunningMean | None  # bco_pair's updated running mean, when one was given


def fused_dpo_loss(inputs: LinearInputs, opts: LinearOptions, config: DPOOpConfig,
                   reference: LinearInputs | Tensor | None, layout: PackedLayout | None = None) -> DPOLossOutput:
    """The fused DPO loss on validated inputs: ``inputs.lead_shape == (K*B, T)``, or N packed rows with their
    ``layout`` of K*B sequences.

    reference: the reference lm_head problem (computed here, forward only), precomputed reference log-probs
    ``[K, B]`` (as the policy's: sums, or means with ``average_log_prob``), or None (reference-free).
    """
    options = config.options
    dtype = compute_dtype(inputs.hidden.dtype)
    rows = PreferenceRows.of(inputs.targets.view(inputs.lead_shape), opts.ignore_index, options.num_responses,
                             layout)
    if isinstance(reference, LinearInputs):
        with torch.no_grad():
            ref_tokens = fused_rows_loss(reference, opts, lambda values: values.logprobs.sum(), rows=rows.rows,
                                         coupling=None).logprobs
            reference = sequence_logps(rows.as_batch(ref_tokens), rows.mask, options,
                                       average_log_prob=config.average_log_prob)
    elif reference is not None:
        reference = reference.to(dtype)

    b = rows.mask.shape[0] // options.num_responses
    # a chunk's prompts (``RowValues.groups``) take the whole batch's normalizers, known before any logit
    num_pairs = b if config.num_pairs is None else config.num_pairs
    num_chosen_tokens = config.num_chosen_tokens
    if num_chosen_tokens is None and options.needs_nll:
        num_chosen_tokens = rows.mask[:b].sum().clamp(min=1)
    sft_weight = sum(weight for name, weight in zip(options.loss_types, options.weights) if name == "sft")

    def loss_of(values: RowValues) -> tuple[DPOResult, Tensor]:
        batch, mask = rows.part(values.logprobs, values.rows, values.groups)
        stats, part = values.stats, values.groups
        # WPO: log sum_v p_v^2 = lse(2z) - 2 lse(z) of each completion token, from the pass's row statistics
        denoms = None if not options.use_weighting else (
            batch.new_zeros(mask.shape) if stats is None  # no completion token at all
            else rows.part((stats.lse2 - 2 * stats.lse).detach(), values.rows, part)[0])
        ref = reference if reference is None or part is None else reference[:, part]
        result, logps = dpo_sequence_loss(
            batch, mask, ref, options, average_log_prob=config.average_log_prob,
            num_pairs=config.num_pairs if part is None else num_pairs,
            num_chosen_tokens=config.num_chosen_tokens if part is None else num_chosen_tokens,
            token_log_denoms=denoms, bco_state=config.bco_state)
        if part is not None and sft_weight:  # sft's term is the batch's NLL once per pair: B times, not G
            result = dataclasses.replace(result, loss=result.loss + sft_weight * (b - logps.shape[1]) / num_pairs
                                         * result.nll)
        return result, logps

    def loss_fn(values: RowValues) -> Tensor:
        return loss_of(values)[0].loss

    coupling: Coupling = None if config.batch_coupled else rows.group_rows
    spec = RowStatsSpec(entropy=config.vocab_metrics, lse2=options.use_weighting, logit_sum=config.vocab_metrics,
                        argmax=config.vocab_metrics)
    out = fused_rows_loss(inputs, opts, loss_fn, rows=rows.rows, coupling=coupling, spec=spec)
    with torch.no_grad():
        result, logps = loss_of(RowValues(out.logprobs, None, out.stats))
        metrics = dpo_metrics(result, logps)
        if config.vocab_metrics and out.stats is not None:
            rank = torch.div(rows.index, rows.mask.numel() // options.num_responses, rounding_mode="floor")
            rank = torch.where(rows.mask.reshape(-1)[rows.index], rank, -1)  # compiled: -1 at the ignored rows
            correct = out.stats.argmax == inputs.targets[rows.rows]
            metrics.update(vocabulary_metrics(token_logit_means(out.stats, inputs, opts), out.entropy,
                                              correct, rank, options.num_responses))
        elif config.vocab_metrics:  # no completion token at all
            metrics.update({name: logps.new_zeros(()) for name in VOCABULARY_METRICS})
    return DPOLossOutput(out.loss, result.chosen_rewards, result.rejected_rewards, logps[0], logps[-1], metrics,
                         result.rewards, logps, result.bco_state)


def token_logit_means(stats: RowStats, inputs: LinearInputs, opts: LinearOptions) -> Tensor:
    """``[M]`` each computed row's mean logit over the whole vocabulary (every shard), untempered as TRL's
    ``mean_logits`` (the ``logits/*`` metrics): the tempered sum (``RowStatsSpec(logit_sum=True)``) times the
    temperature over V."""
    vocab = inputs.weight.shape[0] if opts.shard is None else opts.shard.vocab_size
    return stats.logit_sum * (opts.temperature / vocab)


def validate_preference_layout(hidden, targets, num_responses: int, *, cu_seqlens=None, position_ids=None,
                               num_sequences: int | None = None) -> tuple[int, PackedLayout | None]:
    """``hidden [K*B, T, H]`` and ``targets [K*B, T]``: K groups of B sequences of T tokens, best first; or packed,
    ``hidden [N, H]`` (``[1, N, H]``) and ``targets [N]`` (``[1, N]``) of the K*B sequences of ``cu_seqlens`` or
    ``position_ids`` in the same order (``num_sequences``: K*B from a per-sequence argument, which ``position_ids``
    need under ``torch.compile``). Returns the number of sequences K*B and the packed layout (or None)."""
    layout = "B chosen then B rejected sequences" if num_responses == 2 else \
        f"{num_responses} groups of B sequences, best first"
    if cu_seqlens is not None or position_ids is not None:
        validate_sequence_layout(hidden, targets, packed=True)
        packed = packed_layout(targets.numel(), hidden.device, cu_seqlens=cu_seqlens, position_ids=position_ids,
                               num_sequences=num_sequences)
        if packed.num_sequences % num_responses:
            name = "cu_seqlens" if cu_seqlens is not None else "position_ids"
            raise ValueError(f"{name}: expected a multiple {num_responses}B of packed sequences ({layout}), got "
                             f"{packed.num_sequences}")
        return packed.num_sequences, packed
    hidden = require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape [{num_responses}B, T, H] ({layout}), got {tuple(hidden.shape)}")
    rows, length = hidden.shape[:2]
    if rows == 0 or rows % num_responses or length == 0:
        raise ValueError(f"hidden: expected a multiple {num_responses}B >= {num_responses} of sequences ({layout}) "
                         f"of T >= 1 tokens, got shape {tuple(hidden.shape)}")
    require_shape("targets", require_tensor("targets", targets), (rows, length),
                  f"[{num_responses}B, T], the leading dimensions of hidden {tuple(hidden.shape)}")
    return rows, None


def validate_reference(inputs: LinearInputs, opts: LinearOptions, options: DPOOptions, num_sequences: int, *,
                       ref_chosen_logps, ref_rejected_logps, ref_logps, ref_hidden, ref_weight, ref_bias,
                       check_finite: bool) -> LinearInputs | Tensor | None:
    """The reference of the DPO op on ``num_sequences`` K*B sequences: precomputed log-probs ``[K, B]``, a
    reference lm_head problem (``ref_hidden`` shaped like ``hidden``, padded or packed), or None."""
    precomputed = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
                   "ref_logps": ref_logps}
    computed = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
    given = [name for name, value in {**precomputed, **computed}.items() if value is not None]
    if options.reference_free:
        if given:
            raise ValueError(f"{given[0]}: expected None with reference_free=True (reference log-probs are taken "
                             f"as 0), got a tensor")
        return None
    if not given:
        raise ValueError("ref_chosen_logps: expected the reference log-probs [B] (with ref_rejected_logps; or "
                         "ref_logps [K, B]), or ref_hidden and ref_weight to compute them, or reference_free=True; "
                         "got None")
    if any(name in precomputed for name in given) and any(name in computed for name in given):
        raise ValueError(f"ref_hidden: expected either precomputed reference log-probs or "
                         f"ref_hidden/ref_weight(/ref_bias), not both; got {', '.join(given)}")
    k = options.num_responses
    b = num_sequences // k
    if given[0] in precomputed:
        return _precomputed_reference(inputs, k, b, ref_chosen_logps, ref_rejected_logps, ref_logps, check_finite)
    for name in ("ref_hidden", "ref_weight"):
        if computed[name] is None:
            raise ValueError(f"{name}: required with {given[0]} (reference computed here), got None")
    ref_hidden = require_tensor("ref_hidden", ref_hidden, dtypes=FLOAT_DTYPES)
    require_shape("ref_hidden", ref_hidden, (*inputs.lead_shape, inputs.hidden.shape[1]), "the shape of hidden")
    ref_weight = require_tensor("ref_weight", ref_weight)
    require_shape("ref_weight", ref_weight, tuple(inputs.weight.shape), "the shape of weight")
    check_lm_head_dtypes(ref_hidden, ref_weight, None if ref_bias is None else require_tensor("ref_bias", ref_bias),
                         prefix="ref_")
    if ref_bias is not None:
        require_shape("ref_bias", ref_bias, (inputs.weight.shape[0],), "one entry per row of ref_weight")
    if opts.backend == "triton" and ref_hidden.dtype == torch.float64:
        raise TypeError("ref_hidden: backend='triton' takes float32, float16 or bfloat16 inputs, got torch.float64")
    require_same_device(inputs.hidden, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    if check_finite:  # a shared lm_head was checked as weight and bias already
        for name, value, policy in (("ref_hidden", ref_hidden, None), ("ref_weight", ref_weight, inputs.weight),
                                    ("ref_bias", ref_bias, inputs.bias)):
            if value is not policy:
                require_finite(name, value)
    return LinearInputs(ref_hidden.detach().reshape(inputs.hidden.shape), ref_weight.detach(),
                        None if ref_bias is None else ref_bias.detach(), inputs.targets, inputs.lead_shape)


def _precomputed_reference(inputs: LinearInputs, k: int, b: int, ref_chosen_logps, ref_rejected_logps, ref_logps,
                           check_finite: bool) -> Tensor:
    """Precomputed reference log-probs as ``[K, B]``: ``ref_logps`` or (K = 2) the chosen and rejected ``[B]``."""
    pair = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    if ref_logps is not None:
        if any(value is not None for value in pair.values()):
            raise ValueError("ref_logps: expected either ref_logps [K, B] or ref_chosen_logps/ref_rejected_logps, "
                             "not both")
        values = {"ref_logps": (ref_logps, (k, b), f"[K, B] = [{k}, {b}], one log-prob per response")}
    else:
        if k != 2:
            raise ValueError(f"ref_logps: expected the reference log-probs [K, B] with num_responses={k} "
                             f"(ref_chosen_logps/ref_rejected_logps are for pairs), got None")
        values = {name: (value, (b,), "one log-prob per pair, B = the sequences // 2")
                  for name, value in pair.items()}
    for name, (value, shape, meaning) in values.items():
        if value is None:
            other = "ref_chosen_logps" if name == "ref_rejected_logps" else "ref_rejected_logps"
            raise ValueError(f"{name}: required with {other} (precomputed reference), got None")
        require_tensor(name, value, dtypes=FLOAT_DTYPES)
        require_shape(name, value, shape, meaning)
        require_same_device(inputs.hidden, **{name: value})
        if check_finite:
            require_finite(name, value)
        require_logprobs(name, value, inputs.lead_shape[-1])  # a sum over up to T (packed: N) tokens
    if ref_logps is not None:
        return ref_logps.detach()
    return torch.stack([ref_chosen_logps.detach(), ref_rejected_logps.detach()])
