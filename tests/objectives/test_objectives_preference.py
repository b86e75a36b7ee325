"""CPO / SimPO / AlphaPO and ORPO objectives against float64 transcriptions of TRL's ``CPOTrainer.cpo_loss`` +
``get_batch_loss_metrics`` and ``ORPOTrainer.odds_ratio_loss``: losses, rewards, metrics, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from fastalign.objectives.dpo import dpo_metrics, rpo_nll
from fastalign.objectives.preference import (CPO_LOSS_TYPES, CPOOptions, cpo_loss, log1mexp, orpo_loss,
                                             orpo_metrics)
from helpers.reference import trl_cpo, trl_orpo

F64 = torch.float64


def _pairs(averaged: bool, seed: int = 0):
    """Chosen and rejected log-probs [6]: per-token means in (-3, 0) or sums around -15; the margins are well away
    from 0 (accuracies are not within float noise of their threshold)."""
    g = torch.Generator().manual_seed(seed)
    if averaged:
        chosen = -3 * torch.rand(6, generator=g, dtype=F64)
        chosen[0] = -0.05  # the expm1 branch of log1mexp
    else:
        chosen = -15 + 4 * torch.randn(6, generator=g, dtype=F64)
    rejected = chosen + torch.tensor([-0.9, 0.6, -0.4, 0.5, -1.2, 0.3], dtype=F64) * (1 if averaged else 4)
    if averaged:
        rejected = rejected.clamp(max=-0.01)
    return chosen.requires_grad_(True), rejected.detach().requires_grad_(True)


def _assert_metrics(metrics, expected):
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-12, atol=1e-14, msg=key)


CASES = [(t, a) for t in CPO_LOSS_TYPES for a in (0.0, 0.25)] + [("simpo", -0.5)]


@pytest.mark.parametrize("loss_type,alpha", CASES)
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_cpo_matches_trl(loss_type, alpha, cpo_alpha):
    averaged = loss_type in ("ipo", "simpo")
    chosen, rejected = _pairs(averaged)
    token_counts = torch.tensor([3, 5, 2, 4, 6, 1], dtype=F64)
    chosen_sums = chosen * token_counts if averaged else chosen
    nll = rpo_nll(chosen_sums, token_counts)  # TRL: CrossEntropyLoss over the chosen response tokens
    eps = 0.15 if loss_type in ("sigmoid", "simpo") else 0.0
    beta, gamma = (2.0, 0.8) if averaged else (0.1, 0.5)
    expected_loss, expected_metrics = trl_cpo(chosen, rejected, nll, beta, loss_type, eps, gamma, cpo_alpha, alpha)
    expected_grads = torch.autograd.grad(expected_loss, (chosen, rejected), retain_graph=True)

    options = CPOOptions(beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=gamma, cpo_alpha=cpo_alpha,
                         alpha=alpha)
    assert options.average_log_prob == averaged
    result = cpo_loss(chosen, rejected, options, chosen_nll=nll if cpo_alpha else None)
    grads = torch.autograd.grad(result.loss, (chosen, rejected))
    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-13, atol=1e-15)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-15)
    assert grads[1].abs().sum() > 0
    _assert_metrics(dpo_metrics(result, torch.stack([chosen, rejected])), expected_metrics)


def test_alphapo_reward_survives_long_sequences():
    """TRL's exp(logps) ** -alpha overflows for sums of a long response; the same value, written exp(-alpha l),
    stays finite where the plain float64 value is finite."""
    chosen = torch.tensor([-800.0, -10.0], dtype=F64)
    rejected = torch.tensor([-801.0, -12.0], dtype=F64)
    result = cpo_loss(chosen, rejected, CPOOptions(alpha=0.01, cpo_alpha=0.0))
    assert torch.isfinite(result.losses).all()
    expected = (1 - math.exp(8.0)) / 0.01 - (1 - math.exp(8.01)) / 0.01
    assert result.losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * expected))), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(beta):
    chosen, rejected = _pairs(averaged=True)
    nll = torch.tensor(1.7, dtype=F64, requires_grad=True)
    expected_loss, expected_metrics = trl_orpo(chosen, rejected, nll, beta)
    expected_grads = torch.autograd.grad(expected_loss, (chosen, rejected, nll))
    result = orpo_loss(chosen, rejected, nll, beta)
    grads = torch.autograd.grad(result.loss, (chosen, rejected, nll))
    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-13, atol=1e-15)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-15)
    _assert_metrics(orpo_metrics(result, chosen, rejected), expected_metrics)


def test_log1mexp_both_branches_and_finite_gradients():
    x = torch.tensor([-30.0, -2.0, -0.7, -0.69, -1e-3, -1e-9], dtype=F64, requires_grad=True)
    y = log1mexp(x)
    # exact reference per point: log1p(-exp) is exact far from 0, log(-expm1) near 0
    exact = [math.log1p(-math.exp(v)) if v < -1 else math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(y, torch.tensor(exact, dtype=F64), rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, -1 / torch.expm1(-x.detach()), rtol=1e-9, atol=0)


def test_orpo_computes_in_float32_at_least():
    chosen, rejected = (t.detach().to(torch.bfloat16) for t in _pairs(averaged=True))
    result = orpo_loss(chosen, rejected, torch.tensor(1.0), 0.1)
    assert result.losses.dtype == torch.float32


def test_num_pairs_splits_add_up():
    chosen, rejected = _pairs(averaged=True)
    options = CPOOptions(loss_type="simpo", cpo_alpha=0.0)
    whole = cpo_loss(chosen, rejected, options).loss
    parts = sum(cpo_loss(chosen[s], rejected[s], options, num_pairs=6).loss for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, whole, rtol=1e-14, atol=0)


def test_bad_input_is_named():
    chosen, rejected = _pairs(averaged=False)
    with pytest.raises(ValueError, match="loss_type"):
        CPOOptions(loss_type="alphapo")
    with pytest.raises(ValueError, match="label_smoothing"):
        CPOOptions(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="cpo_alpha"):
        CPOOptions(cpo_alpha=-1.0)
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(chosen, rejected, CPOOptions())
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(chosen, rejected, CPOOptions(cpo_alpha=0.0), chosen_nll=torch.tensor(1.0))
    with pytest.raises(ValueError, match="rejected_logps"):
        cpo_loss(chosen, rejected[:2], CPOOptions(cpo_alpha=0.0))
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(chosen, rejected, torch.tensor(1.0), beta=-1.0)
