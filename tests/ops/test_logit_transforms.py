"""Logit transforms (``logit_scale``, ``logit_softcap``) on every fused op, against float64 references that
materialize the transformed logits ``softcap(scale * (hidden @ weight.T + bias))``: values and the gradients of
hidden, weight and bias, on every backend, one pass and two passes, deterministic, vocab-parallel and compiled.

The reference of a loss op is the op itself with no transform, applied to the materialized float64 transformed
logits through an identity lm_head (``weight = I``, ``hidden = logits``: its logits are exactly those), the
gradients flowing back through the naive float64 transform by autograd; the log-prob op also against a plain
``log_softmax`` of those logits. The untransformed ops are checked against their own float64 references elsewhere.
"""
from __future__ import annotations

import functools

import pytest
import torch
from helpers.bf16_interpreter import bf16_interpreter  # noqa: F401 (fixture)
from conftest import BACKENDS

from fastalign import (fused_linear_cpo_loss, fused_linear_cross_entropy, fused_linear_distill_loss,
                       fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_kto_loss, fused_linear_logprobs,
                       fused_linear_orpo_loss, fused_linear_ppo_loss, fused_linear_rloo_loss)
from helpers.distill import reference_distill
from fastalign.ops import torch_backend
from helpers.reference import as_f64_leaf

B, T, H, V = 2, 5, 8, 37  # V not a multiple of any tile
TEMPERATURE = 0.8
TRANSFORMS = {"softcap": dict(logit_softcap=1.5), "scale": dict(logit_scale=0.6),
              "both": dict(logit_scale=1.7, logit_softcap=2.0)}


def transformed_logits(hidden, weight, bias, *, logit_scale=1.0, logit_softcap=None):
    """The model's logits in float64, materialized: ``softcap(scale * (hidden @ weight.T + bias))``."""
    z = logit_scale * (hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double()))
    return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)


def problem(rows: int = B, dtype=torch.float64):
    """hidden ``[rows, T, H]`` scaled so that the softcap saturates (|z| up to ~4c), weight, bias, targets with
    ignored positions."""
    hidden = 1.5 * torch.randn(rows, T, H, dtype=dtype)
    weight = torch.randn(V, H, dtype=dtype)
    bias = 0.5 * torch.randn(V, dtype=dtype)
    targets = torch.randint(0, V, (rows, T))
    targets[0, 0] = targets[-1, -2] = -100
    return hidden, weight, bias, targets


def values_dtype(h):
    """The dtype of an op's per-token and per-sequence inputs: float64 for float64 hidden, else fp32."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _logprobs(h, w, t, b, **kw):
    lp, ent = fused_linear_logprobs(h, w, t, bias=b, return_entropy=True, **kw)
    coef = torch.linspace(-1.0, 1.0, lp.numel(), dtype=lp.dtype).view(lp.shape)
    return (lp * coef).sum() + 0.3 * (ent * coef.flip(0)).sum(), {}


def _ppo(h, w, t, b, **kw):
    g = torch.Generator().manual_seed(1)
    old = -3 + 0.5 * torch.randn(t.shape, generator=g)
    adv = torch.randn(t.shape, generator=g)
    out = fused_linear_ppo_loss(h, w, t, old.to(values_dtype(h)), adv.to(values_dtype(h)), bias=b, entropy_coef=0.05,
                                **kw)
    return out.loss, out.metrics


def _grpo(h, w, t, b, **kw):
    g = torch.Generator().manual_seed(2)
    old = -3 + 0.5 * torch.randn(t.shape, generator=g)
    adv = torch.randn(t.shape[0], generator=g)
    out = fused_linear_grpo_loss(h, w, t, adv.to(values_dtype(h)), old_logprobs=old.to(values_dtype(h)), bias=b,
                                 loss_type="grpo", entropy_coef=0.05, **kw)
    return out.loss, out.metrics


def _rloo(h, w, t, b, **kw):
    g = torch.Generator().manual_seed(3)
    old = -8 + 0.5 * torch.randn(t.shape[0], generator=g)  # per sequence: summed log-probs, some ratios clipped
    adv = torch.randn(t.shape[0], generator=g)
    out = fused_linear_rloo_loss(h, w, t, adv.to(values_dtype(h)), old_logprobs=old.to(values_dtype(h)), bias=b,
                                 **kw)
    return out.loss, out.metrics


def _dpo(h, w, t, b, **kw):
    g = torch.Generator().manual_seed(3)
    ref = -15 + torch.randn(2, h.shape[0] // 2, generator=g)
    out = fused_linear_dpo_loss(h, w, t, bias=b, ref_chosen_logps=ref[0].to(values_dtype(h)),
                                ref_rejected_logps=ref[1].to(values_dtype(h)), use_weighting=True, rpo_alpha=0.5,
                                vocab_metrics=True, **kw)
    return out.loss, out.metrics


def _kto(h, w, t, b, **kw):
    g = torch.Generator().manual_seed(4)
    ref = -15 + torch.randn(h.shape[0], generator=g)
    labels = torch.arange(h.shape[0]) % 2 == 0
    out = fused_linear_kto_loss(h, w, t, labels, ref_logps=ref.to(values_dtype(h)),
                                kl=torch.tensor(0.3, dtype=values_dtype(h)), bias=b, vocab_metrics=True, **kw)
    return out.loss, out.metrics


def _cpo(h, w, t, b, **kw):
    out = fused_linear_cpo_loss(h, w, t, bias=b, loss_type="simpo", cpo_alpha=0.5, vocab_metrics=True, **kw)
    return out.loss, out.metrics


def _orpo(h, w, t, b, **kw):
    out = fused_linear_orpo_loss(h, w, t, bias=b, vocab_metrics=True, **kw)
    return out.loss, out.metrics


def _ce(h, w, t, b, reduction="mean", **kw):
    """Cross-entropy with label smoothing and a z-loss: the lse's and the logit sum's gradients (``RowGrads``);
    ``reduction="none"`` takes the two-pass backward."""
    out = fused_linear_cross_entropy(h, w, t, bias=b, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, **kw)
    loss = out.loss
    if reduction == "none":
        loss = (loss * torch.linspace(-1.0, 1.0, loss.numel(), dtype=loss.dtype).view(loss.shape)).sum()
    return loss, out.metrics


OPS = {"logprobs": _logprobs, "ppo": _ppo, "grpo": _grpo, "rloo": _rloo, "dpo": _dpo, "kto": _kto, "cpo": _cpo,
       "orpo": _orpo, "ce": _ce, "ce_none": functools.partial(_ce, reduction="none")}


def reference(op, hidden, weight, bias, targets, transform, **kw):
    """The op on the materialized float64 transformed logits (identity lm_head, no transform): loss, metrics and
    the float64 gradients of hidden, weight, bias."""
    leaves = [as_f64_leaf(x) for x in (hidden, weight, bias)]
    z = transformed_logits(*leaves, **transform)
    loss, metrics = op(z, torch.eye(V, dtype=torch.float64), targets, None, backend="torch", **kw)
    return loss, metrics, torch.autograd.grad(loss, leaves)


def check(op, backend, transform, *, dtype=torch.float64, rtol=1e-9, atol=1e-11, **kw):
    hidden, weight, bias, targets = problem(4 if op in (_dpo, _cpo, _orpo) else B)
    expected, expected_metrics, expected_grads = reference(op, hidden, weight, bias, targets, transform,
                                                           temperature=TEMPERATURE, **kw)
    leaves = [x.to(dtype).requires_grad_(True) for x in (hidden, weight, bias)]
    loss, metrics = op(*leaves[:2], targets, leaves[2], backend=backend, temperature=TEMPERATURE, **transform, **kw)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=atol)
    for name, value in expected_metrics.items():
        torch.testing.assert_close(torch.as_tensor(metrics[name]).double(), torch.as_tensor(value).double(),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for name, grad, want in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("op", OPS)
def test_every_op_float64(op, transform):
    """Torch backend in float64: loss, metrics and gradients; the loss ops take their one-pass plan here."""
    check(OPS[op], "torch", TRANSFORMS[transform])


@pytest.mark.parametrize("op", ["logprobs", "grpo", "dpo", "ce", "ce_none"])
def test_two_passes_and_deterministic(op, monkeypatch):
    """The two-pass plan (groups over the chunk budget, chunks of 3 rows) and the deterministic plan."""
    import fastalign.ops.engine as engine

    monkeypatch.setattr(engine, "whole_group_chunks", lambda *args, **kwargs: None)
    check(OPS[op], "torch", TRANSFORMS["both"], chunk_size=3)
    monkeypatch.undo()
    check(OPS[op], "torch", TRANSFORMS["softcap"], deterministic=True)


@pytest.mark.parametrize("op", OPS)
def test_every_op_every_backend_fp32(op, backend):
    """fp32 on every backend (triton under the interpreter) against the float64 reference."""
    check(OPS[op], backend, TRANSFORMS["both"], dtype=torch.float32, rtol=2e-4, atol=2e-5)


def test_logprobs_against_log_softmax(backend):
    """The log-prob op against a plain float64 log_softmax of the transformed logits; a frozen weight (the
    elementwise-moments backward on the torch backend without a softcap)."""
    hidden, weight, bias, targets = problem(dtype=torch.float32)
    for transform in TRANSFORMS.values():
        z = transformed_logits(hidden, weight, bias, **transform) / TEMPERATURE
        log_p = torch.log_softmax(z, -1)
        valid = targets != -100
        want = torch.where(valid, log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
        want_ent = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
        h = hidden.clone().requires_grad_(True)
        lp, ent = fused_linear_logprobs(h, weight, targets, bias=bias, return_entropy=True, temperature=TEMPERATURE,
                                        backend=backend, **transform)
        torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
        h64 = as_f64_leaf(hidden)
        z64 = transformed_logits(h64, weight, bias, **transform) / TEMPERATURE
        want_grad, = torch.autograd.grad(torch.log_softmax(z64, -1).gather(-1, targets.clamp(min=0)[..., None])
                                         [..., 0].mul(valid).sum(), h64)
        grad, = torch.autograd.grad(lp.sum(), h)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5)


def test_module_wrapper_takes_the_transform():
    from fastalign import FusedLinearLogProbs

    hidden, weight, bias, targets = problem(dtype=torch.float32)
    module = FusedLinearLogProbs(temperature=TEMPERATURE, backend="torch", **TRANSFORMS["both"])
    assert "logit_softcap=2.0" in repr(module) and "logit_scale=1.7" in repr(module)
    want = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=TEMPERATURE, backend="torch",
                                 **TRANSFORMS["both"])
    assert torch.equal(module(hidden, weight, targets, bias), want)


@pytest.mark.parametrize("name,value,message", [
    ("logit_scale", 0.0, "logit_scale: expected a positive finite number, got 0.0"),
    ("logit_scale", None, "logit_scale: expected a positive finite number, got None"),
    ("logit_softcap", -1.0, "logit_softcap: expected a positive finite number or None, got -1.0"),
    ("logit_softcap", float("inf"), "logit_softcap: expected a positive finite number or None, got inf"),
    ("logit_softcap", True, "logit_softcap: expected a positive finite number or None, got True"),
])
def test_bad_transform_is_refused(name, value, message):
    hidden, weight, bias, targets = problem(dtype=torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fused_linear_logprobs(hidden, weight, targets, bias=bias, backend="torch", **{name: value})


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("one_row_parts", [False, True])
def test_distill_per_head_transforms(beta, one_row_parts, monkeypatch):
    """The distillation loss with a different transform per head (TRL's order: scale, then softcap, then the
    temperature) and the hard cross-entropy, against TRL's generalized JSD on the materialized float64 transformed
    logits of both heads: loss, entropy and the student's gradients (one pass, and chunks of 4 rows; each chunk's
    elementwise work in one part, or in parts of one row)."""
    if one_row_parts:
        monkeypatch.setattr(torch_backend, "PAIR_PART_BYTES", 1)
    gen = torch.Generator().manual_seed(5)
    hidden, weight, bias, targets = problem()
    teacher_hidden = 1.5 * torch.randn(B, T, H + 3, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(V, H + 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.3
    student = dict(logit_scale=1.7, logit_softcap=2.0)
    teacher = dict(logit_scale=0.6, logit_softcap=3.0)
    leaves = [as_f64_leaf(x) for x in (hidden, weight, bias)]
    zs = transformed_logits(*leaves, **student)
    zt = transformed_logits(teacher_hidden, teacher_weight, None, **teacher)
    eye = torch.eye(V, dtype=torch.float64)
    want, want_entropy = reference_distill(zs, eye, zt, eye, mask, beta=beta, temperature=TEMPERATURE,
                                           hard_label_weight=0.3, targets=targets)
    want_grads = torch.autograd.grad(want, leaves)
    for chunk_size in (None, 4):
        got_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        out = fused_linear_distill_loss(got_leaves[0], got_leaves[1], teacher_hidden, teacher_weight, mask, beta=beta,
                                        temperature=TEMPERATURE, student_bias=got_leaves[2],
                                        student_logit_scale=1.7, student_logit_softcap=2.0, teacher_logit_scale=0.6,
                                        teacher_logit_softcap=3.0, hard_label_weight=0.3, targets=targets,
                                        backend="torch", chunk_size=chunk_size)
        torch.testing.assert_close(out.loss, want.detach(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.entropy, want_entropy.detach(), rtol=1e-9, atol=1e-11)
        for name, grad, expected in zip(("hidden", "weight", "bias"), torch.autograd.grad(out.loss, got_leaves),
                                        want_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"d {name}: {m}")


def test_distill_bad_transform_is_refused():
    hidden, weight, bias, targets = problem(dtype=torch.float32)
    for name, value in (("teacher_logit_softcap", 0.0), ("student_logit_scale", float("nan"))):
        with pytest.raises(ValueError, match=f"{name}: expected a positive finite number"):
            fused_linear_distill_loss(hidden, weight, hidden, weight, backend="torch", **{name: value})


def test_compiled(one_thread):
    """Under torch.compile (the registered ops): loss and gradients of the GRPO op with a softcap and a scale."""
    hidden, weight, bias, targets = problem(dtype=torch.float32)
    transform = TRANSFORMS["both"]
    expected, _, expected_grads = reference(_grpo, hidden, weight, bias, targets, transform,
                                            temperature=TEMPERATURE)
    g = torch.Generator().manual_seed(2)  # _grpo's inputs
    old = -3 + 0.5 * torch.randn(targets.shape, generator=g)
    adv = torch.randn(targets.shape[0], generator=g)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    compiled = torch.compile(lambda h, w, b: fused_linear_grpo_loss(
        h, w, targets, adv, old_logprobs=old, bias=b, loss_type="grpo", entropy_coef=0.05, backend="torch",
        temperature=TEMPERATURE, **transform).loss, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, want in zip(torch.autograd.grad(loss, leaves), expected_grads):
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5)


SHARD_SIZES = [20, 17]  # uneven: V = 37 on 2 ranks


def _sharded_rank(rank: int, world_size: int) -> dict:
    """Each op with a softcap on this rank's vocabulary shard: loss, d hidden, this shard's d weight and d bias."""
    import torch.distributed as dist

    torch.manual_seed(0)
    hidden, weight, bias, targets = problem(4, dtype=torch.float32)
    start = sum(SHARD_SIZES[:rank])
    rows = slice(start, start + SHARD_SIZES[rank])
    out = {}
    for name in ("logprobs", "dpo"):
        leaves = [hidden.clone().requires_grad_(True), weight[rows].clone().requires_grad_(True),
                  bias[rows].clone().requires_grad_(True)]
        loss, _ = OPS[name](*leaves[:2], targets, leaves[2], backend="torch", temperature=TEMPERATURE,
                            process_group=dist.group.WORLD, **TRANSFORMS["both"])
        out[name] = (loss.detach(), *torch.autograd.grad(loss, leaves))
    return out


def test_vocab_parallel_softcap():
    """2 gloo ranks, an uneven vocabulary split: each rank's loss and d hidden equal the unsharded op's, its d weight
    and d bias the rows of its shard."""
    from helpers.distributed import run_ranks

    ranks = run_ranks(_sharded_rank, 2)
    torch.manual_seed(0)
    hidden, weight, bias, targets = problem(4, dtype=torch.float32)
    for name in ("logprobs", "dpo"):  # entropy and its gradient; lse2, the logit sum and the argmax
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        loss, _ = OPS[name](*leaves[:2], targets, leaves[2], backend="torch", temperature=TEMPERATURE,
                            **TRANSFORMS["both"])
        want = (loss.detach(), *torch.autograd.grad(loss, leaves))
        for rank, result in enumerate(ranks):
            start = sum(SHARD_SIZES[:rank])
            rows = slice(start, start + SHARD_SIZES[rank])
            got = result[name]
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[2], want[2][rows], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[3], want[3][rows], rtol=1e-5, atol=1e-6)


# --- mixed dtypes: 16-bit hidden states, an fp32 lm_head (TRL's cast_lm_head_to_fp32) --------------------------

def check_mixed(op, backend, hidden_dtype):
    """``hidden`` in ``hidden_dtype``, weight and bias fp32, with a transform: loss, metrics and gradients against
    the float64 reference of the same (16-bit rounded) values; each gradient in its input's dtype."""
    hidden, weight, bias, targets = problem(4 if op in (_dpo, _cpo, _orpo) else B)
    hidden = hidden.to(hidden_dtype)
    weight, bias = weight.float(), bias.float()
    transform = TRANSFORMS["both"]
    expected, expected_metrics, expected_grads = reference(op, hidden, weight, bias, targets, transform,
                                                           temperature=TEMPERATURE)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss, metrics = op(*leaves[:2], targets, leaves[2], backend=backend, temperature=TEMPERATURE, **transform)
    grads = torch.autograd.grad(loss, leaves)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-6)
    for name, value in expected_metrics.items():
        torch.testing.assert_close(torch.as_tensor(metrics[name]).double(), torch.as_tensor(value).double(),
                                   rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name, grad, leaf, want in zip(("hidden", "weight", "bias"), grads, leaves, expected_grads):
        assert grad.dtype == leaf.dtype, name
        rtol = 1e-2 if leaf.dtype != torch.float32 else 1e-4  # d hidden rounded to 16 bits
        torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=rtol * want.abs().max().item(),
                                   msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_torch(op):
    check_mixed(OPS[op], "torch", torch.bfloat16)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("op,hidden_dtype,deterministic", [("logprobs", torch.bfloat16, False),
                                                           ("grpo", torch.float16, True),
                                                           ("dpo", torch.float16, False)])
def test_mixed_dtypes_triton(op, hidden_dtype, deterministic, bf16_interpreter):
    """fp16 hidden under the interpreter as it is, bf16 through the exact-bf16 patch of the interpreter; the
    deterministic (atomic-free) backward too."""
    check_mixed(functools.partial(OPS[op], deterministic=deterministic), "triton", hidden_dtype)


@pytest.mark.parametrize("hidden_dtype,weight_dtype,bias_dtype,message", [
    (torch.float32, torch.bfloat16, None, "weight: expected dtype torch.float32"),
    (torch.bfloat16, torch.float16, None, r"weight: expected dtype torch.bfloat16 \(the dtype of hidden; or "
                                          r"torch.float32 with 16-bit hidden\), got torch.float16"),
    (torch.bfloat16, torch.float32, torch.bfloat16, r"bias: expected dtype torch.float32 \(the dtype of weight\)"),
])
def test_other_dtype_mixtures_are_refused(hidden_dtype, weight_dtype, bias_dtype, message):
    hidden, weight, bias, targets = problem(dtype=torch.float32)
    with pytest.raises(TypeError, match=message):
        fused_linear_logprobs(hidden.to(hidden_dtype), weight.to(weight_dtype), targets,
                              bias=None if bias_dtype is None else bias.to(bias_dtype), backend="torch")


CHEAP_OPCHECK = ("test_faketensor",)


def test_opcheck_registered_ops_with_a_transform():
    """The registered operators with a softcap and a scale and mixed dtypes (fp16 hidden, fp32 weight): their
    fake tensors (the gradients' dtypes; test_compiled traces the autograd)."""
    from fastalign.ops import registered
    from fastalign.ops.linear import LinearOptions

    hidden, weight, bias, targets = problem(dtype=torch.float32)
    hidden, targets = hidden.reshape(-1, H).to(torch.float16), targets.reshape(-1)
    args = registered.options_args(LinearOptions("torch", temperature=0.7, chunk_size=3, **TRANSFORMS["both"]))
    torch.library.opcheck(torch.ops.fastalign.token_stats, (hidden.requires_grad_(True), weight.requires_grad_(True),
                                                            bias, targets, *args, True, False, False, False),
                          test_utils=CHEAP_OPCHECK)
    n = hidden.shape[0]
    torch.library.opcheck(torch.ops.fastalign.logprobs_backward,
                          (hidden.detach(), weight.detach(), bias, targets, torch.randn(n) + 3, torch.rand(n),
                           torch.randn(n), torch.randn(n), *args, True, True, True), test_utils=CHEAP_OPCHECK)
