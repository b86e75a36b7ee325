"""The two launch functions of fastalign.kernels under the Triton interpreter (CPU, TRITON_INTERPRET=1 set by
conftest) in fp32 and fp16, against float64 references that materialize the logits.

Tolerances, relative to the largest reference value of each output (so a flipped sign or a dropped term, an O(1)
error, fails by orders of magnitude):
  forward, fp32 and fp16 inputs: 1e-5 (fp16 products are exact in the fp32 accumulator);
  backward, fp32: 1e-5; fp16: 3e-3 (the logit gradient is rounded to fp16, 2^-11, to feed the tensor cores);
  logits of scale 1e4: 1e-5 forward (fp32 rounding of z is ~1e-3 absolute; the entropies, of 1e-4 and less,
  to 1e-6 absolute), 1e-2 backward (p = exp(z - lse) inherits that 1e-3 absolute error of z).
"""
import pytest
import torch

from fastalign.kernels.logprobs_backward import linear_logprobs_backward
from fastalign.kernels.lse_forward import linear_lse_forward
from fastalign.kernels.row_stats import RowStatsSpec, merge_row_stats

IGNORE = -100
DTYPES = [torch.float32, torch.float16]
BACKWARD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
ENTROPY = RowStatsSpec(entropy=True)


def make_problem(n, h, v, dtype, *, bias=True, scale=1.0, vocab=None, n_ignored=0, ignore_index=IGNORE):
    """Inputs rounded to `dtype`; targets uniform over a `vocab`-sized global vocabulary (default: v)."""
    hidden = (torch.randn(n, h) * scale / h**0.25).to(dtype)
    weight = (torch.randn(v, h) * scale / h**0.25).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    targets = torch.randint(0, vocab or v, (n,))
    targets[torch.randperm(n)[:n_ignored]] = ignore_index
    return hidden, weight, b, targets


def reference_logits(hidden, weight, bias, inv_temperature):
    z = hidden.double() @ weight.double().T
    return (z + bias.double() if bias is not None else z) * inv_temperature


def reference_forward(hidden, weight, bias, targets, inv_temperature, ignore_index=IGNORE, vocab_start=0):
    """lse, target logit (0 off-shard or ignored) and entropy of this shard's logits, in float64."""
    z = reference_logits(hidden, weight, bias, inv_temperature)
    local = targets - vocab_start
    on_shard = (targets != ignore_index) & (local >= 0) & (local < z.shape[1])
    target_logit = torch.where(on_shard, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
    logp = torch.log_softmax(z, 1)
    return torch.logsumexp(z, 1), target_logit, -(logp.exp() * logp).sum(1)


def reference_backward(hidden, weight, bias, targets, g_lp, g_ent, inv_temperature, ignore_index=IGNORE):
    """float64 autograd of sum(g_lp * log p[target] + g_ent * entropy) over kept rows, entropy = -sum p log p.
    Also returns the global lse and entropy the kernel takes as inputs."""
    leaves = [x.double().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    z = reference_logits(*leaves[:2], leaves[2] if bias is not None else None, inv_temperature)
    logp = torch.log_softmax(z, 1)
    kept = targets != ignore_index
    logprob = torch.where(kept, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    entropy = -(logp.exp() * logp).sum(1)
    loss = (g_lp.double() * logprob).sum() + ((g_ent.double() * entropy).sum() if g_ent is not None else 0.0)
    grads = torch.autograd.grad(loss, leaves)
    return grads + (None,) * (3 - len(grads)), torch.logsumexp(z, 1).detach(), entropy.detach()


def assert_close(actual, expected, tol):
    assert actual.dtype == torch.float32
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol,
                               atol=tol * max(expected.abs().max().item(), 1e-30))


def upstream_grads(targets, with_entropy, ignore_index=IGNORE):
    """Random upstream gradients, zero at ignored rows as callers guarantee."""
    kept = (targets != ignore_index).float()
    return torch.randn(len(targets)) * kept, torch.randn(len(targets)) * kept if with_entropy else None


# (n, h, v, bias, inv_temperature, n_ignored): none is a multiple of the interpreter tiles (16 x 32 x 16).
SHAPES = {
    "tiny": (1, 1, 1, False, 1.0, 0),
    "one_row_ignored": (1, 5, 3, True, 1.0, 1),
    "odd": (37, 19, 97, True, 1 / 0.7, 5),
    "multi_tile": (40, 40, 130, False, 2.0, 3),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, dtype, deterministic):
    """Deterministic: the fixed 64-column vocab split of the interpreter (2 or 3 splits for V = 97, 130)."""
    n, h, v, bias, inv_t, n_ignored = SHAPES[shape]
    hidden, weight, b, targets = make_problem(n, h, v, dtype, bias=bias, n_ignored=n_ignored)
    lse, target_logit, entropy = linear_lse_forward(hidden, weight, b, targets, inv_temperature=inv_t,
                                                    ignore_index=IGNORE, spec=ENTROPY,
                                                    deterministic=deterministic)[:3]
    for actual, ref in zip((lse, target_logit, entropy), reference_forward(hidden, weight, b, targets, inv_t)):
        assert_close(actual, ref, 1e-5)
    assert (target_logit[targets == IGNORE] == 0).all()

    plain = linear_lse_forward(hidden, weight, b, targets, inv_temperature=inv_t, ignore_index=IGNORE)
    assert all(s is None for s in plain[2:])


# The atomic kernel, the atomic-free one with its default workspace (one chunk of rows), and with a 16-row one
# (several chunks: d weight and d bias summed across chunks).
SCHEMES = {"atomic": dict(), "atomic_free": dict(deterministic=True),
           "atomic_free_chunked": dict(deterministic=True, workspace_bytes=1)}


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logprob_grad", "with_entropy_grad"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_reference(shape, with_entropy, dtype, scheme):
    n, h, v, bias, inv_t, n_ignored = SHAPES[shape]
    hidden, weight, b, targets = make_problem(n, h, v, dtype, bias=bias, n_ignored=n_ignored)
    g_lp, g_ent = upstream_grads(targets, with_entropy)
    ref_grads, lse, entropy = reference_backward(hidden, weight, b, targets, g_lp, g_ent, inv_t)

    grads = linear_logprobs_backward(hidden, weight, b, targets, lse.float(), g_lp,
                                     g_ent, entropy.float() if with_entropy else None, inv_temperature=inv_t,
                                     ignore_index=IGNORE, need_grad_bias=bias, **SCHEMES[scheme])
    for actual, ref in zip(grads, ref_grads):
        assert (actual is None) == (ref is None)
        if ref is not None:
            assert_close(actual, ref, BACKWARD_TOL[dtype])


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_need_flags_skip_outputs(scheme):
    """Each gradient alone (the frozen-weight case: d hidden only), on each scheme."""
    hidden, weight, b, targets = make_problem(21, 18, 45, torch.float32, n_ignored=2)
    g_lp, _ = upstream_grads(targets, False)
    (ref_h, ref_w, ref_b), lse, _ = reference_backward(hidden, weight, b, targets, g_lp, None, 1.0)
    common = dict(inv_temperature=1.0, ignore_index=IGNORE, **SCHEMES[scheme])

    gh, gw, gb = linear_logprobs_backward(hidden, weight, b, targets, lse.float(), g_lp, need_grad_weight=False,
                                          **common)
    assert gw is None and gb is None
    assert_close(gh, ref_h, 1e-5)
    gh, gw, gb = linear_logprobs_backward(hidden, weight, b, targets, lse.float(), g_lp, need_grad_hidden=False,
                                          need_grad_bias=True, **common)
    assert gh is None
    assert_close(gw, ref_w, 1e-5)
    assert_close(gb, ref_b, 1e-5)
    gh, gw, gb = linear_logprobs_backward(hidden, weight, b, targets, lse.float(), g_lp, need_grad_hidden=False,
                                          need_grad_weight=False, **common)
    assert gh is None and gw is None and gb is None


def test_ignored_rows_get_no_gradient_whatever_their_statistics():
    """Ignored rows contribute exactly 0 even with a non-zero upstream gradient and a nan lse, and an
    ignore_index that is also a valid vocab id is still treated as ignored (forward: target logit 0)."""
    ignore_index = 3
    hidden, weight, b, targets = make_problem(19, 17, 33, torch.float32, n_ignored=6, ignore_index=ignore_index)
    g_lp, g_ent = upstream_grads(targets, True, ignore_index)
    ref_grads, lse, entropy = reference_backward(hidden, weight, b, targets, g_lp, g_ent, 1.0, ignore_index)

    ignored = targets == ignore_index
    lse, entropy = lse.float().masked_fill(ignored, float("nan")), entropy.float().masked_fill(ignored, 0.0)
    g_lp, g_ent = g_lp.masked_fill(ignored, 1.0), g_ent.masked_fill(ignored, 1.0)
    grads = linear_logprobs_backward(hidden, weight, b, targets, lse, g_lp, g_ent, entropy, inv_temperature=1.0,
                                     ignore_index=ignore_index, need_grad_bias=True)
    for actual, ref in zip(grads, ref_grads):
        assert_close(actual, ref, 1e-5)
    assert (grads[0][ignored] == 0).all()

    target_logit = linear_lse_forward(hidden, weight, b, targets, inv_temperature=1.0,
                                      ignore_index=ignore_index).target_logit
    assert (target_logit[ignored] == 0).all() and (target_logit[~ignored] != 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_shards_merge_to_the_full_vocabulary(dtype):
    """Two shards (vocab_start 0 and 50; targets on either side): merged forward statistics and summed
    backward contributions (global lse and entropy given to each shard) equal the unsharded reference."""
    n, h, v, cut, inv_t = 29, 23, 83, 50, 1.3
    hidden, weight, b, targets = make_problem(n, h, v, dtype, n_ignored=4)
    shards = [(0, slice(0, cut)), (cut, slice(cut, v))]

    stats = [linear_lse_forward(hidden, weight[s], b[s], targets, inv_temperature=inv_t, ignore_index=IGNORE,
                                vocab_start=start, spec=ENTROPY) for start, s in shards]
    for st, (start, s) in zip(stats, shards):  # each shard on its own
        ref = reference_forward(hidden, weight[s], b[s], targets, inv_t, vocab_start=start)
        for actual, r in zip(st, ref):
            assert_close(actual, r, 1e-5)
    merged = merge_row_stats(*stats)
    for actual, ref in zip(merged, reference_forward(hidden, weight, b, targets, inv_t)):
        assert_close(actual, ref, 1e-5)

    g_lp, g_ent = upstream_grads(targets, True)
    (ref_h, ref_w, ref_b), ref_lse, ref_entropy = reference_backward(hidden, weight, b, targets, g_lp, g_ent, inv_t)
    parts = [linear_logprobs_backward(hidden, weight[s], b[s], targets, ref_lse.float(), g_lp, g_ent,
                                      ref_entropy.float(), inv_temperature=inv_t, ignore_index=IGNORE,
                                      vocab_start=start, need_grad_bias=True) for start, s in shards]
    tol = BACKWARD_TOL[dtype]
    assert_close(parts[0][0] + parts[1][0], ref_h, tol)
    assert_close(torch.cat([parts[0][1], parts[1][1]]), ref_w, tol)
    assert_close(torch.cat([parts[0][2], parts[1][2]]), ref_b, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_of_scale_1e4_stay_finite_and_accurate(dtype):
    n, h, v = 16, 16, 90  # one token block, three vocab tiles: the row maxima fall in different vocab splits
    hidden, weight, b, targets = make_problem(n, h, v, dtype, scale=60.0, n_ignored=3)
    z = reference_logits(hidden, weight, b, 1.0)
    assert 5e3 < z.abs().max() < 6e4  # fp32-representable, far beyond exp's range

    lse, target_logit, entropy = linear_lse_forward(hidden, weight, b, targets, inv_temperature=1.0,
                                                    ignore_index=IGNORE, spec=ENTROPY)[:3]
    ref_lse, ref_target_logit, ref_entropy = reference_forward(hidden, weight, b, targets, 1.0)
    assert_close(lse, ref_lse, 1e-5)
    assert_close(target_logit, ref_target_logit, 1e-5)
    # Nearly one-hot rows: entropies of 1e-4 and less, held to an absolute 1e-6 (of log V = 4.5).
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-6)

    g_lp, g_ent = upstream_grads(targets, True)
    ref_grads, lse, entropy = reference_backward(hidden, weight, b, targets, g_lp, g_ent, 1.0)
    grads = linear_logprobs_backward(hidden, weight, b, targets, lse.float(), g_lp, g_ent, entropy.float(),
                                     inv_temperature=1.0, ignore_index=IGNORE, need_grad_bias=True)
    for actual, ref in zip(grads, ref_grads):
        assert_close(actual, ref, 1e-2)


@pytest.mark.slow
def test_large_vocabulary_and_strided_inputs():
    """V = 50257 (GPT-2's vocabulary, thousands of tiles, split across programs) with non-contiguous views."""
    n, h, v = 3, 16, 50257
    hidden, weight, b, targets = make_problem(n, h, v, torch.float16, n_ignored=1)
    hidden_strided = torch.stack([hidden, hidden], 1)[:, 0]  # row stride 2 * h
    weight_strided = weight.T.contiguous().T  # column-major view
    stats = linear_lse_forward(hidden_strided, weight_strided, b, targets, inv_temperature=1.0, ignore_index=IGNORE,
                               spec=ENTROPY)
    for actual, ref in zip(stats, reference_forward(hidden, weight, b, targets, 1.0)):
        assert_close(actual, ref, 1e-5)

    g_lp, _ = upstream_grads(targets, False)
    (ref_h, ref_w, _), lse, _ = reference_backward(hidden, weight, b, targets, g_lp, None, 1.0)
    gh, gw, _ = linear_logprobs_backward(hidden_strided, weight_strided, b, targets, lse.float(), g_lp,
                                         inv_temperature=1.0, ignore_index=IGNORE)
    assert_close(gh, ref_h, BACKWARD_TOL[torch.float16])
    assert_close(gw, ref_w, BACKWARD_TOL[torch.float16])


def test_no_rows():
    hidden, weight, b, targets = make_problem(0, 8, 20, torch.float32)
    lse, target_logit, entropy = linear_lse_forward(hidden, weight, b, targets, inv_temperature=1.0,
                                                    ignore_index=IGNORE, spec=ENTROPY)[:3]
    assert lse.shape == target_logit.shape == entropy.shape == (0,)
    gh, gw, gb = linear_logprobs_backward(hidden, weight, b, targets, lse, lse, inv_temperature=1.0,
                                          ignore_index=IGNORE, need_grad_bias=True)
    assert gh.shape == (0, 8) and (gw == 0).all() and (gb == 0).all()
