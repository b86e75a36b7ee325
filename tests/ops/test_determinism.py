"""Deterministic mode (issue 16): a row's log-prob, entropy and every row statistic are bitwise the same alone or
inside any batch, at any position, with any chunk size or memory budget; gradients repeat bit for bit; the option
reaches every op. The default mode is shown to differ on this machine's CPU matmuls (a 1-row product takes another
kernel than a many-row one), so the tests can fail."""
from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.kernels.row_stats import RowStatsSpec
from fastalign.ops import torch_backend
from conftest import BACKENDS
from helpers.reference import as_f64_leaf, reference_logprobs

H, V = 32, 300
SIZES = (2, 7, 64, 513)
CHUNKINGS = (dict(chunk_size=None), dict(chunk_size=5), dict(chunk_size=None, budget_mb="0.05"))
"""Three chunkings: the default budget (one block), 5 rows per chunk, and a tiny memory budget."""
EVERY_STAT = RowStatsSpec(entropy=True, lse2=True, logit_sum=True, argmax=True)


def problem(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.3
    targets = torch.randint(0, V, (n,), generator=g)
    return hidden, weight, bias, targets


def embed(probe_hidden, probe_targets, n: int, seed: int):
    """``n`` rows of random others (every 3rd one ignored: padding) with the probe rows at a random position."""
    hidden, _, _, targets = problem(n, seed=seed + 100)
    targets[::3] = -100
    start = int(torch.randint(0, n - probe_hidden.shape[0] + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    rows = slice(start, start + probe_hidden.shape[0])
    hidden[rows], targets[rows] = probe_hidden, probe_targets
    return hidden, targets, rows


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


@pytest.fixture(params=[torch_backend.VOCAB_TILE, 128], ids=["tile4096", "tile128"])
def vocab_tile(request, monkeypatch):
    """The real vocabulary tile (V=300: one tile) and a 128-column one (three tiles merged, the last partial)."""
    monkeypatch.setattr(torch_backend, "VOCAB_TILE", request.param)
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    """64-row blocks: several blocks and chunks of them in problems of a few hundred rows."""
    monkeypatch.setattr(torch_backend, "BLOCK_ROWS", 64)


def test_row_statistics_are_batch_invariant(vocab_tile, monkeypatch):
    hidden, weight, bias, targets = problem(1)
    kw = dict(inv_temperature=1 / 0.7, ignore_index=-100, spec=EVERY_STAT)
    differs = {}
    for deterministic in (False, True):
        alone = torch_backend.linear_lse_forward(hidden, weight, bias, targets, deterministic=deterministic, **kw)
        differs[deterministic] = []
        for n in SIZES:
            big_hidden, big_targets, rows = embed(hidden, targets, n, seed=n)
            for chunking in CHUNKINGS:
                monkeypatch.setenv("FASTALIGN_CHUNK_BUDGET_MB", chunking.get("budget_mb", "48"))
                stats = torch_backend.linear_lse_forward(big_hidden, weight, bias, big_targets,
                                                         chunk_size=chunking["chunk_size"],
                                                         deterministic=deterministic, **kw)
                differs[deterministic] += [(n, chunking, field) for field, a, b in
                                           zip(stats._fields, stats.rows(rows), alone) if not same(a, b)]
    assert differs[True] == []
    assert differs[False], "the default mode never differed: this test would not see a batch-variant backend"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1"))])
def test_deterministic_mode_matches_float64_reference(backend):
    """Values and gradients (log-prob and entropy upstream, bias, temperature, ignored rows, N not a multiple of
    the block) against materialized float64 logits; on triton, the fixed vocab split and the atomic-free backward."""
    hidden, weight, bias, targets = problem(131)
    targets[::4] = -100
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = fastalign.fused_linear_logprobs(*leaves[:2], targets, bias=leaves[2], temperature=0.8,
                                              return_entropy=True, backend=backend, deterministic=True)
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(131, generator=g), torch.randn(131, generator=g)
    grads = torch.autograd.grad((lp * up_lp + ent * up_ent).sum(), leaves)
    ref = [as_f64_leaf(t) for t in (hidden, weight, bias)]
    ref_lp, ref_ent = reference_logprobs(*ref[:2], targets, ref[2], temperature=0.8)
    ref_grads = torch.autograd.grad((ref_lp * up_lp.double() + ref_ent * up_ent.double()).sum(), ref)
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # Log-prob upstream only, frozen weight (on torch the weight moments' path).
    frozen = fastalign.fused_linear_logprobs(leaves[0], weight, targets, bias=bias, backend=backend, deterministic=True)
    (grad_h,) = torch.autograd.grad((frozen * up_lp).sum(), [leaves[0]])
    ref_h = as_f64_leaf(hidden)
    (want_h,) = torch.autograd.grad((reference_logprobs(ref_h, weight, targets, bias)[0] * up_lp.double()).sum(),
                                    [ref_h])
    torch.testing.assert_close(grad_h.double(), want_h, rtol=1e-4, atol=1e-5)


def test_frozen_weight_is_batch_invariant(vocab_tile, small_blocks):
    """A frozen weight (the forward forms the weight moments, the backward is elementwise): a row's log-prob,
    entropy and ``d hidden`` are bitwise the same alone or inside batches (several 64-row blocks, the last padded),
    the values bitwise those of the no-grad forward; the gradients against float64 logits."""
    hidden, weight, bias, targets = problem(3, seed=7)
    targets[1] = -100
    g = torch.Generator().manual_seed(2)
    up_lp, up_ent = torch.randn(3, generator=g), torch.randn(3, generator=g)

    def run(h, t, rows):
        leaf = h.clone().requires_grad_(True)
        lp, ent = fastalign.fused_linear_logprobs(leaf, weight, t, bias=bias, temperature=0.8, return_entropy=True,
                                                  backend="torch", deterministic=True)
        (grad,) = torch.autograd.grad((lp[rows] * up_lp).sum() + (ent[rows] * up_ent).sum(), [leaf])
        with torch.no_grad():
            no_grad = fastalign.fused_linear_logprobs(h, weight, t, bias=bias, temperature=0.8, return_entropy=True,
                                                      backend="torch", deterministic=True)
        assert same(lp, no_grad[0]) and same(ent, no_grad[1])
        return lp[rows], ent[rows], grad[rows]

    alone = run(hidden, targets, slice(0, 3))
    for n in (7, 64, 150):
        big_hidden, big_targets, rows = embed(hidden, targets, n, seed=n)
        assert all(same(a, b) for a, b in zip(run(big_hidden, big_targets, rows), alone)), n
    ref = as_f64_leaf(hidden)
    lp, ent = reference_logprobs(ref, weight, targets, bias, temperature=0.8)
    (want,) = torch.autograd.grad((lp * up_lp.double() + ent * up_ent.double()).sum(), [ref])
    torch.testing.assert_close(alone[0].double(), lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[1].double(), ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[2].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.3])
def test_one_pass_deterministic_gradients_match_float64_reference(vocab_tile, small_blocks, entropy_coef):
    """GRPO (dapo, on-policy: ratio exp(lp - lp.detach()) = 1) in one pass, deterministic: the loss
    ``-sum(A lp_ratio m) / sum(m) - c sum(H m) / sum(m)`` and its gradients against float64 logits; 3 sequences of 90
    tokens (five 64-row blocks in chunks of one, and with the 128-column tile three vocabulary tiles)."""
    hidden, weight, bias, targets = problem(270, seed=11)
    targets = targets.view(3, 90)
    targets[1, 60:] = -100
    adv = torch.tensor([0.7, -1.1, 0.4])
    leaves = [t.clone().requires_grad_(True) for t in (hidden.view(3, 90, H), weight, bias)]
    out = fastalign.fused_linear_grpo_loss(*leaves[:2], targets, adv, bias=leaves[2], entropy_coef=entropy_coef,
                                           temperature=0.9, chunk_size=100, backend="torch", deterministic=True)
    grads = torch.autograd.grad(out.loss, leaves)
    ref = [as_f64_leaf(t) for t in (hidden.view(3, 90, H), weight, bias)]
    lp, ent = reference_logprobs(*ref[:2], targets, ref[2], temperature=0.9)
    m = (targets != -100).double()
    ratio = torch.exp(lp - lp.detach())
    want = -(adv.double()[:, None] * ratio * m).sum() / m.sum() - entropy_coef * (ent * m).sum() / m.sum()
    want_grads = torch.autograd.grad(want, ref)
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logprobs.double(), lp.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def _grpo(hidden, weight, bias, targets, advantages, cu_seqlens, deterministic, chunk_size):
    return fastalign.fused_linear_grpo_loss(hidden, weight, targets, advantages, bias=bias, cu_seqlens=cu_seqlens,
                                            backend="torch", deterministic=deterministic, chunk_size=chunk_size)


def test_ops_are_batch_invariant_padded_and_packed():
    """The log-prob op (padded rows), GRPO on a packed batch (cu_seqlens) and PPO on a padded [B, T] batch: the
    probe's log-probs and entropy alone and inside batches, with three chunk sizes."""
    probe_h, weight, bias, probe_t = problem(3, seed=7)
    differs = {False: 0, True: 0}
    for deterministic in (False, True):
        alone_lp, alone_ent = fastalign.fused_linear_logprobs(probe_h[:1], weight, probe_t[:1], bias=bias,
                                                              return_entropy=True, backend="torch",
                                                              deterministic=deterministic)
        seq_alone = _grpo(probe_h, weight, bias, probe_t, torch.ones(1), torch.tensor([0, 3]), deterministic, None)
        ppo_alone = fastalign.fused_linear_ppo_loss(probe_h[None], weight, probe_t[None], torch.zeros(1, 3),
                                                    torch.ones(1, 3), bias=bias, backend="torch",
                                                    compute_entropy=True, deterministic=deterministic)
        for n in SIZES:
            for chunk_size in (None, 4, 50):
                hid, tgt, rows = embed(probe_h[:1], probe_t[:1], n, seed=n)
                lp, ent = fastalign.fused_linear_logprobs(hid, weight, tgt, bias=bias, return_entropy=True,
                                                          backend="torch", chunk_size=chunk_size,
                                                          deterministic=deterministic)
                differs[deterministic] += (not same(lp[rows], alone_lp)) + (not same(ent[rows], alone_ent))
                # Packed: the probe sequence among sequences of 2 rows; n + 3 rows in all.
                hid, tgt, rows = embed(probe_h, probe_t, n + 3, seed=n + 1)
                cuts = sorted({0, n + 3, rows.start, rows.stop, *range(rows.stop % 2, n + 3, 2)} - set(
                    range(rows.start + 1, rows.stop)))
                out = _grpo(hid.requires_grad_(True), weight, bias, tgt, torch.ones(len(cuts) - 1),
                            torch.tensor(cuts), deterministic, chunk_size)
                differs[deterministic] += (not same(out.logprobs[rows], seq_alone.logprobs)) + (
                    not same(out.entropy[rows], seq_alone.entropy))
                # Padded [B, 3]: the probe sequence at a random row b.
                b = max(1, n // 3)
                hid = torch.randn(b, 3, H)
                tgt = torch.randint(0, V, (b, 3))
                at = n % b
                hid[at], tgt[at] = probe_h, probe_t
                ppo = fastalign.fused_linear_ppo_loss(hid.requires_grad_(True), weight, tgt, torch.zeros(b, 3),
                                                      torch.ones(b, 3), bias=bias, backend="torch",
                                                      compute_entropy=True, chunk_size=chunk_size,
                                                      deterministic=deterministic)
                differs[deterministic] += (not same(ppo.logprobs[at], ppo_alone.logprobs[0])) + (
                    not same(ppo.entropy[at], ppo_alone.entropy[0]))
    assert differs[True] == 0
    assert differs[False] > 0, "the default mode never differed: this test would not see a batch-variant op"


def test_gradients_repeat_bit_for_bit_whatever_the_chunking(small_blocks, monkeypatch):
    """Three runs of GRPO (per-token loss, one pass by default) with three chunkings (which walk the rows in
    different chunks, so the default mode sums d weight in a different order; the deterministic one walks whole
    64-row blocks in row order whatever the chunks): deterministic gradients are bitwise equal, the default ones
    are not."""
    hidden, weight, bias, targets = problem(300, seed=3)
    targets[::7] = -100
    adv = torch.randn(1)
    results = {}
    for deterministic in (False, True):
        runs = []
        for chunking in CHUNKINGS:
            monkeypatch.setenv("FASTALIGN_CHUNK_BUDGET_MB", chunking.get("budget_mb", "48"))
            leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
            out = _grpo(*leaves[:2], leaves[2], targets, adv, torch.tensor([0, 300]), deterministic,
                        chunking["chunk_size"])
            runs.append(torch.autograd.grad(out.loss, leaves))
        results[deterministic] = [all(same(a, b) for a, b in zip(run, runs[0])) for run in runs[1:]]
    assert results[True] == [True, True]
    assert not all(results[False]), "the default gradients never differed between chunkings"


def _every_op(deterministic):
    """Each public op once on a tiny problem (2 pairs / sequences of 3 tokens)."""
    hidden, weight, bias, targets = problem(12, seed=5)
    h3, t3 = hidden.view(4, 3, H), targets.view(4, 3)
    kw = dict(backend="auto", deterministic=deterministic)
    zeros = torch.zeros(2)
    fastalign.fused_linear_logprobs(hidden, weight, targets, bias=bias, **kw)
    fastalign.FusedLinearLogProbs(**kw)(hidden, weight, targets, bias)
    fastalign.fused_linear_ppo_loss(h3, weight, t3, torch.zeros(4, 3), torch.ones(4, 3), **kw)
    fastalign.fused_linear_grpo_loss(h3, weight, t3, torch.ones(4), **kw)
    fastalign.fused_linear_dpo_loss(h3, weight, t3, ref_chosen_logps=zeros, ref_rejected_logps=zeros, **kw)
    fastalign.fused_linear_kto_loss(h3, weight, t3, torch.tensor([True, False, True, False]),
                                    ref_logps=torch.zeros(4), kl=torch.zeros(()), **kw)
    fastalign.fused_linear_cpo_loss(h3, weight, t3, **kw)
    fastalign.fused_linear_orpo_loss(h3, weight, t3, **kw)
    fastalign.fused_linear_rloo_loss(h3, weight, t3, torch.ones(4), **kw)


OPS = 9


@pytest.mark.parametrize("how", ["argument", "env", "torch_flag"])
def test_the_option_reaches_every_op(how, monkeypatch):
    calls = []
    invariant = torch_backend._invariant_lse_forward
    monkeypatch.setattr(torch_backend, "_invariant_lse_forward", lambda *a: calls.append(1) or invariant(*a))
    _every_op(False)
    assert calls == []
    if how == "argument":
        _every_op(True)
    elif how == "env":
        monkeypatch.setenv("FASTALIGN_DETERMINISTIC", "1")
        _every_op(None)
    else:
        torch.use_deterministic_algorithms(True)
        try:
            _every_op(None)
        finally:
            torch.use_deterministic_algorithms(False)
    assert len(calls) >= OPS


def test_bad_deterministic_options(monkeypatch):
    hidden, weight, _, targets = problem(2)
    with pytest.raises(TypeError, match="deterministic: expected a bool or None, got int"):
        fastalign.fused_linear_logprobs(hidden, weight, targets, deterministic=1)
    monkeypatch.setenv("FASTALIGN_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match=r"\$FASTALIGN_DETERMINISTIC: expected 0 or 1, got 'yes'"):
        fastalign.fused_linear_logprobs(hidden, weight, targets)


triton_only = pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.slow
@triton_only
def test_triton_rows_are_batch_invariant(monkeypatch):
    """Triton (under the interpreter here): the probe row's log-prob and entropy, from the log-prob op and from the
    PPO epilogue path, alone and at a random position in batches of 2, 7 and 64 rows, with 3 chunk sizes (a
    torch-backend option: shown not to matter); bitwise equal in deterministic mode. The control is structural: the
    default mode splits the vocabulary differently at these sizes (1 and 4 token blocks), the deterministic mode
    never; whether the default's other merge order also changes the last bit depends on the CPU (it does on the AMD
    EPYC, not on the Intel Xeon), so that is not asserted."""
    from fastalign.kernels import lse_forward
    splits = {False: set(), True: set()}
    sized = lse_forward.tiles_per_split

    def recorded(*args, **kwargs):
        per_split = sized(*args, **kwargs)
        splits[kwargs["deterministic"]].add(per_split)
        return per_split

    monkeypatch.setattr(lse_forward, "tiles_per_split", recorded)
    probe_h, weight, bias, probe_t = problem(1, seed=7)
    differs = 0
    for deterministic in (False, True):
        kw = dict(bias=bias, backend="triton", deterministic=deterministic)
        alone = fastalign.fused_linear_logprobs(probe_h, weight, probe_t, return_entropy=True, **kw)
        ppo_alone = fastalign.fused_linear_ppo_loss(probe_h[None].requires_grad_(True), weight, probe_t[None],
                                                    torch.zeros(1, 1), torch.ones(1, 1), compute_entropy=True, **kw)
        assert same(ppo_alone.logprobs[0], alone[0])
        if not deterministic:
            continue
        for n in SIZES[:3]:
            for chunk_size in (None, 4, 50):
                hid, tgt, rows = embed(probe_h, probe_t, n, seed=n)
                lp, ent = fastalign.fused_linear_logprobs(hid, weight, tgt, return_entropy=True,
                                                          chunk_size=chunk_size, **kw)
                differs += (not same(lp[rows], alone[0])) + (not same(ent[rows], alone[1]))
                ppo = fastalign.fused_linear_ppo_loss(hid[None].requires_grad_(True), weight, tgt[None],
                                                      torch.zeros(1, n), torch.ones(1, n), compute_entropy=True,
                                                      chunk_size=chunk_size, **kw)
                differs += (not same(ppo.logprobs[0, rows], ppo_alone.logprobs[0])) + (
                    not same(ppo.entropy[0, rows], ppo_alone.entropy[0]))
    assert differs == 0
    assert len(splits[True]) == 1, f"deterministic mode split the vocabulary in several ways: {splits[True]}"
    # the default mode at the same sizes (its results are not compared: see the docstring)
    for n in SIZES[:3]:
        hid, tgt, _ = embed(probe_h, probe_t, n, seed=n)
        fastalign.fused_linear_logprobs(hid, weight, tgt, bias=bias, backend="triton", deterministic=False)
    assert len(splits[False]) > 1, f"the default mode split the vocabulary one way only ({splits[False]}): " \
        "this test would not see a batch-variant split"


@pytest.mark.slow
@triton_only
def test_triton_gradients_repeat_bit_for_bit(monkeypatch):
    """Triton, deterministic: 3 runs of the log-prob op (log-prob and entropy upstream, bias, temperature, ignored
    rows) with a workspace of 32 rows (several chunks: d weight and d bias summed across chunks), and 3 runs of
    the PPO op: bitwise equal gradients. (Under the interpreter the atomic kernel is sequential too, so the default
    mode cannot be shown to differ here; the compile test shows that the deterministic kernels hold no atomics.)"""
    from fastalign.kernels import logprobs_backward

    monkeypatch.setattr(logprobs_backward, "WORKSPACE_BYTES", 32 * V * 4)
    hidden, weight, bias, targets = problem(40, seed=4)
    targets[::6] = -100
    up = torch.randn(2, 40, generator=torch.Generator().manual_seed(2))
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        lp, ent = fastalign.fused_linear_logprobs(*leaves[:2], targets, bias=leaves[2], temperature=0.9,
                                                  return_entropy=True, backend="triton", deterministic=True)
        grads = torch.autograd.grad((lp * up[0] + ent * up[1]).sum(), leaves)
        out = fastalign.fused_linear_ppo_loss(leaves[0].view(4, 10, H), leaves[1], targets.view(4, 10),
                                              -up[0].abs().view(4, 10), up[1].view(4, 10), bias=leaves[2],
                                              backend="triton", compute_entropy=True, entropy_coef=0.1,
                                              deterministic=True)
        runs.append(grads + torch.autograd.grad(out.loss, leaves))
    assert all(same(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    assert all(g.abs().max() > 0 for g in runs[0])
