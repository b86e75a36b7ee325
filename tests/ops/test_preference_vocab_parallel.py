"""Vocab-parallel KTO, CPO/SimPO/AlphaPO and ORPO ops: 2 gloo ranks with an uneven vocabulary split against the
single-process op on the whole lm_head (loss, metrics with logits/*, d hidden, each rank's d weight / d bias shard),
both backends, whole groups in one pass and (a chunk smaller than a group) two passes on the torch backend."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import BACKENDS
from helpers.distributed import TIMEOUT, run_ranks
from fastalign import fused_linear_cpo_loss, fused_linear_kto_loss, fused_linear_orpo_loss

SIZES = [50, 47]  # V = 97
WIDTH = 16


def problem() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    vocab = sum(SIZES)
    inputs = torch.randint(0, vocab, (4, 6), generator=gen)
    targets = inputs.clone()
    targets[:, :2] = -100  # prompt
    targets[3, 4:] = -100  # padding
    targets[0, 2:5] = torch.tensor([0, vocab - 1, SIZES[0]])  # the first and last ids, the second shard's first
    nll_targets = torch.where(targets[:2] != -100, targets[:2], inputs[:2])  # prompt and response
    return dict(hidden=torch.randn(4, 6, WIDTH, generator=gen), targets=targets, nll_targets=nll_targets,
                weight=torch.randn(vocab, WIDTH, generator=gen) / WIDTH ** 0.5, bias=torch.randn(vocab, generator=gen),
                labels=torch.tensor([True, False, False, True]), ref_logps=-15 + torch.randn(4, generator=gen))


def run_ops(p: dict, rows: slice, backend: str, chunk_size: int | None, group) -> dict[str, torch.Tensor]:
    """Loss, metrics and gradients of the three ops with the vocabulary ``rows`` of the lm_head."""
    out = {}
    ops = {
        "kto": lambda **kw: fused_linear_kto_loss(targets=p["targets"], labels=p["labels"], ref_logps=p["ref_logps"],
                                                  kl=torch.tensor(0.3), beta=0.5, **kw),
        "simpo": lambda **kw: fused_linear_cpo_loss(targets=p["targets"], loss_type="simpo", alpha=0.2, beta=2.0,
                                                    **kw),
        "orpo": lambda **kw: fused_linear_orpo_loss(targets=p["targets"], nll_targets=p["nll_targets"], **kw),
    }
    for name, op in ops.items():
        h, w, b = (t.clone().requires_grad_(True) for t in (p["hidden"], p["weight"][rows], p["bias"][rows]))
        result = op(hidden=h, weight=w, bias=b, temperature=0.9, backend=backend, chunk_size=chunk_size,
                    process_group=group, vocab_metrics=True)  # logits/*: the rows' logit sums merged over shards
        dh, dw, db = torch.autograd.grad(result.loss, [h, w, b])
        out.update({f"{name}/loss": result.loss.detach(), f"{name}/dh": dh, f"{name}/dw": dw, f"{name}/db": db,
                    **{f"{name}/{k}": v for k, v in result.metrics.items()}})
    return out


CASES = [(b, None) for b in BACKENDS] + [("torch", 3)]  # backend, chunk_size


def rank_main(rank: int, world_size: int) -> dict:
    rows = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    group = dist.new_group(list(range(world_size)), timeout=TIMEOUT)
    return {"rows": rows, "outputs": {case: run_ops(problem(), rows, *case, group) for case in CASES}}


@pytest.mark.slow
def test_sharded_preference_ops_equal_the_single_process_op():
    ranks = run_ranks(rank_main, 2)
    for case in CASES:
        want = run_ops(problem(), slice(None), *case, None)
        for key, value in want.items():
            for r in ranks:
                got = r["outputs"][case][key]
                if key.endswith(("/dw", "/db")):
                    value_here = value[r["rows"]]
                else:
                    value_here = value
                    assert torch.equal(got, ranks[0]["outputs"][case][key]), f"{case} {key} differs across ranks"
                scale = float(value_here.abs().max())
                torch.testing.assert_close(got, value_here, rtol=1e-5, atol=1e-6 * max(scale, 1e-3),
                                           msg=f"{case} {key}")
            assert value.abs().max() > 0 or key.endswith("kl"), (case, key)
