"""The engine's one-pass plan does no O(all rows) work per chunk of its own: counted structurally, as the fresh
tensors of all M rows that it allocates outside the loss (whose contract gives it full-length values)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign.ops import engine
from fastalign.ops.logprobs import prepare_linear

GROUPS, ROWS = 8, 6  # M = 48 rows in groups of 6


class FullLengthAllocations(TorchDispatchMode):
    """Counts the ops that return a fresh tensor (not sharing an input's storage) whose first dimension is ``rows``,
    except while ``inside`` (the loss and its gradient)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.count, self.inside = rows, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside:
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.count += any(t.dim() >= 1 and t.shape[0] == self.rows and t.untyped_storage().data_ptr()
                              not in inputs for t in outs)
        return out


def _full_length_allocations(monkeypatch, chunk_size: int) -> int:
    torch.manual_seed(0)
    m = GROUPS * ROWS
    hidden = torch.randn(m, 8, requires_grad=True)
    weight = torch.randn(29, 8, requires_grad=True)
    targets = torch.randint(0, 29, (m,))
    inputs, opts = prepare_linear(hidden, weight, targets, None, temperature=1.0, ignore_index=-100, backend="torch",
                                  chunk_size=chunk_size, check_finite=True)
    mode = FullLengthAllocations(m)
    loss_and_grads = engine._loss_and_grads

    def counted_apart(*args, **kwargs):
        mode.inside = True
        try:
            return loss_and_grads(*args, **kwargs)
        finally:
            mode.inside = False

    monkeypatch.setattr(engine, "_loss_and_grads", counted_apart)
    loss_fn = lambda values: values.logprobs.view(-1, ROWS).sum(1).sigmoid().sum()  # noqa: E731 (whole groups)
    with mode:
        out = engine.fused_rows_loss(inputs, opts, loss_fn, coupling=[ROWS] * GROUPS)
    out.loss.backward()
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
    return mode.count


@pytest.mark.parametrize("chunks", [8, 4])
def test_one_pass_allocates_no_full_length_tensor_per_chunk(monkeypatch, chunks):
    """Chunks of one group each (8 chunks) or 2 (4 chunks) against one chunk of 4 groups (2 chunks): the engine's own
    full-length allocations do not grow with the number of chunks (before, each chunk allocated a zero tensor per
    row statistic)."""
    few = _full_length_allocations(monkeypatch, chunk_size=4 * ROWS)
    many = _full_length_allocations(monkeypatch, chunk_size=GROUPS * ROWS // chunks)
    assert few > 0  # the counter sees the outputs it must see
    assert many == few


@pytest.mark.parametrize("coupling, groups", [([5, 0, 7, 1, 0, 6, 2], None), ("token", [5, 0, 7, 1, 0, 6, 2])])
def test_one_pass_loss_sees_each_chunks_rows_only(coupling, groups):
    """The loss is called once per chunk on that chunk's rows alone (``values.rows``), with the range of the groups
    they belong to (``values.groups``: whole groups, or with coupling "token" the groups they touch), then once on
    all rows for the returned loss; the gradients equal autograd's through a float64 reference (logits formed)."""
    sizes = [5, 0, 7, 1, 0, 6, 2]
    m, starts = sum(sizes), [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    torch.manual_seed(0)
    hidden = torch.randn(m, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 29, (m,))
    scale = torch.rand(len(sizes), dtype=torch.float64)
    seen = []

    def loss_fn(values):  # per group: scale_g * sigmoid(sum of its log-probs / 4) (a sum of per-token terms on "token")
        seen.append((values.logprobs.shape[0], values.rows, values.groups))
        part = slice(0, len(sizes)) if values.groups is None else values.groups
        first = starts[part.start] if values.rows is None else values.rows.start
        group = torch.bucketize(torch.arange(first, first + values.logprobs.shape[0]), torch.tensor(starts[1:]),
                                right=True)
        sums = torch.zeros(len(sizes), dtype=values.logprobs.dtype).index_add(0, group, values.logprobs)
        terms = sums if coupling == "token" else (sums / 4).sigmoid()
        return (scale * terms)[part].sum()

    inputs, opts = prepare_linear(hidden, weight, targets, None, temperature=1.0, ignore_index=-100, backend="torch",
                                  chunk_size=7, check_finite=True)
    out = engine.fused_rows_loss(inputs, opts, loss_fn, coupling=coupling, groups=groups)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    *chunks, last = seen
    assert len(chunks) >= 3 and last == (m, None, None)
    assert sum(n for n, _, _ in chunks) == m
    for n, rows, part in chunks:  # the old engine passed all m rows to every chunk's call
        assert n == rows.stop - rows.start <= 7
        assert starts[part.start] <= rows.start and rows.stop <= starts[part.stop]
        if coupling != "token":  # whole groups
            assert (starts[part.start], starts[part.stop]) == (rows.start, rows.stop)
    logprobs = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    seen.clear()
    expected = torch.autograd.grad(loss_fn(engine.RowValues(logprobs, None, None)), (hidden, weight))
    torch.testing.assert_close(out.loss, loss_fn(engine.RowValues(logprobs.detach(), None, None)))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
