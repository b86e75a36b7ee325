"""The engine's one-pass plan hands the loss one chunk's rows at a time (``RowValues.rows`` and ``.groups``), and
every op's loss of a chunk does work of that chunk's groups only, over the whole batch's normalizers: the loss and
gradients of many small chunks equal those of one chunk, and no tensor the loss forms per chunk is as large as the
batch's padded layout."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastalign
from fastalign.ops import engine

B, T, H, V = 4, 6, 8, 23


class LargestInLoss(TorchDispatchMode):
    """The largest fresh tensor (elements; not a view of an input) any op returns while ``inside`` (the engine's
    per-chunk loss and gradient)."""

    def __init__(self):
        super().__init__()
        self.largest, self.inside, self.calls = 0, False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside:
            leaves = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree)  # noqa: E731
                                   if isinstance(t, torch.Tensor)]
            inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs))}
            sizes = [t.numel() for t in leaves(out) if t.untyped_storage().data_ptr() not in inputs]
            self.largest = max([self.largest, *sizes])
        return out


def _batch(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (rows, T), generator=g)
    lengths = torch.randint(1, T, (rows,), generator=g)
    lengths[1] = T  # a whole row
    targets[torch.arange(T) >= lengths[:, None]] = -100  # completions of different lengths (right padding)
    targets[:, 0] = -100  # a prompt token
    return hidden, weight, targets, g


def _dpo(chunk_size, h, w, t, g):
    ref = torch.randn(2, B, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 8
    return fastalign.fused_linear_dpo_loss(h, w, t, ref_logps=ref, loss_type=["sigmoid", "ipo", "sft"],
                                           loss_weights=[1.0, 0.5, 0.2], ld_alpha=0.5, rpo_alpha=0.3,
                                           backend="torch", chunk_size=chunk_size).loss


def _dpo_wpo(chunk_size, h, w, t, g):
    ref = torch.full((2, B), -9.0, dtype=torch.float64)
    return fastalign.fused_linear_dpo_loss(h, w, t, ref_logps=ref, use_weighting=True, backend="torch",
                                           chunk_size=chunk_size).loss


def _kto(chunk_size, h, w, t, g):
    labels = torch.tensor([True, False] * (h.shape[0] // 2))
    ref = torch.full((h.shape[0],), -9.0, dtype=torch.float64)
    return fastalign.fused_linear_kto_loss(h, w, t, labels, ref_logps=ref, kl=torch.tensor(0.2),
                                           average_log_prob=True, backend="torch", chunk_size=chunk_size).loss


def _cpo(chunk_size, h, w, t, g):
    return fastalign.fused_linear_cpo_loss(h, w, t, loss_type="simpo", cpo_alpha=0.5, backend="torch",
                                           chunk_size=chunk_size).loss


def _orpo(chunk_size, h, w, t, g):
    return fastalign.fused_linear_orpo_loss(h, w, t, backend="torch", chunk_size=chunk_size).loss


def _grpo(loss_type, level, entropy_coef=0.0):
    def run(chunk_size, h, w, t, g):
        gen = torch.Generator().manual_seed(2)
        old = -3 + 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
        adv = torch.randn(h.shape[0], generator=gen, dtype=torch.float64)
        return fastalign.fused_linear_grpo_loss(h, w, t, adv, old_logprobs=old, loss_type=loss_type,
                                                importance_sampling_level=level, beta=0.04, ref_logprobs=old + 0.05,
                                                entropy_coef=entropy_coef, max_completion_length=T,
                                                backend="torch", chunk_size=chunk_size).loss
    return run


def _rloo(chunk_size, h, w, t, g):
    adv = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return fastalign.fused_linear_rloo_loss(h, w, t, adv, old_logprobs=torch.full((h.shape[0],), -20.0,
                                                                                    dtype=torch.float64),
                                            backend="torch", chunk_size=chunk_size).loss


CASES = {
    "dpo": _dpo, "dpo-wpo": _dpo_wpo, "kto": _kto, "simpo": _cpo, "orpo": _orpo,
    "grpo-token": _grpo("grpo", "token", entropy_coef=0.01), "bnpo-token": _grpo("bnpo", "token"),
    "dr_grpo-token": _grpo("dr_grpo", "token"), "gspo-sequence": _grpo("grpo", "sequence"),
    "luspo-sequence": _grpo("luspo", "sequence"), "rloo": _rloo,
}


def _run(monkeypatch, case, chunk_size, rows=2 * B, packed=False):
    h, w, t, g = _batch(rows)
    if packed:  # the same completions packed by position_ids (no padding rows)
        ends = (t != -100).long().cumsum(1).argmax(1) + 1
        keep = torch.arange(T) < ends[:, None]
        pos = torch.cat([torch.arange(int(n)) for n in ends])
        h, t = h[keep], t[keep]
    h.requires_grad_(True)
    w.requires_grad_(True)
    mode = LargestInLoss()
    loss_and_grads = engine._loss_and_grads

    def counted(*args, **kwargs):
        mode.inside, mode.calls = True, mode.calls + 1
        try:
            return loss_and_grads(*args, **kwargs)
        finally:
            mode.inside = False

    with monkeypatch.context() as patch:
        patch.setattr(engine, "_loss_and_grads", counted)
        with mode:
            loss = PACKED[case](chunk_size, h, w, t, pos) if packed else CASES[case](chunk_size, h, w, t, g)
    hg, wg = torch.autograd.grad(loss, (h, w))
    return loss.detach(), hg, wg, mode


def _packed_grpo(chunk_size, h, w, t, pos):
    adv = torch.randn(2 * B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return fastalign.fused_linear_grpo_loss(h, w, t, adv, loss_type="grpo", importance_sampling_level="sequence",
                                            old_logprobs=torch.full(t.shape, -3.0, dtype=torch.float64),
                                            position_ids=pos, backend="torch", chunk_size=chunk_size).loss


def _packed_dpo(chunk_size, h, w, t, pos):
    return fastalign.fused_linear_dpo_loss(h, w, t, ref_logps=torch.full((2, B), -9.0, dtype=torch.float64),
                                           position_ids=pos, backend="torch", chunk_size=chunk_size).loss


PACKED = {"grpo": _packed_grpo, "dpo": _packed_dpo}


@pytest.mark.parametrize("case", [*CASES, *(f"packed-{name}" for name in PACKED)])
def test_chunks_see_their_groups_only_and_sum_to_the_whole(case, monkeypatch):
    """Chunks of at most 10 rows (whole pairs or sequences; parts of sequences with a per-token loss) against one
    chunk of all rows: the same loss and gradients (float64, 1e-12), each chunk's loss forms no tensor of the
    batch's padded size ([2B, T]), and the loss was called once per chunk plus once for the returned value."""
    packed = case.startswith("packed-")
    name = case.removeprefix("packed-")
    whole = _run(monkeypatch, name, None, packed=packed)
    parts = _run(monkeypatch, name, 10, packed=packed)
    for a, b in zip(whole[:3], parts[:3]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert parts[3].calls > whole[3].calls >= 1  # several chunks, each seen by the loss
    assert parts[3].largest < 2 * B * T  # the batch's padded layout was never formed per chunk
