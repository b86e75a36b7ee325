"""fused_linear_cpo_loss (CPO, SimPO, AlphaPO) and fused_linear_orpo_loss against float64 materialized logits and
TRL's cpo_loss / odds_ratio_loss (transcribed in test_objectives_preference): loss, metrics and gradients on both
backends, one pass and two passes, bias, temperature, frozen weight, empty responses, ORPO's prompt NLL, bad
inputs."""
from __future__ import annotations

import pytest
import torch

from fastalign import fused_linear_cpo_loss, fused_linear_orpo_loss
from helpers.reference import as_f64_leaf, reference_logprobs, trl_cpo, trl_orpo

F64 = torch.float64


def problem(b=3, t=8, h=16, v=97, seed=0, dtype=torch.float32):
    """B pairs ``[2B, T]``, chosen rows first; prompt positions ignored, ragged padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    inputs = torch.randint(0, v, (2 * b, t), generator=g)
    targets = inputs.clone()
    targets[:, :3] = -100  # prompt
    targets[1, 6:] = -100  # padding
    targets[b + 2, 4:] = -100
    return hidden, weight, bias, targets, inputs


def materialized(hidden, weight, bias, targets, temperature):
    leaves = [as_f64_leaf(t) for t in (hidden, weight, bias)]
    logprobs, _ = reference_logprobs(leaves[0], leaves[1], targets, leaves[2], temperature=temperature)
    return leaves, logprobs


def nll_of(logprobs, mask):
    """TRL's ``nn.CrossEntropyLoss()`` (mean over the non-ignored tokens) from materialized log-probs."""
    return -(logprobs * mask).sum() / mask.sum()


def check(out, leaves_out, expected_loss, expected_metrics, expected_grads, rtol):
    grads = torch.autograd.grad(out.loss, leaves_out)
    torch.testing.assert_close(out.loss.double(), expected_loss, rtol=rtol, atol=rtol * 0.1)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected, rtol=10 * rtol, atol=rtol * 0.1)
    assert out.metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        torch.testing.assert_close(out.metrics[key].double(), value.double(), rtol=10 * rtol, atol=rtol, msg=key)


CASES = [("sigmoid", 0.0, 1.0), ("sigmoid", 0.2, 0.0), ("hinge", 0.0, 1.0), ("ipo", 0.0, 0.5), ("simpo", 0.0, 0.0),
         ("simpo", 0.3, 1.0)]  # loss type, AlphaPO alpha, cpo_alpha


@pytest.mark.parametrize("loss_type,alpha,cpo_alpha", CASES)
def test_cpo_matches_trl_on_materialized_logits(backend, loss_type, alpha, cpo_alpha):
    hidden, weight, bias, targets, _ = problem()
    b, averaged = 3, loss_type in ("ipo", "simpo")
    eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    beta = 2.0 if averaged else 0.1
    # TRL: get_batch_logps (means for ipo/simpo), CrossEntropyLoss on the chosen labels, cpo_loss.
    leaves, logprobs = materialized(hidden, weight, bias, targets, 0.8)
    mask = targets != -100
    logps = logprobs.sum(-1) / (mask.sum(-1) if averaged else 1)
    nll = nll_of(logprobs[:b], mask[:b])
    expected_loss, expected_metrics = trl_cpo(logps[:b], logps[b:], nll, beta, loss_type, eps, 0.5, cpo_alpha, alpha)
    expected_grads = torch.autograd.grad(expected_loss, leaves)

    leaves_out = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fused_linear_cpo_loss(*leaves_out[:2], targets, bias=leaves_out[2], beta=beta, loss_type=loss_type,
                                label_smoothing=eps, cpo_alpha=cpo_alpha, alpha=alpha, temperature=0.8,
                                backend=backend)
    check(out, leaves_out, expected_loss, expected_metrics, expected_grads, 1e-5)
    torch.testing.assert_close(out.chosen_logps.double(), logps[:b].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_prompt_nll", [False, True])
def test_orpo_matches_trl_on_materialized_logits(backend, with_prompt_nll):
    hidden, weight, bias, targets, inputs = problem()
    b = 3
    nll_targets = None
    nll_mask = (targets != -100)[:b]
    if with_prompt_nll:  # TRL's trainer: the NLL over prompt and response tokens (padding ignored)
        nll_targets = inputs[:b].clone()
        nll_targets[1, 6:] = -100
        nll_mask = nll_targets != -100
    leaves, logprobs = materialized(hidden, weight, bias, targets, 1.0)
    mask = targets != -100
    logps = logprobs.sum(-1) / mask.sum(-1)  # TRL's average_log_prob=True
    if with_prompt_nll:
        nll_logprobs = reference_logprobs(leaves[0][:b], leaves[1], nll_targets, leaves[2])[0]
    else:
        nll_logprobs = logprobs[:b]
    expected_loss, expected_metrics = trl_orpo(logps[:b], logps[b:], nll_of(nll_logprobs, nll_mask), 0.25)
    expected_grads = torch.autograd.grad(expected_loss, leaves)

    leaves_out = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fused_linear_orpo_loss(*leaves_out[:2], targets, bias=leaves_out[2], beta=0.25, nll_targets=nll_targets,
                                 backend=backend)
    check(out, leaves_out, expected_loss, expected_metrics, expected_grads, 1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4])  # whole pairs in one pass; a pair over a chunk: two passes
def test_float64_passes_empty_response_and_frozen_weight(chunk_size):
    hidden, weight, _, targets, _ = problem(h=1, v=31, dtype=F64)  # H = 1, V not a multiple of a block
    targets[4] = -100  # a rejected response without tokens: log-prob 0 (its mean too), no gradient
    b = 3
    leaves, logprobs = materialized(hidden, weight, None, targets, 1.0)
    mask = targets != -100
    logps = logprobs.sum(-1) / mask.sum(-1).clamp(min=1)
    nll = nll_of(logprobs[:b], mask[:b])
    expected_loss, _ = trl_cpo(logps[:b], logps[b:], nll, 2.0, "simpo", 0.0, 0.5, 1.0, 0.0)
    (expected_grad,) = torch.autograd.grad(expected_loss, [leaves[0]])
    h = hidden.clone().requires_grad_(True)
    out = fused_linear_cpo_loss(h, weight, targets, beta=2.0, loss_type="simpo", backend="torch",
                                chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(out.loss, [h])
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)
    assert out.rejected_logps[1] == 0 and grad[4].abs().max() == 0


def test_normalizers_parts_add_up(backend):
    hidden, weight, _, targets, _ = problem()
    w = weight.clone().requires_grad_(True)
    tokens = int((targets[:3] != -100).sum())
    for op in (lambda **kw: fused_linear_cpo_loss(loss_type="simpo", **kw), fused_linear_orpo_loss):
        whole = op(hidden=hidden, weight=w, targets=targets, backend=backend).loss
        (whole_grad,) = torch.autograd.grad(whole, [w])
        parts = []
        for s in ([0], [1, 2]):
            rows = s + [3 + i for i in s]
            parts.append(op(hidden=hidden[rows], weight=w, targets=targets[rows], num_pairs=3,
                            num_chosen_tokens=tokens, backend=backend).loss)
        (parts_grad,) = torch.autograd.grad(sum(parts), [w])
        torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(parts_grad, whole_grad, rtol=1e-5, atol=1e-7)


def test_bad_input_is_named():
    hidden, weight, _, targets, inputs = problem()
    with pytest.raises(ValueError, match="loss_type"):
        fused_linear_cpo_loss(hidden, weight, targets, loss_type="alphapo")
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_cpo_loss(hidden[:5], weight, targets[:5])
    with pytest.raises(ValueError, match="num_pairs"):
        fused_linear_orpo_loss(hidden, weight, targets, num_pairs=2)
    with pytest.raises(ValueError, match="nll_targets"):
        fused_linear_orpo_loss(hidden, weight, targets, nll_targets=inputs)
    wrong = inputs[:3].clone()
    wrong[0, 5] = (targets[0, 5] + 1) % 97
    with pytest.raises(ValueError, match="nll_targets"):
        fused_linear_orpo_loss(hidden, weight, targets, nll_targets=wrong)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_orpo_loss(hidden, weight, targets, beta=0.0)
