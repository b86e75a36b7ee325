"""Fused PPO loss from hidden states: the clipped surrogate, KL and entropy terms with their gradient formed in the
forward pass (the loss is a scalar, so each token's gradient weight is known there), plus the value loss."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..objectives.aggregation import aggregation_weights
from ..objectives.ppo import (PPOLossConfig, PPOTokens, ValueHeadInputs, policy_loss_value, ppo_metrics,
                              ppo_token_losses, value_loss_terms)
from . import torch_backend
from .linear import (LinearOptions, lse_forward, scale_precomputed_grads, triton_logprobs_backward,
                     triton_ppo_forward)
from .logprobs import token_outputs
from .validation import (FLOAT_DTYPES, LinearInputs, require_finite, require_same_device,
                         require_tensor)


def policy_token_grads(tokens: PPOTokens, config: PPOLossConfig, logprobs: Tensor,
                       entropy: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``d policy_loss / d logprobs`` and ``d policy_loss / d entropy`` per token, by autograd on the objectives.

    The entropy gradient is None when ``entropy_coef`` is 0 (the backward then skips the entropy term).
    """
    train_entropy = entropy is not None and config.entropy_coef != 0
    with torch.enable_grad():
        logprobs = logprobs.detach().requires_grad_(True)
        if train_entropy:
            entropy = entropy.detach().requires_grad_(True)
        token_loss = ppo_token_losses(logprobs, tokens.old_logprobs, tokens.advantages, config,
                                      ref_logprobs=tokens.ref_logprobs, entropy=entropy).loss
        grads = torch.autograd.grad((tokens.weights * token_loss).sum(), [logprobs, entropy] if train_entropy
                                    else [logprobs])
    return grads[0], (grads[1] if train_entropy else None)


class LinearPPOPolicy(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, targets [N], tokens) -> (policy_loss, logprobs, entropy)``.

    The gradient of the policy loss is formed during the forward and only scaled in the backward. On the torch
    backend that is one pass of three matmuls per chunk; on triton, the log-sum-exp kernel (split partials), the PPO
    epilogue kernel (merge, per-token loss and gradient weights), then the gradient kernel. With a vocab shard each
    chunk's (torch) or the whole pass's (triton) statistics are merged across the group before the gradients.
    ``logprobs [N]`` and ``entropy [N]`` are returned detached (fp32).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tokens: PPOTokens,
                config: PPOLossConfig, opts: LinearOptions, with_entropy: bool):
        need = dict(zip(("need_hidden", "need_weight", "need_bias"), ctx.needs_input_grad[:3]))
        if opts.backend == "torch":
            out = torch_backend.linear_logprobs_fused(
                hidden, weight, bias, targets,
                lambda rows, lp, ent: policy_token_grads(tokens.rows(rows), config, lp, ent),
                inv_temperature=opts.inv_temperature, ignore_index=opts.ignore_index, with_entropy=with_entropy,
                need_grad_hidden=need["need_hidden"], need_grad_weight=need["need_weight"],
                need_grad_bias=need["need_bias"], chunk_size=opts.chunk_size, shard=opts.shard)
            logprobs, entropy, grads = out.logprobs, out.entropy, opts.finish_grads(out.grads)
            loss = policy_loss_value(tokens, config, logprobs, entropy)
        else:
            out = triton_ppo_forward(hidden, weight, bias, targets, opts, config, with_entropy=with_entropy,
                                     **tokens._asdict())
            # A zero entropy gradient (entropy computed for the metrics only) is left out of the backward.
            grad_ent = out.grad_entropy if config.entropy_coef != 0 else None
            grads = triton_logprobs_backward(hidden, weight, bias, targets, out.lse, out.entropy, out.grad_logprobs,
                                             grad_ent, opts, **need)
            logprobs, entropy, loss = out.logprobs, out.entropy, out.loss.sum()
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.present = [g is not None for g in grads]
        ctx.input_dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        ctx.mark_non_differentiable(logprobs, *([entropy] if entropy is not None else []))
        return loss, logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        scaled = [None if g is None else g.to(dtype)
                  for g, dtype in zip(scale_precomputed_grads(grads, grad_loss), ctx.input_dtypes)]
        return (*scaled, None, None, None, None, None)


def linear_ppo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tokens: PPOTokens,
                    config: PPOLossConfig, opts: LinearOptions, with_entropy: bool
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Policy loss (scalar), detached log-probs ``[N]`` and entropy ``[N]``, through autograd only when needed."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return LinearPPOPolicy.apply(hidden, weight, bias, targets, tokens, config, opts, with_entropy)
    stats = lse_forward(hidden, weight, bias, targets, opts, with_entropy=with_entropy)
    logprobs, entropy = token_outputs(stats, targets != opts.ignore_index, with_entropy)
    return policy_loss_value(tokens, config, logprobs, entropy), logprobs, entropy


class PPOLossOutput(NamedTuple):
    """What :func:`fastalign.fused_linear_ppo_loss` returns."""

    loss: Tensor  # scalar: policy loss + vf_coef * value loss, differentiable
    metrics: dict[str, Tensor]  # detached scalars, TRL names
    logprobs: Tensor  # [B, T] detached fp32 log-probs (0 at ignored positions)
    entropy: Tensor | None  # [B, T] detached, when computed
    values: Tensor | None  # [B, T] (or [B, T, K]) detached value predictions, with a value head


def ppo_loss(inputs: LinearInputs, opts: LinearOptions, config: PPOLossConfig, *, old_logprobs: Tensor,
             advantages: Tensor, mask: Tensor, ref_logprobs: Tensor | None, value_head: ValueHeadInputs | None,
             num_tokens, num_sequences, with_entropy: bool) -> PPOLossOutput:
    """The fused PPO loss on validated inputs (``mask [..., T]`` already combined with the ignored targets)."""
    dtype = torch.float64 if inputs.hidden.dtype == torch.float64 else torch.float32
    weights = aggregation_weights(mask, config.loss_agg, num_tokens=num_tokens, num_sequences=num_sequences,
                                  dtype=dtype).reshape(-1)
    flat = lambda t: None if t is None else t.reshape(-1).to(dtype)  # noqa: E731
    tokens = PPOTokens(flat(old_logprobs), flat(advantages), flat(ref_logprobs), weights)
    flat_mask = mask.reshape(-1) != 0
    policy_loss, logprobs, entropy = linear_ppo_loss(inputs.hidden, inputs.weight, inputs.bias, inputs.targets,
                                                     tokens, config, opts, with_entropy)
    loss, value_metrics, values = policy_loss, {}, None
    if value_head is not None:
        hidden = inputs.hidden if opts.shard is None else opts.shard.replicated_input(inputs.hidden)
        vt = value_loss_terms(hidden, value_head, weights, flat_mask, config.cliprange_value)
        loss = loss + config.vf_coef * vt.loss
        value_metrics, values = vt.metrics, vt.values.reshape(value_head.old_values.shape)
    with torch.no_grad():
        metrics = ppo_metrics(tokens, config, flat_mask, logprobs, entropy, value_metrics)
        metrics["loss/total"] = loss.detach().float()
    shape = inputs.lead_shape
    return PPOLossOutput(loss, metrics, logprobs.view(shape),
                         None if entropy is None else entropy.view(shape), values)


def validate_value_head(weight, bias, old_values, returns, inputs: LinearInputs, token_shape: torch.Size,
                        check_finite: bool) -> ValueHeadInputs | None:
    """The value head arguments of the PPO op: all absent, or a head ``[H]``/``[K, H]`` with its targets."""
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
        if check_finite:
            require_finite(name, value)
    if old_values.shape != returns.shape:
        raise ValueError(f"returns: expected the shape of old_values {tuple(old_values.shape)}, "
                         f"got {tuple(returns.shape)}")
    require_same_device(inputs.hidden, value_head_weight=head, value_head_bias=bias, old_values=old_values,
                        returns=returns)
    return ValueHeadInputs(head, bias, old_values, returns)
