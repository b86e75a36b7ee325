"""fused_linear_ppo_loss on every backend against a naive float64 reference written here (materialized logits)."""
import math

import pytest
import torch

from fastalign import fused_linear_ppo_loss
from helpers.noise import assert_share_close
from helpers.reference import as_f64_leaf, reference_logprobs

F32 = dict(rtol=1e-4, atol=1e-5)


def reference_ppo(hidden, weight, bias, targets, old, adv, mask, *, ref=None, kl_coef=0.0, kl_estimator="k3",
                  cliprange=0.2, cliprange_high=None, dual_clip=None, entropy_coef=0.0, temperature=1.0,
                  vhead=None, vbias=None, old_values=None, returns=None, cliprange_value=0.2, vf_coef=0.1,
                  loss_agg="token-mean", num_tokens=None, num_sequences=None):
    """Loss, metrics and log-probs in float64, the formulas written out independently of fastalign.objectives, and
    for the clip fractions each token's decision and its distance to the decision's edge (masked tokens)."""
    logp, ent = reference_logprobs(hidden, weight, targets, bias, temperature=temperature)
    m = (mask & (targets != -100)).double()
    old, adv = old.double(), adv.double()
    ratio = torch.exp(logp - old)
    hi = cliprange if cliprange_high is None else cliprange_high
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + hi))
    clipped = (-adv * ratio.clamp(1 - cliprange, 1 + hi)) > (-adv * ratio)
    if dual_clip is not None:
        surrogate = torch.where(adv < 0, torch.minimum(surrogate, -dual_clip * adv), surrogate)
    per_token = surrogate.clone()
    kl = None
    if ref is not None:
        d = logp - ref.double()
        kl = {"k1": d, "k2": 0.5 * d ** 2, "k3": torch.exp(-d) + d - 1}[kl_estimator]
        per_token = per_token + kl_coef * kl
    per_token = per_token - entropy_coef * ent

    def agg(x):
        if loss_agg == "token-mean":
            return (x * m).sum() / (num_tokens or m.sum())
        seqs = num_sequences or (m.sum(-1) > 0).sum()
        if loss_agg == "seq-mean-token-sum":
            return (x * m).sum(-1).sum() / seqs
        return ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / seqs

    def mean(x):
        return (x * m).sum() / m.sum().clamp(min=1)

    loss = agg(per_token)
    metrics = {"loss/policy": agg(surrogate), "policy/clipfrac": mean(clipped.double()),
               "policy/approxkl": mean(0.5 * (logp - old) ** 2), "policy/ratio_mean": mean(ratio)}
    on = m.bool()
    edges = {"policy/clipfrac": (clipped[on], torch.minimum((ratio - 1 + cliprange).abs(), (ratio - 1 - hi).abs())[on])}
    if kl is not None:
        metrics["objective/kl"] = mean(kl)
    if entropy_coef:
        metrics["objective/entropy"] = mean(ent)
    if vhead is not None:
        values = hidden.double() @ vhead.double()
        if vbias is not None:
            values = values + vbias.double()
        ov, ret = old_values.double(), returns.double()
        vclip = torch.maximum(torch.minimum(values, ov + cliprange_value), ov - cliprange_value)
        vloss = 0.5 * torch.maximum((values - ret) ** 2, (vclip - ret) ** 2)
        loss = loss + vf_coef * agg(vloss)
        gap = (vclip - ret) ** 2 - (values - ret) ** 2
        metrics.update({"loss/value": agg(vloss), "val/vpred": mean(values), "val/clipfrac": mean((gap > 0).double())})
        shift = ((values - ov).abs() - cliprange_value).abs()  # from the clamp's edge; clamped: the gap from 0 too
        edges["val/clipfrac"] = (gap > 0)[on], torch.where(vclip != values, torch.minimum(shift, gap.abs()), shift)[on]
    return loss, metrics, logp, edges


def make_ppo_problem(B=3, T=6, H=16, V=37, *, bias=True, value_head=True, ref=True, dtype=torch.float32):
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) / math.sqrt(H)).to(dtype)
    data = dict(hidden=hidden, weight=weight, bias=torch.randn(V).to(dtype) if bias else None,
                targets=torch.randint(0, V, (B, T)))
    logp, _ = reference_logprobs(hidden, weight, data["targets"], data["bias"])
    # old log-probs near the current ones so that some ratios fall inside and some outside the clip range
    data["old"] = (logp + 0.3 * torch.randn(B, T)).float()
    data["adv"] = torch.randn(B, T)
    data["mask"] = torch.rand(B, T) < 0.8
    data["mask"][:, 0] = True
    if ref:
        data["ref"] = (logp + 0.2 * torch.randn(B, T)).float()
    if value_head:
        data.update(vhead=torch.randn(H).to(dtype) / math.sqrt(H), vbias=torch.randn(()).to(dtype),
                    old_values=torch.randn(B, T), returns=torch.randn(B, T))
    return data


TRAINABLE = ("hidden", "weight", "bias", "vhead", "vbias")


def run_both(backend, data, tol=F32, chunk_size=None, **options):
    """Loss, metrics, log-probs and every gradient of ours vs the reference."""
    ours = {k: (v.clone().requires_grad_(True) if k in TRAINABLE and v is not None else v) for k, v in data.items()}
    ref = {k: (as_f64_leaf(v) if k in TRAINABLE and v is not None else v) for k, v in data.items()}
    out = fused_linear_ppo_loss(
        ours["hidden"], ours["weight"], ours["targets"], ours["old"], ours["adv"], mask=ours["mask"],
        bias=ours["bias"], ref_logprobs=ours.get("ref"), value_head_weight=ours.get("vhead"),
        value_head_bias=ours.get("vbias"), old_values=ours.get("old_values"), returns=ours.get("returns"),
        backend=backend, chunk_size=chunk_size, **options)
    ref_loss, ref_metrics, ref_logp, edges = reference_ppo(
        ref["hidden"], ref["weight"], ref["bias"], ref["targets"], ref["old"], ref["adv"], ref["mask"],
        ref=ref.get("ref"), vhead=ref.get("vhead"), vbias=ref.get("vbias"), old_values=ref.get("old_values"),
        returns=ref.get("returns"), **options)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **tol)
    torch.testing.assert_close(out.logprobs.double(), ref_logp.detach(), **tol)
    for name, value in ref_metrics.items():
        if name in edges:  # a share of decisions: those within the tolerance of their edge may go either way
            flags, distance = edges[name]
            assert_share_close(out.metrics[name], flags, distance.detach() <= tol["atol"] + tol["rtol"], name)
        else:
            torch.testing.assert_close(out.metrics[name].double(), value.detach(), **tol, msg=name)
    names = [k for k in TRAINABLE if ours.get(k) is not None]
    grads = torch.autograd.grad(out.loss, [ours[k] for k in names])
    ref_grads = torch.autograd.grad(ref_loss, [ref[k] for k in names])
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == ours[name].dtype
        torch.testing.assert_close(g.double(), rg, **tol, msg=lambda m: f"grad {name}: {m}")
    return out


@pytest.mark.parametrize("options", [
    dict(),
    dict(cliprange=0.1, cliprange_high=0.28),
    dict(dual_clip=3.0),
    dict(kl_coef=0.05, kl_estimator="k1"),
    dict(kl_coef=0.05, kl_estimator="k2"),
    dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01),
    dict(loss_agg="seq-mean-token-sum", temperature=0.7),
    dict(loss_agg="seq-mean-token-mean", cliprange_value=0.05, vf_coef=0.5),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_against_reference(backend, options):
    out = run_both(backend, make_ppo_problem(), **options)
    assert 0.0 < float(out.metrics["policy/clipfrac"]) < 1.0  # the problem exercises both branches


def test_deterministic_mode_against_reference(backend, monkeypatch):
    """$FASTALIGN_DETERMINISTIC=1: on triton the fixed vocab split, the epilogue and the atomic-free backward."""
    monkeypatch.setenv("FASTALIGN_DETERMINISTIC", "1")
    run_both(backend, make_ppo_problem(), kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


def test_policy_only_without_value_head_or_reference(backend):
    out = run_both(backend, make_ppo_problem(value_head=False, ref=False, bias=False))
    assert "loss/value" not in out.metrics and out.values is None


def test_multi_output_value_head(backend):
    data = make_ppo_problem(value_head=False)
    head, hbias = torch.randn(2, 16, requires_grad=True), torch.randn(2, requires_grad=True)
    old_values, returns = torch.randn(3, 6, 2), torch.randn(3, 6, 2)
    out = fused_linear_ppo_loss(data["hidden"], data["weight"], data["targets"], data["old"], data["adv"],
                                mask=data["mask"], value_head_weight=head, value_head_bias=hbias,
                                old_values=old_values, returns=returns, vf_coef=1.0, backend=backend)
    # each of the K outputs is a scalar head; the per-token value loss is their mean
    single = [fused_linear_ppo_loss(data["hidden"], data["weight"], data["targets"], data["old"], data["adv"],
                                    mask=data["mask"], value_head_weight=head[k], value_head_bias=hbias[k],
                                    old_values=old_values[..., k], returns=returns[..., k], vf_coef=1.0,
                                    backend=backend).metrics["loss/value"] for k in range(2)]
    torch.testing.assert_close(out.metrics["loss/value"], (single[0] + single[1]) / 2, **F32)
    assert out.values.shape == (3, 6, 2)


def test_fully_masked_batch_gives_zero_loss_and_zero_grads(backend):
    data = make_ppo_problem()
    data["mask"][:] = False
    for loss_agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        h = data["hidden"].clone().requires_grad_(True)
        w = data["weight"].clone().requires_grad_(True)
        v = data["vhead"].clone().requires_grad_(True)
        out = fused_linear_ppo_loss(h, w, data["targets"], data["old"], data["adv"], mask=data["mask"],
                                    ref_logprobs=data["ref"], kl_coef=0.1, entropy_coef=0.01,
                                    value_head_weight=v, old_values=data["old_values"], returns=data["returns"],
                                    loss_agg=loss_agg, backend=backend)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0
        assert all(torch.isfinite(m) for m in out.metrics.values())
        for t in (h, w, v):
            assert torch.isfinite(t.grad).all() and t.grad.abs().max() == 0


def test_ignored_targets_are_masked(backend):
    data = make_ppo_problem()
    data["targets"][0, 2:] = -100
    run_both(backend, data, kl_coef=0.1, entropy_coef=0.02)


def test_two_half_batches_with_global_normalizer_give_the_whole_gradient(backend):
    data = make_ppo_problem(B=4)
    total = int(data["mask"].sum())
    w_whole = data["weight"].clone().requires_grad_(True)
    h_whole = data["hidden"].clone().requires_grad_(True)
    common = lambda d, sl, h, w, **kw: fused_linear_ppo_loss(  # noqa: E731
        h[sl], w, d["targets"][sl], d["old"][sl], d["adv"][sl], mask=d["mask"][sl], bias=d["bias"],
        ref_logprobs=d["ref"][sl], kl_coef=0.05, backend=backend, value_head_weight=d["vhead"],
        old_values=d["old_values"][sl], returns=d["returns"][sl], **kw)
    whole = common(data, slice(None), h_whole, w_whole)
    whole.loss.backward()
    w_acc = data["weight"].clone().requires_grad_(True)
    h_acc = data["hidden"].clone().requires_grad_(True)
    halves = [common(data, sl, h_acc, w_acc, num_tokens=total) for sl in (slice(0, 2), slice(2, 4))]
    for half in halves:
        half.loss.backward()
    torch.testing.assert_close(halves[0].loss + halves[1].loss, whole.loss, **F32)
    torch.testing.assert_close(w_acc.grad, w_whole.grad, **F32)
    torch.testing.assert_close(h_acc.grad, h_whole.grad, **F32)


def test_frozen_lm_head_trains_hidden_and_value_head(backend):
    data = make_ppo_problem()
    h = data["hidden"].clone().requires_grad_(True)
    v = data["vhead"].clone().requires_grad_(True)
    out = fused_linear_ppo_loss(h, data["weight"], data["targets"], data["old"], data["adv"], mask=data["mask"],
                                value_head_weight=v, old_values=data["old_values"], returns=data["returns"],
                                backend=backend)
    out.loss.backward()
    assert data["weight"].grad is None and h.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


def test_no_grad_forward_matches(backend):
    data = make_ppo_problem()
    with torch.no_grad():
        out = fused_linear_ppo_loss(data["hidden"], data["weight"], data["targets"], data["old"], data["adv"],
                                    mask=data["mask"], bias=data["bias"], backend=backend)
    ref_loss, *_ = reference_ppo(data["hidden"], data["weight"], data["bias"], data["targets"], data["old"],
                                 data["adv"], data["mask"])
    assert out.loss.grad_fn is None
    torch.testing.assert_close(out.loss.double(), ref_loss, **F32)


def test_fp16_inputs(backend):
    data = make_ppo_problem(dtype=torch.float16)
    run_both(backend, data, tol=dict(rtol=5e-3, atol=5e-3), kl_coef=0.05, entropy_coef=0.01)


def test_torch_backend_small_chunks_agree():
    run_both("torch", make_ppo_problem(), chunk_size=2, kl_coef=0.05, entropy_coef=0.01)


class TestBadInput:
    def call(self, d=None, **overrides):
        d = make_ppo_problem() if d is None else d
        args = dict(hidden=d["hidden"], weight=d["weight"], targets=d["targets"], old_logprobs=d["old"],
                    advantages=d["adv"], mask=d["mask"], backend="torch")
        args.update(overrides)
        return fused_linear_ppo_loss(**args)

    def test_old_logprobs_shape(self):
        with pytest.raises(ValueError, match=r"old_logprobs: expected shape \(3, 6\)"):
            self.call(old_logprobs=torch.zeros(3, 5))

    def test_advantages_shape(self):
        with pytest.raises(ValueError, match=r"advantages: expected shape \(3, 6\)"):
            self.call(advantages=torch.zeros(6, 3))

    def test_mask_shape(self):
        with pytest.raises(ValueError, match=r"mask: expected shape \(3, 6\)"):
            self.call(mask=torch.ones(3, 7, dtype=torch.bool))

    def test_fractional_mask_is_refused(self):
        mask = torch.ones(3, 6)
        mask[0, 2] = 0.5
        with pytest.raises(ValueError, match=r"mask: expected a bool or 0/1 mask, got 1 other value\(s\) \(e.g. 0.5\)"):
            self.call(mask=mask)

    def test_float_and_int_01_masks_equal_the_bool_mask(self):
        d = make_ppo_problem()
        bool_loss = self.call(d, mask=d["mask"]).loss
        for dtype in (torch.float32, torch.int64):
            torch.testing.assert_close(self.call(d, mask=d["mask"].to(dtype)).loss, bool_loss, rtol=0, atol=0)

    def test_num_tokens_below_the_batch_count(self):
        d = make_ppo_problem()
        own = int((d["mask"] & (d["targets"] != -100)).sum())
        with pytest.raises(ValueError, match=rf"num_tokens: expected at least this batch's own count \({own} "):
            self.call(d, num_tokens=own - 1)
        self.call(d, num_tokens=own)

    def test_value_head_without_targets(self):
        with pytest.raises(ValueError, match="old_values: required with a value head"):
            self.call(value_head_weight=torch.zeros(16), returns=torch.zeros(3, 6))
        with pytest.raises(ValueError, match="returns: required with a value head"):
            self.call(value_head_weight=torch.zeros(16), old_values=torch.zeros(3, 6))

    def test_value_targets_without_head(self):
        with pytest.raises(ValueError, match="value_head_weight: required when old_values"):
            self.call(old_values=torch.zeros(3, 6))

    def test_value_head_width(self):
        with pytest.raises(ValueError, match=r"value_head_weight: expected shape \[H=16\]"):
            self.call(value_head_weight=torch.zeros(15), old_values=torch.zeros(3, 6), returns=torch.zeros(3, 6))

    def test_kl_without_reference(self):
        with pytest.raises(ValueError, match="ref_logprobs: required when kl_coef"):
            self.call(kl_coef=0.1)

    def test_bad_options(self):
        with pytest.raises(ValueError, match="kl_estimator"):
            self.call(kl_estimator="k4")
        with pytest.raises(ValueError, match="loss_agg"):
            self.call(loss_agg="mean")
        with pytest.raises(ValueError, match="dual_clip"):
            self.call(dual_clip=0.5)

    def test_nan_advantages(self):
        adv = torch.zeros(3, 6)
        adv[1, 1] = float("nan")
        with pytest.raises(ValueError, match="advantages: expected finite values"):
            self.call(advantages=adv)
