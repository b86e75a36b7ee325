"""Fused PPO loss from hidden states: the clipped surrogate, KL and entropy terms with their gradient formed in the
forward pass (the loss is a scalar, so each token's gradient weight is known there), plus the value loss. The policy
terms go through the shared engine (``fastalign.ops.engine``, per-token coupling: one pass on the torch backend);
with a gradient on triton, through the PPO epilogue kernel."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.aggregation import aggregation_weights
from ..objectives.ppo import (PPOLossConfig, PPOTokens, ValueHeadInputs, policy_loss_value, ppo_metrics,
                              value_loss_terms)
from .engine import RowValues, fused_rows_loss
from .linear import LinearOptions, scale_precomputed_grads, triton_logprobs_backward, triton_ppo_forward
from .segments import PackedLayout
from .torch_backend import RowStatsSpec
from .validation import (FLOAT_DTYPES, LinearInputs, require_finite, require_same_device,
                         require_tensor)


class LinearPPOPolicyTriton(torch.autograd.Function):
    """Triton: ``(hidden [N, H], weight [V, H], bias [V] | None, targets [N], tokens) -> (policy_loss, logprobs,
    entropy)`` through the PPO epilogue kernel, which fuses the split merge with the per-token loss and its gradient
    weights (the engine's generic two-pass plan would run the same math in PyTorch between the two kernels): the
    log-sum-exp kernel, the epilogue, then the gradient kernel, all in the forward; the backward only scales.
    ``logprobs [N]`` and ``entropy [N]`` are returned detached (fp32)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tokens: PPOTokens,
                config: PPOLossConfig, opts: LinearOptions, with_entropy: bool):
        need = dict(zip(("need_hidden", "need_weight", "need_bias"), ctx.needs_input_grad[:3]))
        out = triton_ppo_forward(hidden, weight, bias, targets, opts, config, with_entropy=with_entropy,
                                 **tokens._asdict())
        # A zero entropy gradient (entropy computed for the metrics only) is left out of the backward.
        grad_ent = out.grad_entropy if config.entropy_coef != 0 else None
        grads = triton_logprobs_backward(hidden, weight, bias, targets, out.lse, out.entropy, out.grad_logprobs,
                                         grad_ent, opts, **need)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.present = [g is not None for g in grads]
        ctx.input_dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        ctx.mark_non_differentiable(out.logprobs, *([out.entropy] if out.entropy is not None else []))
        return out.loss.sum(), out.logprobs, out.entropy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        scaled = [None if g is None else g.to(dtype)
                  for g, dtype in zip(scale_precomputed_grads(grads, grad_loss), ctx.input_dtypes)]
        return (*scaled, None, None, None, None, None)


def linear_ppo_loss(inputs: LinearInputs, tokens: PPOTokens, config: PPOLossConfig, opts: LinearOptions,
                    with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Policy loss (scalar), detached log-probs ``[N]`` and entropy ``[N]``: the engine's one pass of per-token terms
    (torch backend; three matmuls), or the triton epilogue path when a gradient is needed on triton (not under
    ``torch.compile``: the engine's registered ops then)."""
    hidden, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    if opts.backend == "triton" and not torch.compiler.is_compiling() and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return LinearPPOPolicyTriton.apply(hidden, weight, bias, inputs.targets, tokens, config, opts, with_entropy)

    def loss_fn(values: RowValues) -> Tensor:
        part = tokens if values.rows is None else tokens.rows(values.rows)
        train_entropy = values.entropy if config.entropy_coef != 0 else None  # metrics-only entropy: no gradient
        return policy_loss_value(part, config, values.logprobs, train_entropy)

    out = fused_rows_loss(inputs, opts, loss_fn, coupling="token", spec=RowStatsSpec(entropy=with_entropy))
    return out.loss, out.logprobs, out.entropy


class PPOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_ppo_loss` returns."""

    loss: Tensor  # scalar: policy loss + vf_coef * value loss, differentiable
    metrics: dict[str, Tensor]  # detached scalars, TRL names
    logprobs: Tensor  # [B, T] detached fp32 log-probs (0 at ignored positions)
    entropy: Tensor | None  # [B, T] detached, when computed
    values: Tensor | None  # [B, T] (or [B, T, K]) detached value predictions, with a value head


def ppo_loss(inputs: LinearInputs, opts: LinearOptions, config: PPOLossConfig, *, old_logprobs: Tensor,
             advantages: Tensor, mask: Tensor, ref_logprobs: Tensor | None, value_head: ValueHeadInputs | None,
             num_tokens, num_sequences, with_entropy: bool, layout: PackedLayout | None = None) -> PPOLossOutput:
    """The fused PPO loss on validated inputs (``mask [..., T]``, or ``[N]`` packed with its ``layout``, already
    combined with the ignored targets)."""
    dtype = torch.float64 if inputs.hidden.dtype == torch.float64 else torch.float32
    sequences = mask if layout is None else layout.to_padded(mask.reshape(-1), False)  # [..., T]: the aggregation's
    weights = aggregation_weights(sequences, config.loss_agg, num_tokens=num_tokens, num_sequences=num_sequences,
                                  dtype=dtype)
    weights = (weights if layout is None else layout.to_packed(weights)).reshape(-1)
    flat = lambda t: None if t is None else t.reshape(-1).to(dtype)  # noqa: E731
    tokens = PPOTokens(flat(old_logprobs), flat(advantages), flat(ref_logprobs), weights)
    flat_mask = mask.reshape(-1) != 0
    policy_loss, logprobs, entropy = linear_ppo_loss(inputs, tokens, config, opts, with_entropy)
    loss, value_metrics, values = policy_loss, {}, None
    if value_head is not None:
        hidden = inputs.hidden if opts.shard is None else opts.shard.replicated_input(inputs.hidden)
        vt = value_loss_terms(hidden, value_head, weights, flat_mask, config.cliprange_value)
        loss = loss + config.vf_coef * vt.loss
        value_metrics, values = vt.metrics, vt.values.reshape(value_head.old_values.shape)
    with torch.no_grad():
        metrics = ppo_metrics(tokens, config, flat_mask, logprobs, entropy, value_metrics)
        metrics["loss/total"] = loss.detach().to(dtype)
    shape = inputs.lead_shape
    return PPOLossOutput(loss, metrics, logprobs.view(shape),
                         None if entropy is None else entropy.view(shape), values)


def validate_value_head(weight, bias, old_values, returns, inputs: LinearInputs, mask: Tensor,
                        check_finite: bool) -> ValueHeadInputs | None:
    """The value head arguments of the PPO op: all absent, or a head ``[H]``/``[K, H]`` with its targets
    ``[..., T]`` (``[..., T, K]``), 0 outside ``mask`` (the op's token mask) whatever was given there."""
    token_shape = mask.shape
    if weight is None:
        given = [n for n, v in (("value_head_bias", bias), ("old_values", old_values), ("returns", returns))
                 if v is not None]
        if given:
            raise ValueError(f"value_head_weight: required when {', '.join(given)} given, got None")
        return None
    weight = require_tensor("value_head_weight", weight, dtypes=FLOAT_DTYPES)
    width = inputs.hidden.shape[1]
    if weight.dim() not in (1, 2) or weight.shape[-1] != width:
        raise ValueError(f"value_head_weight: expected shape [H={width}] or [K, H={width}], got {tuple(weight.shape)}")
    head = weight.reshape(-1, width)
    k = head.shape[0]
    if bias is not None:
        bias = require_tensor("value_head_bias", bias, dtypes=FLOAT_DTYPES)
        if bias.numel() != k:
            raise ValueError(f"value_head_bias: expected {k} element(s), one per value output, got shape "
                             f"{tuple(bias.shape)}")
        bias = bias.reshape(k)
    for name, value in (("old_values", old_values), ("returns", returns)):
        if value is None:
            raise ValueError(f"{name}: required with a value head (value_head_weight given), got None")
    shapes = [tuple(token_shape) + (k,)] + ([tuple(token_shape)] if k == 1 else [])
    for name, value in (("old_values", old_values), ("returns", returns)):
        value = require_tensor(name, value, dtypes=FLOAT_DTYPES)
        if tuple(value.shape) not in shapes:
            raise ValueError(f"{name}: expected shape {' or '.join(map(str, shapes))} (targets' shape, K={k} "
                             f"value outputs), got {tuple(value.shape)}")
    if old_values.shape != returns.shape:
        raise ValueError(f"returns: expected the shape of old_values {tuple(old_values.shape)}, "
                         f"got {tuple(returns.shape)}")
    require_same_device(inputs.hidden, old_values=old_values, returns=returns)
    where = mask if old_values.shape == mask.shape else mask.unsqueeze(-1)
    old_values, returns = torch.where(where, old_values, 0.0), torch.where(where, returns, 0.0)
    if check_finite:
        require_finite("old_values", old_values)
        require_finite("returns", returns)
    require_same_device(inputs.hidden, value_head_weight=head, value_head_bias=bias, old_values=old_values,
                        returns=returns)
    return ValueHeadInputs(head, bias, old_values, returns)
