"""Packed (padding-free) batches: every op (GRPO, PPO, DPO and rankings, KTO, CPO/SimPO, ORPO) on S sequences
concatenated into N rows (``cu_seqlens`` or ``position_ids``) gives the loss, metrics and gradients of the same
sequences padded to ``[S, L]``, for random length mixes with length-1 sequences and sequences without completion
tokens; only the packed rows get logits. (The padded ops are checked against independent references in their own
test files; here the packed layout is checked against the padded one.)"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastalign import (fused_linear_cpo_loss, fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_kto_loss,
                       fused_linear_orpo_loss, fused_linear_ppo_loss)
from fastalign.ops.segments import packed_layout

H, V = 8, 29


def padded_and_packed(lengths: list[int], prompt: list[int], seed: int):
    """A padded problem ``[S, L]`` and its packing: sequence s has ``lengths[s]`` rows, the first ``prompt[s]`` of
    them prompt (ignored) tokens."""
    g = torch.Generator().manual_seed(seed)
    s, longest = len(lengths), max(lengths)
    hidden = torch.randn(s, longest, H, generator=g)
    targets = torch.randint(0, V, (s, longest), generator=g)
    for i, (n, p) in enumerate(zip(lengths, prompt)):
        targets[i, :p] = -100
        targets[i, n:] = -100
    old = -3 + torch.randn(s, longest, generator=g)
    ref = old + 0.3 * torch.randn(s, longest, generator=g)
    per_token = {"old_logprobs": old, "ref_logprobs": ref, "importance_sampling_ratio": 0.5 + torch.rand(
        s, longest, generator=g)}
    keep = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # rows that exist
    packed = {"hidden": hidden[keep], "targets": targets[keep], **{k: v[keep] for k, v in per_token.items()}}
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    padded = {"hidden": hidden, "targets": targets, **per_token}
    return padded, packed, keep, cu, position_ids, torch.randn(s, generator=g)


def run(inputs, weight, advantages, backend, **kw):
    h, w = inputs["hidden"].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    others = {k: v for k, v in inputs.items() if k not in ("hidden", "targets")}
    out = fused_linear_grpo_loss(h, w, inputs["targets"], advantages, backend=backend, **others, **kw)
    return out, torch.autograd.grad(out.loss, [h, w])


OPTIONS = [dict(loss_type="grpo", beta=0.05, entropy_coef=0.01),
           dict(loss_type="dapo", importance_sampling_level="sequence", off_policy_mask_threshold=0.5),
           dict(loss_type="luspo", importance_sampling_level="sequence"),
           dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.02)]


def check_packed_equals_padded(lengths, prompt, options, backend, seed=0, use_position_ids=False,
                               dtype=torch.float32):
    """float64 where the options hold a discontinuity (the entropy quantile, the off-policy threshold) that fp32
    rounding, different in a packed chunk and a padded one, could cross."""
    padded, packed, keep, cu, position_ids, advantages = padded_and_packed(lengths, prompt, seed)
    padded, packed = ({k: v.to(dtype) if v.is_floating_point() else v for k, v in d.items()} for d in (padded, packed))
    advantages = advantages.to(dtype)
    weight = torch.randn(V, H, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    kw = dict(options, max_completion_length=max(lengths))
    want, (dh, dw) = run(padded, weight, advantages, backend, **kw)
    layout = dict(position_ids=position_ids) if use_position_ids else dict(cu_seqlens=cu)
    got, (gh, gw) = run(packed, weight, advantages, backend, **layout, **kw)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, **tol)
    assert set(got.metrics) == set(want.metrics)
    for k in want.metrics:
        torch.testing.assert_close(got.metrics[k], want.metrics[k], equal_nan=True, **tol)
    torch.testing.assert_close(got.logprobs, want.logprobs[keep], **tol)
    torch.testing.assert_close(got.entropy, want.entropy[keep], **tol)
    torch.testing.assert_close(gh, dh[keep], **tol)
    torch.testing.assert_close(gw, dw, **tol)
    assert float(dh[~keep].abs().sum()) == 0.0  # padded rows: no gradient (and no logits)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_packed_equals_padded_property(data):
    lengths = data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=5))
    prompt = [data.draw(st.integers(0, n)) for n in lengths]  # prompt == length: no completion token at all
    options = data.draw(st.sampled_from(OPTIONS))
    check_packed_equals_padded(lengths, prompt, options, "torch", seed=data.draw(st.integers(0, 100)),
                               use_position_ids=data.draw(st.booleans()), dtype=torch.float64)


@pytest.mark.parametrize("options", OPTIONS[:3], ids=lambda o: o["loss_type"])  # no quantile in fp32
def test_packed_equals_padded_every_backend(backend, options):
    check_packed_equals_padded([5, 1, 3, 4], [1, 0, 3, 2], options, backend, use_position_ids=True)


def test_packed_layout_errors():
    device = torch.device("cpu")
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets"):
        packed_layout(5, device, cu_seqlens=torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets .* to the 5 packed rows"):
        packed_layout(5, device, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype"):
        packed_layout(5, device, cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match="position_ids: expected each packed sequence to count 0, 1, 2"):
        packed_layout(4, device, position_ids=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="position_ids: expected each packed sequence to count"):
        packed_layout(3, device, position_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"position_ids: expected shape \(4,\) or \(1, 4\)"):
        packed_layout(4, device, position_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="expected either cu_seqlens or position_ids"):
        packed_layout(2, device, cu_seqlens=torch.tensor([0, 2]), position_ids=torch.tensor([0, 1]))
    layout = packed_layout(5, device, cu_seqlens=torch.tensor([0, 2, 2, 5]))  # an empty sequence in the middle
    assert layout.shape == (3, 3)
    assert layout.index.tolist() == [0, 1, 6, 7, 8]


def test_packed_shapes_are_checked():
    hidden, weight = torch.randn(6, H), torch.randn(V, H)
    targets, cu = torch.randint(0, V, (6,)), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=r"advantages: expected shape \(2,\) or \(6,\)"):
        fused_linear_grpo_loss(hidden, weight, targets, torch.zeros(6, 1), cu_seqlens=cu, backend="torch")
    with pytest.raises(ValueError, match=r"hidden: expected shape \[N, H\] or \[1, N, H\]"):
        fused_linear_grpo_loss(hidden.view(2, 3, H), weight, targets.view(2, 3), torch.zeros(2), cu_seqlens=cu)
    out = fused_linear_grpo_loss(hidden.unsqueeze(0), weight, targets.unsqueeze(0), torch.zeros(2), cu_seqlens=cu,
                                 backend="torch")
    assert out.logprobs.shape == (1, 6)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_packed_ppo_equals_padded(backend, loss_agg):
    """PPO's per-sequence aggregation, value head and KL on a packed batch equal the padded batch's."""
    lengths, prompt = [4, 1, 6, 3], [1, 1, 2, 0]  # the second sequence has no response token
    padded, packed, keep, cu, _, _ = padded_and_packed(lengths, prompt, seed=3)
    g = torch.Generator().manual_seed(4)
    s, longest = len(lengths), max(lengths)
    extra = {k: torch.randn(s, longest, generator=g) for k in ("advantages", "old_values", "returns")}
    weight, head = torch.randn(V, H, generator=g), torch.randn(H, generator=g)

    def run_ppo(x, extra, **kw):
        h, w, vh = (t.clone().requires_grad_(True) for t in (x["hidden"], weight, head))
        out = fused_linear_ppo_loss(h, w, x["targets"], x["old_logprobs"], extra["advantages"],
                                    ref_logprobs=x["ref_logprobs"], kl_coef=0.1, value_head_weight=vh,
                                    old_values=extra["old_values"], returns=extra["returns"], loss_agg=loss_agg,
                                    backend=backend, **kw)
        return out, torch.autograd.grad(out.loss, [h, w, vh])

    want, (dh, dw, dvh) = run_ppo(padded, extra)
    got, (gh, gw, gvh) = run_ppo(packed, {k: v[keep] for k, v in extra.items()}, cu_seqlens=cu)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, **tol)
    for k in want.metrics:
        torch.testing.assert_close(got.metrics[k], want.metrics[k], **tol)
    torch.testing.assert_close(gh, dh[keep], **tol)
    torch.testing.assert_close(gw, dw, **tol)
    torch.testing.assert_close(gvh, dvh, **tol)


# Preference ops: S = K*B sequences, the B best (chosen) first. Each case: (op, K, options); the per-sequence inputs
# (reference log-probs, labels, KL) are made by ``sequence_inputs``, the per-token ones (ref_hidden, nll_targets)
# are packed like hidden.
PREFERENCE_CASES = {
    "dpo_sigmoid": (fused_linear_dpo_loss, 2, dict(loss_type="sigmoid", beta=0.2)),
    "dpo_mix_rpo": (fused_linear_dpo_loss, 2, dict(loss_type=["ipo", "sigmoid_norm", "sft"], rpo_alpha=0.5,
                                                   loss_weights=[0.5, 1.0, 0.3])),
    "dpo_ld_wpo_vocab": (fused_linear_dpo_loss, 2, dict(loss_type="robust", label_smoothing=0.1, ld_alpha=0.4,
                                                        use_weighting=True, vocab_metrics=True)),
    "dpo_aot_average": (fused_linear_dpo_loss, 2, dict(loss_type=["aot", "apo_zero"], average_log_prob=True)),
    "dpo_ref_hidden": (fused_linear_dpo_loss, 2, dict(loss_type="exo_pair", ref_hidden=True)),
    "ranking": (fused_linear_dpo_loss, 3, dict(loss_type=["sigmoid", "sft"], num_responses=3)),
    "kto": (fused_linear_kto_loss, 1, dict(loss_type="kto", desirable_weight=1.3)),
    "kto_apo": (fused_linear_kto_loss, 1, dict(loss_type="apo_zero_unpaired")),
    "cpo": (fused_linear_cpo_loss, 2, dict(loss_type="sigmoid", cpo_alpha=0.7)),
    "simpo": (fused_linear_cpo_loss, 2, dict(loss_type="simpo", simpo_gamma=0.3)),
    "orpo": (fused_linear_orpo_loss, 2, dict(beta=0.3, nll_targets=True)),
}


def sequence_inputs(op, k: int, options: dict, s: int, dtype, g: torch.Generator) -> dict:
    """The per-sequence arguments of a preference case: reference log-probs ``[K, B]`` or labels and KL."""
    b = s // k
    if op is fused_linear_kto_loss:
        kl = torch.rand((), generator=g).to(dtype) if options["loss_type"] == "kto" else None
        return dict(labels=torch.rand(s, generator=g) < 0.5, ref_logps=(-5 * torch.rand(s, generator=g)).to(dtype),
                    kl=kl)
    if op is fused_linear_dpo_loss and not options.get("ref_hidden"):
        return dict(ref_logps=(-5 * torch.rand(k, b, generator=g)).to(dtype))
    return {}


def run_preference(op, hidden, weight, targets, extra, backend, **kw):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = op(h, w, targets, **extra, backend=backend, **kw)
    return out, torch.autograd.grad(out.loss, [h, w])


def check_preference_packed_equals_padded(case: str, lengths, prompt, backend, seed=0, use_position_ids=False,
                                          dtype=torch.float32):
    op, k, options = PREFERENCE_CASES[case]
    options = dict(options)
    padded, packed, keep, cu, position_ids, _ = padded_and_packed(lengths, prompt, seed)
    g = torch.Generator().manual_seed(seed + 2)
    s, longest = len(lengths), max(lengths)
    hidden, weight = padded["hidden"].to(dtype), torch.randn(V, H, generator=g).to(dtype)
    extra_padded = sequence_inputs(op, k, options, s, dtype, g)
    extra_packed = dict(extra_padded)
    if options.pop("ref_hidden", False):
        ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g).to(dtype)
        extra_padded.update(ref_hidden=ref_hidden, ref_weight=weight)
        extra_packed.update(ref_hidden=ref_hidden[keep], ref_weight=weight)
    if options.pop("nll_targets", False):  # the chosen sequences' prompt and response tokens, ignored elsewhere
        nll = torch.randint(0, V, (s, longest), generator=g)
        nll = torch.where(padded["targets"] != -100, padded["targets"], nll)
        nll[:, 0] = -100  # a first prompt token outside the NLL
        nll[~keep] = -100
        nll[s // 2:] = -100
        extra_padded["nll_targets"], extra_packed["nll_targets"] = nll[:s // 2], nll[keep]
    layout = dict(position_ids=position_ids) if use_position_ids else dict(cu_seqlens=cu)
    want, (dh, dw) = run_preference(op, hidden, weight, padded["targets"], extra_padded, backend, **options)
    got, (gh, gw) = run_preference(op, hidden[keep], weight, packed["targets"], extra_packed, backend, **layout,
                                   **options)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, **tol)
    assert set(got.metrics) == set(want.metrics)
    for name in want.metrics:
        torch.testing.assert_close(got.metrics[name], want.metrics[name], equal_nan=True, **tol)
    for name in ("logps", "rewards"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol)
    torch.testing.assert_close(gh, dh[keep], **tol)
    torch.testing.assert_close(gw, dw, **tol)
    assert float(dh[~keep].abs().sum()) == 0.0


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_preference_packed_equals_padded_property(data):
    case = data.draw(st.sampled_from(sorted(PREFERENCE_CASES)))
    k = PREFERENCE_CASES[case][1]
    b = data.draw(st.integers(1, 3))
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=k * b, max_size=k * b))
    prompt = [data.draw(st.integers(0, n)) for n in lengths]  # prompt == length: no completion token at all
    check_preference_packed_equals_padded(case, lengths, prompt, "torch", seed=data.draw(st.integers(0, 100)),
                                          use_position_ids=data.draw(st.booleans()), dtype=torch.float64)


@pytest.mark.parametrize("case", ["dpo_sigmoid", "dpo_ld_wpo_vocab", "ranking", "kto", "simpo", "orpo"])
def test_preference_packed_equals_padded_every_backend(backend, case):
    k = PREFERENCE_CASES[case][1]
    lengths, prompt = [5, 1, 3, 4, 6, 2][:2 * k], [1, 1, 3, 2, 0, 1][:2 * k]  # one length-1, one empty completion
    check_preference_packed_equals_padded(case, lengths, prompt, backend, use_position_ids=True)


def test_preference_packed_layout_errors():
    hidden, weight, targets = torch.randn(6, H), torch.randn(V, H), torch.randint(0, V, (6,))
    with pytest.raises(ValueError, match="cu_seqlens: expected a multiple 2B of packed sequences .*got 3"):
        fused_linear_dpo_loss(hidden, weight, targets, cu_seqlens=torch.tensor([0, 2, 4, 6]), reference_free=True)
    with pytest.raises(ValueError, match="position_ids: expected a multiple 3B of packed sequences .*got 2"):
        fused_linear_dpo_loss(hidden, weight, targets, position_ids=torch.tensor([0, 1, 2, 0, 1, 2]),
                              reference_free=True, num_responses=3)
    with pytest.raises(ValueError, match=r"ref_chosen_logps: expected shape \(2,\)"):
        fused_linear_dpo_loss(hidden, weight, targets, cu_seqlens=torch.tensor([0, 1, 2, 4, 6]),
                              ref_chosen_logps=torch.zeros(4), ref_rejected_logps=torch.zeros(4))
    with pytest.raises(ValueError, match=r"hidden: expected shape \[N, H\] or \[1, N, H\]"):
        fused_linear_cpo_loss(hidden.view(2, 3, H), weight, targets.view(2, 3), cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        fused_linear_kto_loss(hidden, weight, targets, torch.ones(6, dtype=torch.bool), ref_logps=torch.zeros(6),
                              kl=None, loss_type="apo_zero_unpaired", cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="nll_targets: expected ignore_index .* on the rejected sequences"):
        fused_linear_orpo_loss(hidden, weight, targets, nll_targets=targets, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match=r"nll_targets: expected shape \(6,\)"):
        fused_linear_orpo_loss(hidden, weight, targets, nll_targets=targets[:3], cu_seqlens=torch.tensor([0, 3, 6]))
