"""KTO objective against a float64 transcription of TRL's ``KTOTrainer.kto_loss`` / ``get_batch_loss_metrics`` /
``log``: losses, KL estimate, metrics and gradients, both loss types, mixed and one-sided batches."""
from __future__ import annotations

import pytest
import torch

from fastalign.objectives.kto import KTO_LOSS_TYPES, KTOOptions, kto_kl, kto_loss, kto_metric_means, kto_metrics
from helpers.reference import trl_kto

F64 = torch.float64


def trl_kl(policy_kl, ref_kl, loss_type):
    """TRL's KL estimate (one process): detached batch mean clamped at 0; zeros(1) without calculate_KL."""
    if loss_type == "kto":
        return (policy_kl - ref_kl).mean().detach().clamp(min=0)
    return torch.zeros(1, dtype=F64)


LABEL_MIXES = {
    "mixed": [True, False, True, True, False, False, True],
    "all_desirable": [True] * 5,
    "all_undesirable": [False] * 4,
}


def _inputs(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    policy = (-20 + 6 * torch.randn(b, generator=g, dtype=F64)).requires_grad_(True)
    ref = -20 + 6 * torch.randn(b, generator=g, dtype=F64)
    # KL pairs: the policy sits above the reference on average (positive KL) or below (clamped to 0)
    policy_kl = -25 + 3 * torch.randn(b, generator=g, dtype=F64)
    ref_kl = policy_kl - 2 + torch.randn(b, generator=g, dtype=F64)
    return policy, ref, torch.tensor(labels), policy_kl, ref_kl


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("mix", LABEL_MIXES)
@pytest.mark.parametrize("beta,w_d,w_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7)])
def test_kto_matches_trl(loss_type, mix, beta, w_d, w_u):
    policy, ref, labels, policy_kl, ref_kl = _inputs(LABEL_MIXES[mix])
    expected_loss, expected_metrics = trl_kto(policy, ref, labels, trl_kl(policy_kl, ref_kl, loss_type), beta,
                                             loss_type, w_d, w_u)
    (expected_grad,) = torch.autograd.grad(expected_loss, policy)

    options = KTOOptions(beta=beta, loss_type=loss_type, desirable_weight=w_d, undesirable_weight=w_u)
    kl = kto_kl(policy_kl, ref_kl) if options.uses_kl else None
    result = kto_loss(policy, ref, labels, kl, options)
    (grad,) = torch.autograd.grad(result.loss, policy)
    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    assert grad.abs().min() > 0  # every example moves the loss
    metrics = kto_metric_means({k: float(v) for k, v in kto_metrics(result, policy).items()})
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key


def test_kl_is_detached_clamped_and_moves_the_loss():
    policy, ref, labels, policy_kl, ref_kl = _inputs(LABEL_MIXES["mixed"])
    policy_kl = policy_kl.clone().requires_grad_(True)
    kl = kto_kl(policy_kl, ref_kl)
    assert not kl.requires_grad and kl.dim() == 0
    assert kl.item() == pytest.approx((policy_kl - ref_kl).mean().item(), rel=1e-14) and kl.item() > 1
    assert kto_kl(ref_kl, policy_kl).item() == 0.0  # negative estimate clamped at 0
    with_kl = kto_loss(policy, ref, labels, kl, KTOOptions()).loss
    without = kto_loss(policy, ref, labels, torch.zeros((), dtype=F64), KTOOptions()).loss
    assert abs(with_kl.item() - without.item()) > 1e-3


def test_num_examples_splits_add_up():
    policy, ref, labels, policy_kl, ref_kl = _inputs(LABEL_MIXES["mixed"])
    kl, options = kto_kl(policy_kl, ref_kl), KTOOptions(beta=0.3, desirable_weight=2.0)
    whole = kto_loss(policy, ref, labels, kl, options).loss
    parts = sum(kto_loss(policy[s], ref[s], labels[s], kl, options, num_examples=7).loss
                for s in (slice(0, 3), slice(3, 7)))
    torch.testing.assert_close(parts, whole, rtol=1e-14, atol=0)


def test_bad_input_is_named():
    policy, ref, labels, policy_kl, ref_kl = _inputs(LABEL_MIXES["mixed"])
    kl = kto_kl(policy_kl, ref_kl)
    with pytest.raises(ValueError, match="loss_type"):
        KTOOptions(loss_type="bco")
    with pytest.raises(ValueError, match="beta"):
        KTOOptions(beta=0.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        KTOOptions(undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="labels"):
        kto_loss(policy, ref, labels.long(), kl)
    with pytest.raises(ValueError, match="kl"):
        kto_loss(policy, ref, labels, None)
    with pytest.raises(ValueError, match="kl"):
        kto_loss(policy, ref, labels, kl, KTOOptions(loss_type="apo_zero_unpaired"))
    with pytest.raises(ValueError, match="reference_logps"):
        kto_loss(policy, ref[:3], labels, kl)
    with pytest.raises(ValueError, match="num_examples"):
        kto_loss(policy, ref, labels, kl, num_examples=3)
