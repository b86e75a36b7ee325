"""Fused reference-free preference losses from hidden states: CPO / SimPO / AlphaPO and ORPO.

Layout as the DPO op: ``[2B, T]`` rows, the chosen responses of B pairs, then the rejected ones. The selected
tokens (the responses, plus the chosen sequences' NLL tokens) go through the shared engine
(``fastalign.ops.engine``) pair by pair (the DPO op's ``PreferenceRows``), one pair per group: on the torch backend whole pairs per chunk (one pass,
three matmuls) when the largest fits the memory budget, else two passes; triton makes two passes. The losses are
those of ``fastalign.objectives.preference`` on the per-sequence sums (or means) and the chosen NLL. Packed batches
(``cu_seqlens`` / ``position_ids``, ``fastalign.ops.segments``) hold the 2B sequences in the same order.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.dpo import DPOResult, dpo_metrics, rpo_nll
from ..objectives.preference import CPOOptions, cpo_loss, orpo_loss, orpo_metrics
from .dpo import DPOLossOutput, PreferenceRows, token_logit_means
from .engine import RowValues, fused_rows_loss
from .linear import LinearOptions
from .segments import PackedLayout
from .torch_backend import RowStatsSpec, compute_dtype
from .validation import INT_DTYPES, LinearInputs, require_shape, require_tensor


class PairTokens(NamedTuple):
    """Which tokens of a ``[2B, T]`` batch enter the loss: ``response [2B, T]`` (the pair losses' log-probs) and
    ``nll [B, T]`` (the chosen sequences' NLL term), both bool."""

    response: Tensor
    nll: Tensor


def merge_nll_targets(targets: Tensor, nll_targets, ignore_index: int,
                      layout: PackedLayout | None = None) -> tuple[Tensor, PairTokens]:
    """``targets [2B, T]`` with the chosen rows' NLL targets filled in where the response has none, and the masks
    (``[2B, T]`` and ``[B, T]``; of the padded layout for a packed batch, whose merged targets stay packed).

    nll_targets: ``[B, T]`` next-token ids of the chosen sequences for the NLL (e.g. prompt and response, as TRL's
    ORPO), ``ignore_index`` elsewhere; it must agree with ``targets`` on the response tokens. Packed: shaped like
    ``targets``, ``ignore_index`` on the rejected sequences' rows. None: the chosen response tokens.
    """
    given = targets = require_tensor("targets", targets)
    if layout is not None:
        targets = layout.to_padded(targets.reshape(-1), ignore_index)
        if nll_targets is not None:
            nll_targets = require_tensor("nll_targets", nll_targets, dtypes=INT_DTYPES)
            require_shape("nll_targets", nll_targets, tuple(given.shape), "the shape of targets, packed")
            nll_targets = layout.to_padded(nll_targets.reshape(-1), ignore_index)
            if not torch.compiler.is_compiling() and bool((nll_targets[nll_targets.shape[0] // 2:]
                                                            != ignore_index).any()):  # compiled: not checked
                raise ValueError(f"nll_targets: expected ignore_index ({ignore_index}) on the rejected sequences' "
                                 f"rows (the second half of the packed sequences), got token ids")
            nll_targets = nll_targets[:nll_targets.shape[0] // 2]
    b = targets.shape[0] // 2
    response = targets != ignore_index
    if nll_targets is None:
        return given, PairTokens(response, response[:b])
    nll_targets = require_tensor("nll_targets", nll_targets, dtypes=INT_DTYPES)
    require_shape("nll_targets", nll_targets, (b, targets.shape[1]), "[B, T]: the chosen sequences' NLL targets")
    if nll_targets.device != targets.device:
        raise ValueError(f"nll_targets: expected device {targets.device} (the device of targets), "
                         f"got {nll_targets.device}")
    nll = nll_targets != ignore_index
    # TRL's ORPO takes both from the chosen input ids: the NLL covers every response token, with the same id
    differs = response[:b] & (nll_targets != targets[:b])
    if not torch.compiler.is_compiling() and bool(differs.any()):  # compiled: not checked (a sync)
        raise ValueError(f"nll_targets: expected the ids of targets on every chosen response token (TRL's ORPO NLL "
                         f"covers the prompt and the whole response), got {int(differs.sum())} token(s) differing "
                         f"or ignored")
    merged = targets.clone()
    merged[:b] = torch.where(response[:b], targets[:b], nll_targets)
    return merged if layout is None else layout.to_packed(merged).view(given.shape), PairTokens(response, nll)


def fused_pair_loss(inputs: LinearInputs, opts: LinearOptions, tokens: PairTokens,
                    loss_of: Callable[[Tensor, Tensor, Tensor, slice | None], DPOResult], average_log_prob: bool,
                    layout: PackedLayout | None, vocab_metrics: bool = False
                    ) -> tuple[Tensor, DPOResult, Tensor, dict[str, Tensor]]:
    """A pair loss through the engine: ``loss_of(chosen_logps [G], rejected_logps [G], chosen_nll_sums [G], part)``
    on the per-sequence response sums (means with ``average_log_prob``) and the chosen NLL tokens' log-prob sums of
    the pairs ``part`` (None: all B; else a chunk's pairs, whose loss takes the whole batch's normalizers).
    ``inputs.targets`` hold the response targets and the chosen rows' NLL targets (``merge_nll_targets``). Returns
    the engine's loss, the (detached) result, the per-sequence log-probs ``[2, B]`` and, with ``vocab_metrics``,
    TRL's ``logits/chosen`` and ``logits/rejected`` (the mean untempered logit over the chosen / rejected response
    tokens, from the same pass; else empty). Packed: N rows with their ``layout``."""
    dtype = compute_dtype(inputs.hidden.dtype)
    b = tokens.response.shape[0] // 2
    rows = PreferenceRows.of(inputs.targets.view(inputs.lead_shape), opts.ignore_index, 2, layout)  # group: a pair
    response, nll = tokens.response.to(dtype), tokens.nll.to(dtype)
    counts = tokens.response.sum(1).to(dtype)

    def result_of(values: RowValues) -> tuple[DPOResult, Tensor]:
        batch, _ = rows.part(values.logprobs, values.rows, values.groups)
        part = values.groups

        def pairs(t: Tensor) -> Tensor:  # [2B, ...] -> the part's [2G, ...]
            return t if part is None else t.view(2, b, *t.shape[1:])[:, part].reshape(-1, *t.shape[1:])

        sums = (batch * pairs(response)).sum(-1)
        logps = (sums / pairs(counts).clamp(min=1) if average_log_prob else sums).view(2, -1)
        chosen_nll = (batch[:logps.shape[1]] * (nll if part is None else nll[part])).sum(-1)
        return loss_of(logps[0], logps[1], chosen_nll, part), logps

    out = fused_rows_loss(inputs, opts, lambda values: result_of(values)[0].loss, rows=rows.rows,
                          coupling=rows.group_rows, spec=RowStatsSpec(logit_sum=vocab_metrics))
    metrics = {}
    with torch.no_grad():
        result, logps = result_of(RowValues(out.logprobs, None, out.stats))
        if vocab_metrics:
            means = out.logprobs.new_zeros(0) if out.stats is None else token_logit_means(out.stats, inputs, opts)
            side = torch.div(rows.index, tokens.response.numel() // 2, rounding_mode="floor")  # 0: chosen
            on_response = tokens.response.reshape(-1)[rows.index]  # not the NLL-only (prompt) tokens
            for k, name in enumerate(("logits/chosen", "logits/rejected")):
                where = on_response & (side == k)
                metrics[name] = (means * where).sum() / where.sum().clamp(min=1)
    return out.loss, result, logps, metrics


def nll_of(sums: Tensor, counts: Tensor, num_chosen_tokens, part: slice | None = None) -> Tensor:
    """The chosen NLL ``-sum(sums) / num_chosen_tokens`` (default this batch's NLL tokens, ``counts [B]``, at least
    1), of the pairs ``part`` (``sums [G]``; None: all B)."""
    total = counts.sum().clamp(min=1) if num_chosen_tokens is None else num_chosen_tokens
    return rpo_nll(sums, counts if part is None else counts[part], num_tokens=total)


def fused_cpo_loss(inputs: LinearInputs, opts: LinearOptions, options: CPOOptions, tokens: PairTokens, *,
                   num_pairs, num_chosen_tokens, layout: PackedLayout | None = None,
                   vocab_metrics: bool = False) -> DPOLossOutput:
    """The fused CPO / SimPO / AlphaPO loss on validated inputs (``inputs.lead_shape == (2B, T)``, or N packed rows
    with their ``layout``)."""
    counts = tokens.nll.sum(1).to(compute_dtype(inputs.hidden.dtype))
    pairs = counts.shape[0] if num_pairs is None else num_pairs  # a part of the pairs: the whole batch's count

    def loss_of(chosen: Tensor, rejected: Tensor, nll_sums: Tensor, part: slice | None) -> DPOResult:
        nll = None if options.cpo_alpha == 0 else nll_of(nll_sums, counts, num_chosen_tokens, part)
        return cpo_loss(chosen, rejected, options, chosen_nll=nll, num_pairs=num_pairs if part is None else pairs)

    loss, result, logps, vocab = fused_pair_loss(inputs, opts, tokens, loss_of, options.average_log_prob, layout,
                                                 vocab_metrics)
    return pair_output(loss, result, logps, {**dpo_metrics(result, logps), **vocab})


def fused_orpo_loss(inputs: LinearInputs, opts: LinearOptions, beta: float, tokens: PairTokens, *, num_pairs,
                    num_chosen_tokens, layout: PackedLayout | None = None,
                    vocab_metrics: bool = False) -> DPOLossOutput:
    """The fused ORPO loss on validated inputs (``inputs.lead_shape == (2B, T)``, or N packed rows with their
    ``layout``): per-token means, the NLL. A pair with a response without tokens leaves the odds-ratio term
    (``orpo_loss``'s ``valid``)."""
    counts = tokens.nll.sum(1).to(compute_dtype(inputs.hidden.dtype))
    valid = tokens.response.view(2, -1, tokens.response.shape[-1]).any(-1).all(0)  # [B]: both responses have tokens
    pairs = counts.shape[0] if num_pairs is None else num_pairs  # a part of the pairs: the whole batch's count

    def loss_of(chosen: Tensor, rejected: Tensor, nll_sums: Tensor, part: slice | None) -> DPOResult:
        return orpo_loss(chosen, rejected, nll_of(nll_sums, counts, num_chosen_tokens, part), beta,
                         num_pairs=num_pairs if part is None else pairs,
                         valid=valid if part is None else valid[part])

    loss, result, logps, vocab = fused_pair_loss(inputs, opts, tokens, loss_of, True, layout, vocab_metrics)
    return pair_output(loss, result, logps, {**orpo_metrics(result, logps[0], logps[1], valid), **vocab})


def pair_output(loss: Tensor, result: DPOResult, logps: Tensor, metrics: dict[str, Tensor]) -> DPOLossOutput:
    """The DPO op's output type for a reference-free pair loss (K = 2, no running state)."""
    return DPOLossOutput(loss, result.chosen_rewards, result.rejected_rewards, logps[0], logps[1], metrics,
                         result.rewards, logps, None)
