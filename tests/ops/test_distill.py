"""The fused distillation loss against a float64 transcription of TRL 1.16's generalized JSD on materialized logits
(``ChunkedDivergenceFunction`` / ``_chunked_divergence_loss``): loss, metrics and the student's gradients (hidden,
weight, bias), none for the teacher; beta in {0, 0.25, 0.5, 1}, temperatures, different hidden sizes, masks."""
from __future__ import annotations


import pytest
import torch

from fastalign import fused_linear_distill_loss
from fastalign.ops import torch_backend
from helpers.distill import problem, reference_distill

IGNORE = -100


def check(p, *, mask=True, tol=dict(rtol=1e-9, atol=1e-11), **options):
    """Loss, entropy and the student's gradients of the op (float64) against the reference; no teacher gradient."""
    leaves = {k: p[k].clone().requires_grad_(True) for k in ("sh", "sw", "sb") if p[k] is not None}
    teacher = {k: p[k].clone().requires_grad_(True) for k in ("th", "tw", "tb") if p[k] is not None}
    m = p["mask"] if mask else None
    chunk_size = options.pop("chunk_size", None)
    out = fused_linear_distill_loss(leaves["sh"], leaves["sw"], teacher["th"], teacher["tw"], m,
                                    student_bias=leaves.get("sb"), teacher_bias=teacher.get("tb"), backend="torch",
                                    chunk_size=chunk_size, **options)
    ref_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    ref, ref_entropy = reference_distill(ref_leaves["sh"], ref_leaves["sw"], p["th"], p["tw"], m,
                                         sb=ref_leaves.get("sb"), tb=p["tb"], **options)
    torch.testing.assert_close(out.loss, ref, **tol)
    torch.testing.assert_close(out.entropy, ref_entropy.detach(), **tol)
    got = torch.autograd.grad(out.loss, list(leaves.values()) + list(teacher.values()), allow_unused=True)
    want = torch.autograd.grad(ref, list(ref_leaves.values()))
    assert len(got) == len(leaves) + len(teacher) and all(g is None for g in got[len(leaves):])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **tol)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_distill_matches_trl_generalized_jsd(beta, temperature):
    check(problem(seed=int(beta * 4) + int(temperature * 10)), beta=beta, temperature=temperature)


@pytest.mark.parametrize("variant", ["chunks_no_bias", "parts", "no_mask_num_items", "fully_masked", "hard_labels",
                                     "same_hidden_size"])
def test_distill_variants(variant, monkeypatch):
    if variant == "chunks_no_bias":  # odd sizes, chunks of 2 rows
        check(problem((1, 7), hs=5, ht=3, v=13, bias=False), beta=0.5, chunk_size=2)
    elif variant == "parts":  # a chunk's elementwise work in parts of 2 rows (5 buffers of 13 float64 columns)
        monkeypatch.setattr(torch_backend, "PAIR_PART_BYTES", 2 * 5 * 13 * 8)
        p = problem((1, 7), hs=5, ht=3, v=13)
        for beta in (0.0, 0.5, 1.0):
            check(p, beta=beta, hard_label_weight=0.2, targets=p["targets"])
    elif variant == "no_mask_num_items":
        check(problem(), mask=False, beta=0.25, num_items_in_batch=40)
    elif variant == "fully_masked":
        p = problem()
        p["mask"] = torch.zeros_like(p["mask"])
        out = check(p, beta=0.5)
        assert out.loss.item() == 0.0 and out.metrics["entropy"].item() == 0.0
    elif variant == "hard_labels":
        out = check(problem(), beta=0.0, temperature=2.0, hard_label_weight=0.3, targets=problem()["targets"])
        assert out.metrics["hard_loss"].item() > 0
    else:
        check(problem(hs=6, ht=6), beta=1.0, temperature=1.5)


def test_distill_metrics():
    """The mean student entropy (TRL's metric) and mean divergence over the masked tokens."""
    p = problem()
    out = check(p, beta=0.5)
    _, entropy = reference_distill(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], beta=0.5, sb=p["sb"], tb=p["tb"])
    torch.testing.assert_close(out.metrics["entropy"], entropy.sum() / p["mask"].sum())
    per_token = reference_distill(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], beta=0.5, sb=p["sb"], tb=p["tb"],
                                  num_items_in_batch=1)[0]
    torch.testing.assert_close(out.metrics["divergence"], per_token / p["mask"].sum())


@pytest.mark.parametrize("kwargs, error", [
    (dict(beta=1.5), "beta: expected a number in"),
    (dict(hard_label_weight=0.5), "targets: required when hard_label_weight > 0"),
    (dict(num_items_in_batch=1), "num_items_in_batch: expected at least"),
])
def test_distill_bad_options(kwargs, error):
    p = problem()
    with pytest.raises(ValueError, match=error):
        fused_linear_distill_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], **{"backend": "torch", **kwargs})


def test_distill_bad_teacher_shapes():
    p = problem()
    with pytest.raises(ValueError, match="teacher_weight: expected shape"):
        fused_linear_distill_loss(p["sh"], p["sw"], p["th"], p["tw"][:-1])
    with pytest.raises(ValueError, match="teacher_hidden: expected the student's leading shape"):
        fused_linear_distill_loss(p["sh"], p["sw"], p["th"][:1], p["tw"])


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_distill_matches_the_real_trl_chunked_divergence_loss(beta):
    """TRL 1.16's own ``_chunked_divergence_loss`` (its torch tiles on CPU): loss, mean entropy and the student's
    gradients, fp32, with biases, a wider teacher and a completion mask."""
    trl = pytest.importorskip("trl.trainer.distillation_trainer")
    p = {k: v if v.dtype == torch.bool or v.dtype == torch.long else v.float() for k, v in problem().items()}
    leaves = [p[k].clone().requires_grad_(True) for k in ("sh", "sw", "sb")]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    mask = p["mask"].long()
    loss, entropy_sum, count = trl._chunked_divergence_loss(
        ref_leaves[0], p["th"], ref_leaves[1], p["tw"], mask, beta, student_lm_head_bias=ref_leaves[2],
        teacher_lm_head_bias=p["tb"], temperature=0.7)
    out = fused_linear_distill_loss(leaves[0], leaves[1], p["th"], p["tw"], mask, beta=beta, temperature=0.7,
                                    student_bias=leaves[2], teacher_bias=p["tb"], backend="torch")
    tol = dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.loss, loss.detach(), **tol)
    torch.testing.assert_close(out.metrics["entropy"], (entropy_sum / count).detach(), **tol)
    for got, want in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(loss, ref_leaves)):
        torch.testing.assert_close(got, want, **tol)
