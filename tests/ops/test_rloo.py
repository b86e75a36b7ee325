"""RLOO: ``fastalign.objectives.rloo`` against a float64 transcription of TRL 1.16's ``RLOOTrainer`` written here
(``_compute_loss``; the advantage steps of ``_generate_and_score_completions`` on hand-computed cases), and the fused
op against that loss on materialized float64 logits (loss, metrics, d hidden, d weight, d bias), on every backend,
one pass and two passes, packed == padded. The real TRL is in test_rloo_trl.py."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from fastalign import fused_linear_rloo_loss
from fastalign.objectives.rloo import RLOOOptions, nanstd, rloo_advantages, rloo_loss
from helpers.reference import as_f64_leaf, check, reference_logprobs

B, T, H, V = 5, 7, 10, 37  # odd sizes: V not a multiple of any tile
NAN = float("nan")


def trl_compute_loss(per_token_logps, entropies, completion_mask, advantages, old_logps, epsilon_low, epsilon_high):
    """TRL 1.16 ``RLOOTrainer._compute_loss`` after the forward (one process: gathers are identities)."""
    logps = (per_token_logps * completion_mask).sum(1)
    log_ratio = logps - old_logps
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    loss = per_sequence_loss.mean()
    metrics = {"entropy": (entropies * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)}
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    share = lambda x: x.to(coef_1.dtype)  # noqa: E731  TRL: x.float() (fp32 shares; here float64 ones)
    metrics["clip_ratio/low_mean"] = share(is_low_clipped).nanmean()
    metrics["clip_ratio/low_min"] = share(is_low_clipped).min()
    metrics["clip_ratio/high_mean"] = share(is_high_clipped).nanmean()
    metrics["clip_ratio/high_max"] = share(is_high_clipped).max()
    metrics["clip_ratio/region_mean"] = share(is_low_clipped | is_high_clipped).nanmean()
    return loss, metrics


# ----------------------------------------------------------------------------- the objective alone

def test_objective_matches_trl():
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(B, T, generator=g) < 0.8).double()
    mask[2] = 0  # a completion without tokens: ratio exp(0 - old), no gradient, still in the mean
    lp = (-2 * torch.rand(B, T, generator=g)).double().requires_grad_(True)
    ent = (3 * torch.rand(B, T, generator=g)).double()
    # log-ratios far from the clip edges: below, inside, above, (empty), inside
    offsets = torch.tensor([-0.5, 0.05, 0.6, 0.0, -0.1]).double()
    old = (lp.detach() * mask).sum(1) - offsets
    adv = torch.tensor([-1.0, 0.7, 1.3, -0.4, 0.2]).double()
    options = RLOOOptions(epsilon=0.2, epsilon_high=0.28)
    got = rloo_loss(lp, adv, mask, options, old_logps=old, entropy=ent)
    want, want_metrics = trl_compute_loss(lp, ent, mask, adv, old, 0.2, 0.28)
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=1e-12)
    assert set(got.metrics) == set(want_metrics)
    for k, v in want_metrics.items():
        torch.testing.assert_close(got.metrics[k], v, rtol=1e-12, atol=1e-12, msg=lambda m: f"{k}: {m}")
    assert float(got.metrics["clip_ratio/low_mean"]) == 0.2 and float(got.metrics["clip_ratio/high_max"]) == 1.0
    (grad,), (want_grad,) = torch.autograd.grad(got.loss, lp), torch.autograd.grad(want, lp)
    assert float(want_grad.abs().max()) > 1e-3  # not vacuous: some sequences are inside the clip range
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.logps, (lp.detach() * mask).sum(1))


def test_on_policy_ratio_is_one_and_nothing_is_clipped():
    lp = -torch.rand(B, T).double().requires_grad_(True)
    adv = torch.randn(B).double()
    out = rloo_loss(lp, adv, torch.ones(B, T))
    assert float(out.metrics["clip_ratio/region_mean"]) == 0.0 and "entropy" not in out.metrics
    torch.testing.assert_close(out.loss, -adv.mean(), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, lp)  # REINFORCE: -A d logps / B
    torch.testing.assert_close(grad, -adv.unsqueeze(1).expand(B, T) / B, rtol=1e-12, atol=0)


def test_advantages_by_hand():
    """Two groups of 4 and one of 4 with a single scorable completion: the leave-one-out baseline over scorable
    siblings, NaN (unscorable) rows and lone scorable rows get 0, then the KL and clip steps."""
    rewards = torch.tensor([[1.0, NAN], [NAN, 2.0], [3.0, 1.0], [NAN, NAN],  # sums 1, 2, 4, unscorable
                            [0.5, 0.5], [0.0, 0.0], [2.0, NAN], [1.0, 0.0],  # 1, 0, 2, 1
                            [NAN, NAN], [5.0, NAN], [NAN, NAN], [NAN, NAN]], dtype=torch.float64)  # lone 5
    weights = torch.tensor([1.0, 1.0])
    got = rloo_advantages(rewards, weights, RLOOOptions(beta=0.0, num_generations=4))
    want = [1 - 3, 2 - 2.5, 4 - 1.5, 0, 1 - 1, 0 - 4 / 3, 2 - 2 / 3, 1 - 1, 0, 0, 0, 0]
    torch.testing.assert_close(got.advantages, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    totals = torch.tensor([1, 2, 4, NAN, 1, 0, 2, 1, NAN, 5, NAN, NAN], dtype=torch.float64)
    torch.testing.assert_close(got.metrics["reward"], totals.nanmean())
    torch.testing.assert_close(got.metrics["reward_std"], torch.tensor(statistics.stdev([1, 2, 4, 1, 0, 2, 1, 5]),
                                                                      dtype=torch.float64))
    assert float(got.metrics["frac_reward_zero_std"]) == 0.0  # the lone group's std is NaN, not 0 (as TRL)

    kl = torch.linspace(-1, 2, 12, dtype=torch.float64)
    clipped = rloo_advantages(rewards, torch.tensor([2.0, 1.0]), RLOOOptions(beta=0.5, num_generations=4,
                                                                              reward_clip_range=(0.0, 3.0)), kl=kl)
    r = (rewards * torch.tensor([2.0, 1.0])).nansum(1).clamp(0, 3) - 0.5 * kl
    r[[3, 8, 10, 11]] = NAN
    g = r.view(3, 4)
    scorable = [int((~row.isnan()).sum()) for row in g]
    loo = [(float(g[i].nansum()) - float(g[i, j])) / (scorable[i] - 1) if scorable[i] > 1 else NAN
           for i in range(3) for j in range(4)]
    want = torch.nan_to_num(r - torch.tensor(loo, dtype=torch.float64), nan=0.0)
    torch.testing.assert_close(clipped.advantages, want, rtol=1e-12, atol=1e-12)
    assert float(clipped.advantages[0]) != float(got.advantages[0])  # the clip and the KL changed something


def test_normalized_advantages_and_one_generation():
    rewards = torch.tensor([[1.0], [4.0], [2.0], [2.0], [0.0], [7.0]])
    out = rloo_advantages(rewards, torch.ones(1), RLOOOptions(beta=0.0, num_generations=3,
                                                              normalize_advantages=True))
    raw = torch.tensor([1 - 3.0, 4 - 1.5, 2 - 2.5, 2 - 3.5, 0 - 4.5, 7 - 1.0])
    torch.testing.assert_close(out.advantages, (raw - raw.mean()) / (raw.std() + 1e-4))
    alone = rloo_advantages(rewards, torch.ones(1), RLOOOptions(beta=0.0, num_generations=1))
    assert torch.equal(alone.advantages, torch.zeros(6))
    assert float(alone.metrics["frac_reward_zero_std"]) == 1.0
    torch.testing.assert_close(nanstd(torch.tensor([[1.0, NAN, 3.0], [2.0, NAN, NAN]]), dim=1),
                               torch.tensor([math.sqrt(2.0), NAN]), equal_nan=True)


@pytest.mark.parametrize("bad, error, match", [
    (dict(epsilon=-0.1), ValueError, "epsilon: expected a number >= 0"),
    (dict(epsilon_high=float("inf")), ValueError, "epsilon_high: expected a finite number"),
    (dict(beta=None), ValueError, "beta: expected a finite number"),
    (dict(num_generations=0), ValueError, "num_generations: expected an int >= 1"),
    (dict(normalize_advantages=1), TypeError, "normalize_advantages: expected a bool"),
    (dict(reward_clip_range=(1.0,)), ValueError, r"reward_clip_range: expected None or \(min, max\)"),
    (dict(reward_clip_range=(2.0, 1.0)), ValueError, "reward_clip_range: expected min <= max"),
])
def test_bad_options(bad, error, match):
    with pytest.raises(error, match=match):
        RLOOOptions(**bad)


def test_bad_advantage_inputs():
    with pytest.raises(ValueError, match="rewards_per_func: expected a multiple of num_generations=2"):
        rloo_advantages(torch.zeros(3, 1), torch.ones(1), RLOOOptions(beta=0.0))
    with pytest.raises(ValueError, match="kl: required when beta != 0"):
        rloo_advantages(torch.zeros(4, 1), torch.ones(1))


# ----------------------------------------------------------------------------- the fused op

def make_problem(seed=0, temperature=1.0):
    """B completions of T tokens: completion 1 padded after 3 tokens, completion 2 empty; old log-probs whose
    per-sequence log-ratios at ``temperature`` are far from every clip edge (fp32 and float64 take the same
    branches): above, below, (empty), inside, above."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    bias = torch.randn(V, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 3:] = -100
    targets[2, :] = -100
    lp, _ = reference_logprobs(hidden, weight, targets, bias, temperature=temperature)
    old_tokens = lp + 0.02 * torch.randn(B, T, generator=g).double()
    old_tokens[:, 0] -= torch.tensor([0.5, -0.6, 0.0, 0.05, 1.0]).double()  # log-ratio per sequence
    old_tokens = torch.where(targets != -100, old_tokens, 0.0)
    advantages = torch.tensor([1.0, -0.7, 0.3, -1.2, 0.8]).double()
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, old=old_tokens, advantages=advantages)


def reference_op(p, *, temperature=1.0, with_bias=True, mask=None, old="tokens", epsilon=0.2, epsilon_high=0.28,
                 ignore_index=-100):
    """TRL's loss and metrics on materialized float64 logits, and its gradients w.r.t. hidden, weight, bias."""
    h, w, b = as_f64_leaf(p["hidden"]), as_f64_leaf(p["weight"]), as_f64_leaf(p["bias"]) if with_bias else None
    lp, ent = reference_logprobs(h, w, p["targets"], b, temperature=temperature, ignore_index=ignore_index)
    m = (p["targets"] != ignore_index).double()
    if mask is not None:
        m = m * mask.double()
    old_logps = (p["old"] * m).sum(1) if old is not None else (lp.detach() * m).sum(1)
    loss, metrics = trl_compute_loss(lp, ent, m, p["advantages"], old_logps, epsilon, epsilon_high)
    grads = torch.autograd.grad(loss, [h, w] + ([b] if with_bias else []))
    return loss, metrics, grads


def run_op(p, backend, *, dtype=None, with_bias=True, frozen_weight=False, old="tokens", mask=None, **kw):
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    h = cast(p["hidden"]).clone().requires_grad_(True)
    w = cast(p["weight"]).clone().requires_grad_(not frozen_weight)
    b = cast(p["bias"]).clone().requires_grad_(True) if with_bias else None
    old_logprobs = {"tokens": p["old"], "sequences": (p["old"] * (mask if mask is not None else 1)).sum(1),
                    None: None}[old]
    out = fused_linear_rloo_loss(h, w, p["targets"], p["advantages"].to(h.dtype), old_logprobs=old_logprobs,
                                 mask=mask, bias=b, backend=backend, **{"epsilon_high": 0.28, **kw})
    leaves = [h] + ([] if frozen_weight else [w]) + ([b] if with_bias else [])
    return out, torch.autograd.grad(out.loss, leaves)


@pytest.mark.parametrize("chunk_size", [None, 2, 8], ids=["budget", "two-pass", "whole-seqs"])
@pytest.mark.parametrize("old", ["tokens", "sequences"])
def test_op_float64(chunk_size, old):
    """Torch backend in float64: one pass (budget, whole sequences of <= 8 rows) and two passes (chunks of 2 rows
    are smaller than a sequence) give TRL's loss, metrics and gradients; per-token or per-sequence old log-probs."""
    p = make_problem(temperature=0.8)
    out, grads = run_op(p, "torch", dtype=torch.float64, chunk_size=chunk_size, old=old, temperature=0.8)
    want = reference_op(p, temperature=0.8)
    check(out, grads, want, rtol=1e-9, atol=1e-11)
    assert all(float(g.abs().max()) > 1e-3 for g in want[2])  # the comparison is not vacuous
    assert [float(out.metrics[k]) for k in ("clip_ratio/low_mean", "clip_ratio/high_mean")] == [0.2, 0.4]
    lp, _ = reference_logprobs(p["hidden"], p["weight"], p["targets"], p["bias"], temperature=0.8)
    torch.testing.assert_close(out.logps, lp.sum(1), rtol=1e-12, atol=1e-12)


def test_op_fp32(backend):
    p = make_problem(seed=3, temperature=0.7)
    out, grads = run_op(p, backend, temperature=0.7, epsilon=0.3, epsilon_high=None)
    check(out, grads, reference_op(p, temperature=0.7, epsilon=0.3, epsilon_high=0.3), rtol=2e-5, atol=2e-6)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (B, T)


def test_op_options_on_and_off(backend):
    """No bias, on-policy, a user mask, a frozen lm_head, a non-contiguous hidden, another ignore_index."""
    p = make_problem(seed=9)
    p["targets"] = p["targets"].masked_fill(p["targets"] == -100, -1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = mask[3, 4] = False  # e.g. tool-output tokens
    p["hidden"] = p["hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not p["hidden"].is_contiguous()
    out, grads = run_op(p, backend, with_bias=False, mask=mask, old=None, frozen_weight=True, ignore_index=-1)
    loss, metrics, (dh, _dw) = reference_op(p, with_bias=False, mask=mask, old=None, ignore_index=-1)
    check(out, grads, (loss, metrics, (dh,)), rtol=2e-5, atol=2e-6)
    assert float(out.metrics["clip_ratio/region_mean"]) == 0.0  # on-policy: ratio exactly 1
    assert out.logprobs[0, 1] == 0 and out.entropy[0, 1] == 0  # outside the mask: no logits


def test_op_fp16(backend):
    p = make_problem(seed=7)
    out, grads = run_op(p, backend, dtype=torch.float16)
    p16 = {**p, **{k: p[k].half().float() for k in ("hidden", "weight", "bias")}}  # the fp16-rounded inputs
    assert out.logprobs.dtype == torch.float32
    check(out, grads, reference_op(p16), rtol=2e-3, atol=2e-3)


def test_fully_masked_batch(backend):
    """No completion token: every ratio exp(0 - old_logps), no gradient, the loss still TRL's."""
    p = make_problem(seed=11)
    p["targets"] = torch.full((B, T), -100)
    old = torch.tensor([0.0, -0.3, -0.7, 0.0, -0.1])  # sums of log-probs: <= 0
    out = fused_linear_rloo_loss(p["hidden"].requires_grad_(True), p["weight"], p["targets"],
                                 p["advantages"].float(), old_logprobs=old, backend=backend)
    ratio = torch.exp(-old)
    a = p["advantages"].float()
    torch.testing.assert_close(out.loss, -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a).mean())
    (dh,) = torch.autograd.grad(out.loss, p["hidden"])
    assert float(dh.abs().max()) == 0.0 and float(out.metrics["entropy"]) == 0.0


@pytest.mark.parametrize("layout", ["cu_seqlens", "position_ids"])
def test_packed_equals_padded(backend, layout):
    """S completions packed into N rows (one of length 1, one without completion tokens) give the padded batch's
    loss, metrics, log-probs and gradients; only packed rows get a gradient."""
    lengths, prompt = [5, 1, 4, 3], [1, 0, 4, 2]
    g = torch.Generator().manual_seed(4)
    s, longest = len(lengths), max(lengths)
    hidden, weight = torch.randn(s, longest, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (s, longest), generator=g)
    keep = torch.arange(longest) < torch.tensor(lengths).unsqueeze(1)
    targets = targets.masked_fill(~keep | (torch.arange(longest) < torch.tensor(prompt).unsqueeze(1)), -100)
    old = torch.where(targets != -100, -3 + 0.5 * torch.randn(s, longest, generator=g), 0.0)
    adv = torch.randn(s, generator=g)
    starts = torch.tensor([0] + lengths).cumsum(0)
    packing = dict(cu_seqlens=starts.int()) if layout == "cu_seqlens" else dict(
        position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0))

    def run(h, t, o, **kw):
        h, w = h.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fused_linear_rloo_loss(h, w, t, adv, old_logprobs=o, backend=backend, **kw)
        return out, torch.autograd.grad(out.loss, [h, w])

    want, (dh, dw) = run(hidden, targets, old)
    per_token, (gh, gw) = run(hidden[keep], targets[keep], old[keep], **packing)
    per_sequence, _ = run(hidden[keep], targets[keep], old.sum(1), **packing)
    tol = dict(rtol=1e-5, atol=1e-6)
    for got in (per_token, per_sequence):
        torch.testing.assert_close(got.loss, want.loss, **tol)
        for k in want.metrics:
            torch.testing.assert_close(got.metrics[k], want.metrics[k], **tol)
        torch.testing.assert_close(got.logps, want.logps, **tol)
    torch.testing.assert_close(per_token.logprobs, want.logprobs[keep], **tol)
    torch.testing.assert_close(per_token.entropy, want.entropy[keep], **tol)
    torch.testing.assert_close(gh, dh[keep], **tol)
    torch.testing.assert_close(gw, dw, **tol)
    assert float(dh[~keep].abs().sum()) == 0.0 and float(dh.abs().max()) > 0


class TestBadInput:
    def call(self, **overrides):
        p = make_problem()
        args = dict(hidden=p["hidden"], weight=p["weight"], targets=p["targets"], advantages=p["advantages"].float(),
                    backend="torch")
        args.update(overrides)
        return fused_linear_rloo_loss(**args)

    @pytest.mark.parametrize("overrides, error, match", [
        (dict(advantages=torch.zeros(B, T)), ValueError,
         r"advantages: expected shape \(5,\) \(one per completion: RLOO's advantages are per sequence\)"),
        (dict(advantages=torch.zeros(B, dtype=torch.long)), TypeError, "advantages: expected dtype"),
        (dict(advantages=torch.full((B,), NAN)), ValueError, "advantages: expected finite values"),
        (dict(old_logprobs=torch.zeros(B, T - 1)), ValueError,
         r"old_logprobs: expected shape \(5, 7\) \(per token\) or \(5,\) \(per sequence, TRL's old_logps\)"),
        (dict(old_logprobs=torch.full((B,), NAN)), ValueError, "old_logprobs: expected finite values"),
        (dict(mask=torch.full((B, T), 0.5)), ValueError, "mask: expected a bool or 0/1 mask"),
        (dict(epsilon=-1.0), ValueError, "epsilon: expected a number >= 0"),
        (dict(hidden=torch.zeros(B * T, H)), ValueError, r"hidden: expected shape \[B, T, H\]"),
        (dict(targets=torch.full((B, T), V)), ValueError, r"targets: expected ids in \[0, 37\)"),
        (dict(temperature=0.0), ValueError, "temperature: expected a positive finite number"),
    ])
    def test_clear_errors(self, overrides, error, match):
        with pytest.raises(error, match=match):
            self.call(**overrides)
