"""fused_linear_dpo_loss against a naive float64 reference (materialized logits), on every backend and strategy."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign import DPOLossOutput, fused_linear_dpo_loss
from fastalign.objectives.dpo import DPO_LOSS_TYPES, DPOOptions, RunningMean, dpo_metrics, dpo_sequence_loss, \
    sequence_logps
from fastalign.ops import torch_backend
from fastalign.ops.dispatch import available_backends
from helpers.noise import assert_share_close, near
from helpers.reference import as_f64_leaf, reference_logprobs
from helpers.reference_dpo import (plackett_luce_reference, trl_dpo)

# fp32 against float64: sums of a few token log-probs, errors ~1e-6 relative; bounds 100x that.
F32 = dict(rtol=1e-4, atol=1e-5)
SMOOTHING = {"sigmoid": 0.2, "robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}
TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"}


@dataclass
class Engine:
    """A backend and the strategy forced on it: "pairs" (chunks of whole pairs, torch only), "two_passes", or None
    for whichever ``chunk`` gives (not checked)."""

    backend: str
    strategy: str | None
    chunk: int | None = None
    fused_calls: list = field(default_factory=list)

    def chunk_size(self, length: int) -> int | None:
        if self.backend != "torch" or self.strategy is None:
            return self.chunk
        return 4 * length if self.strategy == "pairs" else 1  # a group has at most K*T rows; most have more than 1


ENGINES = [("torch", "pairs"), ("torch", "two_passes")] + [("triton", "two_passes")] * (
    "triton" in available_backends())


def spied_engine(param, monkeypatch) -> Engine:
    """A backend and strategy; records the calls of the one-pass whole-pair engine to check the strategy taken."""
    eng = Engine(*param)
    fused = torch_backend.linear_logprobs_fused

    def spy(*args, **kwargs):
        eng.fused_calls.append(kwargs.get("chunks"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "linear_logprobs_fused", spy)
    return eng


def engine_ids(e):
    return f"{e[0]}-{e[1]}"


@pytest.fixture(params=ENGINES, ids=engine_ids)
def engine(request, monkeypatch):
    return spied_engine(request.param, monkeypatch)


@pytest.fixture(params=[e for e in ENGINES if e[0] == "torch"], ids=engine_ids)
def torch_engine(request, monkeypatch):
    """The torch backend's strategies only (bf16: the Triton interpreter has none, see DESIGN.md)."""
    return spied_engine(request.param, monkeypatch)


@pytest.fixture(params=[e for e in ENGINES if e[1] == "two_passes"], ids=engine_ids)
def two_pass_engine(request, monkeypatch):
    return spied_engine(request.param, monkeypatch)


def make_batch(pairs, length, width, vocab, *, dtype=torch.float32, bias=False, prompt=True, responses=2):
    """Policy ``hidden [K*B, T, H]``, ``weight``, ``bias``, ``targets`` with random prompt lengths and padding."""
    rows = responses * pairs
    hidden = torch.randn(rows, length, width).to(dtype)
    weight = (torch.randn(vocab, width) / width ** 0.5).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (rows, length))
    if prompt:
        pos = torch.arange(length)
        start = torch.randint(0, max(length // 2, 1), (rows, 1))  # prompt tokens are ignored
        end = torch.randint(length // 2 + 1, length + 1, (rows, 1))  # and so is the padding after `end`
        targets[(pos < start) | (pos >= end)] = -100
    return hidden, weight, b, targets


def reference_tokens(hidden, weight, targets, bias=None, *, temperature=1.0):
    """Per-token log-probs ``[K*B, T]`` from float64 logits (0 off the completion)."""
    return reference_logprobs(hidden, weight, targets, bias, temperature=temperature)[0]


def reference_logits(hidden, weight, bias, temperature):
    """Float64 tempered logits ``[K*B, T, V]``."""
    return ((hidden.double() @ weight.double().T) + (0 if bias is None else bias.double())) / temperature


def reference_dpo(hidden, weight, targets, bias, reference, options, *, average, temperature=1.0, bco_state=None):
    """``(DPOResult, logps [K, B])`` in float64: log-probs from materialized logits, the loss of
    ``dpo_sequence_loss`` (itself checked against TRL's code in test_objectives_dpo_trl.py); WPO's
    ``log sum_v p_v^2`` from the materialized logits too."""
    tokens = reference_tokens(hidden, weight, targets, bias, temperature=temperature)
    denoms = None
    if options.use_weighting:
        with torch.no_grad():
            denoms = torch.logsumexp(2 * torch.log_softmax(reference_logits(hidden, weight, bias, temperature), -1),
                                     -1)
    mask = targets != -100
    if isinstance(reference, tuple):  # computed: the reference model's token log-probs
        ref_tokens = reference_tokens(*(None if t is None else t.double() for t in reference[:2]), targets,
                                      None if reference[2] is None else reference[2].double(),
                                      temperature=temperature)
        reference = sequence_logps(ref_tokens, mask, options, average_log_prob=average)
    elif reference is not None:
        reference = reference.double()
    return dpo_sequence_loss(tokens, mask, reference, options, average_log_prob=average, bco_state=bco_state,
                             token_log_denoms=denoms)


def make_reference(kind, hidden, weight, targets, bias, options, *, average, temperature=1.0):
    """Keyword arguments of the op for a reference of ``kind``, and the reference as ``reference_dpo`` takes it."""
    if kind == "free":
        return dict(reference_free=True), None
    ref_hidden = torch.randn_like(hidden.float()).to(hidden.dtype)
    ref_weight = (weight.float() + 0.1 * torch.randn_like(weight.float())).to(weight.dtype)
    ref_bias = None if bias is None else torch.randn_like(bias.float()).to(bias.dtype)
    if kind == "computed":
        return dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias), (ref_hidden, ref_weight,
                                                                                       ref_bias)
    tokens = reference_tokens(ref_hidden.double(), ref_weight.double(), targets,
                              None if ref_bias is None else ref_bias.double(), temperature=temperature)
    logps = sequence_logps(tokens, targets != -100, options, average_log_prob=average).float()
    if options.num_responses == 2:
        return dict(ref_chosen_logps=logps[0], ref_rejected_logps=logps[1]), logps
    return dict(ref_logps=logps), logps


def check_dpo(engine, hidden, weight, targets, bias=None, *, reference="computed", average_log_prob=None,
              temperature=1.0, train=("hidden", "weight", "bias"), tol=F32, grad_tol=None, bco_state=None,
              vocab_metrics=False, **option_kwargs) -> DPOLossOutput:
    """Loss, rewards, log-probs, metrics and gradients against ``reference_dpo``; the strategy that ran."""
    average = bool(average_log_prob)
    option_kwargs.setdefault("beta", 0.1)
    options = DPOOptions(reference_free=reference == "free", **option_kwargs)
    ref_kwargs, ref = make_reference(reference, hidden, weight, targets, bias, options, average=average,
                                     temperature=temperature)
    names = ("hidden", "weight", "bias")
    ours = {n: None if t is None else t.detach().clone().requires_grad_(n in train)
            for n, t in zip(names, (hidden, weight, bias))}
    theirs = {n: as_f64_leaf(t) for n, t in zip(names, (hidden, weight, bias))}
    out = fused_linear_dpo_loss(ours["hidden"], ours["weight"], targets, bias=ours["bias"],
                                average_log_prob=average_log_prob, temperature=temperature, backend=engine.backend,
                                chunk_size=engine.chunk_size(targets.shape[1]), bco_state=bco_state,
                                vocab_metrics=vocab_metrics, **option_kwargs, **ref_kwargs)
    expected, logps = reference_dpo(theirs["hidden"], theirs["weight"], targets, theirs["bias"], ref, options,
                                    average=average, temperature=temperature, bco_state=bco_state)
    k, b = logps.shape

    assert isinstance(out, DPOLossOutput) and out.loss.shape == () and out.loss.dtype == torch.float32
    close = lambda got, want, what: torch.testing.assert_close(  # noqa: E731
        got.double(), want.detach(), **tol, msg=lambda m: f"{what}: {m}")
    close(out.loss, expected.loss, "loss")
    for name, got, want in (("chosen_rewards", out.chosen_rewards, expected.rewards[0]),
                            ("rejected_rewards", out.rejected_rewards, expected.rewards[-1]),
                            ("chosen_logps", out.chosen_logps, logps[0]),
                            ("rejected_logps", out.rejected_logps, logps[-1]),
                            ("rewards", out.rewards, expected.rewards), ("logps", out.logps, logps)):
        assert got.dtype == torch.float32 and not got.requires_grad, name
        close(got, want, name)
    want_metrics = dpo_metrics(expected, logps)
    top2_gaps = None
    if vocab_metrics:  # TRL's metrics over the vocabulary, from the materialized float64 logits
        with torch.no_grad():
            z = reference_logits(theirs["hidden"], theirs["weight"], theirs["bias"], temperature)
            mask = targets != -100
            rank = torch.arange(k).repeat_interleave(b)[:, None].expand_as(mask)
            ent = reference_logprobs(theirs["hidden"], theirs["weight"], targets, theirs["bias"],
                                     temperature=temperature)[1]
            top2 = z.topk(min(2, z.shape[-1]), dim=-1).values
            top2_gaps = (top2[..., 0] - top2[..., -1])[mask & (rank == 0)]
            correct = z.argmax(-1) == targets
            for name, m in zip(("logits/chosen", "logits/rejected"), (rank == 0, rank == k - 1)):
                want_metrics[name] = (z.mean(-1) * temperature * (mask & m)).sum() / (mask & m).sum().clamp(min=1)
            want_metrics["entropy"] = (ent * mask).sum() / mask.sum().clamp(min=1)
            best = mask & (rank == 0)
            want_metrics["mean_token_accuracy"] = (correct & best).sum() / best.sum().clamp(min=1)
    assert set(out.metrics) == set(want_metrics)
    assert TRL_METRICS <= set(out.metrics)
    i, j = torch.triu_indices(k, k, offset=1)
    margins = (expected.rewards[i] - expected.rewards[j]).detach()  # [pairs of ranks, B]
    noise = 10 * (tol["atol"] + tol["rtol"] * float(expected.rewards.abs().max()))
    ambiguous = near(margins, [0.0], noise)
    for name, value in out.metrics.items():
        assert value.shape == () and not value.requires_grad, name
        # step functions: margins within 10x the tolerance of 0 may go either way
        if name == "rewards/accuracies":
            assert_share_close(value, margins > 0, ambiguous, name)
        elif name == "rewards/ranking_accuracy":
            assert_share_close(value, (margins > 0).all(0), ambiguous.any(0), name)
        elif name == "mean_token_accuracy":  # arg-max: tokens whose two top logits are within noise may go either way
            best = (targets != -100)[:b]
            flags = (reference_logits(theirs["hidden"], theirs["weight"], theirs["bias"], temperature).argmax(-1)
                     == targets)[:b][best]
            assert_share_close(value, flags, top2_gaps <= 1e-4, name)
        else:
            close(value, want_metrics[name], name)

    trained = [n for n in names if ours[n] is not None and n in train]
    if trained:
        grads = torch.autograd.grad(out.loss, [ours[n] for n in trained])
        want = torch.autograd.grad(expected.loss, [theirs[n] for n in trained])
        for name, g, w in zip(trained, grads, want):
            assert g.dtype == ours[name].dtype and g.shape == ours[name].shape, name
            torch.testing.assert_close(g.double(), w, **(grad_tol or tol), msg=lambda m: f"grad {name}: {m}")
        if engine.strategy is not None:
            coupled = (bool({"aot", "aot_unpaired"} & set(options.loss_types)) or bco_state is not None
                       or (options.use_weighting and "sft" in options.loss_types))
            expected_fused = engine.strategy == "pairs" and bool((targets != -100).any()) and not coupled
            assert bool(engine.fused_calls) == expected_fused, f"strategy {engine.strategy} did not run"
    return out


# --- against the reference ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type, average_log_prob", [(t, False) for t in DPO_LOSS_TYPES]
                         + [(t, True) for t in ("sigmoid", "ipo", "sigmoid_norm", "sft")])
def test_loss_types(engine, loss_type, average_log_prob):
    hidden, weight, bias, targets = make_batch(3, 7, 16, 37)
    # beta 0.5: sizeable gradients in every loss type (ipo's target margin 1/beta, apo's sigmoids)
    check_dpo(engine, hidden, weight, targets, loss_type=loss_type, beta=0.5,
              label_smoothing=SMOOTHING.get(loss_type, 0.0), average_log_prob=average_log_prob)


@pytest.mark.parametrize("reference", ["computed", "precomputed", "free"])
def test_reference_kinds_with_bias_and_temperature(engine, reference):
    hidden, weight, bias, targets = make_batch(2, 9, 24, 41, bias=True)
    check_dpo(engine, hidden, weight, targets, bias, reference=reference, temperature=0.7)


@pytest.mark.parametrize("loss_type,average_log_prob", [("sigmoid", False), ("sigmoid", True), ("ipo", None)])
def test_rpo(engine, loss_type, average_log_prob):
    hidden, weight, bias, targets = make_batch(3, 8, 16, 29)
    check_dpo(engine, hidden, weight, targets, loss_type=loss_type, average_log_prob=average_log_prob,
              rpo_alpha=0.7)


def trl_check(engine, loss_type, *, seed=0, **kwargs):
    """The op with precomputed reference SUMS (as TRL precomputes them) against TRL's code, written out in float64
    in reference_dpo.py: loss and gradient w.r.t. hidden."""
    torch.manual_seed(seed)
    hidden, weight, bias, targets = make_batch(3, 8, 16, 29, bias=True)
    ref_hidden = torch.randn_like(hidden)
    mask = targets != -100
    ref_tokens = reference_tokens(ref_hidden.double(), weight.double(), targets, bias.double())
    options = DPOOptions(loss_type=loss_type, beta=0.5, **kwargs)
    ref = sequence_logps(ref_tokens, mask, options).float()  # TRL's compute_ref_log_probs: sums (LD-weighted)
    leaf = hidden.clone().requires_grad_(True)
    out = fused_linear_dpo_loss(leaf, weight, targets, bias=bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                loss_type=loss_type, beta=0.5, backend=engine.backend,
                                chunk_size=engine.chunk_size(8), **kwargs)
    theirs = as_f64_leaf(hidden)
    tokens = reference_tokens(theirs, weight.double(), targets, bias.double())
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trl_kwargs = {k: v for k, v in kwargs.items() if k != "loss_weights"}
    logits = reference_logits(theirs, weight, bias, 1.0).detach() if kwargs.get("use_weighting") else None
    expected = trl_dpo(tokens, ref_tokens, mask, types, kwargs.get("loss_weights"), beta=0.5, logits=logits,
                       **trl_kwargs)[0]
    torch.testing.assert_close(out.loss.double(), expected.detach(), **F32)
    torch.testing.assert_close(torch.autograd.grad(out.loss, leaf)[0].double(),
                               torch.autograd.grad(expected, theirs)[0], **F32)
    return out, expected


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_precomputed_sums_give_trls_length_normalized_losses(engine, loss_type):
    """ipo and sigmoid_norm take precomputed reference sums, as TRL's trainer precomputes them (no per-token means
    expected from the user), and divide the log-ratios by the completion lengths."""
    trl_check(engine, loss_type)


def test_mpo_list_loss_matches_trl(engine):
    trl_check(engine, ["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_matches_trl(engine, kind):
    trl_check(engine, ["sigmoid", "ipo"], f_divergence_type=kind, f_alpha_divergence_coef=0.3)


def test_ld_dpo_matches_trl(engine):
    out, _ = trl_check(engine, "sigmoid", ld_alpha=0.4)
    plain, _ = trl_check(engine, "sigmoid")
    assert abs(out.loss.item() - plain.loss.item()) > 1e-4  # the tail weighting changed the loss


@pytest.mark.parametrize("reference", ["computed", "precomputed"])
def test_ranking_of_three(engine, reference):
    """K = 3 responses per prompt, best first: the Plackett-Luce loss, metrics and gradients; with LD-DPO and sft."""
    hidden, weight, bias, targets = make_batch(2, 7, 16, 31, bias=True, responses=3)
    out = check_dpo(engine, hidden, weight, targets, bias, reference=reference, num_responses=3, beta=0.5)
    assert "rewards/ranking_accuracy" in out.metrics and out.rewards.shape == (3, 2)
    # the loss is -log P(ranking) of the rewards the op returns, written out with loops
    assert out.loss.item() == pytest.approx(plackett_luce_reference(out.rewards.double().tolist()), rel=1e-5)
    check_dpo(engine, hidden, weight, targets, bias, reference=reference, num_responses=3, beta=0.5,
              loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], ld_alpha=0.5)


def test_bco_pair_running_mean_through_the_op(engine):
    hidden, weight, bias, targets = make_batch(2, 6, 16, 23)
    state = RunningMean.initial()
    for _ in range(2):
        out = check_dpo(engine, hidden, weight, targets, loss_type="bco_pair", beta=0.5, bco_state=state)
        assert out.bco_state.count.item() == pytest.approx(state.count.item() + 1)
        state = out.bco_state


@pytest.mark.parametrize("responses", [2, 3])
def test_vocabulary_metrics(engine, responses):
    """entropy, logits/chosen, logits/rejected, mean_token_accuracy from the pass's row statistics."""
    hidden, weight, bias, targets = make_batch(2, 6, 16, 23, bias=True, responses=responses)
    weight = weight * 4  # peaked distributions: some arg-max hits
    out = check_dpo(engine, hidden, weight, targets, bias, vocab_metrics=True, temperature=0.8,
                    num_responses=responses)
    assert {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"} <= set(out.metrics)


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "bco_pair", "sft"], "ipo"])
def test_wpo_weighting(engine, loss_type):
    """use_weighting: TRL's WPO weights from lse(2z) computed in the pass, against materialized float64 logits."""
    hidden, weight, bias, targets = make_batch(3, 7, 16, 29, bias=True)
    check_dpo(engine, hidden, weight, targets, bias, loss_type=loss_type, use_weighting=True, beta=0.5,
              temperature=0.9, vocab_metrics=True)


def test_wpo_matches_trl(engine):
    trl_check(engine, ["sigmoid", "sft"], use_weighting=True)


@pytest.mark.parametrize("layout", ["chosen_fully_masked", "one_pair", "one_token", "nothing_to_learn"])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_odd_layouts(engine, layout, average_log_prob):
    """A sequence without response tokens has log-prob 0, sum or mean, and no gradient."""
    pairs, length = {"one_pair": (1, 10), "one_token": (3, 1)}.get(layout, (2, 6))
    hidden, weight, bias, targets = make_batch(pairs, length, 16, 23, bias=True, prompt=layout != "one_token")
    if layout == "chosen_fully_masked":
        targets[1] = -100
    if layout == "nothing_to_learn":
        targets[:] = -100
    check_dpo(engine, hidden, weight, targets, bias, average_log_prob=average_log_prob, rpo_alpha=1.0)


def test_frozen_weight_and_frozen_hidden(engine):
    hidden, weight, bias, targets = make_batch(2, 7, 16, 31, bias=True)
    check_dpo(engine, hidden, weight, targets, bias, train=("hidden",))
    check_dpo(engine, hidden, weight, targets, bias, train=("weight", "bias"))


def check_half_precision(engine, dtype):
    hidden, weight, bias, targets = make_batch(2, 8, 32, 97, dtype=dtype, bias=True)
    # fp32 math on half inputs; the gradients are rounded to the input dtype at the end
    eps = torch.finfo(dtype).eps
    check_dpo(engine, hidden, weight, targets, bias, reference="computed",
              grad_tol=dict(rtol=2 * eps, atol=2 * eps * 0.05))


def test_fp16(engine):
    check_half_precision(engine, torch.float16)


def test_bf16(torch_engine):
    check_half_precision(torch_engine, torch.bfloat16)


@settings(max_examples=25, deadline=None)
@given(pairs=st.integers(1, 3), length=st.integers(1, 6), vocab=st.integers(1, 13), ignore=st.floats(0.0, 1.0),
       chunk=st.none() | st.integers(1, 13), loss_type=st.sampled_from(DPO_LOSS_TYPES),
       average_log_prob=st.booleans(), rpo_alpha=st.sampled_from([None, 0.5]),
       reference=st.sampled_from(["computed", "precomputed", "free"]), seed=st.integers(0, 2 ** 16))
def test_property_random_layouts_torch_backend(pairs, length, vocab, ignore, chunk, loss_type, average_log_prob,
                                               rpo_alpha, reference, seed):
    torch.manual_seed(seed)
    hidden, weight, bias, targets = make_batch(pairs, length, 4, vocab, bias=True, prompt=False)
    targets[torch.rand(targets.shape) < ignore] = -100
    check_dpo(Engine("torch", None, chunk), hidden, weight, targets, bias, reference=reference, beta=0.5,
              loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0),
              average_log_prob=average_log_prob, rpo_alpha=rpo_alpha)


# --- autograd behaviour -------------------------------------------------------------------------------------------

def test_no_grad_gives_the_same_outputs(engine):
    hidden, weight, _, targets = make_batch(2, 6, 16, 23)
    kwargs = dict(ref_chosen_logps=-torch.rand(2) * 5, ref_rejected_logps=-torch.rand(2) * 5,
                  backend=engine.backend, chunk_size=engine.chunk_size(6), rpo_alpha=0.5)
    with torch.no_grad():
        quiet = fused_linear_dpo_loss(hidden.requires_grad_(True), weight, targets, **kwargs)
    assert not quiet.loss.requires_grad and not engine.fused_calls  # forward only: one matmul
    loud = fused_linear_dpo_loss(hidden, weight, targets, **kwargs)
    assert loud.loss.requires_grad
    for got, want in zip(quiet[:5], loud[:5]):
        torch.testing.assert_close(got, want.detach())
    assert quiet.metrics.keys() == loud.metrics.keys()


def test_upstream_gradient_scales_and_backward_can_repeat(engine):
    hidden, weight, _, targets = make_batch(2, 6, 16, 23)
    hidden.requires_grad_(True)
    kwargs = dict(reference_free=True, backend=engine.backend, chunk_size=engine.chunk_size(6))
    (grad,) = torch.autograd.grad(fused_linear_dpo_loss(hidden, weight, targets, **kwargs).loss, hidden)
    loss = fused_linear_dpo_loss(hidden, weight, targets, **kwargs).loss
    (scaled,) = torch.autograd.grad(-3.0 * loss, hidden, retain_graph=True)
    torch.testing.assert_close(scaled, -3.0 * grad)
    (again,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(again, grad)



@pytest.mark.parametrize("tensor_counts", [False, True])
def test_global_normalizers_make_two_halves_add_up(engine, tensor_counts):
    """Two halves of a batch, each with the whole batch's ``num_pairs`` and ``num_chosen_tokens``, sum to the whole
    batch's loss and gradients (data parallel, gradient accumulation)."""
    hidden, weight, bias, targets = make_batch(4, 6, 16, 23, bias=True)
    ref = -torch.rand(8) * 5
    kwargs = dict(rpo_alpha=0.5, loss_type="robust", label_smoothing=0.1, backend=engine.backend,
                  chunk_size=engine.chunk_size(6))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    whole = fused_linear_dpo_loss(leaves[0], leaves[1], targets, bias=leaves[2], ref_chosen_logps=ref[:4],
                                  ref_rejected_logps=ref[4:], **kwargs)
    want = torch.autograd.grad(whole.loss, leaves)
    num_pairs, num_chosen = 4, int((targets[:4] != -100).sum())
    if tensor_counts:
        num_pairs, num_chosen = torch.tensor(num_pairs), torch.tensor([num_chosen])
    loss, grads = 0.0, [torch.zeros_like(t) for t in leaves]
    for pairs in ([0, 1], [2, 3]):
        rows = pairs + [4 + p for p in pairs]  # chosen, then rejected, of the same pairs
        part = fused_linear_dpo_loss(leaves[0][rows], leaves[1], targets[rows], bias=leaves[2],
                                     ref_chosen_logps=ref[pairs], ref_rejected_logps=ref[[4 + p for p in pairs]],
                                     num_pairs=num_pairs, num_chosen_tokens=num_chosen, **kwargs)
        loss = loss + part.loss.detach()
        grads = [g + d for g, d in zip(grads, torch.autograd.grad(part.loss, leaves))]
    torch.testing.assert_close(loss, whole.loss.detach(), rtol=1e-5, atol=1e-6)
    for name, got, expected in zip(("hidden", "weight", "bias"), grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {name}: {m}")


def test_bad_global_normalizers():
    hidden, weight, _, targets = make_batch(2, 5, 8, 11)
    call = lambda **kw: fused_linear_dpo_loss(hidden, weight, targets, reference_free=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"num_pairs: expected an int >= 2 \(at least the pairs in this batch\), "
                                         r"got 1"):
        call(num_pairs=1)
    with pytest.raises(TypeError, match="num_chosen_tokens: expected an int or a one-element tensor, got float"):
        call(num_chosen_tokens=3.0, rpo_alpha=1.0)
    with pytest.raises(ValueError, match=r"num_pairs: expected an int or a one-element tensor, got shape \(2,\)"):
        call(num_pairs=torch.tensor([2, 2]))

@pytest.mark.parametrize("chunk_size", [100, 2])
def test_gradcheck_float64_torch_backend(chunk_size):
    hidden, weight, bias, targets = make_batch(2, 4, 5, 7, dtype=torch.float64, bias=True)
    ref_logps = -torch.rand(4, dtype=torch.float64)

    def loss(h, w, b):
        return fused_linear_dpo_loss(h, w, targets, bias=b, ref_chosen_logps=ref_logps[:2],
                                     ref_rejected_logps=ref_logps[2:], loss_type="nca_pair", rpo_alpha=0.3,
                                     backend="torch", chunk_size=chunk_size).loss

    assert torch.autograd.gradcheck(loss, [t.requires_grad_(True) for t in (hidden, weight, bias)])


# --- strategy -----------------------------------------------------------------------------------------------------

def test_long_pair_takes_two_passes_within_the_budget(two_pass_engine, monkeypatch):
    """A pair beyond the whole-pair limit runs in two passes over chunks of the budget: memory O(chunk)."""
    engine = two_pass_engine
    hidden, weight, _, targets = make_batch(1, 12, 8, 97, prompt=False)  # one pair of 24 rows
    monkeypatch.setenv("FASTALIGN_CHUNK_BUDGET_MB", str(2 * 97 * 4 / 2 ** 20))  # 2 rows: pairs up to 2 * 8 rows
    monkeypatch.setattr(Engine, "chunk_size", lambda self, length: None)
    check_dpo(engine, hidden, weight, targets)


# --- bad input ----------------------------------------------------------------------------------------------------

class TestBadInput:
    def setup_method(self):
        self.hidden, self.weight, _, self.targets = make_batch(2, 5, 8, 11)
        self.ref = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))

    def call(self, **kwargs):
        args = dict(hidden=self.hidden, weight=self.weight, targets=self.targets, backend="torch", **self.ref)
        args.update(kwargs)
        return fused_linear_dpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)

    def test_odd_number_of_rows(self):
        with pytest.raises(ValueError, match=r"hidden: expected a multiple 2B >= 2 .* got shape \(3, 5, 8\)"):
            self.call(hidden=self.hidden[:3], targets=self.targets[:3])

    def test_hidden_not_3d(self):
        with pytest.raises(ValueError, match=r"hidden: expected shape \[2B, T, H\].* got \(20, 8\)"):
            self.call(hidden=self.hidden.reshape(20, 8), targets=self.targets.reshape(20))

    def test_targets_shape(self):
        with pytest.raises(ValueError, match=r"targets: expected shape \(4, 5\)"):
            self.call(targets=self.targets[:, :4])

    def test_missing_reference(self):
        with pytest.raises(ValueError, match="ref_chosen_logps: expected the reference log-probs .* reference_free"):
            self.call(ref_chosen_logps=None, ref_rejected_logps=None)
        with pytest.raises(ValueError, match="ref_rejected_logps: required with ref_chosen_logps"):
            self.call(ref_rejected_logps=None)
        with pytest.raises(ValueError, match="ref_weight: required with ref_hidden"):
            self.call(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=self.hidden)

    def test_both_references_or_reference_free_with_one(self):
        with pytest.raises(ValueError, match="either precomputed .* not both"):
            self.call(ref_hidden=self.hidden, ref_weight=self.weight)
        with pytest.raises(ValueError, match="ref_chosen_logps: expected None with reference_free=True"):
            self.call(reference_free=True)

    def test_reference_shapes(self):
        with pytest.raises(ValueError, match=r"ref_chosen_logps: expected shape \(2,\) .* got \(4,\)"):
            self.call(ref_chosen_logps=torch.zeros(4))
        computed = dict(ref_chosen_logps=None, ref_rejected_logps=None)
        with pytest.raises(ValueError, match=r"ref_hidden: expected shape \(4, 5, 8\) \(the shape of hidden\)"):
            self.call(**computed, ref_hidden=self.hidden[:, :4], ref_weight=self.weight)
        with pytest.raises(ValueError, match=r"ref_weight: expected shape \(11, 8\) \(the shape of weight\)"):
            self.call(**computed, ref_hidden=self.hidden, ref_weight=self.weight[:10])
        with pytest.raises(ValueError, match=r"ref_bias: expected shape \(11,\)"):
            self.call(**computed, ref_hidden=self.hidden, ref_weight=self.weight, ref_bias=torch.zeros(10))
        with pytest.raises(TypeError, match="ref_weight: expected dtype torch.float32 .* got torch.float16"):
            self.call(**computed, ref_hidden=self.hidden, ref_weight=self.weight.half())

    def test_non_finite_reference(self):
        with pytest.raises(ValueError, match="ref_rejected_logps: expected finite values"):
            self.call(ref_rejected_logps=torch.tensor([0.0, float("nan")]))

    def test_bad_options(self):
        with pytest.raises(ValueError, match="loss_type: expected names from"):
            self.call(loss_type="kto")
        with pytest.raises(ValueError, match="label_smoothing: expected \\[0.0, 0.5\\) for loss_type 'sigmoid'"):
            self.call(label_smoothing=0.5)
        with pytest.raises(TypeError, match="bco_state: expected a RunningMean or None, got tuple"):
            self.call(loss_type="bco_pair", bco_state=(0.0, 1.0))
        with pytest.raises(ValueError, match="ref_logps: expected the reference log-probs \\[K, B\\] with "
                                             "num_responses=3"):
            self.call(hidden=self.hidden[:3], targets=self.targets[:3], num_responses=3,
                      ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))
        with pytest.raises(ValueError, match="label_smoothing"):
            self.call(loss_type="hinge", label_smoothing=0.1)
        with pytest.raises(ValueError, match="beta: expected a positive number"):
            self.call(beta=0.0)
        with pytest.raises(TypeError, match="average_log_prob: expected a bool or None"):
            self.call(average_log_prob=1)
        with pytest.raises(ValueError, match="chunk_size"):
            self.call(chunk_size=0)
