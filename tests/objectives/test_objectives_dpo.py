"""DPO objectives on pairs: the classic loss types against their formulas written out with ``math``, signs, options,
metrics, gradients (every TRL loss type, lists, f-divergences, LD-DPO, WPO and rankings: test_objectives_dpo_trl.py)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign.objectives.dpo import DPOOptions, DPOResult, dpo_loss, dpo_metrics, rpo_nll

F64 = torch.float64


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# Per-pair loss from c = chosen log-ratio, r = rejected log-ratio, z = c - r, b = beta, e = label smoothing.
FORMULAS = {
    "sigmoid": lambda c, r, z, b, e: -(1 - e) * _logsig(b * z) - e * _logsig(-b * z),
    "robust": lambda c, r, z, b, e: (-(1 - e) * _logsig(b * z) + e * _logsig(-b * z)) / (1 - 2 * e),
    "hinge": lambda c, r, z, b, e: max(0.0, 1 - b * z),
    "ipo": lambda c, r, z, b, e: (z - 1 / (2 * b)) ** 2,
    "sppo_hard": lambda c, r, z, b, e: (c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2,
    "nca_pair": lambda c, r, z, b, e: -_logsig(b * c) - 0.5 * _logsig(-b * c) - 0.5 * _logsig(-b * r),
    "apo_zero": lambda c, r, z, b, e: 1 - _sig(b * c) + _sig(b * r),
    "apo_down": lambda c, r, z, b, e: _sig(b * c) + 1 - _sig(b * z),
}
SMOOTHING = {"sigmoid": 0.2, "robust": 0.2}
PAIR_LOSS_TYPES = tuple(FORMULAS)  # label smoothing used where the loss type takes it

# policy chosen, policy rejected, reference chosen, reference rejected
PAIRS = [(-10.0, -14.0, -11.0, -12.5), (-3.0, -2.0, -3.5, -2.2), (-20.0, -20.0, -20.0, -20.0)]


def _expected(loss_type: str, pc: float, pr: float, rc: float, rr: float, beta: float, eps: float) -> float:
    c, r = pc - rc, pr - rr
    return FORMULAS[loss_type](c, r, c - r, beta, eps)


def _tensors(pairs, dtype=F64, requires_grad=False):
    cols = list(zip(*pairs))
    return [torch.tensor(col, dtype=dtype, requires_grad=requires_grad) for col in cols]


def _pair(pc, pr, rc, rr, options=DPOOptions(), **kwargs) -> DPOResult:
    """``dpo_loss`` on chosen/rejected ``[B]`` tensors; ``ipo`` on these per-pair numbers as they are (lengths 1)."""
    ref = None if rc is None and rr is None else torch.stack([rc, rr])
    lengths = torch.ones(2, pc.shape[0], dtype=pc.dtype) if options.needs_lengths else None
    return dpo_loss(torch.stack([pc, pr]), ref, options, lengths=lengths, **kwargs)


def _pair_losses(pc, pr, rc, rr, options=DPOOptions()):
    result = _pair(pc, pr, rc, rr, options)
    return result.losses, result.chosen_rewards, result.rejected_rewards


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_and_rewards_match_formula(loss_type, beta):
    eps = SMOOTHING.get(loss_type, 0.0)
    options = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=eps)
    result = _pair(*_tensors(PAIRS), options)
    expected = [_expected(loss_type, *pair, beta, eps) for pair in PAIRS]
    torch.testing.assert_close(result.losses, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.loss, torch.tensor(sum(expected) / len(expected), dtype=F64))
    chosen_rewards = [beta * (pc - rc) for pc, _, rc, _ in PAIRS]
    rejected_rewards = [beta * (pr - rr) for _, pr, _, rr in PAIRS]
    torch.testing.assert_close(result.chosen_rewards, torch.tensor(chosen_rewards, dtype=F64))
    torch.testing.assert_close(result.rejected_rewards, torch.tensor(rejected_rewards, dtype=F64))
    assert result.nll is None
    losses, chosen_rewards, rejected_rewards = _pair_losses(*_tensors(PAIRS), options)
    assert torch.equal(losses, result.losses) and torch.equal(chosen_rewards, result.chosen_rewards)
    assert torch.equal(rejected_rewards, result.rejected_rewards)


# First pair of PAIRS with beta = 0.5: c = 1, r = -1.5, z = 2.5; with beta = 0.1 for hinge: b z = 0.25.
@pytest.mark.parametrize(
    "loss_type, beta, eps, expected",
    [
        ("sigmoid", 0.5, 0.0, math.log(1 + math.exp(-1.25))),
        ("sigmoid", 0.5, 0.2, 0.8 * math.log(1 + math.exp(-1.25)) + 0.2 * math.log(1 + math.exp(1.25))),
        ("robust", 0.5, 0.2, (0.8 * math.log(1 + math.exp(-1.25)) - 0.2 * math.log(1 + math.exp(1.25))) / 0.6),
        ("hinge", 0.1, 0.0, 0.75),
        ("hinge", 0.5, 0.0, 0.0),
        ("ipo", 0.5, 0.0, 2.25),
        ("sppo_hard", 0.5, 0.0, 0.25),
        ("nca_pair", 0.5, 0.0,
         math.log(1 + math.exp(-0.5)) + 0.5 * math.log(1 + math.exp(0.5)) + 0.5 * math.log(1 + math.exp(-0.75))),
        ("apo_zero", 0.5, 0.0, 1 - 1 / (1 + math.exp(-0.5)) + 1 / (1 + math.exp(0.75))),
        ("apo_down", 0.5, 0.0, 1 / (1 + math.exp(-0.5)) + 1 - 1 / (1 + math.exp(-1.25))),
    ],
)
def test_hand_computed_example(loss_type, beta, eps, expected):
    options = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=eps)
    result = _pair(*_tensors(PAIRS[:1]), options)
    assert result.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(
    "loss_type, expected",
    [("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0), ("ipo", 25.0), ("sppo_hard", 50.0),
     ("nca_pair", 2 * math.log(2)), ("apo_zero", 1.0), ("apo_down", 1.0)],
)
def test_policy_equal_to_reference(loss_type, expected):
    """At policy == reference (all log-ratios 0) with beta = 0.1 every loss has a closed form."""
    options = DPOOptions(beta=0.1, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    logps = torch.tensor([-7.0, -3.0], dtype=F64)
    result = _pair(logps, logps.flip(0), logps, logps.flip(0), options)
    torch.testing.assert_close(result.losses, torch.full((2,), expected, dtype=F64))


def _loss_at(loss_type: str, chosen_shift: float, rejected_shift: float, beta: float = 0.1) -> float:
    options = DPOOptions(beta=beta, loss_type=loss_type)
    ref_c, ref_r = torch.tensor([-12.0], dtype=F64), torch.tensor([-9.0], dtype=F64)
    return _pair(ref_c + chosen_shift, ref_r + rejected_shift, ref_c, ref_r, options).loss.item()


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_loss_decreases_as_rejected_logp_drops(loss_type):
    values = [_loss_at(loss_type, 0.0, -shift) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("loss_type", [t for t in PAIR_LOSS_TYPES if t != "apo_down"])
def test_loss_decreases_as_chosen_logp_rises(loss_type):
    values = [_loss_at(loss_type, shift, 0.0) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_apo_zero_raises_and_apo_down_lowers_the_chosen_logp():
    """APO-zero pushes the chosen likelihood up; APO-down pushes it down (rejected down more)."""
    grads = {}
    for loss_type in ("apo_zero", "apo_down"):
        chosen = torch.tensor([-5.0], dtype=F64, requires_grad=True)
        rejected = torch.tensor([-7.0], dtype=F64, requires_grad=True)
        loss = _pair(chosen, rejected, torch.tensor([-5.0], dtype=F64), torch.tensor([-6.0], dtype=F64),
                        DPOOptions(beta=0.5, loss_type=loss_type)).loss
        grads[loss_type] = torch.autograd.grad(loss, (chosen, rejected))
    assert grads["apo_zero"][0].item() < 0 and grads["apo_zero"][1].item() > 0
    assert grads["apo_down"][0].item() > 0 and grads["apo_down"][1].item() > 0
    assert grads["apo_down"][1].item() > grads["apo_down"][0].item()


def test_sigmoid_gradient_matches_closed_form():
    beta, eps = 0.3, 0.1
    pc, pr, rc, rr = _tensors(PAIRS, requires_grad=True)
    loss = _pair(pc, pr, rc, rr, DPOOptions(beta=beta, label_smoothing=eps)).loss
    grads = torch.autograd.grad(loss, (pc, pr, rc, rr))
    expected = []
    for p_c, p_r, r_c, r_r in PAIRS:
        z = (p_c - p_r) - (r_c - r_r)
        expected.append((-(1 - eps) * beta * _sig(-beta * z) + eps * beta * _sig(beta * z)) / len(PAIRS))
    expected = torch.tensor(expected, dtype=F64)
    for grad, sign in zip(grads, (1, -1, -1, 1)):
        torch.testing.assert_close(grad, sign * expected)


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    options = DPOOptions(beta=0.2, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0), rpo_alpha=0.7)
    # Margins z = 3.5, -2.7, 1.2: beta z stays away from the hinge kink at 1.
    inputs = _tensors([(-10.0, -14.0, -11.0, -11.5), (-3.0, -2.0, -3.5, -5.2), (-6.0, -8.0, -6.5, -9.7)],
                      requires_grad=True)

    def fn(pc, pr, rc, rr):
        return _pair(pc, pr, rc, rr, options, chosen_nll=rpo_nll(pc, torch.tensor([4, 2, 3]))).loss

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("loss_type", ["sigmoid", "sppo_hard", "nca_pair"])
def test_gradcheck_reference_free(loss_type):
    options = DPOOptions(beta=0.2, loss_type=loss_type, reference_free=True)
    pc, pr, _, _ = _tensors(PAIRS, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r: _pair(c, r, None, None, options).loss, (pc, pr))


def test_rewards_are_detached_and_loss_is_not():
    pc, pr, rc, rr = _tensors(PAIRS, requires_grad=True)
    result = _pair(pc, pr, rc, rr)
    assert result.loss.requires_grad and result.losses.requires_grad
    assert not result.chosen_rewards.requires_grad and not result.rejected_rewards.requires_grad


# ---------------------------------------------------------------------------------------------- label smoothing
def test_label_smoothing_makes_sigmoid_less_confident():
    """With a large correct margin, cDPO's loss grows with the assumed flip rate."""
    pc, pr, rc, rr = _tensors([(-1.0, -30.0, -10.0, -10.0)])
    values = [_pair(pc, pr, rc, rr, DPOOptions(beta=0.5, label_smoothing=e)).loss.item() for e in (0.0, 0.1, 0.3)]
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
def test_robust_loss_is_unbiased_under_label_noise(eps):
    """Robust DPO's defining property: (1-e) L(z) + e L(-z) equals the clean DPO loss -log s(b z)."""
    pc, pr, rc, rr = _tensors(PAIRS)
    options = DPOOptions(beta=0.4, loss_type="robust", label_smoothing=eps)
    noisy = (1 - eps) * _pair_losses(pc, pr, rc, rr, options)[0] + eps * _pair_losses(pr, pc, rr, rc, options)[0]
    clean = _pair_losses(pc, pr, rc, rr, DPOOptions(beta=0.4))[0]
    torch.testing.assert_close(noisy, clean)


# ---------------------------------------------------------------------------------------------- reference_free
@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_reference_free_takes_reference_logps_as_zero(loss_type):
    pc, pr, _, _ = _tensors(PAIRS)
    options = DPOOptions(beta=0.2, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    free = _pair(pc, pr, None, None, DPOOptions(**{**options.__dict__, "reference_free": True}))
    expected = [FORMULAS[loss_type](c, r, c - r, 0.2, SMOOTHING.get(loss_type, 0.0)) for c, r, _, _ in PAIRS]
    torch.testing.assert_close(free.losses, torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(free.chosen_rewards, 0.2 * pc)
    torch.testing.assert_close(free.rejected_rewards, 0.2 * pr)


def test_reference_free_rejects_reference_tensors_and_the_default_requires_them():
    pc, pr, rc, rr = _tensors(PAIRS)
    with pytest.raises(ValueError, match="ref_logps: expected None with reference_free=True"):
        _pair(pc, pr, rc, rr, DPOOptions(reference_free=True))
    with pytest.raises(ValueError, match="ref_logps: expected a tensor of shape \\[K, B\\]"):
        dpo_loss(torch.stack([pc, pr]), None)


# ---------------------------------------------------------------------------------------------- RPO and num_pairs
def test_rpo_nll_is_mean_negative_log_likelihood_per_chosen_token():
    chosen = torch.tensor([-6.0, -4.0], dtype=F64)
    assert rpo_nll(chosen, torch.tensor([3, 2])).item() == pytest.approx(2.0)
    assert rpo_nll(chosen, torch.tensor([3, 2]), num_tokens=20).item() == pytest.approx(0.5)
    assert rpo_nll(chosen, torch.tensor([3, 2]), num_tokens=torch.tensor(8)).item() == pytest.approx(1.25)


def test_rpo_term_is_added_to_the_mean_loss():
    pc, pr, rc, rr = _tensors(PAIRS)
    nll = torch.tensor(1.7, dtype=F64)
    plain = _pair(pc, pr, rc, rr, DPOOptions(beta=0.3))
    with_rpo = _pair(pc, pr, rc, rr, DPOOptions(beta=0.3, rpo_alpha=0.5), chosen_nll=nll)
    assert with_rpo.loss.item() == pytest.approx(plain.loss.item() + 0.5 * 1.7, rel=1e-12)
    torch.testing.assert_close(with_rpo.losses, plain.losses)
    assert with_rpo.nll is nll


def test_rpo_gradient_reaches_chosen_logps_through_the_nll():
    beta, alpha = 0.3, 2.0
    pc, pr, rc, rr = _tensors(PAIRS, requires_grad=True)
    counts = torch.tensor([5, 4, 1])
    options = DPOOptions(beta=beta, rpo_alpha=alpha)
    loss = _pair(pc, pr, rc, rr, options, chosen_nll=rpo_nll(pc, counts)).loss
    without = _pair(pc, pr, rc, rr, DPOOptions(beta=beta)).loss
    extra = torch.autograd.grad(loss, pc)[0] - torch.autograd.grad(without, pc)[0]
    torch.testing.assert_close(extra, torch.full((3,), -alpha / 10, dtype=F64))


def test_rpo_requires_nll_exactly_when_enabled():
    pc, pr, rc, rr = _tensors(PAIRS)
    with pytest.raises(ValueError, match="chosen_nll: expected a 0-dim tensor with .* rpo_alpha=1.0, got None"):
        _pair(pc, pr, rc, rr, DPOOptions(rpo_alpha=1.0))
    with pytest.raises(ValueError, match="chosen_nll: expected None with .* rpo_alpha=None, got a tensor"):
        _pair(pc, pr, rc, rr, chosen_nll=torch.tensor(1.0))
    with pytest.raises(ValueError, match="chosen_nll: expected a 0-dim floating-point tensor, got shape \\(3,\\)"):
        _pair(pc, pr, rc, rr, DPOOptions(rpo_alpha=1.0), chosen_nll=pc)


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_num_pairs_makes_micro_batches_add_up(loss_type):
    options = DPOOptions(beta=0.2, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0), rpo_alpha=0.5)
    pairs = PAIRS + [(-4.0, -9.0, -4.5, -8.0)]
    counts = torch.tensor([3, 5, 2, 6])
    pc, pr, rc, rr = _tensors(pairs, requires_grad=True)
    whole = _pair(pc, pr, rc, rr, options, chosen_nll=rpo_nll(pc, counts)).loss
    parts = sum(
        _pair(pc[s], pr[s], rc[s], rr[s], options, num_pairs=4,
                 chosen_nll=rpo_nll(pc[s], counts[s], num_tokens=16)).loss
        for s in (slice(0, 1), slice(1, 4))
    )
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(torch.autograd.grad(parts, pc)[0], torch.autograd.grad(whole, pc)[0])


def test_num_pairs_divides_the_sum():
    pc, pr, rc, rr = _tensors(PAIRS)
    result = _pair(pc, pr, rc, rr, num_pairs=torch.tensor(12))
    torch.testing.assert_close(result.loss, result.losses.sum() / 12)
    with pytest.raises(ValueError, match="num_pairs: expected an int >= 3 \\(at least the pairs in this batch\\)"):
        _pair(pc, pr, rc, rr, num_pairs=2)
    with pytest.raises(TypeError, match="num_pairs: expected an int or a one-element tensor, got float"):
        _pair(pc, pr, rc, rr, num_pairs=3.0)
    empty = torch.zeros(0, dtype=F64)
    assert _pair(empty, empty, empty, empty, num_pairs=4).loss.item() == 0.0
    with pytest.raises(ValueError, match="expected at least one group"):
        _pair(empty, empty, empty, empty)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_names_and_values():
    beta = 0.5
    # rewards: chosen 0.5 * (1, -0.5, 0, 2) = (0.5, -0.25, 0, 1);
    # rejected 0.5 * (-1.5, 0.2, 0, 3) = (-0.75, 0.1, 0, 1.5)
    pairs = [(-10.0, -14.0, -11.0, -12.5), (-3.0, -2.0, -2.5, -2.2), (-5.0, -6.0, -5.0, -6.0), (-1.0, -1.0, -3.0, -4.0)]
    pc, pr, rc, rr = _tensors(pairs, requires_grad=True)
    result = _pair(pc, pr, rc, rr, DPOOptions(beta=beta))
    metrics = dpo_metrics(result, torch.stack([pc, pr]))
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}
    expected = {
        "rewards/chosen": (0.5 - 0.25 + 0 + 1) / 4,
        "rewards/rejected": (-0.75 + 0.1 + 0 + 1.5) / 4,
        "rewards/accuracies": 0.25,  # only the first pair; the tie (third) does not count
        "rewards/margins": ((0.5 + 0.75) + (-0.25 - 0.1) + 0 + (1 - 1.5)) / 4,
        "logps/chosen": (-10 - 3 - 5 - 1) / 4,
        "logps/rejected": (-14 - 2 - 6 - 1) / 4,
    }
    for name, value in expected.items():
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad, name
        assert metrics[name].item() == pytest.approx(value, rel=1e-12, abs=1e-15), name


def test_metrics_report_the_nll_when_rpo_is_on():
    pc, pr, rc, rr = _tensors(PAIRS, requires_grad=True)
    nll = rpo_nll(pc, torch.tensor([2, 2, 2]))
    result = _pair(pc, pr, rc, rr, DPOOptions(rpo_alpha=1.0), chosen_nll=nll)
    metrics = dpo_metrics(result, torch.stack([pc, pr]))
    assert metrics["nll_loss"].item() == pytest.approx((10 + 3 + 20) / 6)
    assert not metrics["nll_loss"].requires_grad


# ---------------------------------------------------------------------------------------------- dtypes and range
@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_float32_keeps_dtype_and_matches_float64(loss_type):
    options = DPOOptions(beta=0.2, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    r32 = _pair(*_tensors(PAIRS, dtype=torch.float32), options)
    r64 = _pair(*_tensors(PAIRS), options)
    for a, b in ((r32.loss, r64.loss), (r32.losses, r64.losses), (r32.chosen_rewards, r64.chosen_rewards)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_margins_stay_finite(loss_type, dtype):
    """Sequence log-prob sums of thousands of nats: beta z reaches +-2000; no overflow in loss or gradient."""
    options = DPOOptions(beta=1.0, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    pc, pr, rc, rr = _tensors([(-100.0, -4000.0, -2000.0, -2000.0), (-4000.0, -100.0, -2000.0, -2000.0)], dtype,
                              requires_grad=True)
    loss = _pair(pc, pr, rc, rr, options).loss
    grads = torch.autograd.grad(loss, (pc, pr))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


finite = st.floats(min_value=-200.0, max_value=0.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    loss_type=st.sampled_from(PAIR_LOSS_TYPES),
    beta=st.floats(min_value=0.01, max_value=2.0),
    eps=st.floats(min_value=0.0, max_value=0.49),
    pairs=st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=6),
)
def test_property_matches_formula(loss_type, beta, eps, pairs):
    eps = eps if loss_type in SMOOTHING else 0.0
    options = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=eps)
    result = _pair(*_tensors(pairs), options)
    expected = torch.tensor([_expected(loss_type, *pair, beta, eps) for pair in pairs], dtype=F64)
    torch.testing.assert_close(result.losses, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- validation
def test_unknown_loss_type_lists_the_choices():
    with pytest.raises(ValueError, match="loss_type: expected names from .*'sigmoid'.*'sigmoid_norm'.*got 'dpo'"):
        DPOOptions(loss_type="dpo")


@pytest.mark.parametrize("beta, error", [(0.0, ValueError), (-0.1, ValueError), (math.nan, ValueError),
                                         (math.inf, ValueError), (True, TypeError), ("0.1", TypeError)])
def test_invalid_beta(beta, error):
    with pytest.raises(error, match="beta: expected"):
        DPOOptions(beta=beta)


def test_invalid_rpo_alpha_and_reference_free():
    with pytest.raises(ValueError, match="rpo_alpha: expected None or a number >= 0, got -1.0"):
        DPOOptions(rpo_alpha=-1.0)
    with pytest.raises(TypeError, match="reference_free: expected a bool, got int"):
        DPOOptions(reference_free=1)


def test_result_type():
    assert isinstance(_pair(*_tensors(PAIRS)), DPOResult)


def test_input_validation_names_the_argument():
    pc, pr, rc, rr = _tensors(PAIRS)
    with pytest.raises(TypeError, match="ref_logps: expected a floating-point tensor, got dtype torch.int64"):
        dpo_loss(torch.stack([pc, pr]), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="logps: expected a torch.Tensor, got list"):
        dpo_loss([[-1.0], [-2.0]], None, DPOOptions(reference_free=True))
    with pytest.raises(TypeError, match="options: expected DPOOptions, got dict"):
        dpo_loss(torch.stack([pc, pr]), torch.stack([rc, rr]), {"beta": 0.1})
    with pytest.raises(ValueError, match="chosen_num_tokens: expected a tensor of shape \\(3,\\), got \\(2,\\)"):
        rpo_nll(pc, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_tokens: expected an int >= 1 \\(a token count\\), got 0"):
        rpo_nll(pc, torch.tensor([1, 2, 3]), num_tokens=0)
