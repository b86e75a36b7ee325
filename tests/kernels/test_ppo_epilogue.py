"""The PPO epilogue kernel under the Triton interpreter (CPU, TRITON_INTERPRET=1 set by conftest), in fp32.

Merged statistics (lse, log-prob, entropy) are checked against a float64 merge of the split partials written
here; the loss, its gradients and the clip flags against `fastalign.objectives.ppo.ppo_token_losses` and
autograd, evaluated on the kernel's own log-probs and entropy (so the flags must agree exactly).
"""
import math

import pytest
import torch

from fastalign.kernels.lse_forward import LsePartials
from helpers.noise import near
from helpers.reference import random_split_partials
from fastalign.kernels.ppo_epilogue import ppo_epilogue
from fastalign.objectives.ppo import LOG_RATIO_CLAMP, PPOLossConfig, kl_penalty, ppo_token_losses

IGNORE = -100
TOL = dict(rtol=1e-5, atol=1e-6)


def reference_merge(p: LsePartials, targets: torch.Tensor):
    """lse, log-prob and entropy in float64: lse = logsumexp_s(max_s + log sumexp_s), E[z] a softmax-weighted mean
    of the splits' means max_s + sum_ez_s / sumexp_s, entropy lse - E[z]."""
    split_lse = p.max.double() + p.sumexp.double().log()
    lse = torch.logsumexp(split_lse, 0)
    split_mean = p.max.double() + p.sum_ez.double() / p.sumexp.double()
    expected = (torch.exp(split_lse - lse) * split_mean).sum(0)
    valid = targets != IGNORE
    return lse, torch.where(valid, p.target_logit.double().sum(0) - lse, 0.0), torch.where(valid, lse - expected, 0.0)


def spread(n: int, scale: float) -> torch.Tensor:
    """Mostly N(0, scale); every 4th value N(0, 2) (dual clip); every 7th beyond +-LOG_RATIO_CLAMP (the clamp)."""
    x = scale * torch.randn(n)
    x[::4] = 2 * torch.randn(len(x[::4]))
    x[3::7] = torch.sign(torch.randn(len(x[3::7]))) * (LOG_RATIO_CLAMP + 0.5 + 10 * torch.rand(len(x[3::7])))
    return x


def kernel_options(cfg: PPOLossConfig) -> dict:
    return dict(cliprange=cfg.cliprange, cliprange_high=cfg.cliprange_high, dual_clip=cfg.dual_clip,
                kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef,
                log_ratio_clamp=LOG_RATIO_CLAMP)


OPTIONS = {
    "symmetric": dict(),
    "asymmetric": dict(cliprange=0.1, cliprange_high=0.28),
    "dual_clip": dict(dual_clip=3.0),
    "k1": dict(kl_coef=0.05, kl_estimator="k1"),
    "k2": dict(kl_coef=0.05, kl_estimator="k2"),
    "k3": dict(kl_coef=0.05, kl_estimator="k3"),
    "entropy_bonus": dict(entropy_coef=0.01),
    "entropy_without_bonus": dict(with_entropy=True),
    "all": dict(cliprange=0.1, cliprange_high=0.28, dual_clip=2.0, kl_coef=0.1, kl_estimator="k3",
                entropy_coef=0.02),
}


@pytest.mark.parametrize("n", [1, 37])  # 37: three interpreter blocks of 16, the last one partial
@pytest.mark.parametrize("name", OPTIONS)
def test_matches_objectives_and_autograd(name, n):
    options = dict(OPTIONS[name])
    with_entropy = options.pop("with_entropy", options.get("entropy_coef", 0) != 0)
    cfg = PPOLossConfig(**options)
    with_ref = cfg.kl_coef != 0
    partials, targets = random_split_partials(n, splits=3, ignore_index=IGNORE)
    lse, logp, entropy = reference_merge(partials, targets)
    old = (logp - spread(n, 0.3)).float()
    ref = (logp - spread(n, 0.5)).float() if with_ref else None
    adv = torch.randn(n)
    weights = torch.rand(n) * (torch.rand(n) < 0.7)

    out = ppo_epilogue(partials if with_entropy else partials._replace(sum_ez=None), targets, old, adv, ref,
                       weights, ignore_index=IGNORE, with_entropy=with_entropy, **kernel_options(cfg))
    torch.testing.assert_close(out.lse.double(), lse, **TOL)
    torch.testing.assert_close(out.logprobs.double(), logp, **TOL)
    assert (out.logprobs[targets == IGNORE] == 0).all()
    if with_entropy:
        torch.testing.assert_close(out.entropy.double(), entropy, **TOL)
    else:
        assert out.entropy is None and out.grad_entropy is None

    # The objectives and autograd on the kernel's own log-probs and entropy.
    lp = out.logprobs.clone().requires_grad_(True)
    ent = out.entropy.clone().requires_grad_(True) if with_entropy else None
    parts = ppo_token_losses(lp, old, adv, cfg, ref_logprobs=ref, entropy=ent)
    weighted = weights * parts.loss
    grads = torch.autograd.grad(weighted.sum(), [lp] + ([ent] if with_entropy else []))
    torch.testing.assert_close(out.loss, weighted.detach(), **TOL)
    torch.testing.assert_close(out.grad_logprobs, grads[0], **TOL)
    if with_entropy:
        torch.testing.assert_close(out.grad_entropy, grads[1], **TOL)
    # the branch flags are step functions of the ratio (exp here and in the kernel may differ by an ulp): equal
    # wherever the ratio is not within rounding of an edge
    high = cfg.cliprange if cfg.cliprange_high is None else cfg.cliprange_high
    settled = ~near(parts.ratio.detach(), [1 - cfg.cliprange, 1 + high, cfg.dual_clip], 1e-5)
    assert torch.equal(out.clipped[settled], parts.clipped[settled])
    assert torch.equal(out.dual_clipped[settled], parts.dual_clipped[settled])

    if n > 1:  # the inputs reach every branch: clipped, unclipped, dual-clipped, beyond the clamps
        assert out.clipped.any() and not out.clipped.all()
        assert out.dual_clipped.any() == (cfg.dual_clip is not None)
        assert ((out.logprobs - old).abs() > LOG_RATIO_CLAMP).any()


def test_k3_keeps_its_relative_accuracy_near_zero():
    """With A = 0 and weight 1 the loss is kl_coef * k3 alone. k3 = expm1(x) - x ~ x^2 / 2 must agree with torch's
    expm1 form to about one rounding of x (exp(x) - 1 - x would be off by ~1e-7 absolute, 1e3 times that)."""
    n = 37
    partials = LsePartials(torch.zeros(1, n), torch.ones(1, n), None, -torch.rand(1, n))  # lse 0: logp = target
    targets = torch.zeros(n, dtype=torch.long)
    logp = partials.target_logit[0]
    d = torch.logspace(-4, math.log10(30.0), n) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    ref = logp - d
    cfg = PPOLossConfig(kl_coef=1.0, kl_estimator="k3")
    out = ppo_epilogue(partials, targets, logp, torch.zeros(n), ref, torch.ones(n), ignore_index=IGNORE,
                       with_entropy=False, **kernel_options(cfg))
    expected = kl_penalty(logp, ref, "k3")
    x = (ref - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    assert (out.loss >= 0).all()
    assert ((out.loss - expected).abs() <= 4 * torch.finfo(torch.float32).eps * (x.abs() + expected)).all()


def test_no_tokens():
    partials = LsePartials(*(torch.zeros(2, 0) for _ in range(4)))
    empty = torch.zeros(0)
    out = ppo_epilogue(partials, empty.long(), empty, empty, None, empty, ignore_index=IGNORE, with_entropy=True,
                       **kernel_options(PPOLossConfig()))
    assert all(t.shape == (0,) for t in out)


def test_inconsistent_options_raise():
    partials, targets = random_split_partials(4, splits=2, ignore_index=IGNORE)
    x = torch.zeros(4)
    common = dict(ignore_index=IGNORE, **kernel_options(PPOLossConfig()))
    with pytest.raises(ValueError, match="ref_logprobs: required"):
        ppo_epilogue(partials, targets, x, x, None, x, with_entropy=False, **{**common, "kl_coef": 0.1})
    with pytest.raises(ValueError, match="with_entropy: expected True"):
        ppo_epilogue(partials, targets, x, x, None, x, with_entropy=False, **{**common, "entropy_coef": 0.1})
    with pytest.raises(ValueError, match="partials.sum_ez"):
        ppo_epilogue(partials._replace(sum_ez=None), targets, x, x, None, x, with_entropy=True, **common)
