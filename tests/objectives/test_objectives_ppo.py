"""PPO objectives and loss aggregation: hand-computed values, gradients, gradcheck and properties.

Expected numbers are worked out by hand in the comments (cliprange 0.2 unless stated), not re-derived
with the code under test.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign.objectives.aggregation import (
    LOSS_AGG_MODES,
    aggregate,
    aggregation_weights,
    local_normalizer,
    masked_mean,
    masked_var,
    masked_whiten,
)
from fastalign.objectives.ppo import (
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    PPOLossConfig,
    clipped_policy_loss,
    clipped_value_loss,
    kl_penalty,
    policy_ratio,
    ppo_token_losses,
)

F64 = torch.float64


def t(values, dtype=F64, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def logs(ratios, requires_grad=True):
    """Log-probs whose ratio to old log-probs of 0 is ``ratios``."""
    return t([math.log(r) for r in ratios], requires_grad=requires_grad)


def grad_of(out, x):
    (g,) = torch.autograd.grad(out.sum(), x)
    return g


def close(actual, expected):
    """Exact up to float64 rounding: default float64 tolerances (rtol 1e-7, atol 1e-7)."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype))


# ---------------------------------------------------------------- policy ratio


def test_policy_ratio_values_and_clamp():
    lp = t([math.log(2.0), 0.0, 100.0, -100.0])
    old = t([0.0, math.log(4.0), 0.0, 0.0])
    close(policy_ratio(lp, old), [2.0, 0.25, math.exp(LOG_RATIO_CLAMP), math.exp(-LOG_RATIO_CLAMP)])
    assert LOG_RATIO_CLAMP == 20.0


def test_policy_ratio_no_gradient_beyond_clamp():
    lp = t([100.0, 0.5], requires_grad=True)
    close(grad_of(policy_ratio(lp, torch.zeros(2, dtype=F64)), lp), [0.0, math.exp(0.5)])


# ---------------------------------------------------------------- clipped policy loss

# (advantage, ratio, loss, clipped, d loss / d logprob); eps = 0.2, so clip(r) lies in [0.8, 1.2]
SYMMETRIC_CASES = [
    (1.0, 1.1, -1.1, False, -1.1),  # A > 0, inside
    (1.0, 1.5, -1.2, True, 0.0),  # A > 0, above 1 + eps: clipped at -1.2, no gradient
    (1.0, 0.5, -0.5, False, -0.5),  # A > 0, below 1 - eps: pessimistic max keeps -0.5
    (-1.0, 0.5, 0.8, True, 0.0),  # A < 0, below 1 - eps: clipped at 0.8
    (-1.0, 1.5, 1.5, False, 1.5),  # A < 0, above 1 + eps: unclipped 1.5 is the max
    (-2.0, 1.1, 2.2, False, 2.2),  # A < 0, inside
    (0.5, 0.9, -0.45, False, -0.45),  # A > 0, inside, small advantage
]


def test_clipped_policy_loss_symmetric_hand_values():
    adv, ratios, loss, clipped, grad = map(list, zip(*SYMMETRIC_CASES))
    lp = logs(ratios)
    out = clipped_policy_loss(lp, torch.zeros(len(ratios), dtype=F64), t(adv), cliprange=0.2)
    close(out.loss, loss)
    close(out.ratio, ratios)
    assert out.clipped.tolist() == clipped
    assert not out.dual_clipped.any()
    # d/dlogp (-A r) = -A r where unclipped
    close(grad_of(out.loss, lp), grad)


def test_clipped_policy_loss_asymmetric_clip_higher():
    # eps_low = 0.2, eps_high = 0.28: clip range [0.8, 1.28]
    adv = t([1.0, 1.0, -1.0, -1.0])
    lp = logs([1.25, 1.5, 0.7, 1.25])
    out = clipped_policy_loss(lp, torch.zeros(4, dtype=F64), adv, cliprange=0.2, cliprange_high=0.28)
    # 1.25 is inside [0.8, 1.28] (would be clipped at 1.2 symmetrically); 1.5 -> 1.28; 0.7 -> 0.8 for A < 0
    close(out.loss, [-1.25, -1.28, 0.8, 1.25])
    assert out.clipped.tolist() == [False, True, True, False]
    close(grad_of(out.loss, lp), [-1.25, 0.0, 0.0, 1.25])
    symmetric = clipped_policy_loss(lp, torch.zeros(4, dtype=F64), adv, cliprange=0.2)
    close(symmetric.loss, [-1.2, -1.2, 0.8, 1.25])


def test_clipped_policy_loss_dual_clip():
    # c = 3: for A < 0 the loss is capped at -c A
    adv = t([-1.0, -1.0, 1.0, -1.0, -0.5])
    lp = logs([5.0, 2.0, 5.0, 0.5, 8.0])
    out = clipped_policy_loss(lp, torch.zeros(5, dtype=F64), adv, cliprange=0.2, dual_clip=3.0)
    # 5 > 3: capped at 3; 2 < 3: inactive; A > 0: never dual-clipped (-1.2); 0.5 -> 0.8; 0.5*8 = 4 > 1.5
    close(out.loss, [3.0, 2.0, -1.2, 0.8, 1.5])
    assert out.dual_clipped.tolist() == [True, False, False, False, True]
    assert out.clipped.tolist() == [False, False, True, True, False]
    close(grad_of(out.loss, lp), [0.0, 2.0, 0.0, 0.0, 0.0])
    # without dual clip the first token keeps its unclipped loss 5
    assert clipped_policy_loss(lp, torch.zeros(5, dtype=F64), adv, cliprange=0.2).loss[0].item() == pytest.approx(5.0)


def test_clipped_policy_loss_nonzero_old_logprobs_and_2d_shape():
    # ratio 1.5 from logp - old = log 1.5 with both non-zero; broadcast [B, 1] advantages over [B, T]
    old = t([[-2.0, -1.0], [-3.0, -0.5]])
    lp = (old + math.log(1.5)).requires_grad_()
    adv = t([[1.0], [-1.0]])
    out = clipped_policy_loss(lp, old, adv)
    close(out.loss, [[-1.2, -1.2], [1.5, 1.5]])
    assert out.loss.shape == (2, 2)
    close(grad_of(out.loss, lp), [[0.0, 0.0], [1.5, 1.5]])


@pytest.mark.parametrize(
    "kwargs",
    [dict(cliprange=-0.1), dict(cliprange_high=-0.01), dict(dual_clip=1.0), dict(dual_clip=0.5), dict(cliprange=math.nan)],
)
def test_clipped_policy_loss_rejects_bad_ranges(kwargs):
    z = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        clipped_policy_loss(z, z, z, **kwargs)


# ---------------------------------------------------------------- value loss


def test_clipped_value_loss_hand_values():
    # v_old = 0, R = 1, c = 0.2: clip(v) in [-0.2, 0.2]
    v = t([0.1, 0.5, -0.5, 2.0], requires_grad=True)
    out = clipped_value_loss(v, torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), cliprange_value=0.2)
    # 0.1: 0.5*0.81; 0.5: max(0.5*0.25, 0.5*0.64); -0.5: max(0.5*2.25, 0.5*1.44); 2: max(0.5*1, 0.5*0.64)
    close(out.loss, [0.405, 0.32, 1.125, 0.5])
    assert out.clipped.tolist() == [False, True, False, False]
    # d/dv 0.5 (v - R)^2 = v - R where unclipped, 0 where clipped
    close(grad_of(out.loss, v), [-0.9, 0.0, -1.5, 1.0])


def test_clipped_value_loss_rejects_negative_range():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="cliprange_value"):
        clipped_value_loss(z, z, z, cliprange_value=-1.0)


# ---------------------------------------------------------------- KL estimators


@pytest.mark.parametrize(
    "logp, ref, expected",
    [
        # d = logp - ref = 1: k1 = 1, k2 = 0.5, k3 = e^-1 + 1 - 1
        (0.5, -0.5, {"k1": 1.0, "k2": 0.5, "k3": math.exp(-1.0)}),
        # d = -2: k1 = -2, k2 = 2, k3 = e^2 - 2 - 1
        (-1.0, 1.0, {"k1": -2.0, "k2": 2.0, "k3": math.exp(2.0) - 3.0}),
        (-0.7, -0.7, {"k1": 0.0, "k2": 0.0, "k3": 0.0}),
    ],
)
def test_kl_estimators_hand_values(logp, ref, expected):
    for name, value in expected.items():
        close(kl_penalty(t([logp]), t([ref]), name), [value])


def test_kl_estimator_gradients():
    lp = t([0.5, -1.0], requires_grad=True)
    ref = t([-0.5, 1.0])
    close(grad_of(kl_penalty(lp, ref, "k1"), lp), [1.0, 1.0])
    close(grad_of(kl_penalty(lp, ref, "k2"), lp), [1.0, -2.0])  # d = logp - ref
    close(grad_of(kl_penalty(lp, ref, "k3"), lp), [1.0 - math.exp(-1.0), 1.0 - math.exp(2.0)])  # 1 - e^-d


def test_k3_exponent_is_clamped():
    out = kl_penalty(t([0.0, 0.0]), t([100.0, -100.0]), "k3")
    close(out, [math.exp(20.0) - 20.0 - 1.0, math.exp(-20.0) + 20.0 - 1.0])
    assert torch.isfinite(kl_penalty(t([0.0], dtype=torch.float32), t([1e4], dtype=torch.float32))).all()


def test_k1_k3_expectations_are_the_exact_kl():
    # E_{x ~ p}[k(x)] over a small categorical, summed exactly, equals KL(p || q) for k1 and k3 but not k2
    p_logits, q_logits = t([0.3, -1.2, 2.0, 0.1]), t([1.0, 0.2, -0.5, 0.0])
    logp, logq = p_logits.log_softmax(0), q_logits.log_softmax(0)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p_logits), torch.distributions.Categorical(logits=q_logits)
    )
    for name in ("k1", "k3"):
        close((logp.exp() * kl_penalty(logp, logq, name)).sum(), kl)
    assert abs((logp.exp() * kl_penalty(logp, logq, "k2")).sum() - kl) > 1e-3


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-30, 30),
            st.one_of(st.floats(-30, 30), st.floats(-1e-5, 1e-5)),  # near d = 0, rounding could go negative
        ),
        min_size=1,
        max_size=16,
    )
)
def test_k2_k3_nonnegative(dtype, pairs):
    lp = t([a for a, _ in pairs], dtype)
    ref = t([a + d for a, d in pairs], dtype)
    # k3 = expm1(x) - x: its sign near x = 0 is within one rounding of expm1 (SLEEF's, 1 ulp, differs between the
    # AVX2 and AVX-512 CPUs), so it is >= 0 up to an ulp of |x|, never by more (the naive exp(x) - 1 - x misses by
    # up to an ulp of 1)
    x = (ref - lp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    assert (kl_penalty(lp, ref, "k3") >= -torch.finfo(dtype).eps * x.abs()).all()
    assert (kl_penalty(lp, ref, "k2") >= 0).all()


def test_kl_bad_estimator_lists_choices():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'k1', 'k2', 'k3'.*'k4'"):
        kl_penalty(z, z, "k4")
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


# ---------------------------------------------------------------- combined token losses


def test_ppo_token_losses_values_and_gradient_weights():
    # the fused op's contract: autograd.grad of (weights * loss).sum() gives each token's gradient weight
    config = PPOLossConfig(cliprange=0.2, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    lp = logs([1.1, 1.5, 0.5])
    ref = t([0.3, -0.2, 0.0])
    entropy = t([2.0, 1.0, 0.5], requires_grad=True)
    adv = t([1.0, 1.0, -1.0])
    out = ppo_token_losses(lp, torch.zeros(3, dtype=F64), adv, config, ref_logprobs=ref, entropy=entropy)
    lpv = [math.log(1.1), math.log(1.5), math.log(0.5)]
    k3 = [math.exp(r - x) - (r - x) - 1 for x, r in zip(lpv, ref.tolist())]
    pg = [-1.1, -1.2, 0.8]
    close(out.pg_loss, pg)
    close(out.kl, k3)
    close(out.loss, [p + 0.1 * k - 0.01 * h for p, k, h in zip(pg, k3, [2.0, 1.0, 0.5])])
    assert out.clipped.tolist() == [False, True, True]

    w = t([0.5, 0.25, 2.0])
    g_lp, g_h = torch.autograd.grad((w * out.loss).sum(), [lp, entropy])
    # d/dlogp: -A r (unclipped only) + kl_coef (1 - exp(ref - logp))
    d_pg = [-1.1, 0.0, 0.0]
    d_kl = [1 - math.exp(r - x) for x, r in zip(lpv, ref.tolist())]
    close(g_lp, [wi * (a + 0.1 * b) for wi, a, b in zip(w.tolist(), d_pg, d_kl)])
    close(g_h, [-0.01 * wi for wi in w.tolist()])


def test_ppo_token_losses_defaults_is_plain_surrogate():
    lp = logs([1.1, 0.5])
    out = ppo_token_losses(lp, torch.zeros(2, dtype=F64), t([1.0, -1.0]))
    close(out.loss, [-1.1, 0.8])
    assert out.kl is None


def test_ppo_token_losses_zero_coefficient_keeps_entropy_in_graph():
    lp = logs([1.1])
    entropy = t([1.0], requires_grad=True)
    out = ppo_token_losses(lp, t([0.0]), t([1.0]), PPOLossConfig(), entropy=entropy)
    g_lp, g_h = torch.autograd.grad(out.loss.sum(), [lp, entropy])
    close(g_lp, [-1.1])
    close(g_h, [0.0])


def test_ppo_token_losses_requires_inputs_for_nonzero_coefficients():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_token_losses(z, z, z, PPOLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        ppo_token_losses(z, z, z, PPOLossConfig(entropy_coef=0.1))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(cliprange=-1.0), "cliprange"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(kl_estimator="kl"), "kl_estimator"),
        (dict(loss_agg="sum"), "loss_agg"),
        (dict(cliprange_value=-0.1), "cliprange_value"),
        (dict(kl_coef=math.inf), "kl_coef"),
    ],
)
def test_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PPOLossConfig(**kwargs)


def test_float32_matches_float64_and_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    lp64, old64, adv64 = (torch.randn(4, 7, generator=g, dtype=F64) * 0.3 for _ in range(3))
    ref64, ent64 = torch.randn(4, 7, generator=g, dtype=F64), torch.rand(4, 7, generator=g, dtype=F64)
    config = PPOLossConfig(kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0, cliprange_high=0.28)
    out64 = ppo_token_losses(lp64, old64, adv64, config, ref_logprobs=ref64, entropy=ent64)
    f32 = [x.float() for x in (lp64, old64, adv64, ref64, ent64)]
    out32 = ppo_token_losses(*f32[:3], config, ref_logprobs=f32[3], entropy=f32[4])
    assert out32.loss.dtype == torch.float32 and out64.loss.dtype == F64
    torch.testing.assert_close(out32.loss, out64.loss.float())  # float32 default tolerances


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_shape_independence(b, tlen, seed):
    # [B, T] and flat [N] give the same per-token values
    g = torch.Generator().manual_seed(seed)
    lp, old, adv, ref = (torch.randn(b, tlen, generator=g, dtype=F64) for _ in range(4))
    config = PPOLossConfig(kl_coef=0.1, dual_clip=2.0)
    two_d = ppo_token_losses(lp, old, adv, config, ref_logprobs=ref)
    flat = ppo_token_losses(lp.flatten(), old.flatten(), adv.flatten(), config, ref_logprobs=ref.flatten())
    assert two_d.loss.shape == (b, tlen)
    assert torch.equal(two_d.loss.flatten(), flat.loss)
    assert torch.equal(two_d.clipped.flatten(), flat.clipped)


# ---------------------------------------------------------------- gradcheck (float64, at smooth points)


def test_gradcheck_policy_loss():
    # ratios away from the kinks at 0.8, 1.2 (clip) and at 3 |A| (dual clip)
    adv = t([1.0, -1.0, 0.5, -0.3, 1.0, -2.0])
    old = t([0.1, -0.3, 0.2, 0.0, -1.0, 0.4])
    ratios = t([0.9, 1.1, 0.5, 1.6, 1.5, 0.6])
    lp = (old + ratios.log()).requires_grad_()
    f = lambda x: clipped_policy_loss(x, old, adv, cliprange=0.2, cliprange_high=0.28, dual_clip=3.0).loss
    assert torch.autograd.gradcheck(f, (lp,))


def test_gradcheck_value_loss():
    v = t([0.1, 0.5, -0.5, 2.0, 0.05], requires_grad=True)
    old, ret = t([0.0, 0.0, 0.0, 0.0, 0.1]), t([1.0, 1.0, 1.0, 1.0, -0.3])
    assert torch.autograd.gradcheck(lambda x: clipped_value_loss(x, old, ret).loss, (v,))


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_gradcheck_kl(estimator):
    lp = t([0.5, -1.0, -0.2], requires_grad=True)
    ref = t([-0.5, 1.0, -0.3], requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, estimator), (lp, ref))


def test_gradcheck_ppo_token_losses():
    config = PPOLossConfig(kl_coef=0.2, entropy_coef=0.05)
    old, adv, ref = t([0.0, -0.5, 0.3]), t([1.0, -1.0, 0.7]), t([0.1, 0.2, -0.4])
    lp = (old + t([1.05, 0.9, 1.5]).log()).requires_grad_()
    entropy = t([1.0, 2.0, 0.3], requires_grad=True)
    f = lambda x, h: ppo_token_losses(x, old, adv, config, ref_logprobs=ref, entropy=h).loss
    assert torch.autograd.gradcheck(f, (lp, entropy))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gradcheck_aggregate(mode):
    per_token = torch.randn(3, 4, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: aggregate(x, mask, mode), (per_token,))


# ---------------------------------------------------------------- aggregation

MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
VALUES = t([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0], [100.0, 100.0, 100.0]])


@pytest.mark.parametrize(
    "mode, weights, loss",
    [
        # 3 tokens: (1 + 2 + 3) / 3
        ("token-mean", [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0], [0, 0, 0]], 2.0),
        # 2 non-empty sequences: ((1 + 2) + 3) / 2
        ("seq-mean-token-sum", [[1 / 2, 1 / 2, 0], [1 / 2, 0, 0], [0, 0, 0]], 3.0),
        # ((1 + 2) / 2 + 3 / 1) / 2
        ("seq-mean-token-mean", [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0], [0, 0, 0]], 2.25),
    ],
)
def test_aggregation_hand_values(mode, weights, loss):
    close(aggregation_weights(MASK, mode, dtype=F64), weights)
    close(aggregation_weights(MASK.to(F64), mode), weights)  # float mask, same weights
    close(aggregate(VALUES, MASK, mode), loss)


@pytest.mark.parametrize(
    "mode, kwargs, loss",
    [
        ("token-mean", dict(num_tokens=4), 6.0 / 4),
        ("seq-mean-token-sum", dict(num_sequences=4), 6.0 / 4),
        ("seq-mean-token-mean", dict(num_sequences=4), 4.5 / 4),
    ],
)
def test_aggregation_explicit_normalizer(mode, kwargs, loss):
    close(aggregate(VALUES, MASK, mode, **kwargs), loss)


def test_aggregation_default_dtype():
    assert aggregation_weights(MASK, "token-mean").dtype == torch.float32
    assert aggregation_weights(MASK.to(F64), "token-mean").dtype == F64


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_fully_masked_batch_gives_zero_weights_and_loss(mode):
    mask = torch.zeros(2, 3, dtype=torch.bool)
    w = aggregation_weights(mask, mode)
    assert torch.equal(w, torch.zeros(2, 3))
    per_token = t([[1.0, math.nan, math.inf], [2.0, 3.0, -math.inf]], requires_grad=True)
    loss = aggregate(per_token, mask, mode)
    assert loss.item() == 0.0
    assert torch.equal(grad_of(loss, per_token), torch.zeros(2, 3, dtype=F64))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_masked_positions_ignored_even_if_nonfinite(mode):
    values = VALUES.clone()
    values[~MASK] = math.nan
    close(aggregate(values, MASK, mode), aggregate(VALUES, MASK, mode))


def test_local_normalizer():
    assert local_normalizer(MASK, "token-mean").item() == 3
    assert local_normalizer(MASK, "seq-mean-token-sum").item() == 2
    assert local_normalizer(MASK, "seq-mean-token-mean").item() == 2
    assert local_normalizer(torch.tensor([0, 1, 1]), "seq-mean-token-mean").item() == 1  # [T]: one sequence


def _split_rows(mask_rows, seed):
    g = torch.Generator().manual_seed(seed)
    b = len(mask_rows)
    mask = torch.tensor(mask_rows, dtype=torch.bool)
    values = torch.randn(mask.shape, generator=g, dtype=F64)
    cut = int(torch.randint(0, b + 1, (1,), generator=g))
    return mask, values, cut


masks = st.integers(1, 6).flatmap(
    lambda tlen: st.lists(st.lists(st.booleans(), min_size=tlen, max_size=tlen), min_size=1, max_size=6)
)


@settings(max_examples=150, deadline=None)
@given(masks, st.sampled_from(LOSS_AGG_MODES), st.integers(0, 2**31 - 1))
def test_global_normalizer_micro_batches_sum_to_whole_batch(mask_rows, mode, seed):
    # two micro-batches (rows split at a random cut), each normalized by the whole batch's count
    mask, values, cut = _split_rows(mask_rows, seed)
    key = "num_tokens" if mode == "token-mean" else "num_sequences"
    total = sum(int(local_normalizer(m, mode)) for m in (mask[:cut], mask[cut:]))
    x = values.clone().requires_grad_()
    whole = aggregate(x, mask, mode)
    (g_whole,) = torch.autograd.grad(whole, x)
    if total == 0:
        assert whole.item() == 0.0
        return
    y = values.clone().requires_grad_()
    parts = [aggregate(y[s], mask[s], mode, **{key: total}) for s in (slice(0, cut), slice(cut, None))]
    (g_parts,) = torch.autograd.grad(sum(parts), y)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(g_parts, g_whole)


def test_global_normalizer_differs_from_local_normalization():
    # unequal micro-batches: averaging locally normalized losses is NOT the whole-batch loss
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    values = t([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    whole = aggregate(values, mask, "token-mean")  # 7 / 4
    local = (aggregate(values[:1], mask[:1], "token-mean") + aggregate(values[1:], mask[1:], "token-mean")) / 2
    close(whole, 1.75)
    close(local, 2.5)
    glob = sum(aggregate(values[i : i + 1], mask[i : i + 1], "token-mean", num_tokens=4) for i in range(2))
    close(glob, 1.75)


@settings(max_examples=150, deadline=None)
@given(masks)
def test_weight_sums(mask_rows):
    mask = torch.tensor(mask_rows, dtype=torch.bool)
    lengths = mask.sum(-1).to(F64)
    nonempty = int((lengths > 0).sum())
    for mode in LOSS_AGG_MODES:
        w = aggregation_weights(mask, mode, dtype=F64)
        assert torch.isfinite(w).all() and (w >= 0).all()
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        if nonempty == 0:
            assert torch.equal(w, torch.zeros_like(w))
            continue
        # token-mean and seq-mean-token-mean: a mean, weights sum to 1
        if mode in ("token-mean", "seq-mean-token-mean"):
            torch.testing.assert_close(w.sum(), t(1.0))
        # seq-mean-token-sum: each sequence's weights sum to its length / number of sequences
        else:
            torch.testing.assert_close(w.sum(-1), lengths / nonempty)
    # token-mean: every unmasked token has the same weight 1 / num_tokens
    w = aggregation_weights(mask, "token-mean", dtype=F64)
    if nonempty:
        torch.testing.assert_close(w[mask], torch.full_like(w[mask], 1.0 / int(mask.sum())))


def test_aggregation_validation():
    with pytest.raises(ValueError, match=r"'token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean'.*'mean'"):
        aggregation_weights(MASK, "mean")
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(VALUES, MASK, "token-sum")
    with pytest.raises(ValueError, match="loss_agg"):
        local_normalizer(MASK, "seq-sum")
    for bad in (0, -1, 0.0, torch.tensor(0), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="num_tokens: expected a positive number"):
            aggregation_weights(MASK, "token-mean", num_tokens=bad)
        with pytest.raises(ValueError, match="num_sequences: expected a positive number"):
            aggregation_weights(MASK, "seq-mean-token-mean", num_sequences=bad)
    with pytest.raises(ValueError, match="num_tokens does not apply"):
        aggregation_weights(MASK, "seq-mean-token-sum", num_tokens=3)
    with pytest.raises(ValueError, match="num_sequences does not apply"):
        aggregation_weights(MASK, "token-mean", num_sequences=3)


def test_normalizer_below_the_batch_own_count_is_refused():
    # MASK holds 3 tokens in 2 non-empty sequences: a smaller normalizer would silently inflate the loss
    for bad in (2, 2.5, torch.tensor(2)):
        with pytest.raises(ValueError, match=r"num_tokens: expected at least this batch's own count \(3 unmasked"):
            aggregation_weights(MASK, "token-mean", num_tokens=bad)
    with pytest.raises(ValueError, match=r"num_sequences: expected at least this batch's own count \(2 sequences"):
        aggregation_weights(MASK, "seq-mean-token-sum", num_sequences=1)
    with pytest.raises(ValueError, match="one-element tensor"):
        aggregation_weights(MASK, "token-mean", num_tokens=torch.tensor([3, 4]))
    close(aggregate(VALUES, MASK, "token-mean", num_tokens=3), 2.0)  # the batch's own count is fine


def test_tensor_normalizer_accepted():
    close(aggregate(VALUES, MASK, "token-mean", num_tokens=torch.tensor(6)), 1.0)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean():
    close(masked_mean(VALUES, MASK), 2.0)
    close(masked_mean(VALUES, MASK, dim=-1), [1.5, 3.0, 0.0])  # empty row -> 0
    close(masked_mean(VALUES, torch.zeros_like(MASK)), 0.0)
    values = VALUES.clone()
    values[~MASK] = math.inf
    close(masked_mean(values, MASK), 2.0)


def test_masked_var_and_whiten():
    x = t([1.0, 2.0, 4.0, 50.0])
    mask = torch.tensor([True, True, True, False])
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; biased 42/27, unbiased 42/18
    close(masked_var(x, mask, unbiased=False), 42 / 27)
    close(masked_var(x, mask), 42 / 18)
    w = masked_whiten(x, mask)
    std = math.sqrt(42 / 18 + 1e-8)
    close(w[:3], [(v - 7 / 3) / std for v in (1.0, 2.0, 4.0)])
    close(masked_whiten(x, mask, shift_mean=False)[:3], [(v - 7 / 3) / std + 7 / 3 for v in (1.0, 2.0, 4.0)])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([False, True, False, False]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x, torch.zeros(4, dtype=torch.bool))
