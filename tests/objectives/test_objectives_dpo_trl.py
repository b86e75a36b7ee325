"""DPO objectives against TRL's ``DPOTrainer._compute_loss`` (TRL 1.16) written out here in float64 from per-token
log-probs: every loss type alone, weighted lists, f-divergences, LD-DPO, WPO, bco_pair's running mean, rankings
(Plackett-Luce written with loops), loss, metrics and gradients."""
from __future__ import annotations

import itertools

import pytest
import torch

from fastalign.objectives.dpo import (DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCE_TYPES, DPOOptions,
                                      RunningMean, dpo_loss, dpo_metrics, dpo_sequence_loss, sequence_logps)
from helpers.reference_dpo import plackett_luce_reference, trl_dpo

F64 = torch.float64
SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3, "aot": 0.15, "aot_unpaired": 0.05}


def _problem(k: int = 2, b: int = 3, t: int = 7, v: int = 11, seed: int = 0):
    """Per-token log-probs of the policy and the reference ``[K*B, T]``, a completion mask with unequal lengths
    (one response fully padded), and the policy's logits ``[K*B, T, V]``."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(k * b, t, v, generator=g, dtype=F64)
    targets = torch.randint(0, v, (k * b, t), generator=g)
    policy = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    ref = policy + 0.4 * torch.randn(k * b, t, generator=g, dtype=F64)
    starts = torch.randint(0, 3, (k * b,), generator=g)
    ends = torch.randint(3, t + 1, (k * b,), generator=g)
    pos = torch.arange(t)
    mask = (pos >= starts[:, None]) & (pos < ends[:, None])
    mask[-1] = False  # the worst response of the last group: no completion token
    return policy, ref, mask, logits, targets


# ------------------------------------------------------------------------------------------------ ours
def ours(policy, ref, mask, options: DPOOptions, *, logits=None, bco_state=None):
    denoms = None
    if options.use_weighting:
        denoms = torch.logsumexp(2.0 * logits, -1) - 2.0 * torch.logsumexp(logits, -1)
    ref_logps = sequence_logps(ref.masked_fill(~mask, 0.0), mask, options)
    return dpo_sequence_loss(policy, mask, ref_logps, options, token_log_denoms=denoms, bco_state=bco_state)


def _compare(options: DPOOptions, trl_kwargs: dict, seed: int = 0, **ours_kwargs):
    policy, ref, mask, logits, _ = _problem(seed=seed)
    policy = policy.clone().requires_grad_(True)
    result, logps = ours(policy, ref, mask, options, logits=logits, **ours_kwargs)
    expected, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = trl_dpo(
        policy, ref, mask, list(options.loss_types), list(options.weights), logits=logits, **trl_kwargs)
    torch.testing.assert_close(result.loss, expected, rtol=1e-12, atol=1e-12)
    grad = torch.autograd.grad(result.loss, policy)[0]
    expected_grad = torch.autograd.grad(expected, policy)[0]
    assert expected_grad.abs().max() > 1e-6  # the comparison is not vacuous
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(result.rejected_rewards, rejected_rewards)
    metrics = dpo_metrics(result, logps)
    torch.testing.assert_close(metrics["logps/chosen"], chosen_logps.detach().mean())
    torch.testing.assert_close(metrics["logps/rejected"], rejected_logps.detach().mean())
    torch.testing.assert_close(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean())
    return result


def _options(loss_type, **kwargs) -> tuple[DPOOptions, dict]:
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    eps = max([SMOOTHING.get(t, 0.0) for t in types])
    if "exo_pair" in types:
        eps = SMOOTHING["exo_pair"]
    beta = kwargs.pop("beta", 0.3)
    options = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=eps, **kwargs)
    trl = {k: v for k, v in kwargs.items() if k not in ("loss_weights",)}
    return options, {"beta": beta, "label_smoothing": eps, **trl}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_alone_matches_trl(loss_type):
    options, trl = _options(loss_type)
    _compare(options, trl)


@pytest.mark.parametrize("loss_type, weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["ipo", "discopop", "apo_zero", "sigmoid_norm"], [0.5, 1.5, 0.3, 2.0]),
])
def test_weighted_lists_match_trl(loss_type, weights):
    options, trl = _options(loss_type, loss_weights=weights)
    result = _compare(options, trl)
    alone = [(_options(name)[0], w) for name, w in zip(loss_type, weights)]
    policy, ref, mask, logits, _ = _problem()
    total = sum(w * ours(policy, ref, mask, DPOOptions(beta=0.3, loss_type=o.loss_type,
                                                       label_smoothing=options.label_smoothing
                                                       if o.loss_type in SMOOTHING else 0.0))[0].loss
                for o, w in alone)
    torch.testing.assert_close(result.loss.detach(), total)


@pytest.mark.parametrize("kind", F_DIVERGENCE_TYPES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "exo_pair", "discopop"])
def test_f_divergences_match_trl(kind, loss_type):
    options, trl = _options(loss_type, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
    _compare(options, trl)


def test_alpha_divergence_at_one_is_reverse_kl_and_changes_the_loss_elsewhere():
    base = _compare(*_options("sigmoid"))
    limit = _compare(*_options("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0))
    other = _compare(*_options("sigmoid", f_divergence_type="forward_kl"))
    torch.testing.assert_close(base.loss, limit.loss)
    assert abs(base.loss.item() - other.loss.item()) > 1e-4


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sppo_hard", ["sigmoid", "sft"]])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
def test_ld_dpo_matches_trl(loss_type, ld_alpha):
    options, trl = _options(loss_type, ld_alpha=ld_alpha)
    _compare(options, trl)


def test_ld_dpo_alpha_one_is_plain_dpo_and_alpha_below_one_is_not():
    plain = _compare(*_options("sigmoid"))
    one = _compare(*_options("sigmoid", ld_alpha=1.0))
    half = _compare(*_options("sigmoid", ld_alpha=0.5))
    torch.testing.assert_close(plain.loss, one.loss)
    assert abs(plain.loss.item() - half.loss.item()) > 1e-4


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft", ["sigmoid", "bco_pair", "sft"]])
def test_wpo_weighting_matches_trl(loss_type):
    options, trl = _options(loss_type, use_weighting=True)
    _compare(options, trl)


def test_bco_pair_running_mean_matches_trl_running_moments():
    """TRL < 1.0: ``RunningMoments.update(mean of the batch's 2B rewards)``, then shift by the running mean."""
    beta = 0.3
    state, trl_mean, trl_count = RunningMean.initial(dtype=F64), 0.0, 1e-24
    for seed in range(3):
        policy, ref, mask, _, _ = _problem(seed=seed)
        ref = ref - 0.3 * (seed + 1)  # a mean reward away from 0
        options = DPOOptions(beta=beta, loss_type="bco_pair")
        policy = policy.clone().requires_grad_(True)
        result, _ = ours(policy, ref, mask, options, bco_state=state)
        chosen = ((policy - ref) * mask).sum(1).chunk(2)
        rewards = torch.cat([beta * chosen[0], beta * chosen[1]]).mean().item()
        tot = trl_count + 1
        trl_mean, trl_count = trl_mean + (rewards - trl_mean) / tot, tot
        expected = trl_dpo(policy, ref, mask, ["bco_pair"], beta=beta, bco_mean=trl_mean)[0]
        torch.testing.assert_close(result.loss, expected)
        torch.testing.assert_close(torch.autograd.grad(result.loss, policy)[0],
                                   torch.autograd.grad(expected, policy)[0])
        assert result.bco_state.mean.item() == pytest.approx(trl_mean, rel=1e-12)
        state = result.bco_state
    assert abs(trl_mean) > 0.1


@pytest.mark.parametrize("k", [2, 3, 4])
def test_ranking_is_the_plackett_luce_likelihood(k):
    policy, ref, mask, _, _ = _problem(k=k, b=3)
    policy = policy.clone().requires_grad_(True)
    options = DPOOptions(beta=0.7, num_responses=k)
    result, logps = ours(policy, ref, mask, options)
    ratios = ((policy - ref) * mask).sum(1).view(k, -1).detach()
    rewards = (0.7 * ratios).tolist()
    assert result.loss.item() == pytest.approx(plackett_luce_reference(rewards), rel=1e-12)
    # gradient: d/du_k of -sum_i (u_i - lse(u_i..)) = -1[k < K-1] + sum_{i <= min(k, K-2)} softmax_i(u)_k
    u = torch.tensor(rewards, dtype=F64)
    grad_u = torch.zeros_like(u)
    for i in range(k - 1):
        grad_u[i] -= 1
        grad_u[i:] += torch.softmax(u[i:], dim=0)
    grad_u /= u.shape[1]
    expected = (0.7 * grad_u).reshape(-1, 1) * mask
    torch.testing.assert_close(torch.autograd.grad(result.loss, policy)[0], expected)
    metrics = dpo_metrics(result, logps)
    pairs = [(i, j) for i, j in itertools.combinations(range(k), 2)]
    ordered = [[rewards[i][b] > rewards[j][b] for i, j in pairs] for b in range(3)]
    assert metrics["rewards/accuracies"].item() == pytest.approx(sum(map(sum, ordered)) / (3 * len(pairs)))
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(rewards[0]) / 3)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(rewards[-1]) / 3)
    if k > 2:
        assert metrics["rewards/ranking_accuracy"].item() == pytest.approx(sum(all(o) for o in ordered) / 3)
    else:
        assert "rewards/ranking_accuracy" not in metrics
        trl = trl_dpo(policy, ref, mask, ["sigmoid"], beta=0.7)[0]
        torch.testing.assert_close(result.loss, trl)


def test_ranking_accuracy_counts_well_separated_orders():
    """Rewards far from ties: group 0 in order, group 1 with its two last swapped, group 2 reversed."""
    logps = torch.tensor([[3.0, 3.0, 1.0], [2.0, 1.0, 2.0], [1.0, 2.0, 3.0]], dtype=F64)
    result = dpo_loss(logps, torch.zeros_like(logps), DPOOptions(beta=1.0, num_responses=3))
    metrics = dpo_metrics(result, logps)
    assert metrics["rewards/ranking_accuracy"].item() == pytest.approx(1 / 3)
    assert metrics["rewards/accuracies"].item() == pytest.approx((3 + 2 + 0) / 9)


def test_ranking_with_sft_ld_and_wpo():
    k = 3
    policy, ref, mask, logits, _ = _problem(k=k, b=2)
    options = DPOOptions(beta=0.4, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], num_responses=k,
                         ld_alpha=0.5, use_weighting=True)
    result, _ = ours(policy, ref, mask, options, logits=logits)
    # independent: LD weights with the group's shortest length, PL on them, WPO product of the 3 weights
    lengths = mask.sum(1).view(k, -1)
    shared = lengths.min(0).values.repeat(k)
    pos = mask.long().cumsum(1)
    w = torch.where(pos > shared[:, None], 0.5, 1.0) * mask
    u = 0.4 * ((policy - ref) * w).sum(1).view(k, -1)
    log_denom = torch.logsumexp(2.0 * logits, -1) - 2.0 * torch.logsumexp(logits, -1)
    wpo = torch.exp((((policy - log_denom) * mask).sum(1) / mask.sum(1).clamp(min=1)).view(k, -1)).prod(0)
    pl = torch.tensor([plackett_luce_reference(u[:, [b]].tolist()) for b in range(2)], dtype=F64)
    sft = -(policy[:2] * mask[:2]).sum() / mask[:2].sum()
    expected = ((pl + 0.5 * sft) * wpo).mean()
    torch.testing.assert_close(result.loss, expected)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("loss_type, eps, message", [
    ("sigmoid", 0.5, "expected \\[0.0, 0.5\\) for loss_type 'sigmoid', got 0.5"),
    ("sigmoid", -0.1, "expected \\[0.0, 0.5\\)"),
    ("robust", 0.5, "expected \\[0.0, 0.5\\) for loss_type 'robust'"),
    ("aot", 0.7, "expected \\[0.0, 0.5\\) for loss_type 'aot'"),
    ("aot_unpaired", -1e-3, "for loss_type 'aot_unpaired'"),
    ("exo_pair", 0.0, "expected \\(0.0, 0.5\\) \\(the EXO paper recommends 1e-3\\) for loss_type 'exo_pair'"),
    ("exo_pair", 0.5, "for loss_type 'exo_pair'"),
    ("ipo", 0.1, "expected 0.0 \\(not used by loss_type \\['ipo'\\]\\), got 0.1"),
    (["hinge", "sft"], 0.2, "not used by loss_type \\['hinge', 'sft'\\]"),
    (["sigmoid", "exo_pair"], 0.0, "for loss_type 'exo_pair'"),
])
def test_label_smoothing_out_of_range_is_an_error(loss_type, eps, message):
    with pytest.raises(ValueError, match="label_smoothing: .*" + message):
        DPOOptions(loss_type=loss_type, label_smoothing=eps)


def test_label_smoothing_in_range_is_accepted():
    for loss_type in ("sigmoid", "robust", "aot", "aot_unpaired"):
        DPOOptions(loss_type=loss_type, label_smoothing=0.0)
        DPOOptions(loss_type=loss_type, label_smoothing=0.49)
    DPOOptions(loss_type=["hinge", "robust"], label_smoothing=0.3)
    DPOOptions(loss_type="exo_pair", label_smoothing=1e-3)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"loss_type": "dpo"}, ValueError, "loss_type: expected names from .*got 'dpo'"),
    ({"loss_type": []}, TypeError, "loss_type: expected a loss type name or a non-empty list"),
    ({"loss_type": ["sigmoid", "sigmoid"]}, ValueError, "loss_type: expected each name at most once"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError,
     "loss_weights: expected one weight per loss type \\(2"),
    ({"loss_weights": ["a"]}, TypeError, "loss_weights: expected a real number"),
    ({"f_divergence_type": "kl"}, ValueError, "f_divergence_type: expected one of"),
    ({"f_divergence_type": "forward_kl", "loss_type": "nca_pair"}, ValueError,
     "f_divergence_type: 'forward_kl' is only defined for the loss types"),
    ({"discopop_tau": 0.0}, ValueError, "discopop_tau: expected a positive number"),
    ({"ld_alpha": 1.5}, ValueError, "ld_alpha: expected None or a number in \\[0, 1\\], got 1.5"),
    ({"use_weighting": 1}, TypeError, "use_weighting: expected a bool"),
    ({"use_weighting": True, "loss_type": "aot"}, ValueError, "use_weighting: not defined for 'aot'"),
    ({"num_responses": 1}, ValueError, "num_responses: expected an int >= 2, got 1"),
    ({"num_responses": 3, "loss_type": "ipo"}, ValueError, "loss_type: with num_responses=3"),
    ({"num_responses": 3, "label_smoothing": 0.1}, ValueError, "label_smoothing: expected 0.0 with num_responses=3"),
])
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        DPOOptions(**kwargs)


def test_f_divergence_is_accepted_exactly_for_trls_loss_types():
    for loss_type in DPO_LOSS_TYPES:
        if loss_type in F_DIVERGENCE_LOSS_TYPES:
            DPOOptions(loss_type=loss_type, f_divergence_type="js_divergence",
                       label_smoothing=SMOOTHING["exo_pair"] if loss_type == "exo_pair" else 0.0)
        else:
            with pytest.raises(ValueError, match="f_divergence_type"):
                DPOOptions(loss_type=loss_type, f_divergence_type="js_divergence",
                           label_smoothing=SMOOTHING.get(loss_type, 0.0))


def test_missing_inputs_name_the_argument():
    logps = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="lengths: required by loss_type \\['ipo'\\]"):
        dpo_loss(logps, logps, DPOOptions(loss_type="ipo"))
    with pytest.raises(ValueError, match="chosen_nll: expected a 0-dim tensor with loss_type \\['sft'\\]"):
        dpo_loss(logps, logps, DPOOptions(loss_type="sft"))
    with pytest.raises(ValueError, match="log_weights: expected a \\[K, B\\] tensor with use_weighting=True"):
        dpo_loss(logps, logps, DPOOptions(use_weighting=True))
    with pytest.raises(ValueError, match="logps: expected 3 rows \\(num_responses\\)"):
        dpo_loss(logps, logps, DPOOptions(num_responses=3))
    with pytest.raises(ValueError, match="ref_logps: expected shape \\[2, 3\\] like logps, got \\(2, 2\\)"):
        dpo_loss(logps, logps[:, :2])
    with pytest.raises(ValueError, match="logps: expected shape \\[K, B\\]"):
        dpo_loss(logps[0], logps[0])


def test_long_sequence_sums_keep_fp32_accuracy():
    """Issue 10.6: a 32k-token fp32 sum within 0.005 of the float64 sum (accumulated in float64)."""
    g = torch.Generator().manual_seed(0)
    tokens = -torch.rand(2, 32768, generator=g, dtype=F64) * 8
    mask = torch.ones(2, 32768, dtype=torch.bool)
    got = sequence_logps(tokens.float(), mask, DPOOptions())
    want = tokens.float().double().sum(1).view(2, 1)
    assert (got.double() - want).abs().max() < 0.005
