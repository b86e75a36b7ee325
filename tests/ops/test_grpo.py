"""The GRPO family: ``fastalign.objectives.grpo`` against a float64 transcription of TRL 1.16's
``GRPOTrainer._compute_loss`` written here, and the fused op against that reference on materialized float64 logits
(loss, metrics, d hidden, d weight, d bias), on every backend, one pass and two passes."""
from __future__ import annotations

import math

import pytest
import torch

from fastalign import fused_linear_grpo_loss
from fastalign.objectives.grpo import GRPO_LOSS_TYPES, GRPOLossConfig, grpo_loss
from helpers.reference import as_f64_leaf, check, reference_logprobs

B, T, H, V = 4, 6, 12, 37  # V not a multiple of any tile


# ----------------------------------------------------------------------------- TRL 1.16, transcribed (one process,
# no gradient accumulation, num_processes = 1). Deviations of fastalign, documented in objectives/grpo.py, are
# marked "fastalign:" below: they concern positions outside the completion mask only.

def trl_high_entropy_mask(entropies, mask, threshold):
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, threshold)
    masked_entropies = entropies * mask.float()
    entropy_mask = masked_entropies >= entropy_threshold
    return entropy_mask & mask.bool()


def trl_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
    kl_div = sampling_per_token_logps - per_token_logps.detach()
    kl_div = torch.nan_to_num(kl_div, nan=0.0)
    seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (seq_kl <= off_policy_threshold)).to(dtype=mask.dtype)


def trl_gamma_weights(advantages, log_ratio_per_token, mask, importance_sampling_ratio, k_pos, lambda_pos, k_neg,
                      lambda_neg):
    with torch.no_grad():
        lower_clamp = math.log(1e-8)
        log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
        seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
        if importance_sampling_ratio is not None:  # tests keep the ratio at 1 outside the mask, as TRL's is
            log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
            seq_log_ratio = seq_log_ratio + torch.sum(log_is_ratio, dim=-1, keepdim=True)
        log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
        w_seq = torch.exp(log_w_seq)
        is_nonneg_adv = advantages >= 0
        k_seq = torch.where(is_nonneg_adv, torch.tensor(k_pos, dtype=w_seq.dtype), torch.tensor(k_neg, dtype=w_seq.dtype))
        lambda_seq = torch.where(is_nonneg_adv, torch.tensor(lambda_pos, dtype=w_seq.dtype),
                                 torch.tensor(lambda_neg, dtype=w_seq.dtype)).clamp(min=1e-4)
        log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
        return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def trl_compute_loss(per_token_logps, entropies, mask, advantages, args: dict, *, old=None, ref=None,
                     is_ratio=None, sampling=None, num_items_in_batch=None):
    """TRL 1.16 ``_compute_loss`` from the per-token log-probs on: (loss, metrics)."""
    a = dict(loss_type="dapo", importance_sampling_level="token", epsilon=0.2, epsilon_high=None, delta=None,
             beta=0.0, use_bias_correction_kl=True, off_policy_mask_threshold=None, top_entropy_quantile=1.0,
             entropy_coef=0.0, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
             vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, max_completion_length=None)
    a.update(args)
    epsilon_low, epsilon_high = a["epsilon"], a["epsilon_high"] if a["epsilon_high"] is not None else a["epsilon"]
    metrics = {}
    if a["top_entropy_quantile"] < 1.0:
        entropy_mask = trl_high_entropy_mask(entropies, mask, 1 - a["top_entropy_quantile"])
    else:
        entropy_mask = None
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_per_token_logps = per_token_logps.detach() if old is None else old
    if a["off_policy_mask_threshold"] is not None:
        sampling_per_token_logps = old_per_token_logps if sampling is None else sampling
        off_policy_mask = trl_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask,
                                              a["off_policy_mask_threshold"])
    log_ratio = per_token_logps - old_per_token_logps
    if a["importance_sampling_level"] == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if a["beta"] != 0.0:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        if a["use_bias_correction_kl"]:
            per_token_kl = per_token_kl * coef_1
    loss_type = a["loss_type"]
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if a["delta"] is not None:
            coef_1 = torch.clamp(coef_1, max=a["delta"])
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    elif loss_type == "sapo":
        pos, neg = (torch.tensor(a[k], dtype=advantages.dtype) for k in ("sapo_temperature_pos", "sapo_temperature_neg"))
        temperatures = torch.where(advantages > 0, pos, neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    elif loss_type == "vespo":
        phi_seq = trl_gamma_weights(advantages, log_ratio, mask, is_ratio, a["vespo_k_pos"], a["vespo_lambda_pos"],
                                    a["vespo_k_neg"], a["vespo_lambda_neg"])
        per_token_loss = -phi_seq * advantages * per_token_logps
    if a["off_policy_mask_threshold"] is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if a["beta"] != 0.0:
        per_token_loss = per_token_loss + a["beta"] * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * a["max_completion_length"])
    elif loss_type in ["cispo", "dapo", "vespo"]:
        normalizer = (mask.sum() if num_items_in_batch is None else torch.tensor(float(num_items_in_batch))).clamp(
            min=1.0)
        loss = (per_token_loss * mask).sum() / normalizer
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    if a["entropy_coef"] != 0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
        metrics["policy_loss"] = loss.detach()
        loss = loss - a["entropy_coef"] * entropy_loss

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    def nan_extreme(x, fn):
        return torch.tensor(float("nan")) if torch.isnan(x).all() else fn(x[~torch.isnan(x)])

    with torch.no_grad():
        if a["beta"] != 0.0:
            metrics["kl"] = global_masked_mean(per_token_kl)
        metrics["entropy"] = global_masked_mean(entropies)
        if loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
            is_low_clipped = ((coef_1 < 1 - epsilon_low) & (advantages < 0)).double()
            is_high_clipped = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).double()
            is_region_clipped = ((is_low_clipped + is_high_clipped) > 0).double()
            metrics["clip_ratio/low_mean"] = global_masked_mean(is_low_clipped)
            metrics["clip_ratio/high_mean"] = global_masked_mean(is_high_clipped)
            metrics["clip_ratio/region_mean"] = global_masked_mean(is_region_clipped)
            metrics["clip_ratio/low_min"] = nan_extreme(masked_seq_mean(is_low_clipped), torch.min)
            metrics["clip_ratio/high_max"] = nan_extreme(masked_seq_mean(is_high_clipped), torch.max)
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > epsilon_high) & (advantages > 0)).double())
        elif loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = global_masked_mean(phi_seq)
    return loss, metrics


# ----------------------------------------------------------------------------- problems

def make_problem(seed=0, *, per_token_advantages=False, is_ratio_shape=None, dtype=torch.float32):
    """A batch of B completions of T tokens: sequence 1 padded after 3 tokens, sequence 2 empty. ``old``, ``ref`` and
    ``sampling`` are the float64 reference log-probs shifted by per-sequence offsets far from every clip, quantile
    and threshold boundary of the tests (so fp32 and float64 take the same branches)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    bias = torch.randn(V, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 3:] = -100
    targets[2, :] = -100
    lp, _ = reference_logprobs(hidden, weight, targets, bias)
    offsets = torch.tensor([0.5, -0.6, 0.0, 0.05]).double().unsqueeze(1)  # log pi - log pi_old per sequence
    jitter = 0.02 * torch.randn(B, T, generator=g).double()
    old = lp - offsets + jitter
    ref = lp + 0.3 * torch.randn(B, T, generator=g).double()
    sampling = old + torch.tensor([0.0, 0.5, 0.0, 0.5]).double().unsqueeze(1)  # seq KL to pi about 0.0 or 0.5
    advantages = torch.tensor([1.0, -0.7, 0.3, -1.2]).double()
    if per_token_advantages:
        advantages = advantages.unsqueeze(1) + 0.5 * torch.randn(B, T, generator=g).double()
    ratio = None
    if is_ratio_shape is not None:
        ratio = 0.5 + torch.rand(*is_ratio_shape, generator=g).double()
        if is_ratio_shape == (B, T):
            ratio = torch.where(targets != -100, ratio, 1.0)
    valid = targets != -100
    zero = lambda x: torch.where(valid, x, 0.0) if x.shape == (B, T) else x  # noqa: E731
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype), targets=targets,
                old=zero(old), ref=zero(ref), sampling=zero(sampling), advantages=advantages, is_ratio=ratio)


def reference_op(p, args, *, temperature=1.0, with_bias=True, mask=None, use_old=True):
    """TRL's loss and metrics on materialized float64 logits, and its gradients w.r.t. hidden, weight, bias."""
    h, w, b = as_f64_leaf(p["hidden"]), as_f64_leaf(p["weight"]), as_f64_leaf(p["bias"]) if with_bias else None
    lp, ent = reference_logprobs(h, w, p["targets"], b, temperature=temperature)
    m = (p["targets"] != -100).double()
    if mask is not None:
        m = m * mask.double()
    loss, metrics = trl_compute_loss(lp, ent, m, p["advantages"], args, old=p["old"] if use_old else None,
                                     ref=p["ref"], is_ratio=p["is_ratio"], sampling=p["sampling"])
    grads = torch.autograd.grad(loss, [h, w] + ([b] if with_bias else []))
    return loss, metrics, grads


def run_op(p, args, backend, *, dtype=None, temperature=1.0, with_bias=True, chunk_size=None, mask=None,
           use_old=True, frozen_weight=False):
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    h = cast(p["hidden"]).clone().requires_grad_(True)
    w = cast(p["weight"]).clone().requires_grad_(not frozen_weight)
    b = cast(p["bias"]).clone().requires_grad_(True) if with_bias else None
    needs_sampling = args.get("off_policy_mask_threshold") is not None
    out = fused_linear_grpo_loss(h, w, p["targets"], p["advantages"].to(h.dtype), bias=b,
                                 old_logprobs=p["old"] if use_old else None, ref_logprobs=p["ref"],
                                 importance_sampling_ratio=p["is_ratio"],
                                 sampling_logprobs=p["sampling"] if needs_sampling else None, mask=mask,
                                 temperature=temperature, backend=backend, chunk_size=chunk_size, **args)
    leaves = [h] + ([] if frozen_weight else [w]) + ([b] if with_bias else [])
    return out, torch.autograd.grad(out.loss, leaves)


ALL_OPTIONS = dict(beta=0.04, use_bias_correction_kl=True, delta=3.0, epsilon_high=0.28, max_completion_length=T)


def loss_args(loss_type, level, **extra):
    return dict(loss_type=loss_type, importance_sampling_level=level, **{**ALL_OPTIONS, **extra})


# ----------------------------------------------------------------------------- the objectives alone

@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("extra", [{}, dict(top_entropy_quantile=0.5, entropy_coef=0.03),
                                   dict(off_policy_mask_threshold=0.25, entropy_coef=-0.02)], ids=["plain", "entropy",
                                                                                                    "off_policy"])
def test_objective_matches_trl(loss_type, level, extra):
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(B, T, generator=g) < 0.8).double()
    mask[2] = 0  # an empty sequence
    lp = (-3 * torch.rand(B, T, generator=g)).double().requires_grad_(True)
    ent = (3 * torch.rand(B, T, generator=g)).double().requires_grad_(True)
    old = lp.detach() + 0.4 * torch.randn(B, T, generator=g).double()
    ref = lp.detach() + 0.3 * torch.randn(B, T, generator=g).double()
    sampling = old + 0.5 * torch.rand(B, 1, generator=g).double()
    adv = torch.randn(B, T if level == "token" else 1, generator=g).double().squeeze(-1) if loss_type != "sapo" else \
        torch.randn(B, T, generator=g).double()
    ratio = torch.where(mask > 0, 0.5 + torch.rand(B, T, generator=g).double(), 1.0)
    args = loss_args(loss_type, level, **extra)
    want, want_metrics = trl_compute_loss(lp, ent, mask, adv, args, old=old, ref=ref, is_ratio=ratio,
                                          sampling=sampling, num_items_in_batch=40)
    got = grpo_loss(lp, adv, mask, GRPOLossConfig(**args), old_logprobs=old, ref_logprobs=ref, entropy=ent,
                    importance_sampling_ratio=ratio, sampling_logprobs=sampling, num_items_in_batch=40)
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=1e-12)
    assert set(got.metrics) == set(want_metrics)
    for k, v in want_metrics.items():
        torch.testing.assert_close(got.metrics[k], v, rtol=1e-12, atol=1e-12, equal_nan=True)
    for a, b in zip(torch.autograd.grad(got.loss, [lp, ent], allow_unused=True),
                    torch.autograd.grad(want, [lp, ent], allow_unused=True)):
        if a is None or b is None:  # entropy unused by the loss: both must agree on that
            assert a is None and b is None or float((a if b is None else b).abs().max()) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_on_policy_ratio_is_one_and_nothing_is_clipped():
    lp = -torch.rand(B, T).double().requires_grad_(True)
    adv = torch.randn(B).double()
    mask = torch.ones(B, T).double()
    out = grpo_loss(lp, adv, mask, GRPOLossConfig(loss_type="dapo"))
    assert float(out.metrics["clip_ratio/region_mean"]) == 0.0
    torch.testing.assert_close(out.loss, -adv.mean(), rtol=1e-12, atol=1e-12)  # -A r with r = 1, token mean
    (grad,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(grad, -adv.unsqueeze(1).expand(B, T) / (B * T), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(loss_type="ppo"), "loss_type: expected one of"),
    (dict(importance_sampling_level="batch"), "importance_sampling_level: expected one of"),
    (dict(loss_type="dr_grpo"), "max_completion_length: required for loss_type='dr_grpo'"),
    (dict(top_entropy_quantile=1.5), r"top_entropy_quantile: expected a number in \[0, 1\]"),
    (dict(epsilon=-0.1), "epsilon: expected a number >= 0"),
    (dict(delta=1.0), "delta: expected a number > 1"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg: expected a number > 0"),
    (dict(beta=float("nan")), "beta: expected a finite number"),
    (dict(max_completion_length=0), "max_completion_length: expected a positive int"),
])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossConfig(**bad)


# ----------------------------------------------------------------------------- the fused op

@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("chunk_size", [None, 2, 8], ids=["budget", "two-pass", "whole-seqs"])
def test_op_float64_every_loss_type(loss_type, level, chunk_size):
    """Torch backend in float64: one pass (budget, whole sequences of <= 8 rows) and two passes (chunks of 2 rows
    are smaller than a sequence) give TRL's loss, metrics and gradients to float64 precision."""
    p = make_problem(per_token_advantages=loss_type in ("cispo", "luspo"), is_ratio_shape=(B, T))
    args = loss_args(loss_type, level)
    out, grads = run_op(p, args, "torch", dtype=torch.float64, chunk_size=chunk_size)
    check(out, grads, reference_op(p, args), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("extra", [
    dict(loss_type="dapo", top_entropy_quantile=0.6, entropy_coef=0.05),
    dict(loss_type="grpo", importance_sampling_level="sequence", off_policy_mask_threshold=0.25, entropy_coef=0.02),
    dict(loss_type="vespo", off_policy_mask_threshold=0.25),
    dict(loss_type="bnpo", epsilon_high=None, delta=None, beta=0.0, use_bias_correction_kl=False),
], ids=["entropy-quantile", "gspo-off-policy", "vespo-off-policy", "bnpo-plain"])
def test_op_masks_and_bonus(backend, extra):
    p = make_problem(seed=3, is_ratio_shape=(B, 1))
    args = {**ALL_OPTIONS, **extra}
    out, grads = run_op(p, args, backend, temperature=0.8)
    check(out, grads, reference_op(p, args, temperature=0.8), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_op_every_loss_type_fp32(backend, loss_type):
    level = "sequence" if loss_type in ("grpo", "luspo", "cispo") else "token"
    p = make_problem(seed=5, per_token_advantages=loss_type == "sapo")
    args = loss_args(loss_type, level)
    out, grads = run_op(p, args, backend)
    check(out, grads, reference_op(p, args), rtol=2e-5, atol=2e-6)


def test_op_fp16(backend):
    p = make_problem(seed=7)
    args = loss_args("dapo", "token", entropy_coef=0.01)
    out, grads = run_op(p, args, backend, dtype=torch.float16)
    p16 = {**p, "hidden": p["hidden"].half().float(), "weight": p["weight"].half().float(),
           "bias": p["bias"].half().float()}  # the reference on the fp16-rounded inputs
    assert out.logprobs.dtype == torch.float32
    check(out, grads, reference_op(p16, args), rtol=2e-3, atol=2e-3)


def test_op_options_on_and_off(backend):
    """No bias, on-policy (old_logprobs None), a user mask, a frozen lm_head, a non-contiguous hidden."""
    p = make_problem(seed=9)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = False  # e.g. a tool-output token
    p["hidden"] = p["hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not p["hidden"].is_contiguous()
    args = loss_args("dr_grpo", "token")
    out, grads = run_op(p, args, backend, with_bias=False, mask=mask, use_old=False, frozen_weight=True)
    loss, metrics, (dh, _dw) = reference_op(p, args, with_bias=False, mask=mask, use_old=False)
    check(out, grads, (loss, metrics, (dh,)), rtol=2e-5, atol=2e-6)
    assert float(out.metrics["clip_ratio/region_mean"]) == 0.0  # on-policy: ratio exactly 1
    assert out.logprobs[0, 1] == 0 and out.entropy[0, 1] == 0  # outside the mask: no logits


def test_fully_masked_batch_gives_zero_loss_and_gradients(backend):
    p = make_problem(seed=11)
    p["targets"] = torch.full((B, T), -100)
    for loss_type in ("grpo", "dapo", "luspo"):
        out, grads = run_op(p, loss_args(loss_type, "sequence", entropy_coef=0.1), backend)
        assert float(out.loss.detach()) == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in grads)
        assert not torch.isnan(out.metrics["entropy"])


def test_no_grad_forward_equals_the_training_forward():
    p = make_problem(seed=13)
    args = loss_args("vespo", "token")
    with torch.no_grad():
        out = fused_linear_grpo_loss(p["hidden"], p["weight"], p["targets"], p["advantages"].float(), bias=p["bias"],
                                     old_logprobs=p["old"], ref_logprobs=p["ref"], backend="torch", **args)
    trained, _ = run_op(p, args, "torch")
    torch.testing.assert_close(out.loss, trained.loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logprobs, trained.logprobs)


class TestBadInput:
    def call(self, **overrides):
        p = make_problem()
        args = dict(hidden=p["hidden"], weight=p["weight"], targets=p["targets"], advantages=p["advantages"].float(),
                    backend="torch")
        args.update(overrides)
        return fused_linear_grpo_loss(**args)

    @pytest.mark.parametrize("overrides, error, match", [
        (dict(advantages=torch.zeros(B + 1)), ValueError,
         r"advantages: expected shape \(4,\) or \(4, 6\) \(one per sequence"),
        (dict(advantages=torch.zeros(B, dtype=torch.long)), TypeError, "advantages: expected dtype"),
        (dict(importance_sampling_ratio=torch.ones(B, 2)), ValueError, r"importance_sampling_ratio: expected shape"),
        (dict(importance_sampling_ratio=-torch.ones(B, T)), ValueError, "importance_sampling_ratio: expected non-neg"),
        (dict(loss_type="dr_grpo"), ValueError, "max_completion_length: required"),
        (dict(beta=0.1), ValueError, "ref_logprobs: required when beta != 0"),
        (dict(mask=torch.full((B, T), 0.5)), ValueError, "mask: expected a bool or 0/1 mask"),
        (dict(num_items_in_batch=3), ValueError, r"num_items_in_batch: expected at least this batch's own "
                                                 r"completion tokens \(15;"),
        (dict(sampling_logprobs=torch.zeros(B, T)), ValueError, "sampling_logprobs: only used by the off-policy"),
        (dict(old_logprobs=torch.zeros(B, T - 1)), ValueError, r"old_logprobs: expected shape \(4, 6\)"),
        (dict(old_logprobs=torch.full((B, T), float("nan"))), ValueError, "old_logprobs: expected finite values"),
        (dict(hidden=torch.zeros(B * T, H)), ValueError, r"hidden: expected shape \[B, T, H\]"),
        (dict(targets=torch.full((B, T), V)), ValueError, r"targets: expected ids in \[0, 37\)"),
        (dict(loss_type="gspo"), ValueError, "loss_type: expected one of"),
    ])
    def test_clear_errors(self, overrides, error, match):
        with pytest.raises(error, match=match):
            self.call(**overrides)
