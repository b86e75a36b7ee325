"""fused_linear_kto_loss against float64 materialized logits and TRL's kto_loss (transcribed in
test_objectives_kto): loss, metrics and gradients on both backends, one pass and two passes, both loss types and
label mixes, bias, temperature, frozen weight, masked rows and batches, non-contiguous inputs, bad inputs."""
from __future__ import annotations

import pytest
import torch

from fastalign import fused_linear_kto_loss
from fastalign.objectives.kto import kto_metric_means
from helpers.reference import as_f64_leaf, reference_logprobs, trl_kto

F64 = torch.float64


def problem(b=5, t=7, h=16, v=97, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[:, :2] = -100  # prompt
    targets[1, 5:] = -100  # padding
    targets[0, 2] = v - 1
    ref_logps = -25 + 3 * torch.randn(b, generator=g, dtype=F64)
    return hidden, weight, bias, targets, ref_logps


def reference(hidden, weight, bias, targets, labels, ref_logps, kl, *, beta, loss_type, w_d=1.0, w_u=1.0,
              temperature=1.0):
    """Loss, TRL's logged metrics and gradients from float64 materialized logits and TRL's formulas."""
    leaves = [as_f64_leaf(t) for t in (hidden, weight, bias)]
    logprobs, _ = reference_logprobs(leaves[0], leaves[1], targets, leaves[2], temperature=temperature)
    logps = logprobs.sum(-1)
    kl = torch.zeros(1, dtype=F64) if kl is None else kl.double()
    loss, metrics = trl_kto(logps, ref_logps.double(), labels, kl, beta, loss_type, w_d, w_u)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss, metrics, grads


LABELS = {"mixed": [True, False, False, True, True], "desirable": [True] * 5, "undesirable": [False] * 5}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("mix", LABELS)
def test_matches_trl_on_materialized_logits(backend, loss_type, mix):
    hidden, weight, bias, targets, ref_logps = problem()
    labels = torch.tensor(LABELS[mix])
    kl = torch.tensor(0.8) if loss_type == "kto" else None
    options = dict(beta=0.5, loss_type=loss_type)
    expected_loss, expected_metrics, expected_grads = reference(hidden, weight, bias, targets, labels, ref_logps,
                                                                kl, w_d=1.3, w_u=0.8, temperature=0.7, **options)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fused_linear_kto_loss(*leaves[:2], targets, labels, ref_logps=ref_logps.float(), kl=kl, bias=leaves[2],
                                desirable_weight=1.3, undesirable_weight=0.8, temperature=0.7, backend=backend,
                                **options)
    grads = torch.autograd.grad(out.loss, leaves)
    torch.testing.assert_close(out.loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)
    metrics = kto_metric_means({k: float(v) for k, v in out.metrics.items()})
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert out.logps.dtype == torch.float32 and out.rewards.shape == (5,)


@pytest.mark.parametrize("chunk_size", [None, 3])  # whole sequences in one pass; a sequence over a chunk: two passes
def test_float64_one_and_two_passes_and_masked_rows(chunk_size):
    hidden, weight, _, targets, ref_logps = problem(h=1, v=31, dtype=F64)  # H = 1, V not a multiple of a block
    targets[3] = -100  # a completion without tokens: log-prob sum 0 (TRL's masked sum), no gradient
    labels = torch.tensor(LABELS["mixed"])
    kl = torch.tensor(0.3, dtype=F64)
    expected_loss, _, expected_grads = reference(hidden, weight, None, targets, labels, ref_logps, kl, beta=0.1,
                                                 loss_type="kto")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    out = fused_linear_kto_loss(*leaves, targets, labels, ref_logps=ref_logps, kl=kl, backend="torch",
                                chunk_size=chunk_size)
    grads = torch.autograd.grad(out.loss, leaves)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-12, atol=1e-14)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-13)
    assert out.logps[3] == 0 and grads[0][3].abs().max() == 0


def test_fully_masked_batch_frozen_weight_and_non_contiguous(backend):
    hidden, weight, bias, targets, ref_logps = problem()
    labels = torch.tensor(LABELS["mixed"])
    kl = torch.tensor(0.2)
    h = hidden.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # non-contiguous
    assert not h.is_contiguous()
    out = fused_linear_kto_loss(h, weight, targets, labels, ref_logps=ref_logps, kl=kl, bias=bias, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, [h])
    _, _, expected = reference(hidden, weight, bias, targets, labels, ref_logps, kl, beta=0.1, loss_type="kto")
    torch.testing.assert_close(grad.double(), expected[0], rtol=1e-4, atol=1e-6)
    # No completion token at all: every log-prob sum is 0, the loss is TRL's on zeros, the gradient 0.
    masked = torch.full_like(targets, -100)
    h = hidden.clone().requires_grad_(True)
    out = fused_linear_kto_loss(h, weight, masked, labels, ref_logps=ref_logps, kl=kl, backend=backend)
    expected_loss, _, _ = reference(hidden, weight, None, masked, labels, ref_logps, kl, beta=0.1, loss_type="kto")
    torch.testing.assert_close(out.loss.double(), expected_loss, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    assert h.grad is None or h.grad.abs().max() == 0


def test_num_examples_parts_add_up(backend):
    hidden, weight, _, targets, ref_logps = problem()
    labels, kl = torch.tensor(LABELS["mixed"]), torch.tensor(0.4)
    w = weight.clone().requires_grad_(True)
    whole = fused_linear_kto_loss(hidden, w, targets, labels, ref_logps=ref_logps, kl=kl, backend=backend).loss
    (whole_grad,) = torch.autograd.grad(whole, [w])
    parts = [fused_linear_kto_loss(hidden[s], w, targets[s], labels[s], ref_logps=ref_logps[s], kl=kl,
                                   num_examples=5, backend=backend).loss for s in (slice(0, 2), slice(2, 5))]
    (parts_grad,) = torch.autograd.grad(sum(parts), [w])
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts_grad, whole_grad, rtol=1e-5, atol=1e-7)


def test_bad_input_is_named():
    hidden, weight, _, targets, ref_logps = problem()
    labels, kl = torch.tensor(LABELS["mixed"]), torch.tensor(0.4)
    call = lambda **kw: fused_linear_kto_loss(**{**dict(hidden=hidden, weight=weight, targets=targets,  # noqa: E731
                                                        labels=labels, ref_logps=ref_logps, kl=kl), **kw})
    with pytest.raises(TypeError, match="labels"):
        call(labels=labels.long())
    with pytest.raises(ValueError, match="labels"):
        call(labels=labels[:3])
    with pytest.raises(ValueError, match="ref_logps"):
        call(ref_logps=ref_logps[:2])
    with pytest.raises(ValueError, match="kl"):
        call(kl=None)
    with pytest.raises(ValueError, match="kl"):
        call(loss_type="apo_zero_unpaired")
    with pytest.raises(ValueError, match="kl"):
        call(kl=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="ref_logps"):
        call(ref_logps=torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match="num_examples"):
        call(num_examples=2)
    with pytest.raises(ValueError, match="hidden"):
        call(hidden=hidden[0])
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="sigmoid")
