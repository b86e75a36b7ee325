"""Packed (padding-free) batches: the GRPO op on S sequences concatenated into N rows (``cu_seqlens`` or
``position_ids``) gives the loss, metrics and gradients of the same sequences padded to ``[S, L]``, for random
length mixes with length-1 sequences and sequences without completion tokens; only the packed rows get logits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastalign import fused_linear_grpo_loss, fused_linear_ppo_loss
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
