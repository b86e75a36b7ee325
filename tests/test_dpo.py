"""fused_linear_dpo_loss against a naive float64 reference (materialized logits), on every backend and strategy."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign import DPOLossOutput, fused_linear_dpo_loss
from fastalign.objectives.dpo import DPO_LOSS_TYPES, DPOOptions, dpo_loss, dpo_metrics
from fastalign.ops import torch_backend
from fastalign.ops.dispatch import available_backends
from fastalign.ops.dpo import PAIR_BUDGET_CHUNKS, whole_pair_chunks
from noise import assert_share_close, near
from reference import as_f64_leaf, reference_logprobs

# fp32 against float64: sums of a few token log-probs, errors ~1e-6 relative; bounds 100x that.
F32 = dict(rtol=1e-4, atol=1e-5)
SMOOTHING = {"sigmoid": 0.2, "robust": 0.2}  # label smoothing where the loss type takes it
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
        return 2 * length if self.strategy == "pairs" else 1  # a pair has at most 2T rows; most have more than 1


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


def make_batch(pairs, length, width, vocab, *, dtype=torch.float32, bias=False, prompt=True):
    """Policy ``hidden [2B, T, H]``, ``weight``, ``bias``, ``targets`` with random prompt lengths and padding."""
    hidden = torch.randn(2 * pairs, length, width).to(dtype)
    weight = (torch.randn(vocab, width) / width ** 0.5).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (2 * pairs, length))
    if prompt:
        pos = torch.arange(length)
        start = torch.randint(0, max(length // 2, 1), (2 * pairs, 1))  # prompt tokens are ignored
        end = torch.randint(length // 2 + 1, length + 1, (2 * pairs, 1))  # and so is the padding after `end`
        targets[(pos < start) | (pos >= end)] = -100
    return hidden, weight, b, targets


def reference_sequence_logps(hidden, weight, targets, bias=None, *, temperature=1.0, average=False):
    """Per-sequence sums (means) ``[2B]`` of the response tokens' log-probs, from float64 logits; and the sums."""
    logp, _ = reference_logprobs(hidden, weight, targets, bias, temperature=temperature)
    sums = logp.sum(-1)
    counts = (targets != -100).sum(-1).double()
    return (sums / counts.clamp(min=1) if average else sums), sums, counts


def reference_dpo(hidden, weight, targets, bias, reference, options, *, average, temperature=1.0):
    """``(DPOResult, logps [2B])`` in float64: the formula from ``dpo_loss``, the log-probs computed here."""
    logps, sums, counts = reference_sequence_logps(hidden, weight, targets, bias, temperature=temperature,
                                                   average=average)
    b = targets.shape[0] // 2
    if reference is None:
        ref = (None, None)
    elif isinstance(reference, tuple) and len(reference) == 3:
        ref_logps = reference_sequence_logps(*(None if t is None else t.double() for t in reference[:2]), targets,
                                             None if reference[2] is None else reference[2].double(),
                                             temperature=temperature, average=average)[0]
        ref = (ref_logps[:b], ref_logps[b:])
    else:
        ref = tuple(t.double() for t in reference)
    nll = None
    if options.rpo_alpha is not None:  # mean NLL per chosen response token
        nll = -sums[:b].sum() / counts[:b].sum().clamp(min=1)
    return dpo_loss(logps[:b], logps[b:], *ref, options, chosen_nll=nll), logps


def make_reference(kind, hidden, weight, targets, bias, *, average, temperature=1.0):
    """Keyword arguments of the op for a reference of ``kind``, and the reference as ``reference_dpo`` takes it."""
    if kind == "free":
        return dict(reference_free=True), None
    ref_hidden = torch.randn_like(hidden.float()).to(hidden.dtype)
    ref_weight = (weight.float() + 0.1 * torch.randn_like(weight.float())).to(weight.dtype)
    ref_bias = None if bias is None else torch.randn_like(bias.float()).to(bias.dtype)
    if kind == "computed":
        return dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias), (ref_hidden, ref_weight,
                                                                                       ref_bias)
    logps = reference_sequence_logps(ref_hidden.double(), ref_weight.double(), targets,
                                     None if ref_bias is None else ref_bias.double(), temperature=temperature,
                                     average=average)[0].float()
    b = targets.shape[0] // 2
    return dict(ref_chosen_logps=logps[:b], ref_rejected_logps=logps[b:]), (logps[:b], logps[b:])


def check_dpo(engine, hidden, weight, targets, bias=None, *, reference="computed", loss_type="sigmoid",
              label_smoothing=0.0, average_log_prob=None, rpo_alpha=None, beta=0.1, temperature=1.0,
              train=("hidden", "weight", "bias"), tol=F32, grad_tol=None) -> DPOLossOutput:
    """Loss, rewards, log-probs, metrics and gradients against ``reference_dpo``; the strategy that ran."""
    average = loss_type == "ipo" if average_log_prob is None else average_log_prob
    options = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         reference_free=reference == "free", rpo_alpha=rpo_alpha)
    ref_kwargs, ref = make_reference(reference, hidden, weight, targets, bias, average=average,
                                     temperature=temperature)
    names = ("hidden", "weight", "bias")
    ours = {n: None if t is None else t.detach().clone().requires_grad_(n in train)
            for n, t in zip(names, (hidden, weight, bias))}
    theirs = {n: as_f64_leaf(t) for n, t in zip(names, (hidden, weight, bias))}
    out = fused_linear_dpo_loss(ours["hidden"], ours["weight"], targets, bias=ours["bias"], beta=beta,
                                loss_type=loss_type, label_smoothing=label_smoothing,
                                average_log_prob=average_log_prob, rpo_alpha=rpo_alpha, temperature=temperature,
                                backend=engine.backend, chunk_size=engine.chunk_size(targets.shape[1]),
                                **ref_kwargs)
    expected, logps = reference_dpo(theirs["hidden"], theirs["weight"], targets, theirs["bias"], ref, options,
                                    average=average, temperature=temperature)
    b = targets.shape[0] // 2

    assert isinstance(out, DPOLossOutput) and out.loss.shape == () and out.loss.dtype == torch.float32
    close = lambda got, want, what: torch.testing.assert_close(  # noqa: E731
        got.double(), want.detach(), **tol, msg=lambda m: f"{what}: {m}")
    close(out.loss, expected.loss, "loss")
    for name, got, want in (("chosen_rewards", out.chosen_rewards, expected.chosen_rewards),
                            ("rejected_rewards", out.rejected_rewards, expected.rejected_rewards),
                            ("chosen_logps", out.chosen_logps, logps[:b]),
                            ("rejected_logps", out.rejected_logps, logps[b:])):
        assert got.shape == (b,) and got.dtype == torch.float32 and not got.requires_grad, name
        close(got, want, name)
    want_metrics = dpo_metrics(expected, logps[:b], logps[b:])
    assert set(out.metrics) == TRL_METRICS | ({"nll_loss"} if rpo_alpha is not None else set())
    assert set(out.metrics) == set(want_metrics)
    margins = (expected.chosen_rewards - expected.rejected_rewards).detach()
    for name, value in out.metrics.items():
        assert value.shape == () and not value.requires_grad, name
        if name == "rewards/accuracies":  # a step function: margins within 10x the tolerance of 0 may go either way
            noise = 10 * (tol["atol"] + tol["rtol"] * float(margins.abs().max()))
            assert_share_close(value, margins > 0, near(margins, [0.0], noise), name)
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
            expected_fused = engine.strategy == "pairs" and bool((targets != -100).any())
            assert bool(engine.fused_calls) == expected_fused, f"strategy {engine.strategy} did not run"
    return out


# --- against the reference ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("average_log_prob", [False, True])
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


def test_ipo_averages_by_default_like_trl(engine):
    hidden, weight, bias, targets = make_batch(2, 6, 8, 19)
    out = check_dpo(engine, hidden, weight, targets, loss_type="ipo")
    counts = (targets != -100).sum(-1).float()
    summed = check_dpo(engine, hidden, weight, targets, loss_type="ipo", average_log_prob=False)
    torch.testing.assert_close(out.chosen_logps, summed.chosen_logps / counts[:2])


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
    kwargs = dict(ref_chosen_logps=torch.randn(2) * 5, ref_rejected_logps=torch.randn(2) * 5,
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
    ref = torch.randn(8) * 5
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
    ref_logps = torch.randn(4, dtype=torch.float64)

    def loss(h, w, b):
        return fused_linear_dpo_loss(h, w, targets, bias=b, ref_chosen_logps=ref_logps[:2],
                                     ref_rejected_logps=ref_logps[2:], loss_type="nca_pair", rpo_alpha=0.3,
                                     backend="torch", chunk_size=chunk_size).loss

    assert torch.autograd.gradcheck(loss, [t.requires_grad_(True) for t in (hidden, weight, bias)])


# --- strategy -----------------------------------------------------------------------------------------------------

def test_whole_pair_chunks():
    # pairs of 3, 5, 2, 4 rows in chunks of at most 7 rows: [3], [5, 2], [4]
    assert whole_pair_chunks([3, 5, 2, 4], 11, chunk_size=7) == [slice(0, 3), slice(3, 10), slice(10, 14)]
    assert whole_pair_chunks([3, 0, 4], 11, chunk_size=7) == [slice(0, 7)]
    assert whole_pair_chunks([3, 5, 2, 4], 11, chunk_size=4) is None  # a pair of 5 rows: two passes


def test_whole_pairs_may_exceed_the_chunk_budget_up_to_a_limit(monkeypatch):
    vocab = 1024  # one budget row is 4 KiB
    monkeypatch.setenv("FASTALIGN_CHUNK_BUDGET_MB", str(100 * 4096 / 2 ** 20))  # 100 rows
    assert whole_pair_chunks([60, 30, 50], vocab, None) == [slice(0, 90), slice(90, 140)]  # packed up to 100
    largest = PAIR_BUDGET_CHUNKS * 100
    assert whole_pair_chunks([10, largest, 10], vocab, None) == [slice(0, 10), slice(10, 10 + largest),
                                                                  slice(10 + largest, 20 + largest)]
    assert whole_pair_chunks([10, largest + 1], vocab, None) is None


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
        with pytest.raises(ValueError, match=r"hidden: expected an even number 2B .* got shape \(3, 5, 8\)"):
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
        with pytest.raises(ValueError, match="loss_type: expected one of"):
            self.call(loss_type="kto")
        with pytest.raises(ValueError, match="label_smoothing"):
            self.call(loss_type="hinge", label_smoothing=0.1)
        with pytest.raises(ValueError, match="beta: expected a positive number"):
            self.call(beta=0.0)
        with pytest.raises(TypeError, match="average_log_prob: expected a bool or None"):
            self.call(average_log_prob=1)
        with pytest.raises(ValueError, match="chunk_size"):
            self.call(chunk_size=0)
