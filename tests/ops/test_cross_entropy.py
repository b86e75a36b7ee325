"""The fused cross-entropy (SFT) against ``F.cross_entropy`` on materialized float64 logits (+ TRL's dft, a z-loss,
``num_items_in_batch``): loss, metrics and the gradients of hidden, weight and bias, on every backend (vocab-parallel:
tests/ops/test_sft_distill_vocab_parallel.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.bf16_interpreter import bf16_interpreter  # noqa: F401 (fixture)
from fastalign import fused_linear_cross_entropy
from helpers.cross_entropy import problem

IGNORE = -100


def reference_ce(hidden, weight, targets, bias=None, *, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 loss_type="nll", num_items_in_batch=None, temperature=1.0):
    """Float64 reference from the materialized logits: ``F.cross_entropy`` (nll, smoothing, reductions), TRL's dft
    written out, the z-loss ``z * lse^2`` per counted token, a mean over ``num_items_in_batch`` when given."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = (z / temperature).reshape(-1, weight.shape[0])
    t = targets.reshape(-1)
    valid = t != IGNORE
    if loss_type == "dft":
        logp = torch.log_softmax(z, -1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
        per_token = torch.where(valid, -logp * logp.detach().exp(), 0.0)
    else:
        per_token = F.cross_entropy(z, t, reduction="none", label_smoothing=label_smoothing, ignore_index=IGNORE)
    per_token = per_token + torch.where(valid, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    if reduction == "none":
        return per_token.view(targets.shape)
    if num_items_in_batch is not None:
        return per_token.sum() / num_items_in_batch
    return per_token.sum() if reduction == "sum" else per_token.sum() / valid.sum().clamp(min=1)


def leaves(*tensors, requires_grad=(True, True, True)):
    return [None if t is None else t.clone().requires_grad_(g) for t, g in zip(tensors, requires_grad)]


def strided(t):
    """The same values as a non-contiguous view (the first two dimensions' memory order swapped)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def check(backend, *, lead=(3, 5), v=37, bias=True, frozen=False, ignore_frac=0.3, non_contiguous=False,
          **options):
    """Loss and gradients of the fused op (float64 on torch, fp32 on triton) against the float64 reference."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-10) if backend == "torch" else dict(rtol=2e-4, atol=2e-5)
    hidden, weight, b, targets = problem(lead, v=v, dtype=dtype, bias=bias, ignore_frac=ignore_frac)
    grads_wanted = (True, not frozen, not frozen)
    h1, w1, b1 = leaves(hidden, weight, b, requires_grad=grads_wanted)
    h0, w0, b0 = leaves(*(None if x is None else x.double() for x in (hidden, weight, b)), requires_grad=grads_wanted)
    args = (strided(h1), strided(w1), strided(targets)) if non_contiguous else (h1, w1, targets)
    assert not non_contiguous or not any(t.is_contiguous() for t in args)
    walk = {k: options.pop(k) for k in ("chunk_size", "deterministic") if k in options}  # the op's alone
    out = fused_linear_cross_entropy(*args, bias=b1, backend=backend, **walk, **options)
    ref = reference_ce(h0, w0, targets, b0, **options)
    torch.testing.assert_close(out.loss.double(), ref, **tol)
    upstream = torch.randn_like(ref) if ref.dim() else torch.ones_like(ref)
    params = [t for t, g in zip((h1, w1, b1), grads_wanted) if t is not None and g]
    params0 = [t for t, g in zip((h0, w0, b0), grads_wanted) if t is not None and g]
    got = torch.autograd.grad(out.loss, params, upstream.to(out.loss.dtype))
    want = torch.autograd.grad(ref, params0, upstream)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, **tol)
    return out, (h0, w0, b0, targets)


CASES = {
    "mean": {},
    "sum_temperature": dict(reduction="sum", temperature=0.7),
    "none_smoothing_zloss": dict(reduction="none", label_smoothing=0.2, z_loss=1e-2),
    "smoothing": dict(label_smoothing=0.1),
    "zloss_sum": dict(reduction="sum", z_loss=1e-3),
    "dft": dict(loss_type="dft"),
    "num_items_smoothing_zloss": dict(num_items_in_batch=40, label_smoothing=0.3, z_loss=0.05, temperature=1.3),
    "deterministic_smoothing_zloss": dict(label_smoothing=0.2, z_loss=0.01, deterministic=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cross_entropy_matches_float64_reference(backend, case):
    check(backend, **CASES[case])


@pytest.mark.parametrize("variant", ["odd_no_bias_chunks", "frozen_weight", "non_contiguous", "fully_masked",
                                     "every_row_counted", "deterministic"])
def test_cross_entropy_variants(variant):
    """Odd sizes in chunks of 3 rows, a frozen weight, non-contiguous inputs, a fully masked batch, no ignored row (no
    row selection), the deterministic mode: the torch backend against the reference (smoothing and z-loss on, so
    every gradient path runs)."""
    options = dict(label_smoothing=0.1, z_loss=1e-2)
    if variant == "odd_no_bias_chunks":
        check("torch", lead=(1, 7), v=5, bias=False, chunk_size=3, **options)
    elif variant == "frozen_weight":
        check("torch", frozen=True, **options)
    elif variant == "non_contiguous":
        check("torch", lead=(4, 4), non_contiguous=True, **options)
    elif variant == "fully_masked":
        out, _ = check("torch", ignore_frac=1.1, **options)
        assert out.loss.item() == 0.0 and out.metrics["entropy"].item() == 0.0
        assert bool((out.lse == 0).all())
    elif variant == "every_row_counted":
        out, _ = check("torch", ignore_frac=0.0, chunk_size=4, **options)
        assert bool((out.lse != 0).all())
    else:
        check("torch", deterministic=True, chunk_size=4, **options)


def test_cross_entropy_metrics_and_outputs(backend):
    """TRL's metrics (mean entropy and arg-max accuracy over the counted tokens), log-probs and lse per token."""
    out, (h0, w0, b0, targets) = check(backend, temperature=0.9)
    z = ((h0 @ w0.T + b0) / 0.9).detach()
    valid = targets != IGNORE
    logp = torch.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    tol = dict(rtol=1e-9, atol=1e-10) if backend == "torch" else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(out.metrics["entropy"].double(), entropy[valid].mean(), **tol)
    accuracy = (z.argmax(-1) == targets)[valid].double().mean()
    assert out.metrics["mean_token_accuracy"].item() == pytest.approx(accuracy.item())
    torch.testing.assert_close(out.lse.double(), torch.where(valid, torch.logsumexp(z, -1), 0.0), **tol)
    want = torch.where(valid, logp.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0], 0.0)
    torch.testing.assert_close(out.logprobs.double(), want, **tol)


def test_cross_entropy_compiled_matches_eager():
    """Under torch.compile the registered two-pass plan, with the lse and logit-sum gradients of its backward."""
    hidden, weight, b, targets = problem()
    h1, w1, b1 = leaves(hidden, weight, b)
    h0, w0, b0 = leaves(hidden, weight, b)
    options = dict(label_smoothing=0.2, z_loss=0.01, backend="torch")
    compiled = torch.compile(lambda h, w, t, b: fused_linear_cross_entropy(h, w, t, bias=b, **options).loss,
                             fullgraph=True)
    loss = compiled(h1, w1, targets, b1)
    ref = reference_ce(h0, w0, targets, b0, label_smoothing=0.2, z_loss=0.01)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, [h1, w1, b1]), torch.autograd.grad(ref, [h0, w0, b0])):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("kwargs, error", [
    (dict(reduction="avg"), "reduction: expected one of"),
    (dict(loss_type="focal"), "loss_type: expected one of"),
    (dict(label_smoothing=1.5), "label_smoothing: expected a finite number in"),
    (dict(z_loss=-1.0), "z_loss: expected a finite number >= 0"),
    (dict(loss_type="dft", label_smoothing=0.1), "label_smoothing: not used with loss_type='dft'"),
    (dict(reduction="sum", num_items_in_batch=10), "num_items_in_batch: only with reduction='mean'"),
    (dict(num_items_in_batch=1), "num_items_in_batch: expected at least"),
])
def test_cross_entropy_bad_options(kwargs, error):
    hidden, weight, b, targets = problem()
    with pytest.raises(ValueError, match=error):
        fused_linear_cross_entropy(hidden, weight, targets, bias=b, backend="torch", **kwargs)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "atomic_free"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_row_grads_of_the_backward_kernels_in_half_precision(bf16_interpreter, dtype, deterministic):
    """The Triton backward's lse and logit-sum gradients (``HAS_ROW_GRADS``, a z-loss and label smoothing) with
    the log-prob one, fp16 and bf16 (the exact-bf16 interpreter fixture), against float64 autograd within the
    bf16 bound of the kernels' rounding of dz (the fp16 one is tighter still)."""
    from helpers.bf16_interpreter import SHAPES, assert_within_bf16_bound, reference

    from fastalign.kernels.logprobs_backward import linear_logprobs_backward

    n, h, v, bias, inv_t, n_ignored = SHAPES["odd"]
    gen = torch.Generator().manual_seed(3)
    half = getattr(torch, dtype)
    hidden, weight = torch.randn(n, h, generator=gen).to(half), (torch.randn(v, h, generator=gen) / h ** 0.5).to(half)
    b = torch.randn(v, generator=gen).to(half)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[:n_ignored] = IGNORE
    kept = targets != IGNORE
    g_lp, g_lse, g_sum = (torch.randn(n, generator=gen) * kept for _ in range(3))

    def loss_fn(logp, z):
        logprob = torch.where(kept, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
        return (g_lp.double() * logprob + g_lse.double() * torch.logsumexp(z, 1) + g_sum.double() * z.sum(1)).sum()

    ref_h, ref_w, ref_b, dz = reference(hidden, weight, b, targets, inv_t, loss_fn)
    lse = torch.logsumexp((hidden.double() @ weight.double().T + b.double()) * inv_t, 1).float()
    gh, gw, gb = linear_logprobs_backward(hidden, weight, b, targets, lse, g_lp, inv_temperature=inv_t,
                                          ignore_index=IGNORE, need_grad_bias=True, deterministic=deterministic,
                                          grad_lse=g_lse, grad_logit_sum=g_sum)
    assert_within_bf16_bound(gh, ref_h, dz, weight)
    assert_within_bf16_bound(gw, ref_w, dz.T, hidden)
    assert_within_bf16_bound(gb[:, None], ref_b[:, None], dz.T, torch.ones(n, 1))
