"""The bad-input table (issue 24) and the masked-position guarantee (issue 29), for every fused op.

``OPS`` holds one builder of valid arguments per op (a new op is one entry); ``ROWS`` one bad input per row: the
argument, the bad value (or a function of the valid arguments giving it), extra arguments that make the row apply
(a loss type, say), and what must happen: an error of a type whose message holds a fragment (house style
``"name: expected X, got Y"``), or ``FINITE`` (a finite loss, gradients and metrics: TRL's value, or 0 by the
documented rule). A row runs for every op that has its argument (and, for packed rows, a packed form).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

import fastalign
from fastalign.objectives.kto import kto_metric_means
from helpers.reference import reference_logprobs, trl_kto

F64 = torch.float64
B, T, H, V = 2, 6, 8, 16
PROMPT = 2  # leading ignored positions of every row


def _lm(rows: int, g: torch.Generator) -> dict:
    targets = torch.randint(0, V, (rows, T), generator=g)
    targets[:, :PROMPT] = -100
    targets[-1, -1] = -100  # some padding
    return dict(hidden=torch.randn(rows, T, H, generator=g), weight=torch.randn(V, H, generator=g) / H ** 0.5,
                targets=targets)


def _logprobs(shape, g) -> torch.Tensor:
    return -0.1 - torch.rand(shape, generator=g)


def _logprobs_op(g):
    return _lm(B, g)


def _ppo(g):
    kw = _lm(B, g)
    return dict(kw, old_logprobs=_logprobs((B, T), g), advantages=torch.randn(B, T, generator=g),
                ref_logprobs=_logprobs((B, T), g), kl_coef=0.05, value_head_weight=torch.randn(H, generator=g) / 3,
                old_values=torch.randn(B, T, generator=g), returns=torch.randn(B, T, generator=g))


def _grpo(g):
    kw = _lm(B, g)
    return dict(kw, advantages=torch.tensor([1.0, -0.5]), old_logprobs=_logprobs((B, T), g),
                ref_logprobs=_logprobs((B, T), g), beta=0.04, loss_type="grpo")


def _rloo(g):
    kw = _lm(B, g)
    return dict(kw, advantages=torch.tensor([1.0, -0.5]), old_logprobs=_logprobs((B, T), g))


def _dpo(g):
    return dict(_lm(2 * B, g), ref_chosen_logps=-3 * torch.rand(B, generator=g) - 1,
                ref_rejected_logps=-3 * torch.rand(B, generator=g) - 1, rpo_alpha=0.5)


def _cpo(g):
    return _lm(2 * B, g)


def _orpo(g):
    kw = _lm(2 * B, g)
    nll = torch.where(kw["targets"][:B] == -100, torch.randint(0, V, (B, T), generator=g), kw["targets"][:B])
    return dict(kw, nll_targets=nll)


def _kto(g):
    return dict(_lm(B, g), labels=torch.tensor([True, False]), ref_logps=-3 * torch.rand(B, generator=g) - 1,
                kl=torch.tensor(0.1))


def _ce(g):
    return dict(_lm(B, g), label_smoothing=0.1, z_loss=1e-3)


def _distill(g):
    kw = _lm(B, g)
    return dict(kw, teacher_hidden=torch.randn(B, T, H + 2, generator=g),
                teacher_weight=torch.randn(V, H + 2, generator=g) / H ** 0.5, mask=kw["targets"] != -100, beta=0.5,
                hard_label_weight=0.5)


def _distill_op(hidden, weight, teacher_hidden, teacher_weight, mask=None, **kw):
    return fastalign.fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, mask, **kw)


# the table's names: the student's hidden states and weight as every other op's
_distill_op.__signature__ = inspect.signature(fastalign.fused_linear_distill_loss).replace(parameters=[
    p.replace(name={"student_hidden": "hidden", "student_weight": "weight"}.get(p.name, p.name))
    for p in inspect.signature(fastalign.fused_linear_distill_loss).parameters.values()])


def _pack_sequences(kw: dict) -> dict:
    """The padded batch as one packed row whose ``position_ids`` never restart (one sequence, not B)."""
    out = dict(kw)
    n = kw["targets"].numel()
    for name in ("hidden", "targets", "old_logprobs", "ref_logprobs"):
        if name in kw:
            out[name] = kw[name].reshape(1, n, -1) if name == "hidden" else kw[name].reshape(1, n)
    if "nll_targets" in kw:
        out["nll_targets"] = torch.full((1, n), -100)
    out["position_ids"] = torch.arange(n)[None]
    return out


class Op(NamedTuple):
    fn: Callable
    build: Callable[[torch.Generator], dict]
    packed: bool = False  # whether _pack_sequences applies (per-sequence arguments meet a one-sequence layout)


OPS = {
    "logprobs": Op(fastalign.fused_linear_logprobs, _logprobs_op),
    "ppo": Op(fastalign.fused_linear_ppo_loss, _ppo),
    "grpo": Op(fastalign.fused_linear_grpo_loss, _grpo, packed=True),
    "rloo": Op(fastalign.fused_linear_rloo_loss, _rloo, packed=True),
    "dpo": Op(fastalign.fused_linear_dpo_loss, _dpo, packed=True),
    "cpo": Op(fastalign.fused_linear_cpo_loss, _cpo, packed=True),
    "orpo": Op(fastalign.fused_linear_orpo_loss, _orpo, packed=True),
    "kto": Op(fastalign.fused_linear_kto_loss, _kto, packed=True),
    "ce": Op(fastalign.fused_linear_cross_entropy, _ce),
    "distill": Op(_distill_op, _distill),
}

FINITE = "finite"
TRL_NAN_WITHOUT_TOKENS = {"clip_ratio/low_min", "clip_ratio/high_max"}  # GRPO metrics TRL logs as NaN then


class Row(NamedTuple):
    arg: str
    value: object  # or a function of the valid arguments
    expect: tuple[type, str] | str  # (error type, message fragment) or FINITE
    extra: dict = {}  # arguments that make the row apply (and the valid call with them must pass)
    only: tuple[str, ...] = ()  # restrict to these ops (else: every op with the argument)


def _plus(value: float):
    """A log-prob tensor like the valid one, ``value`` (> 0) at one completion position."""
    def make(kw, name):
        bad = kw[name].clone()
        bad.view(-1)[-2 if bad.dim() > 1 else 0] = value  # a completion token (or the first sequence)
        return bad
    return make


def _all_masked(kw, name):
    return torch.full_like(kw[name], -100)


def _empty_last_response(kw, name):
    bad = kw[name].clone()
    bad[-1] = -100  # the last row (a rejected response, an undesirable completion) has no token
    return bad


EMPTY_CASES = [  # (extra arguments, ops) under which empty responses are tried
    ({}, ()), ({"loss_type": "ipo"}, ("dpo", "cpo")), ({"loss_type": "simpo"}, ("cpo",)),
    ({"loss_type": "sigmoid_norm"}, ("dpo",)), ({"average_log_prob": True}, ("dpo", "kto")),
    ({"use_weighting": True}, ("dpo",)), ({"loss_type": "apo_zero_unpaired", "kl": None}, ("kto",)),
    ({"loss_agg": "seq-mean-token-mean"}, ("ppo",)), ({"importance_sampling_level": "sequence"}, ("grpo",)),
    *(({"loss_type": t}, ("grpo",)) for t in ("bnpo", "dapo", "cispo", "sapo", "luspo", "vespo")),
]

ROWS = [
    # bools accept bools only
    *(Row(name, "yes", (TypeError, f"{name}: expected a bool")) for name in (
        "return_entropy", "check_finite", "reduce_hidden_grad", "deterministic", "vocab_metrics", "average_log_prob",
        "use_weighting", "reference_free", "use_bias_correction_kl", "compute_entropy")),
    Row("num_responses", "2", (TypeError, "num_responses: expected an int")),
    # coefficients whose sign TRL never uses
    Row("beta", -0.04, (ValueError, "beta: expected")),
    Row("delta", 0.5, (ValueError, "delta: expected a number > 1")),
    Row("delta", 1.0, (ValueError, "delta: expected a number > 1")),
    Row("off_policy_mask_threshold", -1.0, (ValueError, "off_policy_mask_threshold: expected a number >= 0")),
    Row("kl_coef", -0.05, (ValueError, "kl_coef: expected a number >= 0")),
    Row("vf_coef", -1.0, (ValueError, "vf_coef: expected a number >= 0")),
    Row("simpo_gamma", -1.0, (ValueError, "simpo_gamma: expected a number >= 0"), {"loss_type": "simpo"}),
    Row("label_smoothing", 0.6, (ValueError, "label_smoothing: expected [0.0, 0.5)"), only=("cpo",)),
    Row("label_smoothing", 0.5, (ValueError, "label_smoothing: expected [0.0, 0.5)"), {"loss_type": "simpo"},
        only=("cpo",)),
    Row("label_smoothing", 0.6, (ValueError, "label_smoothing: expected [0.0, 0.5)"), {"loss_type": "robust"},
        only=("dpo",)),
    Row("loss_weights", [1.0, -1.0], (ValueError, "loss_weights: expected weights >= 0"),
        {"loss_type": ["sigmoid", "sft"]}),
    Row("f_alpha_divergence_coef", 0.0, (ValueError, "f_alpha_divergence_coef: expected a number > 0"),
        {"f_divergence_type": "alpha_divergence"}),
    Row("f_alpha_divergence_coef", -1.0, (ValueError, "f_alpha_divergence_coef: expected a number > 0"),
        {"f_divergence_type": "alpha_divergence"}),
    Row("kl", torch.tensor(-1.0), (ValueError, "kl: expected the clamped batch KL estimate >= 0")),
    Row("temperature", 0.0, (ValueError, "temperature: expected a positive")),
    # log-prob inputs are <= 0 (beyond rounding)
    *(Row(name, _plus(3.0), (ValueError, f"{name}: expected log-probs <= 0"))
      for name in ("old_logprobs", "ref_logprobs", "ref_chosen_logps", "ref_rejected_logps")),
    Row("ref_logps", _plus(5.0), (ValueError, "ref_logps: expected log-probs <= 0"), only=("kto",)),
    Row("ref_logps", lambda kw, name: torch.stack([kw.pop("ref_chosen_logps"), kw.pop("ref_rejected_logps")]) + 5,
        (ValueError, "ref_logps: expected log-probs <= 0"), only=("dpo",)),
    Row("sampling_logprobs", lambda kw, name: _plus(3.0)(kw, "old_logprobs"),
        (ValueError, "sampling_logprobs: expected log-probs <= 0"), {"off_policy_mask_threshold": 0.5}),
    Row("ref_chosen_logps", _plus(50.0), (ValueError, "ref_chosen_logps: expected log-probs <= 0")),
    Row("old_logprobs", _plus(1e-5), FINITE),  # fp32 rounding above 0 is accepted
    Row("old_logprobs", lambda kw, name: _plus(0.03)(kw, name).bfloat16(), FINITE),  # bf16 rounding too
    Row("old_logprobs", lambda kw, name: _plus(0.1)(kw, name).bfloat16(),
        (ValueError, "old_logprobs: expected log-probs <= 0 (up to 0.05 of rounding)")),
    # counts below the batch's own
    Row("num_chosen_tokens", 1, (ValueError, "num_chosen_tokens: expected an int >=")),
    Row("num_pairs", 1, (ValueError, "num_pairs: expected an int >= 2")),
    Row("num_examples", 1, (ValueError, "num_examples: expected an int >= 2")),
    Row("num_items_in_batch", 1, (ValueError, "num_items_in_batch: expected at least"), {"loss_type": "dapo"},
        only=("grpo",)),
    Row("num_items_in_batch", 1, (ValueError, "num_items_in_batch: expected at least"), only=("ce", "distill")),
    Row("num_items_in_batch", torch.ones(2) * 99, (ValueError, "num_items_in_batch: expected a number or a "
                                                               "one-element tensor"), only=("ce", "distill")),
    Row("num_tokens", 1, (ValueError, "num_tokens: expected at least")),
    Row("num_sequences", 1, (ValueError, "num_sequences: expected at least"), {"loss_agg": "seq-mean-token-sum"}),
    Row("max_completion_length", 2, (ValueError, "max_completion_length: expected at least the longest"),
        {"loss_type": "dr_grpo", "max_completion_length": 8}),
    # ORPO's nll_targets: integer ids, the targets' on every chosen response token
    Row("nll_targets", lambda kw, name: kw[name].double(), (TypeError, "nll_targets: expected dtype")),
    Row("nll_targets", lambda kw, name: torch.where(kw["targets"][:B] != -100, (kw[name] + 1) % V, kw[name]),
        (ValueError, "nll_targets: expected the ids of targets on every chosen response token")),
    Row("nll_targets", lambda kw, name: torch.full_like(kw[name], -100),
        (ValueError, "nll_targets: expected the ids of targets on every chosen response token")),
    # all-masked batches and empty responses: finite (TRL's value, or 0 by the documented rule), every loss shape
    *(Row("targets", change, FINITE, extra, only) for change in (_all_masked, _empty_last_response)
      for extra, only in EMPTY_CASES),
    # a packed layout that never restarts: the error names the layout
    Row("position_ids", "packed", (ValueError, "position_ids: expected")),
]


def _cases():
    for op_name, op in OPS.items():
        params = inspect.signature(op.fn).parameters
        for i, row in enumerate(ROWS):
            if row.only and op_name not in row.only or row.arg not in params:
                continue
            if any(name not in params for name in row.extra):
                continue
            if row.arg == "position_ids" and not op.packed:
                continue
            yield pytest.param(op_name, row, id=f"{op_name}-{i}-{row.arg}")


def _scalar(out) -> torch.Tensor:
    return out.loss if hasattr(out, "loss") else (out[0] if isinstance(out, tuple) else out).sum()


def _call(op_name: str, row: Row | None = None, backend: str = "torch", bad: bool = True):
    """The op on its valid arguments, with ``row``'s extra arguments and (``bad``) its bad value."""
    op = OPS[op_name]
    kw = op.build(torch.Generator().manual_seed(0))
    if row is not None:
        kw.update(row.extra)
        if bad and row.arg == "position_ids":
            kw = _pack_sequences(kw)
        elif bad:
            kw[row.arg] = row.value(kw, row.arg) if callable(row.value) else row.value
    kw["hidden"] = kw["hidden"].clone().requires_grad_(True)
    kw["weight"] = kw["weight"].clone().requires_grad_(True)
    out = op.fn(backend=backend, **kw)
    return out, kw


@pytest.mark.parametrize("op_name", OPS)
def test_valid_arguments_pass(op_name):
    out, kw = _call(op_name)
    assert torch.isfinite(_scalar(out))


@pytest.mark.parametrize("op_name,row", list(_cases()))
def test_bad_input_table(op_name, row):
    if row.expect == FINITE:
        out, kw = _call(op_name, row)
        loss = _scalar(out)
        grads = torch.autograd.grad(loss, [kw["hidden"], kw["weight"]], allow_unused=True)
        assert torch.isfinite(loss), loss
        assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        empty = bool((kw["targets"] == -100).all())
        for name, value in getattr(out, "metrics", {}).items():
            if empty and name in TRL_NAN_WITHOUT_TOKENS:  # TRL's nanmin / nanmax over no sequence: NaN
                assert not torch.isinf(value), (name, value)
            else:
                assert bool(torch.isfinite(value).all()), (name, value)
        return
    if row.extra:  # the row's setting is valid by itself: only the bad value is refused
        _call(op_name, row, bad=False)
    error, fragment = row.expect
    with pytest.raises(error) as info:
        _call(op_name, row)
    assert fragment in str(info.value), str(info.value)


def test_table_covers_every_op_and_issue_item():
    cases = list(_cases())
    assert {op for op, *_ in (c.values for c in cases)} == set(OPS)
    assert len(cases) >= 90, len(cases)


# --- issue 29: values at masked positions never reach a loss, a metric or a gradient ---------------------------

MASKED_VALUES = (-100.0, -1e4, -math.inf, math.nan)


def _masked_problem(op_name: str, g: torch.Generator, **options) -> dict:
    kw = OPS[op_name].build(g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False  # masked completion tokens besides the ignored prompt ones
    kw.update(mask=mask, **options)
    if op_name == "grpo":
        kw.update(advantages=torch.randn(B, T, generator=g), importance_sampling_ratio=1 + 0.1 * torch.rand(B, T),
                  sampling_logprobs=_logprobs((B, T), g), off_policy_mask_threshold=0.5)
    return kw


def _fill_masked(kw: dict, value: float) -> dict:
    masked = (kw["targets"] == -100) | ~kw["mask"]
    out = dict(kw)
    for name in ("old_logprobs", "ref_logprobs", "sampling_logprobs", "importance_sampling_ratio", "advantages",
                 "old_values", "returns"):
        if name in kw and kw[name].shape == masked.shape:
            out[name] = torch.where(masked, value, kw[name])
    return out


def _outputs(op_name: str, kw: dict, backend: str):
    leaves = [kw["hidden"].clone().requires_grad_(True), kw["weight"].clone().requires_grad_(True)]
    value_head = [kw["value_head_weight"].clone().requires_grad_(True)] if "value_head_weight" in kw else []
    args = dict(kw, hidden=leaves[0], weight=leaves[1], **({"value_head_weight": value_head[0]} if value_head else {}))
    out = OPS[op_name].fn(backend=backend, check_finite=False, **args)
    grads = torch.autograd.grad(out.loss, leaves + value_head)
    return out.loss, out.metrics, grads


GRPO_CASES = [dict(loss_type=t) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")]
GRPO_CASES += [dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5)]
PPO_CASES = [dict(), dict(dual_clip=3.0, entropy_coef=0.01, kl_estimator="k1", loss_agg="seq-mean-token-mean")]


@pytest.mark.parametrize("op_name,options", [("grpo", c) for c in GRPO_CASES] + [("ppo", c) for c in PPO_CASES]
                         + [("rloo", dict(epsilon=0.1))],
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())) or "default")
def test_masked_positions_never_reach_results(backend, op_name, options):
    if op_name == "grpo" and options["loss_type"] == "dr_grpo":
        options = dict(options, max_completion_length=T)
    kw = _masked_problem(op_name, torch.Generator().manual_seed(1), **options)
    kw["old_logprobs"] = kw["old_logprobs"] - 0.5  # ratios away from 1: clipped and unclipped tokens
    loss, metrics, grads = _outputs(op_name, _fill_masked(kw, 0.0), backend)
    assert torch.isfinite(loss)
    for value in MASKED_VALUES:
        got_loss, got_metrics, got_grads = _outputs(op_name, _fill_masked(kw, value), backend)
        assert torch.equal(got_loss, loss), (value, got_loss, loss)
        assert got_metrics.keys() == metrics.keys()
        for name in metrics:
            torch.testing.assert_close(got_metrics[name], metrics[name], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{name} with {value} at masked positions: {m}")
        for got, expected in zip(got_grads, grads):
            assert torch.equal(got, expected), value


def test_masked_nan_passes_the_finite_check_and_unmasked_nan_does_not():
    kw = _masked_problem("grpo", torch.Generator().manual_seed(2))
    fastalign.fused_linear_grpo_loss(**_fill_masked(kw, math.nan))  # check_finite=True: only the masked tokens
    bad = kw["old_logprobs"].clone()
    bad[1, -2] = math.nan
    with pytest.raises(ValueError, match="old_logprobs: expected finite values, got 1 NaN"):
        fastalign.fused_linear_grpo_loss(**dict(kw, old_logprobs=bad))


# --- issue 29: KTO average_log_prob, ORPO's empty responses, the logits/* metrics, against float64 -----------------

def _f64_logits(kw):
    return kw["hidden"].detach().double() @ kw["weight"].detach().double().T


def test_kto_average_log_prob_matches_trl_length_normalized(backend):
    kw = _kto(torch.Generator().manual_seed(3))
    kw["targets"][0, PROMPT:] = torch.arange(T - PROMPT)  # lengths 4 and 3
    leaves = [kw["hidden"].double().requires_grad_(True), kw["weight"].double().requires_grad_(True)]
    logprobs, _ = reference_logprobs(leaves[0], leaves[1], kw["targets"], temperature=0.7)
    mask = kw["targets"] != -100
    means = logprobs.sum(-1) / mask.sum(-1)  # TRL's _get_batch_logps(average_log_prob=True)
    expected_loss, expected_metrics = trl_kto(means, kw["ref_logps"].double(), kw["labels"], kw["kl"].double(),
                                              0.3, "kto", 1.0, 1.0)
    expected_grads = torch.autograd.grad(expected_loss, leaves)
    got = [t.clone().requires_grad_(True) for t in (kw["hidden"], kw["weight"])]
    out = fastalign.fused_linear_kto_loss(got[0], got[1], kw["targets"], kw["labels"], ref_logps=kw["ref_logps"],
                                          kl=kw["kl"], beta=0.3, temperature=0.7, average_log_prob=True,
                                          backend=backend)
    torch.testing.assert_close(out.logps.double(), means.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(torch.autograd.grad(out.loss, got), expected_grads):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)
    logged = kto_metric_means({k: v.item() for k, v in out.metrics.items()})
    for name, value in expected_metrics.items():
        assert logged[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    sums = fastalign.fused_linear_kto_loss(kw["hidden"], kw["weight"], kw["targets"], kw["labels"],
                                           ref_logps=kw["ref_logps"], kl=kw["kl"], beta=0.3, temperature=0.7,
                                           backend=backend)
    assert not torch.allclose(sums.logps, out.logps)  # the option changes the reduction


def _trl_logits_metrics(logits, targets, side_rows):
    """TRL 1.16's logits/* (DPO and KTO trainers): the mean over the vocabulary of each completion token's logits,
    summed over a side's completion tokens and divided by their count."""
    mean_logits, mask = logits.mean(-1), targets != -100
    return [(mean_logits[rows] * mask[rows]).sum() / mask[rows].sum() for rows in side_rows]


@pytest.mark.parametrize("op_name", ["cpo", "orpo", "kto"])
def test_logits_metrics_match_trl(backend, op_name):
    kw = OPS[op_name].build(torch.Generator().manual_seed(4))
    if op_name == "kto":
        kw.update(labels=torch.tensor([False, True]))
        sides = [kw["labels"], ~kw["labels"]]
    else:
        sides = [slice(0, B), slice(B, 2 * B)]
    bias = torch.randn(V)
    expected = _trl_logits_metrics(_f64_logits(kw) + bias.double(), kw["targets"], sides)
    out = OPS[op_name].fn(bias=bias, temperature=0.6, vocab_metrics=True, backend=backend, **kw)
    metrics = out.metrics
    if op_name == "kto":
        metrics = kto_metric_means({k: v.item() for k, v in metrics.items()})
    for side, value in zip(("chosen", "rejected"), expected):
        assert float(metrics[f"logits/{side}"]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), side
    plain = OPS[op_name].fn(bias=bias, temperature=0.6, backend=backend, **kw)
    torch.testing.assert_close(plain.loss, out.loss, rtol=0, atol=0)
    assert not any(k.startswith("logits/") for k in plain.metrics)


def test_orpo_empty_responses_leave_the_odds_ratio_term():
    """TRL's per-token mean of an empty response is 0/0 (NaN loss); here that pair's odds-ratio term is 0."""
    kw = _orpo(torch.Generator().manual_seed(5))
    kw["targets"][-1] = -100  # the second pair's rejected response is empty
    beta = 0.2
    leaves = [kw["hidden"].double().requires_grad_(True), kw["weight"].double().requires_grad_(True)]
    targets = kw["targets"].clone()
    nll_targets = torch.cat([kw["nll_targets"], torch.full_like(kw["nll_targets"], -100)])
    logprobs, _ = reference_logprobs(leaves[0], leaves[1], targets)
    nll_logprobs, _ = reference_logprobs(leaves[0], leaves[1], nll_targets)
    mask = targets != -100
    means = logprobs.sum(-1) / mask.sum(-1).clamp(min=1)
    chosen, rejected = means[:B], means[B:]
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    nll = -nll_logprobs.sum() / (nll_targets != -100).sum()
    expected = nll - beta * torch.nn.functional.logsigmoid(log_odds[:1]).sum() / B  # pair 2 counts 0
    expected_grads = torch.autograd.grad(expected, leaves)
    got = [t.clone().requires_grad_(True) for t in (kw["hidden"], kw["weight"])]
    out = fastalign.fused_linear_orpo_loss(got[0], got[1], kw["targets"], nll_targets=kw["nll_targets"], beta=beta,
                                           backend="torch")
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, ref in zip(torch.autograd.grad(out.loss, got), expected_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-6)
    assert float(out.metrics["log_odds_chosen"]) == pytest.approx(float(log_odds[0].detach()) / B, rel=1e-5)
    kw["targets"][:] = -100  # all masked: the NLL of the prompt tokens alone
    out = fastalign.fused_linear_orpo_loss(kw["hidden"], kw["weight"], kw["targets"], nll_targets=kw["nll_targets"],
                                           beta=beta, backend="torch")
    torch.testing.assert_close(out.loss.double(), nll.detach(), rtol=1e-5, atol=1e-6)
