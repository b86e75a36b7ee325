"""The distillation op's Triton kernels (``fastalign.kernels.divergence``, under TRITON_INTERPRET=1) against the float64
transcription of TRL 1.16's generalized JSD on materialized logits: loss, entropy and the student's gradients (none
for the teacher) in fp32, fp16 and bf16 (``bf16_interpreter``), beta in {0, 0.25, 0.5, 1}, temperature, per-head
scale/softcap, hidden sizes that differ (and are not multiples of 16), an odd vocabulary, masks incl. a fully masked
batch; and the deterministic mode of both backends: a row's terms and gradients bitwise the same alone or in any
batch, the weight's gradient the same on every run."""
from __future__ import annotations

import pytest
import torch

from helpers.bf16_interpreter import bf16_interpreter  # noqa: F401 (fixture)
from conftest import BACKENDS
from fastalign import fused_linear_distill_loss
from fastalign.ops import torch_backend
from helpers.distill import reference_distill

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1")

V, HS, HT, IGNORE = 77, 20, 27, -100  # 3 vocab tiles of 32 (the last partial) under the interpreter
VARIANTS = {  # one per beta: every option is on in at least one
    0.0: dict(temperature=0.7, student_logit_softcap=3.0, teacher_logit_scale=0.8),
    0.25: dict(student_logit_scale=1.3, teacher_logit_softcap=2.5, hard_label_weight=0.3),
    0.5: dict(temperature=1.6, student_logit_softcap=2.0, teacher_logit_softcap=4.0, num_items_in_batch=40),
    1.0: dict(teacher_logit_scale=1.2, student_logit_scale=0.7, hard_label_weight=0.5, temperature=0.8),
}


def problem(lead=(5, 5), *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    p = dict(sh=randn(*lead, HS), sw=randn(V, HS) * 2 / HS ** 0.5, th=randn(*lead, HT), tw=randn(V, HT) * 3 / HT ** 0.5,
             sb=randn(V) * 0.5, tb=randn(V) * 0.5, mask=torch.rand(lead, generator=gen) > 0.25,
             targets=torch.randint(0, V, lead, generator=gen))
    p["targets"][torch.rand(lead, generator=gen) < 0.2] = IGNORE
    return p


def transformed(h, w, b, temperature, scale=1.0, softcap=None):
    """The float64 transformed logits (scale, then softcap), before the temperature; ``temperature`` unused."""
    z = scale * (h.double() @ w.double().T + b.double())
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def reference(p, leaves, mask, beta, options):
    """The loss and entropy of TRL's generalized JSD on the float64 transformed logits (through identity heads)."""
    t = options.get("temperature", 1.0)
    zs = transformed(*leaves, t, options.get("student_logit_scale", 1.0), options.get("student_logit_softcap"))
    zt = transformed(p["th"], p["tw"], p["tb"], t, options.get("teacher_logit_scale", 1.0),
                     options.get("teacher_logit_softcap"))
    eye = torch.eye(V, dtype=torch.float64)
    hard = options.get("hard_label_weight", 0.0)
    return reference_distill(zs, eye, zt, eye, mask, beta=beta, temperature=t,
                             num_items_in_batch=options.get("num_items_in_batch"), hard_label_weight=hard,
                             targets=p["targets"] if hard else None)


def run(p, dtype, beta, options, *, backend="triton", mask=None, **kwargs):
    """The op's loss, entropy and the student's gradients in ``dtype`` (teacher leaves too: they get None)."""
    student = [p[k].to(dtype).requires_grad_(True) for k in ("sh", "sw", "sb")]
    teacher = [p[k].to(dtype).requires_grad_(True) for k in ("th", "tw", "tb")]
    extra = dict(targets=p["targets"]) if options.get("hard_label_weight") else {}
    out = fused_linear_distill_loss(student[0], student[1], teacher[0], teacher[1], mask, beta=beta,
                                    student_bias=student[2], teacher_bias=teacher[2], backend=backend,
                                    **options, **extra, **kwargs)
    grads = torch.autograd.grad(out.loss, student + teacher, allow_unused=True)
    assert all(g is None for g in grads[3:]), "the teacher got a gradient"
    return out, student, grads[:3]


def check(dtype, beta, tol, *, seed=0):
    p = problem(seed=seed)
    options = VARIANTS[beta]
    out, student, grads = run(p, dtype, beta, options, mask=p["mask"])
    leaves = [t.detach().double().requires_grad_(True) for t in student]  # the reference on the same rounded inputs
    p64 = {**p, **{k: p[k].to(dtype).double() for k in ("th", "tw", "tb")}}
    want, want_entropy = reference(p64, leaves, p["mask"], beta, options)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(out.loss.double(), want.detach(), **tol)
    torch.testing.assert_close(out.entropy.double(), want_entropy.detach(), **tol)
    for name, got, expected in zip(("hidden", "weight", "bias"), grads, want_grads):
        scale = expected.abs().max()  # relative to the largest entry: fp16/bf16 round every operand of the products
        torch.testing.assert_close(got.double() / scale, expected / scale, **tol, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("beta", sorted(VARIANTS))
def test_triton_distill_fp32(beta):
    check(torch.float32, beta, dict(rtol=2e-5, atol=2e-6), seed=int(beta * 4))


@pytest.mark.parametrize("beta", [0.25, 0.5])
def test_triton_distill_fp16(beta):
    check(torch.float16, beta, dict(rtol=2e-2, atol=2e-3), seed=7)


def test_triton_distill_bf16(bf16_interpreter):
    check(torch.bfloat16, 0.5, dict(rtol=6e-2, atol=2e-2), seed=9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_masked_batch_gives_zero_loss_and_gradients(backend):
    p = problem(seed=3)
    out, _, grads = run(p, torch.float32, 0.5, VARIANTS[0.5], backend=backend, mask=torch.zeros(5, 5, dtype=torch.bool))
    assert out.loss.item() == 0.0 and not out.entropy.any()
    assert all(g is not None and not g.any() for g in grads)


@pytest.fixture
def small_pair_blocks(monkeypatch):
    """4-row blocks on the torch backend: several blocks, the last one padded, in a problem of 25 rows."""
    monkeypatch.setattr(torch_backend, "PAIR_BLOCK_ROWS", 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deterministic_rows_are_batch_invariant(backend, small_pair_blocks):
    """A probe row's entropy and d hidden (which take its divergence terms) are bitwise the same alone and at
    other positions of larger batches (every row masked in, a fixed num_items_in_batch: the same row scale); the
    weight's gradient repeats bit for bit; and the mode agrees with the default one."""
    p = problem(seed=11)
    options = dict(VARIANTS[0.25], num_items_in_batch=100)
    flat = {k: p[k].reshape(25, -1) if k in ("sh", "th") else p[k].reshape(25) if k == "targets" else p[k]
            for k in p}
    dtype = torch.float32 if backend == "triton" else torch.float64

    def probe(rows, at, **kwargs):
        q = {**flat, "sh": flat["sh"][rows], "th": flat["th"][rows], "targets": flat["targets"][rows]}
        out, _, grads = run(q, dtype, 0.25, options, backend=backend, **kwargs)
        return out.entropy[at], grads[0][at], grads[1]

    alone = probe(slice(6, 7), 0, deterministic=True)
    for rows, at in ((slice(0, 25), 6), (slice(3, 19), 3), (slice(5, 12), 1)):
        batch = probe(rows, at, deterministic=True)
        for name, a, b in zip(("entropy", "d hidden"), alone[:2], batch[:2]):
            assert torch.equal(a, b), f"{name} of the row at {at} of {rows}: {b} != {a} (alone)"
    once, again = probe(slice(0, 25), 6, deterministic=True), probe(slice(0, 25), 6, deterministic=True)
    assert torch.equal(once[2], again[2])
    default = probe(slice(0, 25), 6, deterministic=False)
    for a, b in zip(once, default):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
