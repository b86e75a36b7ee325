"""The public fused ops: functions of hidden states and the lm_head weight that never materialize the logits."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from .objectives.dpo import DPOOptions, RunningMean, check_count
from .objectives.grpo import GRPOLossConfig
from .objectives.kto import KTOOptions
from .objectives.preference import CPOOptions
from .objectives.ppo import PPOLossConfig
from .objectives.distill import DistillConfig
from .objectives.rloo import RLOOOptions
from .objectives.sft import CrossEntropyConfig
from .ops.cpo import fused_cpo_loss, fused_orpo_loss, merge_nll_targets
from .ops.cross_entropy import CrossEntropyOutput, fused_cross_entropy
from .ops.distill import DistillLossOutput, fused_distill_loss, validate_teacher
from .ops.dpo import DPOLossOutput, DPOOpConfig, fused_dpo_loss, validate_preference_layout, validate_reference
from .ops.grpo import GRPOLossOutput, fused_grpo_loss, validate_grpo_inputs
from .ops.kto import KTOLossOutput, fused_kto_loss, validate_kto_inputs
from .ops.logprobs import linear_logprobs, prepare_linear
from .ops.linear import LinearOptions
from .ops.segments import PackedLayout, check_sequence_count, packed_layout, validate_sequence_layout
from .ops.ppo import PPOLossOutput, ppo_loss, validate_value_head
from .ops.rloo import RLOOLossOutput, fused_rloo_loss, validate_rloo_inputs
from .ops.torch_backend import compute_dtype
from .ops.validation import (FLOAT_DTYPES, LinearInputs, check_logit_transform, masked_token_tensor, require_bool,
                             require_tensor, validate_token_mask)


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                          temperature: float = 1.0, logit_scale: float = 1.0,
                          logit_softcap: float | None = None, ignore_index: int = -100, return_entropy: bool = False,
                          backend: str = "auto", chunk_size: int | None = None,
                          deterministic: bool | None = None, check_finite: bool = True,
                          process_group=None, reduce_hidden_grad: bool = True):
    """Per-token log-probs ``log softmax((hidden @ weight.T + bias) / temperature)[targets]``, without the logits.

    Args:
        hidden: ``[..., H]`` last hidden states (fp32, fp16, bf16; float64 on the torch backend).
        weight: ``[V, H]`` lm_head weight, same dtype. A frozen weight (``requires_grad=False``) costs no
            ``d weight`` work.
        targets: ``[...]`` int64 token ids in ``[0, V)``, or ``ignore_index`` (log-prob 0, no gradient).
        bias: optional ``[V]`` lm_head bias.
        temperature: positive divisor of the logits.
        logit_scale: positive multiplier of the raw logits ``hidden @ weight.T + bias``, before the softcap (Cohere's
            ``logit_scale``; Granite divides by ``logits_scaling``: pass its inverse).
        logit_softcap: ``c`` of the softcap ``c * tanh(x / c)`` applied to the scaled logits before the temperature
            (Gemma 2/3's ``final_logit_softcapping``), None: no softcap. Every statistic (log-sum-exp, entropy...)
            is of the transformed logits; the gradients flow through the transform.
        return_entropy: also return the entropy ``-sum_v p_v log p_v`` of the tempered distribution.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere; ``$FASTALIGN_BACKEND`` overrides), ``"triton"``,
            ``"torch"``.
        chunk_size: tokens per chunk on the torch backend; None sizes it from ``$FASTALIGN_CHUNK_BUDGET_MB``
            (default 48 MiB of ``[chunk, V]`` temporaries).
        deterministic: batch-invariant and run-to-run deterministic (see the README's "Deterministic mode"): a
            row's log-prob and entropy are bitwise the same whatever the other rows, the batch size, the chunk size
            or the memory budget, and the gradients repeat bit for bit. None (default): on when
            ``torch.are_deterministic_algorithms_enabled()`` or ``$FASTALIGN_DETERMINISTIC=1``. On triton: a fixed
            vocabulary split merged in order and the atomic-free backward (a logit-gradient workspace of about 512 MiB).
        check_finite: raise on NaN/inf in ``hidden``, ``weight`` or ``bias`` (one cheap pass over each).
        process_group: vocab-parallel (tensor-parallel) lm_head: a ``torch.distributed.ProcessGroup`` over which
            the vocabulary is split. ``weight`` is then this rank's contiguous shard ``[V_r, H]`` (rows
            ``vocab_start ..``, ranks in group order, shards may be uneven), ``bias`` ``[V_r]``, ``hidden`` and
            ``targets`` (global ids in ``[0, V)``) the same on every rank; every rank returns exactly the
            unsharded op's outputs (row statistics merged with two all-reduces per forward), and gets its own
            ``d weight`` / ``d bias`` shard. Every rank must call the op (collectives). On the torch backend a
            frozen weight then costs one matmul more than unsharded (three).
        reduce_hidden_grad: with ``process_group``, all-reduce ``d hidden`` over the group inside the op (default:
            each rank gets exactly the unsharded gradient). False leaves each rank its partial sum (its shard's
            vocabulary), Megatron style, for a caller whose copy-to-tensor-parallel-region backward all-reduces it.
            Without a group, ``d hidden`` is always whole.

    Returns:
        ``logprobs`` shaped like ``targets``, fp32 (float64 for float64 inputs); with ``return_entropy``,
        ``(logprobs, entropy)``. Both are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, logit_scale=logit_scale,
                                  logit_softcap=logit_softcap, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                                  check_finite=check_finite,
                                  process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    logprobs, entropy = linear_logprobs(inputs, opts, require_bool("return_entropy", return_entropy))
    logprobs = logprobs.view(inputs.lead_shape)
    return (logprobs, entropy.view(inputs.lead_shape)) if return_entropy else logprobs


def fused_linear_ppo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor,
                          advantages: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
                          ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                          cliprange: float = 0.2, cliprange_high: float | None = None,
                          dual_clip: float | None = None, entropy_coef: float = 0.0, temperature: float = 1.0,
                          logit_scale: float = 1.0, logit_softcap: float | None = None,
                          value_head_weight: Tensor | None = None, value_head_bias: Tensor | None = None,
                          old_values: Tensor | None = None, returns: Tensor | None = None,
                          cliprange_value: float = 0.2, vf_coef: float = 0.1, loss_agg: str = "token-mean",
                          num_tokens=None, num_sequences=None, compute_entropy: bool | None = None,
                          cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                          ignore_index: int = -100, backend: str = "auto", chunk_size: int | None = None,
                          deterministic: bool | None = None,
                          check_finite: bool = True, process_group=None,
                          reduce_hidden_grad: bool = True) -> PPOLossOutput:
    """PPO loss from hidden states in one pass over the vocabulary, without the logits.

    ``loss = agg(pg + kl_coef * kl - entropy_coef * entropy) + vf_coef * agg(value_loss)`` with the clipped
    surrogate ``pg = max(-A r, -A clip(r, 1 - cliprange, 1 + cliprange_high))`` (optional dual clip), the KL
    estimator ``kl_estimator`` (``k1``, ``k2``, ``k3``) to ``ref_logprobs``, and the clipped value loss of a linear
    value head on the same hidden rows. Formulas: ``fastalign.objectives.ppo``.

    Args:
        hidden ``[B, T, H]``, weight ``[V, H]``, targets ``[B, T]`` (sampled token ids, ``ignore_index`` allowed),
        old_logprobs, advantages, ref_logprobs, mask: ``[B, T]``. ``mask`` marks response tokens (default: the
        tokens whose target is not ignored); masked tokens contribute nothing: the per-token inputs' values there
        (``old_values`` and ``returns`` too) are replaced by 0 before any use, whatever they are (-100, -inf, NaN;
        ``check_finite`` looks at the response tokens only). Log-prob inputs must be <= 0 up to rounding
        (``fastalign.ops.validation.LOGPROB_TOLERANCE``: 1e-4 in fp32/fp64, 0.05 in fp16/bf16).
        kl_coef, vf_coef: >= 0 (a negative weight would reward the KL or the value error).
        value_head_weight: ``[H]`` or ``[K, H]`` (with ``value_head_bias`` ``[]``/``[K]``); then ``old_values`` and
            ``returns`` ``[B, T]`` (``[B, T, K]``) are required. Without a head the op is policy-only (GRPO).
        loss_agg: ``token-mean``, ``seq-mean-token-sum`` or ``seq-mean-token-mean``; ``num_tokens`` /
            ``num_sequences``: the normalizer over the whole accumulated batch (gradient accumulation, data
            parallel), default this batch's.
        compute_entropy: compute the entropy (for ``objective/entropy``); default: when ``entropy_coef != 0``.
        cu_seqlens, position_ids: a packed batch (``hidden [N, H]`` or ``[1, N, H]``, per-token arguments ``[N]``)
            of the sequences they describe (as in :func:`fused_linear_grpo_loss`), aggregated per sequence as the
            padded batch would be.
        process_group, reduce_hidden_grad: vocab-parallel lm_head, as in :func:`fused_linear_logprobs`; the per-token
            inputs and the value head are the same on every rank. With ``reduce_hidden_grad=False`` the value
            head's share of ``d hidden`` goes to the group's rank 0 only, so that the ranks' partials sum to it
            once. The torch backend keeps its one pass (three matmuls), merging each chunk's statistics.
        Other options as in :func:`fused_linear_logprobs`.

    Returns:
        ``PPOLossOutput(loss, metrics, logprobs, entropy, values)``: ``loss`` differentiable w.r.t. hidden,
        weight, bias and the value head; the rest detached. Metrics: 0-d fp32 tensors (float64 for float64 inputs)
        under TRL's names (``policy/clipfrac``, ``policy/approxkl``, ``objective/kl``, ``objective/entropy``,
        ``loss/policy``, ``loss/value``, ``val/clipfrac``, ``val/vpred``, ``policy/ratio_mean`` ...).
    """
    if cu_seqlens is not None or position_ids is not None:
        validate_sequence_layout(hidden, targets, packed=True)
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, logit_scale=logit_scale,
                                  logit_softcap=logit_softcap, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                                  check_finite=check_finite,
                                  process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    layout = packed_layout(inputs.targets.numel(), inputs.hidden.device, cu_seqlens=cu_seqlens,
                           position_ids=position_ids)
    config = PPOLossConfig(cliprange=cliprange, cliprange_high=cliprange_high, dual_clip=dual_clip, kl_coef=kl_coef,
                           kl_estimator=kl_estimator, entropy_coef=entropy_coef, cliprange_value=cliprange_value,
                           vf_coef=vf_coef, loss_agg=loss_agg)
    not_ignored = targets != ignore_index
    if mask is None:
        mask = not_ignored
    else:
        mask = validate_token_mask("mask", mask, targets.shape, inputs.hidden.device) & not_ignored
    token = partial(masked_token_tensor, mask=mask, check_finite=check_finite)  # masked positions: 0
    old_logprobs, advantages = token("old_logprobs", old_logprobs, logprobs=True), token("advantages", advantages)
    if ref_logprobs is not None:
        ref_logprobs = token("ref_logprobs", ref_logprobs, logprobs=True)
    elif kl_coef != 0:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (kl_coef={kl_coef}), got None")
    value_head = validate_value_head(value_head_weight, value_head_bias, old_values, returns, inputs,
                                     mask, check_finite)
    with_entropy = entropy_coef != 0 if compute_entropy is None else require_bool("compute_entropy", compute_entropy)
    if entropy_coef != 0 and not with_entropy:
        raise ValueError(f"compute_entropy: expected True when entropy_coef != 0 (entropy_coef={entropy_coef}), "
                         "got False")
    return ppo_loss(inputs, opts, config, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                    ref_logprobs=ref_logprobs, value_head=value_head, num_tokens=num_tokens,
                    num_sequences=num_sequences, with_entropy=with_entropy, layout=layout)


def fused_linear_dpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                          ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                          ref_logps: Tensor | None = None, ref_hidden: Tensor | None = None,
                          ref_weight: Tensor | None = None, ref_bias: Tensor | None = None, beta: float = 0.1,
                          loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
                          label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                          f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
                          ld_alpha: float | None = None, use_weighting: bool = False, num_responses: int = 2,
                          average_log_prob: bool | None = None, rpo_alpha: float | None = None,
                          reference_free: bool = False, bco_state: RunningMean | None = None,
                          vocab_metrics: bool = False, temperature: float = 1.0, logit_scale: float = 1.0,
                          logit_softcap: float | None = None,
                          num_pairs: int | Tensor | None = None, num_chosen_tokens: int | Tensor | None = None,
                          cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                          ignore_index: int = -100, backend: str = "auto", chunk_size: int | None = None,
                          deterministic: bool | None = None,
                          check_finite: bool = True, process_group=None,
                          reduce_hidden_grad: bool = True) -> DPOLossOutput:
    """DPO loss (TRL's ``DPOTrainer`` loss surface) and rankings from hidden states, without the logits.

    Each response's log-prob is the sum over its completion tokens (``targets != ignore_index``) of the token
    log-probs (LD-DPO: the tokens past the shorter response weighted by ``ld_alpha``); the loss of those numbers for
    the policy and the reference is TRL's ``DPOTrainer._compute_loss`` (formulas: ``fastalign.objectives.dpo``).
    Prompt and padding tokens cost no logits. On the torch backend a chunk holds whole prompts (their K responses)
    when they fit the memory budget (one pass, three matmuls), else the op makes two passes (four matmuls, memory
    O(chunk) however long a response is), as do ``aot``/``aot_unpaired`` and ``bco_pair`` with a ``bco_state``
    (batch-coupled); the triton backend always makes two passes, O(tile) memory.

    Args:
        hidden: ``[K*B, T, H]`` last hidden states of the policy, K = ``num_responses`` groups of B rows, best first:
            for pairs rows ``0 .. B-1`` the chosen sequences, rows ``B .. 2B-1`` the rejected ones (TRL's layout).
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``. Same dtype as ``hidden``.
        targets: ``[K*B, T]`` next-token ids, ``ignore_index`` on prompt and padding positions.
        ref_chosen_logps, ref_rejected_logps: precomputed reference log-probs ``[B]`` of pairs, or ``ref_logps``
            ``[K, B]``: **sums** over the completion tokens for every loss type, as TRL precomputes them (LD-DPO
            weighted with ``ld_alpha``; means only with ``average_log_prob=True``), <= 0 up to rounding (the
            tolerance of ``LOGPROB_TOLERANCE`` times T); or
        ref_hidden, ref_weight, ref_bias: the reference model's ``[K*B, T, H]`` hidden states, ``[V, H]`` lm_head
            weight (pass ``weight`` when it is shared) and ``[V]`` bias: its log-probs are computed here, forward
            only. Exactly one of the two, unless ``reference_free``.
        beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau,
            ld_alpha, use_weighting: TRL's ``DPOConfig`` options. ``loss_type`` a name or a list of names from
            ``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``,
            ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``, ``sigmoid_norm``; the loss is
            the ``loss_weights``-weighted sum of each type's mean (weights >= 0; ``f_alpha_divergence_coef`` > 0,
            the f-DPO paper's alpha; TRL's config checks neither). ``ipo`` and ``sigmoid_norm`` divide the log-ratio
            scores by the completion lengths, as TRL. ``use_weighting`` (WPO): each pair's loss times the detached
            product of its responses' ``exp(mean over tokens of log p_y - log sum_v p_v^2)``, with ``lse(2z)``
            computed in the same pass over the vocabulary (never from materialized logits).
        num_responses: K >= 2 responses per prompt, best first; K > 2: the Plackett-Luce ranking loss
            (``loss_type`` ``sigmoid``, plus ``sft``), equal to ``sigmoid`` at K = 2.
        average_log_prob: True: per-token means instead of sums, policy and reference alike (a sequence without
            completion tokens counts 0); ``ipo`` and ``sigmoid_norm`` then do not divide again. Default (None,
            False): sums.
        rpo_alpha: adds ``rpo_alpha *`` the mean NLL per chosen token (RPO). reference_free: reference log-probs 0.
        bco_state: ``RunningMean`` of ``bco_pair`` (TRL < 1.0's reward shift; None: no shift, TRL 1.x); the updated
            one is returned in ``bco_state``.
        vocab_metrics: also compute TRL's metrics over the vocabulary, from per-row statistics of the same pass:
            ``entropy`` (completion tokens), ``logits/chosen``, ``logits/rejected`` (mean untempered logit of the
            best / worst responses' tokens), ``mean_token_accuracy`` (arg-max == target on the best responses).
        temperature, logit_scale, logit_softcap: the logits' temperature and transform (as in
            :func:`fused_linear_logprobs`), policy and reference alike.
        num_pairs, num_chosen_tokens: the normalizers over the whole accumulated batch (gradient accumulation, data
            parallel), an int or a one-element tensor: each loss type's mean is ``sum / num_pairs`` and the chosen
            NLL (``sft``, RPO) ``-sum(chosen token log-probs) / num_chosen_tokens``, so that the parts add up to the
            whole. Default this batch's B and its number of chosen completion tokens.
        cu_seqlens, position_ids: a packed (padding-free) batch instead of a padded one (TRL's ``padding_free``):
            ``hidden [N, H]`` (or ``[1, N, H]``), ``targets [N]`` (``ref_hidden`` like ``hidden``) of the K*B
            sequences given by flash-attention's ``cu_seqlens`` (int ``[S + 1]`` offsets) or transformers'
            ``position_ids`` (a sequence starts where the position is 0), in the padded layout's order: the B
            chosen sequences, then the B rejected ones (K groups of B, best first). Precomputed reference log-probs
            stay per sequence (``[B]``, ``[K, B]``). Same loss as the padded batch.
        deterministic: as in :func:`fused_linear_logprobs`.
        backend, chunk_size, check_finite, process_group, reduce_hidden_grad: as in :func:`fused_linear_logprobs`;
            a computed reference's ``ref_weight`` (``ref_bias``) is sharded like ``weight``.

    Returns:
        ``DPOLossOutput(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, metrics, rewards, logps,
        bco_state)``: ``loss`` a scalar differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; the rewards
        ``beta * (policy - reference)`` and sequence log-probs of the best and worst responses ``[B]`` and of all
        ``[K, B]``; ``metrics`` with TRL's names ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``nll_loss`` (sft / RPO), those of
        ``vocab_metrics``, and ``rewards/ranking_accuracy`` for K > 2. All but ``loss`` are detached, fp32
        (float64 for float64 inputs).
    """
    options = DPOOptions(beta=beta, loss_type=loss_type if isinstance(loss_type, str) else tuple(loss_type),
                         loss_weights=None if loss_weights is None else tuple(loss_weights),
                         label_smoothing=label_smoothing, reference_free=reference_free, rpo_alpha=rpo_alpha,
                         f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                         discopop_tau=discopop_tau, ld_alpha=ld_alpha, use_weighting=use_weighting,
                         num_responses=num_responses)
    given = ref_logps if ref_logps is not None else ref_chosen_logps  # the sequences: a compiled position_ids' count
    sequences, layout = validate_preference_layout(
        hidden, targets, options.num_responses, cu_seqlens=cu_seqlens, position_ids=position_ids,
        num_sequences=given.numel() * (2 if ref_logps is None else 1) if isinstance(given, Tensor) else None)
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, logit_scale=logit_scale,
                                  logit_softcap=logit_softcap, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                                  check_finite=check_finite,
                                  process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    if average_log_prob is not None and not isinstance(average_log_prob, bool):
        raise TypeError(f"average_log_prob: expected a bool or None, got {type(average_log_prob).__name__}")
    if not isinstance(vocab_metrics, bool):
        raise TypeError(f"vocab_metrics: expected a bool, got {type(vocab_metrics).__name__}")
    if bco_state is not None and not isinstance(bco_state, RunningMean):
        raise TypeError(f"bco_state: expected a RunningMean or None, got {type(bco_state).__name__}")
    chosen = targets if layout is None else layout.to_padded(targets.reshape(-1), ignore_index)
    num_pairs, num_chosen_tokens = _pair_counts(sequences // options.num_responses, num_pairs, num_chosen_tokens,
                                                chosen[:sequences // options.num_responses] != ignore_index)
    config = DPOOpConfig(options, bool(average_log_prob), num_pairs, num_chosen_tokens, bco_state, vocab_metrics)
    reference = validate_reference(inputs, opts, options, sequences, ref_chosen_logps=ref_chosen_logps,
                                   ref_rejected_logps=ref_rejected_logps, ref_logps=ref_logps,
                                   ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                   check_finite=check_finite)
    return fused_dpo_loss(inputs, opts, config, reference, layout)


def _prepare_sequences(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, *, cu_seqlens,
                       position_ids, per_sequence: dict,
                       **linear) -> tuple[LinearInputs, LinearOptions, PackedLayout | None]:
    """:func:`prepare_linear` for a batch of sequences, padded (``hidden [B, T, H]``) or packed (``cu_seqlens`` or
    ``position_ids``): the inputs, the options and the packed layout (None when padded). The count of each
    per-sequence argument (``per_sequence``: name -> value) is checked against the layout first, so that a layout
    that does not match them is blamed, not the argument."""
    validate_sequence_layout(hidden, targets, cu_seqlens is not None or position_ids is not None)
    inputs, opts = prepare_linear(hidden, weight, targets, bias, **linear)
    counts = [value.numel() for value in per_sequence.values()  # [S] (or [S, 1]), not per token [N]
              if isinstance(value, Tensor) and value.dim() <= 2 and value.numel() != inputs.targets.numel()]
    layout = packed_layout(inputs.targets.numel(), inputs.hidden.device, cu_seqlens=cu_seqlens,
                           position_ids=position_ids, num_sequences=counts[0] if counts else None)
    for name, value in per_sequence.items():
        check_sequence_count(name, value, layout, cu_seqlens)
    return inputs, opts, layout


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor, *,
                           old_logprobs: Tensor | None = None, mask: Tensor | None = None, bias: Tensor | None = None,
                           loss_type: str = "dapo", importance_sampling_level: str = "token", epsilon: float = 0.2,
                           epsilon_high: float | None = None, delta: float | None = None, beta: float = 0.0,
                           ref_logprobs: Tensor | None = None, use_bias_correction_kl: bool = True,
                           importance_sampling_ratio: Tensor | None = None,
                           off_policy_mask_threshold: float | None = None, sampling_logprobs: Tensor | None = None,
                           top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0,
                           sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                           vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                           vespo_lambda_neg: float = 2.0, max_completion_length: int | None = None,
                           num_items_in_batch=None, cu_seqlens: Tensor | None = None,
                           position_ids: Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                           logit_softcap: float | None = None, ignore_index: int = -100,
                           backend: str = "auto", chunk_size: int | None = None,
                           deterministic: bool | None = None, check_finite: bool = True,
                           process_group=None, reduce_hidden_grad: bool = True,
                           compute_entropy: bool = True) -> GRPOLossOutput:
    """GRPO-family loss from hidden states, with every option of TRL's ``GRPOTrainer``, without the logits.

    Semantics are TRL 1.16's ``GRPOTrainer._compute_loss`` term for term, for one process and without the division
    by the gradient-accumulation steps (that stays the caller's): formulas in ``fastalign.objectives.grpo``, the few
    deviations in ``docs/trl-semantics.md``. Only completion tokens get logits. On the torch backend a per-token loss
    type takes one pass (three matmuls); sequence-level terms (``importance_sampling_level="sequence"`` (GSPO), vespo,
    the off-policy mask) take whole sequences per chunk in one pass when a sequence fits the memory budget, else two
    passes; ``top_entropy_quantile < 1`` (a quantile over the whole batch) always takes two passes (four matmuls).
    The triton backend always makes two passes. Memory stays O(chunk) (torch) or O(tile) (triton).

    Args:
        hidden: ``[B, T, H]`` last hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` sampled completion token ids, ``ignore_index`` on prompt and padding positions.
        advantages: ``[B]`` (one per completion, as TRL) or ``[B, T]`` (per token).
        old_logprobs: ``[B, T]`` log-probs at sampling time; None: on-policy (the detached current log-probs, ratio
            exactly 1).
        mask: ``[B, T]`` bool or 0/1 completion mask (e.g. TRL's ``completion_mask * tool_mask``); default the
            tokens whose target is not ignored. Fractional values are refused.
        loss_type: ``grpo``, ``dapo``, ``dr_grpo``, ``bnpo``, ``cispo``, ``sapo``, ``luspo``, ``vespo`` or a type
            registered with ``fastalign.objectives.grpo.register_grpo_loss`` (``docs/loss-registries.md``).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        epsilon, epsilon_high, delta: the clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high``
            defaults to ``epsilon``; for cispo the absolute cap of the ratio) and the two-sided clip's cap.
        beta, ref_logprobs, use_bias_correction_kl: the k3 KL term to ``ref_logprobs [B, T]`` (required when
            ``beta != 0``), times the importance ratio with ``use_bias_correction_kl``.
        importance_sampling_ratio: ``[B, T]`` or ``[B, 1]`` rollout-engine correction (TIS/MIS), multiplying the
            per-token loss after the masks and before the KL term (vespo: in its gamma weight).
        off_policy_mask_threshold, sampling_logprobs: the off-policy sequence mask and the rollout engine's
            log-probs it compares with (default ``old_logprobs``).
        top_entropy_quantile, entropy_coef: train on the tokens at or above the batch's entropy quantile; subtract
            ``entropy_coef *`` the mean entropy over the same tokens.
        sapo_temperature_pos, sapo_temperature_neg, vespo_*: the sapo gate's and vespo's gamma weight's parameters.
        max_completion_length: dr_grpo's constant normalizer (required for dr_grpo).
        cu_seqlens, position_ids: a packed (padding-free) batch instead of a padded one: ``hidden [N, H]`` (or
            ``[1, N, H]``), ``targets`` and every per-token argument ``[N]`` (``[1, N]``), per-sequence ones ``[S]``;
            the S sequences given by flash-attention's ``cu_seqlens`` (int ``[S + 1]`` offsets) or transformers'
            ``position_ids`` (a sequence starts where the position is 0). Same loss as the padded batch.
        num_items_in_batch: dapo/cispo/vespo normalizer, the completion tokens of the whole accumulated batch (a
            number or one-element tensor; default this batch's). Checked to be at least this batch's count.
        Masked positions: every per-token input (``advantages``, ``old_logprobs``, ``ref_logprobs``,
        ``sampling_logprobs``, the IS ratio) is replaced outside the completion mask by a neutral value (0; the
        ratio 1) before any use, so whatever it holds there (-100, -1e4, -inf, NaN) never reaches the loss, a metric
        or a gradient; ``check_finite`` looks at the completion tokens only. The log-prob inputs must be <= 0 up to
        rounding (``fastalign.ops.validation.LOGPROB_TOLERANCE``). Signs TRL never uses are refused: ``delta``
        <= 1, ``beta`` < 0, ``off_policy_mask_threshold`` < 0; dr_grpo's ``max_completion_length`` must be at least
        the longest completion (TRL truncates to it).
        deterministic: as in :func:`fused_linear_logprobs`.
        compute_entropy: compute the entropy (the ``entropy`` metric and output, as TRL logs it); False skips it
            (``entropy`` None, no ``entropy`` metric), refused when ``entropy_coef != 0`` or
            ``top_entropy_quantile < 1`` use it.
        temperature, logit_scale, logit_softcap, ignore_index, backend, chunk_size, check_finite, process_group,
        reduce_hidden_grad: as in
            :func:`fused_linear_logprobs` (vocab-parallel: every other argument the same on every rank).

    Returns:
        ``GRPOLossOutput(loss, metrics, logprobs, entropy)``: ``loss`` differentiable w.r.t. ``hidden``, ``weight``
        and ``bias``; ``metrics`` detached 0-d fp32 tensors (float64 for float64 inputs) under TRL's names
        (``entropy``, ``kl``, ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``,
        ``clip_ratio/high_max``,
        ``clip_ratio/region_mean``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss``; floats:
        ``{k: v.item() for k, v in out.metrics.items()}``); ``logprobs`` and ``entropy`` ``[B, T]`` detached fp32
        (0 outside the completion mask; ``[N]`` packed): the next iteration's ``old_logprobs`` need no extra forward.
    """
    inputs, opts, layout = _prepare_sequences(
        hidden, weight, targets, bias, cu_seqlens=cu_seqlens, position_ids=position_ids,
        per_sequence=dict(advantages=advantages, importance_sampling_ratio=importance_sampling_ratio),
        temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index,
        backend=backend, chunk_size=chunk_size, deterministic=deterministic, check_finite=check_finite,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    config = GRPOLossConfig(
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, epsilon=epsilon,
        epsilon_high=epsilon_high, delta=delta, beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        off_policy_mask_threshold=off_policy_mask_threshold, top_entropy_quantile=top_entropy_quantile,
        entropy_coef=entropy_coef, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, max_completion_length=max_completion_length)
    tokens = validate_grpo_inputs(
        targets, targets.shape[0] if layout is None else layout.num_sequences, compute_dtype(inputs.hidden.dtype),
        config, advantages=advantages, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logprobs=sampling_logprobs,
        num_items_in_batch=num_items_in_batch, ignore_index=int(ignore_index), check_finite=check_finite)
    with_entropy = require_bool("compute_entropy", compute_entropy)
    if config.uses_entropy and not with_entropy:
        raise ValueError(f"compute_entropy: expected True when entropy_coef != 0 or top_entropy_quantile < 1 "
                         f"(entropy_coef={entropy_coef}, top_entropy_quantile={top_entropy_quantile}), got False")
    return fused_grpo_loss(inputs, opts, config, tokens, layout, with_entropy)


def fused_linear_rloo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor, *,
                           old_logprobs: Tensor | None = None, mask: Tensor | None = None,
                           epsilon: float = RLOOOptions.epsilon, epsilon_high: float | None = RLOOOptions.epsilon_high,
                           bias: Tensor | None = None, cu_seqlens: Tensor | None = None,
                           position_ids: Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                           logit_softcap: float | None = None, ignore_index: int = -100, backend: str = "auto",
                           chunk_size: int | None = None, deterministic: bool | None = None,
                           check_finite: bool = True, process_group=None,
                           reduce_hidden_grad: bool = True) -> RLOOLossOutput:
    """RLOO loss from hidden states (TRL 1.16's ``RLOOTrainer._compute_loss``), without the logits.

    Each completion's log-prob is the sum of its completion tokens' log-probs, ``logps [B]``; the loss is
    ``mean_b -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`` with the sequence ratio ``r = exp(logps -
    old_logps)``, for one process and without the division by the gradient-accumulation steps (that stays the
    caller's). The advantages come from ``fastalign.objectives.rloo.rloo_advantages`` (leave-one-out baseline, the
    KL penalty in the reward); formulas and where TRL differs from the paper: ``fastalign.objectives.rloo``. Only
    completion tokens get logits; whole sequences per chunk (torch: one pass, three matmuls, when the longest
    completion fits the memory budget, else two passes; triton: two passes, four matmuls).

    Args:
        hidden: ``[B, T, H]`` last hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` sampled completion token ids, ``ignore_index`` on prompt and padding positions.
        advantages: ``[B]``, one per completion.
        old_logprobs: the log-probs at sampling time, per token ``[B, T]`` (summed over the completion mask, as TRL
            sums ``old_per_token_logps``) or per completion ``[B]`` (TRL's ``old_logps``); None: on-policy (the
            detached current log-probs, ratio exactly 1).
        mask: ``[B, T]`` bool or 0/1 completion mask (e.g. TRL's ``completion_mask``, zero for a truncated
            completion with ``mask_truncated_completions``); default the tokens whose target is not ignored.
        epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high`` None:
            ``epsilon``), TRL's ``RLOOConfig`` names and defaults.
        cu_seqlens, position_ids: a packed batch of S completions (``hidden [N, H]`` or ``[1, N, H]``, ``targets``
            and a per-token ``old_logprobs`` / ``mask`` ``[N]`` (``[1, N]``), ``advantages`` and a per-sequence
            ``old_logprobs`` ``[S]``; when ``N == S`` an ``old_logprobs [N]`` is read per token), as in
            :func:`fused_linear_grpo_loss`. Same loss as the padded batch.
        deterministic: as in :func:`fused_linear_logprobs`.
        temperature, logit_scale, logit_softcap, ignore_index, backend, chunk_size, check_finite, process_group,
            reduce_hidden_grad: as in :func:`fused_linear_logprobs` (vocab-parallel: every other argument the same
            on every rank).

    Returns:
        ``RLOOLossOutput(loss, metrics, logprobs, entropy, logps)``: ``loss`` differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``; ``metrics`` detached 0-d fp32 tensors (float64 for float64 inputs) under TRL's
        names (``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``,
        ``clip_ratio/high_max``, ``clip_ratio/region_mean``); ``logprobs`` and ``entropy`` ``[B, T]`` detached fp32
        (0 outside the completion mask; ``[N]`` packed); ``logps [B]`` the completions' log-probs, detached.
    """
    inputs, opts, layout = _prepare_sequences(
        hidden, weight, targets, bias, cu_seqlens=cu_seqlens, position_ids=position_ids,
        per_sequence=dict(advantages=advantages, old_logprobs=old_logprobs),
        temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index,
        backend=backend, chunk_size=chunk_size, deterministic=deterministic, check_finite=check_finite,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    options = RLOOOptions(epsilon=epsilon, epsilon_high=epsilon_high)
    tokens = validate_rloo_inputs(targets, layout, compute_dtype(inputs.hidden.dtype), advantages=advantages,
                                  mask=mask, old_logprobs=old_logprobs, ignore_index=int(ignore_index),
                                  check_finite=check_finite)
    return fused_rloo_loss(inputs, opts, options, tokens, layout)


def fused_linear_kto_loss(hidden: Tensor, weight: Tensor, targets: Tensor, labels: Tensor, *, ref_logps: Tensor,
                          kl: Tensor | None, bias: Tensor | None = None, beta: float = 0.1,
                          desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
                          average_log_prob: bool = False, vocab_metrics: bool = False,
                          num_examples: int | Tensor | None = None, temperature: float = 1.0,
                          logit_scale: float = 1.0, logit_softcap: float | None = None,
                          cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                          ignore_index: int = -100, backend: str = "auto", chunk_size: int | None = None,
                          deterministic: bool | None = None,
                          check_finite: bool = True, process_group=None,
                          reduce_hidden_grad: bool = True) -> KTOLossOutput:
    """KTO loss of unpaired completions from hidden states (TRL's ``KTOTrainer``), without the logits.

    Each completion's log-prob is the sum of its token log-probs (``targets != ignore_index``); the loss of those
    ``[B]`` sums, the reference's and the labels is TRL's (formulas: ``fastalign.objectives.kto``). Only completion
    tokens get logits; one sequence per engine group (torch: one pass of three matmuls when the longest completion
    fits the memory budget, else two passes; triton: two passes).

    Args:
        hidden: ``[B, T, H]`` last hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` completion token ids, ``ignore_index`` on prompt and padding positions.
        labels: ``[B]`` bool, True for a desirable completion. A batch may hold only one kind.
        ref_logps: ``[B]`` the reference model's completion log-prob sums (means with ``average_log_prob``), <= 0.
        kl: the batch KL estimate, a one-element tensor >= 0 (``fastalign.objectives.kto.kto_kl`` of the policy's
            and the reference's log-probs on mismatched prompt/completion pairs, clamped at 0 as TRL; detached
            here), required for ``loss_type="kto"``; None for ``"apo_zero_unpaired"``.
        beta, desirable_weight, undesirable_weight, loss_type: TRL's ``KTOConfig`` options (``kto``,
            ``apo_zero_unpaired``).
        average_log_prob: True: each completion's log-prob is the mean of its token log-probs instead of the sum
            (length-normalized, as TRL's older ``_get_batch_logps(average_log_prob=True)`` and Liger's KTO; a
            completion without tokens counts 0); pass ``ref_logps`` and the ``kl`` estimate's log-probs reduced
            the same way. Default False: sums, TRL 1.16's KTO.
        vocab_metrics: also return TRL 1.16's per-batch sums behind ``logits/chosen`` and ``logits/rejected`` (the
            mean untempered logit over the desirable / undesirable completions' tokens, from per-row statistics of
            the same pass): ``logits/{chosen,rejected}_sum`` and ``count/{chosen,rejected}_tokens``, which
            ``kto_metric_means`` turns into TRL's logged means.
        num_examples: the completions of the whole accumulated batch (an int or one-element tensor): the loss is
            ``sum(losses) / num_examples``; default B (the mean).
        cu_seqlens, position_ids: a packed batch of B completions (``hidden [N, H]`` or ``[1, N, H]``, ``targets
            [N]``; ``labels`` and ``ref_logps`` stay ``[B]``), as in :func:`fused_linear_grpo_loss`.
        deterministic: as in :func:`fused_linear_logprobs`.
        temperature, logit_scale, logit_softcap, ignore_index, backend, chunk_size, check_finite, process_group,
        reduce_hidden_grad: as in
            :func:`fused_linear_logprobs` (vocab-parallel: every other argument the same on every rank).

    Returns:
        ``KTOLossOutput(loss, rewards, logps, metrics)``: ``loss`` differentiable w.r.t. ``hidden``, ``weight`` and
        ``bias``; ``rewards`` ``beta * (policy - reference)`` and ``logps`` ``[B]``; ``metrics`` TRL's per-batch
        ``kl``, ``rewards/{chosen,rejected}_sum``, ``logps/{chosen,rejected}_sum``, ``count/{chosen,rejected}``
        (sides present only; ``fastalign.objectives.kto.kto_metric_means`` turns summed ones into TRL's logged
        means). All but ``loss`` detached, fp32 (float64 for float64 inputs).
    """
    inputs, opts, layout = _prepare_sequences(
        hidden, weight, targets, bias, cu_seqlens=cu_seqlens, position_ids=position_ids,
        per_sequence=dict(labels=labels, ref_logps=ref_logps),
        temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index,
        backend=backend, chunk_size=chunk_size, deterministic=deterministic, check_finite=check_finite,
        process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    options = KTOOptions(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight)
    average_log_prob = require_bool("average_log_prob", average_log_prob)
    examples = validate_kto_inputs(targets, targets.shape[0] if layout is None else layout.num_sequences,
                                   compute_dtype(inputs.hidden.dtype), options, labels=labels, ref_logps=ref_logps,
                                   kl=kl, num_examples=num_examples, check_finite=check_finite,
                                   average_log_prob=average_log_prob)
    return fused_kto_loss(inputs, opts, options, examples, layout, average_log_prob=average_log_prob,
                          vocab_metrics=require_bool("vocab_metrics", vocab_metrics))


def _pair_counts(pairs: int, num_pairs, num_chosen_tokens, chosen_tokens: Tensor):
    """The normalizers over the accumulated batch, checked against this batch's ``pairs`` (prompts) and its chosen
    (NLL) tokens (bool ``chosen_tokens``; counted only when ``num_chosen_tokens`` is an int)."""
    if num_pairs is not None:
        num_pairs = check_count("num_pairs", num_pairs, pairs, "at least the pairs in this batch")
    if num_chosen_tokens is not None:
        unchecked = isinstance(num_chosen_tokens, Tensor) or torch.compiler.is_compiling()  # no sync
        own = 1 if unchecked else max(int(chosen_tokens.sum()), 1)
        num_chosen_tokens = check_count("num_chosen_tokens", num_chosen_tokens, own,
                                        "at least this batch's chosen NLL tokens")
    return num_pairs, num_chosen_tokens


def fused_linear_cpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                          beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                          simpo_gamma: float = 0.5, cpo_alpha: float = 1.0, alpha: float = 0.0,
                          vocab_metrics: bool = False,
                          num_pairs: int | Tensor | None = None, num_chosen_tokens: int | Tensor | None = None,
                          cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                          temperature: float = 1.0, logit_scale: float = 1.0,
                          logit_softcap: float | None = None, ignore_index: int = -100, backend: str = "auto",
                          chunk_size: int | None = None,
                          deterministic: bool | None = None, check_finite: bool = True, process_group=None,
                          reduce_hidden_grad: bool = True) -> DPOLossOutput:
    """CPO, SimPO and AlphaPO losses from hidden states (TRL's ``CPOTrainer``), reference-free, without the logits.

    Each response's log-prob is the sum of its token log-probs (``sigmoid``, ``hinge``) or their mean (``ipo``,
    ``simpo``), as TRL; the loss is ``mean(pair losses) + cpo_alpha *`` the mean NLL per chosen response token
    (formulas: ``fastalign.objectives.preference``). Prompt and padding tokens get no logits; one pair per engine
    group (torch: one pass when the largest pair fits the memory budget, else two passes; triton: two passes).

    Args:
        hidden: ``[2B, T, H]``: rows ``0 .. B-1`` the chosen sequences, ``B .. 2B-1`` the rejected ones.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[2B, T]`` next-token ids, ``ignore_index`` on prompt and padding positions.
        beta, loss_type, label_smoothing, simpo_gamma, cpo_alpha, alpha: TRL's ``CPOConfig`` (``loss_type`` in
            ``sigmoid``, ``hinge``, ``ipo``, ``simpo``; TRL's ``"alphapo"`` is ``loss_type="simpo", cpo_alpha=0``
            with ``alpha != 0``). A response without tokens has log-prob 0 (its mean too).
        vocab_metrics: also compute TRL's ``logits/chosen`` and ``logits/rejected``: the mean untempered logit over
            the chosen / rejected response tokens (0 without any), from per-row statistics of the same pass. (TRL's
            experimental CPO and ORPO trainers average the full logits over every position of the padded batch,
            prompt and padding included, which the fused op never computes; this is the completion-token mean of
            TRL 1.16's DPO and KTO trainers.)
        num_pairs, num_chosen_tokens: normalizers over the whole accumulated batch, as in
            :func:`fused_linear_dpo_loss`.
        cu_seqlens, position_ids: a packed batch of the 2B sequences, chosen first, as in
            :func:`fused_linear_dpo_loss`.
        deterministic: as in :func:`fused_linear_logprobs`.
        temperature, logit_scale, logit_softcap, ignore_index, backend, chunk_size, check_finite, process_group,
        reduce_hidden_grad: as in
            :func:`fused_linear_logprobs`.

    Returns:
        ``DPOLossOutput(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, metrics)``: rewards
        ``beta * logps`` (AlphaPO: ``beta`` times the shaped reward); ``metrics`` TRL's ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
        ``nll_loss`` (0 when ``cpo_alpha=0``), ``logits/chosen``, ``logits/rejected`` (``vocab_metrics``); all but
        ``loss`` detached.
    """
    sequences, layout = validate_preference_layout(hidden, targets, 2, cu_seqlens=cu_seqlens, position_ids=position_ids)
    options = CPOOptions(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                         cpo_alpha=cpo_alpha, alpha=alpha)
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, logit_scale=logit_scale,
                                  logit_softcap=logit_softcap, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                                  check_finite=check_finite,
                                  process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    _, tokens = merge_nll_targets(targets, None, int(ignore_index), layout)
    num_pairs, num_chosen_tokens = _pair_counts(sequences // 2, num_pairs, num_chosen_tokens, tokens.nll)
    return fused_cpo_loss(inputs, opts, options, tokens, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens,
                          layout=layout, vocab_metrics=require_bool("vocab_metrics", vocab_metrics))


def fused_linear_orpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                           beta: float = 0.1, nll_targets: Tensor | None = None, vocab_metrics: bool = False,
                           num_pairs: int | Tensor | None = None, num_chosen_tokens: int | Tensor | None = None,
                           cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                           temperature: float = 1.0, logit_scale: float = 1.0,
                           logit_softcap: float | None = None, ignore_index: int = -100, backend: str = "auto",
                           chunk_size: int | None = None,
                           deterministic: bool | None = None, check_finite: bool = True, process_group=None,
                           reduce_hidden_grad: bool = True) -> DPOLossOutput:
    """ORPO loss from hidden states (TRL's ``ORPOTrainer``): odds ratio of the per-token mean log-probs and the
    chosen NLL, reference-free, without the logits.

    Args:
        hidden, weight, bias, targets: as in :func:`fused_linear_cpo_loss` (``[2B, T, H]``, chosen rows first).
        beta: weight of the odds-ratio term (TRL's ``ORPOConfig.beta``, the paper's lambda).
        nll_targets: ``[B, T]`` integer next-token ids of the chosen sequences for the NLL term, ``ignore_index``
            elsewhere, equal to ``targets`` on every chosen response token (an error otherwise: TRL's trainer takes
            the NLL and the log-probs from the same chosen input ids, so a different or missing response token has
            no TRL meaning). TRL's trainer takes the NLL over the prompt and the response (all attended tokens):
            pass the chosen input ids shifted by one with padding ignored. None: the chosen response tokens only.
        vocab_metrics: ``logits/chosen`` and ``logits/rejected`` over the response tokens (not the NLL-only prompt
            tokens), as in :func:`fused_linear_cpo_loss`.
        num_pairs, num_chosen_tokens: normalizers over the whole accumulated batch (``num_chosen_tokens`` counts
            the NLL tokens), as in :func:`fused_linear_dpo_loss`.
        cu_seqlens, position_ids: a packed batch of the 2B sequences, chosen first, as in
            :func:`fused_linear_dpo_loss`; ``nll_targets`` then shaped like ``targets``, ``ignore_index`` on the
            rejected sequences.
        deterministic: as in :func:`fused_linear_logprobs`.
        temperature, logit_scale, logit_softcap, ignore_index, backend, chunk_size, check_finite, process_group,
        reduce_hidden_grad: as in
            :func:`fused_linear_logprobs`.

    Returns:
        ``DPOLossOutput``: rewards ``beta * logps`` (means); ``metrics`` TRL's ``rewards/*``, ``logps/*``,
        ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``, ``logits/*`` (``vocab_metrics``); all but ``loss``
        detached. A pair with a response without tokens (TRL: a 0/0 mean, NaN) contributes 0 to the odds-ratio
        term and to ``log_odds_*`` (still counted in the mean over pairs), so an all-masked batch gives loss 0.
    """
    sequences, layout = validate_preference_layout(hidden, targets, 2, cu_seqlens=cu_seqlens, position_ids=position_ids)
    merged, tokens = merge_nll_targets(targets, nll_targets, int(ignore_index), layout)
    inputs, opts = prepare_linear(hidden, weight, merged, bias, temperature=temperature, logit_scale=logit_scale,
                                  logit_softcap=logit_softcap, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                                  check_finite=check_finite,
                                  process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    num_pairs, num_chosen_tokens = _pair_counts(sequences // 2, num_pairs, num_chosen_tokens, tokens.nll)
    return fused_orpo_loss(inputs, opts, beta, tokens, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens,
                           layout=layout, vocab_metrics=require_bool("vocab_metrics", vocab_metrics))


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                               reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                               loss_type: str = "nll", num_items_in_batch=None, temperature: float = 1.0,
                               logit_scale: float = 1.0, logit_softcap: float | None = None, ignore_index: int = -100,
                               backend: str = "auto", chunk_size: int | None = None, process_group=None,
                               deterministic: bool | None = None, check_finite: bool = True,
                               reduce_hidden_grad: bool = True) -> CrossEntropyOutput:
    """Cross-entropy of ``softmax((hidden @ weight.T + bias) / temperature)`` against ``targets`` (SFT), without the
    logits: ``F.cross_entropy``'s semantics plus TRL 1.16's SFT ``dft`` loss and a PaLM z-loss.

    Formulas in ``fastalign.objectives.sft``. On the torch backend one pass (three matmuls) for a scalar reduction,
    two passes on triton and for ``reduction="none"`` (four matmuls); memory O(chunk) / O(tile). Only the tokens
    whose target is not ignored get logits.

    Args:
        hidden: ``[..., H]`` last hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[...]`` int64 token ids, ``ignore_index`` where not trained (prompt, padding).
        reduction: ``"mean"`` (over the counted tokens; 0 when none, TRL's clamp, where ``F.cross_entropy`` gives
            NaN), ``"sum"`` or ``"none"`` (per token ``[...]``, 0 at ignored positions).
        label_smoothing: ``F.cross_entropy``'s: ``(1 - eps) nll + eps * mean_v(-log p_v)``.
        z_loss: adds ``z_loss * lse^2`` per token (PaLM), reduced like the loss.
        loss_type: ``"nll"`` or ``"dft"`` (TRL's SFTTrainer: each token's NLL times its detached probability).
        num_items_in_batch: with ``reduction="mean"``, the sum over this count instead (transformers'
            ``ForCausalLMLoss`` and TRL's SFT: the tokens of the whole accumulated batch, at least this batch's).
        temperature: positive divisor of the logits.
        logit_scale, logit_softcap: the model's logit transform, ``softcap(logit_scale * z)`` before the
            temperature, ``softcap(x) = logit_softcap * tanh(x / logit_softcap)`` (None: none), as in
            :func:`fused_linear_logprobs`.
        ignore_index, backend, chunk_size, process_group, deterministic, check_finite, reduce_hidden_grad: as in
            :func:`fused_linear_logprobs` (vocab-parallel: every other argument the same on every rank).

    Returns:
        ``CrossEntropyOutput(loss, metrics, logprobs, lse)``: ``loss`` differentiable w.r.t. ``hidden``, ``weight``
        and ``bias``; ``metrics`` detached 0-d fp32 tensors (float64 for float64 inputs) under TRL's names
        ``entropy`` (mean over the counted tokens) and ``mean_token_accuracy`` (share of counted tokens whose
        arg-max logit is the target); ``logprobs`` and ``lse`` ``[...]`` detached fp32 (0 at ignored positions).
    """
    config = CrossEntropyConfig(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                loss_type=loss_type)
    inputs, opts = prepare_linear(hidden, weight, targets, bias, temperature=temperature, logit_scale=logit_scale,
                                  logit_softcap=logit_softcap, ignore_index=ignore_index, backend=backend,
                                  chunk_size=chunk_size, deterministic=deterministic, check_finite=check_finite,
                                  process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    return fused_cross_entropy(inputs, opts, config, num_items_in_batch)


def fused_linear_distill_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                              teacher_weight: Tensor, mask: Tensor | None = None, *, beta: float = 1.0,
                              temperature: float = 1.0, student_bias: Tensor | None = None,
                              teacher_bias: Tensor | None = None, student_logit_scale: float = 1.0,
                              teacher_logit_scale: float = 1.0, student_logit_softcap: float | None = None,
                              teacher_logit_softcap: float | None = None, num_items_in_batch=None,
                              hard_label_weight: float = 0.0, targets: Tensor | None = None, ignore_index: int = -100,
                              backend: str = "auto", chunk_size: int | None = None, process_group=None,
                              deterministic: bool | None = None, check_finite: bool = True,
                              reduce_hidden_grad: bool = True) -> DistillLossOutput:
    """On-policy distillation loss between a student and a frozen teacher over one vocabulary, without the logits of
    either: TRL 1.16's generalized JSD (``DistillationTrainer``, ``ChunkedDivergenceFunction``), term for term.

    Formulas in ``fastalign.objectives.distill``: ``beta`` 0 is the forward ``KL(teacher || student)``, 1 the
    reverse ``KL(student || teacher)``, in between the generalized JSD with mixture ``(1 - beta) p_s + beta p_t``;
    both models' logits divided by ``temperature``. Torch backend: per chunk of the masked rows, both heads'
    logits, the divergence and its gradient w.r.t. the student's logits, four matmuls; memory O(chunk). Triton
    (``fastalign.kernels.divergence``): each head's lse, the per-row terms, then the student's gradients, tile by
    tile (eight tile products); memory O(tile). Never an ``[N, V]`` of either model.

    Args:
        student_hidden, student_weight: ``[..., H_s]`` and ``[V, H_s]``; ``student_bias``: optional ``[V]``.
        teacher_hidden, teacher_weight: ``[..., H_t]`` (same leading shape) and ``[V, H_t]``; ``teacher_bias``
            optional ``[V]``. The teacher gets no gradient (its tensors are detached); hidden sizes may differ.
        mask: ``[...]`` bool or 0/1 completion mask (TRL's ``completion_mask``); default every position.
        beta: in ``[0, 1]``.
        temperature: positive divisor of both models' logits.
        student_logit_scale, teacher_logit_scale, student_logit_softcap, teacher_logit_softcap: each model's logit
            transform, ``softcap(logit_scale * z)`` then the temperature (TRL's order), ``softcap(x) = c tanh(x /
            c)`` (None: none).
        num_items_in_batch: the loss is the sum over this count (the accumulated batch's completion tokens), else
            the mean over the masked tokens (0 when there is none), as TRL.
        hard_label_weight, targets: ``(1 - w) divergence + w CE(targets)``, the cross-entropy on the student's
            logits before the temperature (Liger's distillation base), ``targets [...]`` with ``ignore_index``;
            ``targets`` required when ``w > 0``.
        ignore_index, chunk_size, check_finite: as in :func:`fused_linear_logprobs`.
        backend, deterministic: as in :func:`fused_linear_logprobs` (deterministic: a row's terms and gradients
            bitwise the same alone or in any batch, the weight's gradient the same on every run).
        process_group, reduce_hidden_grad: vocab-parallel, as in :func:`fused_linear_logprobs`: both weights are
            this rank's rows of the vocabulary (the same split), hidden states the same on every rank.

    Returns:
        ``DistillLossOutput(loss, metrics, entropy)``: ``loss`` differentiable w.r.t. the student's hidden, weight
        and bias; ``metrics`` detached 0-d fp32 tensors (float64 for float64 inputs): ``entropy`` (the student's
        mean, TRL's metric), ``divergence`` (the mean per-token divergence), ``hard_loss`` with ``targets``;
        ``entropy`` ``[...]`` the student's per-token entropy, detached (0 outside the mask).
    """
    student_logit_scale, student_logit_softcap = check_logit_transform(student_logit_scale, student_logit_softcap,
                                                                       prefix="student_")
    teacher_logit_scale, teacher_logit_softcap = check_logit_transform(teacher_logit_scale, teacher_logit_softcap,
                                                                       prefix="teacher_")
    config = DistillConfig(beta=beta, hard_label_weight=hard_label_weight)
    if hard_label_weight and targets is None:
        raise ValueError(f"targets: required when hard_label_weight > 0 (got {hard_label_weight!r}), got None")
    stand_in = targets  # prepare_linear validates targets: without any, zeros stand in (no hard loss)
    if targets is None:
        student_hidden = require_tensor("student_hidden", student_hidden, dtypes=FLOAT_DTYPES)
        stand_in = torch.zeros(student_hidden.shape[:-1], dtype=torch.long, device=student_hidden.device)
    student, opts = prepare_linear(student_hidden, student_weight, stand_in, student_bias, temperature=temperature,
                                   logit_scale=student_logit_scale, logit_softcap=student_logit_softcap,
                                   ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                                   deterministic=deterministic, check_finite=check_finite,
                                   process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    teacher = validate_teacher(teacher_hidden, teacher_weight, teacher_bias, student, check_finite=check_finite)
    teacher_opts = dataclasses.replace(opts, logit_scale=teacher_logit_scale, logit_softcap=teacher_logit_softcap)
    return fused_distill_loss(student, teacher, opts, teacher_opts, config, mask, targets, num_items_in_batch)
