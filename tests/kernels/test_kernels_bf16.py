"""Every kernel in bfloat16 under the Triton interpreter (TRITON_INTERPRET=1 set by conftest), made exact by the
`bf16_interpreter` fixture (tests/helpers/bf16_interpreter.py), against float64 references computed here from the same
bf16-rounded inputs.

Tolerances, from where the kernels round:
- forward statistics: products of bf16 numbers (8 significant bits each) are exact in fp32 and accumulate in fp32,
  so the logits carry fp32 rounding only: 1e-5 relative to the largest reference value, as for fp16;
- d hidden and d weight: the logit gradient dz is rounded once to bf16 (unit roundoff u = 2^-8) to feed the
  tensor cores, then multiplied exactly and summed in fp32 over K = V (d hidden) or N (d weight) terms, so each
  element is off by at most (u + K 2^-24) sum_k |dz_k| |x_k|, plus the fp32 error of dz itself (about 1e-6
  relative): the bound `(2^-8 + 1e-5) (|dz| @ |x|)` per element, with dz from the float64 reference. Each test also
  checks that this bound stays under 5% of the largest gradient, so a flipped sign (an error of 2|g|) or a lost
  factor such as the temperature (43% at 1/0.7) fails it;
- d bias: the atomic kernel sums the fp32 dz (1e-5 relative to the largest value); the atomic-free backward sums
  the bf16 dz of its workspace (dz.T @ 1), held to the bound above.
"""
import pytest
import torch
import triton
import triton.language as tl
from helpers.bf16_interpreter import bf16_interpreter, exact_bf16  # noqa: F401 (fixture)

from fastalign import fused_linear_ppo_loss
from fastalign.kernels.logprobs_backward import linear_logprobs_backward
from fastalign.kernels.lse_forward import linear_lse_forward
from fastalign.kernels.row_stats import RowStatsSpec
from fastalign.objectives.ppo import PPOLossConfig, ppo_token_losses
from helpers.bf16_interpreter import BF16, FP32_REL, SHAPES, assert_within_bf16_bound, reference

IGNORE = -100


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))


def interpreter_dot_and_cast():
    a, b = torch.randn(16, 32).to(BF16), torch.randn(32, 16).to(BF16)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, 16, 32, 16)
    # Values whose low 16 bits round up, ties to even either way, and the edges: overflow to inf, inf, nan.
    x = torch.tensor([1 + 2**-8 + 2**-12, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-20),
                      torch.finfo(torch.float32).max, float("inf"), float("nan"), 0.0] + torch.randn(56).tolist())
    y = torch.empty(64, dtype=BF16)
    _to_bf16_kernel[(1,)](x, y, 64)
    return c, a.double() @ b.double(), y, x.to(BF16)


def same_bf16(x, y):
    """The same bits, NaNs aside (any NaN matches any NaN)."""
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(x[~x.isnan()].view(torch.int16),
                                                             y[~y.isnan()].view(torch.int16))


def test_unpatched_interpreter_is_wrong_and_the_patch_exact():
    c, c_ref, y, y_ref = interpreter_dot_and_cast()  # unpatched: integer products of bit patterns, truncation
    assert (c.double() - c_ref).abs().max() > 1.0
    assert not same_bf16(y, y_ref)

    with exact_bf16():
        c, c_ref, y, y_ref = interpreter_dot_and_cast()
    # exact products summed in fp32: off by at most 32 * 2^-24 * sum |a b| (about 4e-5 here)
    torch.testing.assert_close(c.double(), c_ref, rtol=0, atol=1e-4)
    assert same_bf16(y, y_ref)  # torch rounds to nearest even

    c, c_ref, _, _ = interpreter_dot_and_cast()  # the patch is gone again
    assert (c.double() - c_ref).abs().max() > 1.0


def make_problem(n, h, v, *, bias, n_ignored):
    """bf16 inputs; targets uniform over the vocabulary, `n_ignored` of them ignored."""
    hidden = (torch.randn(n, h) / h**0.25).to(BF16)
    weight = (torch.randn(v, h) / h**0.25).to(BF16)
    b = torch.randn(v).to(BF16) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[torch.randperm(n)[:n_ignored]] = IGNORE
    return hidden, weight, b, targets


def assert_fp32_close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=FP32_REL,
                               atol=FP32_REL * expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
def test_lse_forward_bf16(bf16_interpreter, shape):
    n, h, v, bias, inv_t, n_ignored = SHAPES[shape]
    hidden, weight, b, targets = make_problem(n, h, v, bias=bias, n_ignored=n_ignored)
    stats = linear_lse_forward(hidden, weight, b, targets, inv_temperature=inv_t, ignore_index=IGNORE,
                               spec=RowStatsSpec(entropy=True, lse2=True, logit_sum=True))

    z = (hidden.double() @ weight.double().T + (b.double() if bias else 0.0)) * inv_t
    logp = torch.log_softmax(z, 1)
    kept = targets != IGNORE
    assert_fp32_close(stats.lse, torch.logsumexp(z, 1))
    assert_fp32_close(stats.target_logit, torch.where(kept, z.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0))
    assert_fp32_close(stats.entropy, -(logp.exp() * logp).sum(1))
    assert_fp32_close(stats.lse2, torch.logsumexp(2 * z, 1))
    assert_fp32_close(stats.logit_sum, z.sum(1))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "atomic_free"])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logprob_grad", "with_entropy_grad"])
@pytest.mark.parametrize("shape", SHAPES)
def test_logprobs_backward_bf16(bf16_interpreter, shape, with_entropy, deterministic):
    """Both schemes round dz to bf16 once: the atomic kernel in registers, the atomic-free one into its workspace
    (`_logit_grad_kernel`), which the owned-tile matmuls (`_matmul_kernel`) then read."""
    n, h, v, bias, inv_t, n_ignored = SHAPES[shape]
    hidden, weight, b, targets = make_problem(n, h, v, bias=bias, n_ignored=n_ignored)
    kept = targets != IGNORE
    g_lp = torch.randn(n) * kept
    g_ent = torch.randn(n) * kept if with_entropy else None

    def loss_fn(logp, z):
        logprob = torch.where(kept, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
        entropy = -(logp.exp() * logp).sum(1)
        return (g_lp.double() * logprob).sum() + ((g_ent.double() * entropy).sum() if with_entropy else 0.0)

    ref_h, ref_w, ref_b, dz = reference(hidden, weight, b, targets, inv_t, loss_fn)
    z = (hidden.double() @ weight.double().T + (b.double() if bias else 0.0)) * inv_t
    logp = torch.log_softmax(z, 1)
    lse, entropy = torch.logsumexp(z, 1).float(), (-(logp.exp() * logp).sum(1)).float()

    gh, gw, gb = linear_logprobs_backward(hidden, weight, b, targets, lse, g_lp, g_ent,
                                          entropy if with_entropy else None, inv_temperature=inv_t,
                                          ignore_index=IGNORE, need_grad_bias=bias, deterministic=deterministic)
    assert_within_bf16_bound(gh, ref_h, dz, weight)
    assert_within_bf16_bound(gw, ref_w, dz.T, hidden)
    if bias and deterministic:  # d bias = dz.T @ 1 from the bf16 workspace: rounded as the others
        assert_within_bf16_bound(gb[:, None], ref_b[:, None], dz.T, torch.ones(n, 1))
    elif bias:  # the atomic kernel sums the fp32 dz
        assert_fp32_close(gb, ref_b)


def test_ppo_op_bf16(bf16_interpreter):
    """The fused PPO op on the triton backend in bf16: the forward kernel, the PPO epilogue kernel and the backward
    kernel, against the objectives' PPO loss on float64 log-probs (TRL token-mean). Ratios sit at exp(delta) with
    delta in {0, +-0.5, 1.5} (inside the clip range, clipped, clipped, dual-clipped for A < 0), at least 0.18 in
    log from the edges 0.8, 1.2 and 3, where the gradient jumps: far beyond the kernel's ~1e-6 log-prob error."""
    n, h, v, inv_t = 38, 24, 101, 1 / 0.9
    hidden, weight, _, targets = make_problem(n, h, v, bias=False, n_ignored=4)
    cfg = PPOLossConfig(cliprange=0.2, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    z = (hidden.double() @ weight.double().T) * inv_t
    logp64 = torch.log_softmax(z, 1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    delta = torch.tensor([0.0, 0.5, -0.5, 1.5]).repeat(n // 4 + 1)[:n]
    old = (logp64 - delta).float()
    ref_lp = (logp64 - 0.3 * torch.randn(n)).float()
    adv = torch.randn(n)
    kept = targets != IGNORE

    hidden_leaf, weight_leaf = hidden.view(2, n // 2, h).clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_ppo_loss(hidden_leaf, weight_leaf, targets.view(2, -1), old.view(2, -1), adv.view(2, -1),
                                ref_logprobs=ref_lp.view(2, -1), cliprange=cfg.cliprange, dual_clip=cfg.dual_clip,
                                kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef,
                                temperature=1 / inv_t, backend="triton")
    out.loss.backward()

    def loss_fn(logp, _):
        lp = torch.where(kept, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
        parts = ppo_token_losses(lp, old.double(), adv.double(), cfg, ref_logprobs=ref_lp.double(),
                                 entropy=-(logp.exp() * logp).sum(1))
        return torch.where(kept, parts.loss, 0.0).sum() / kept.sum()

    ref_h, ref_w, _, dz = reference(hidden, weight, None, targets, inv_t, loss_fn)
    assert_fp32_close(out.loss.detach(), loss_fn(torch.log_softmax(z, 1), z))
    # The op returns gradients in the inputs' dtype: one more rounding to bf16, of u |g|.
    assert_within_bf16_bound(hidden_leaf.grad.view(n, h), ref_h, dz, weight, rounded_to_bf16=True)
    assert_within_bf16_bound(weight_leaf.grad, ref_w, dz.T, hidden, rounded_to_bf16=True)
