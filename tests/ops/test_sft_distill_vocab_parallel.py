"""The fused cross-entropy and distillation loss (both backends) on 2 and 4 gloo ranks, each holding an uneven
vocabulary shard of the weights, against the single-process ops: loss, metrics, ``d hidden`` and each rank's
``d weight`` / ``d bias`` shard. One run of the ranks per world size checks every op (spawning ranks is the cost)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import BACKENDS
from helpers.cross_entropy import problem
from helpers.distill import problem as distill_problem
from helpers.distributed import run_ranks
from fastalign import fused_linear_cross_entropy, fused_linear_distill_loss

SHARDS = {2: [20, 17], 4: [11, 9, 10, 7]}  # V = 37
CE_CASES = {"mean": dict(label_smoothing=0.2, z_loss=0.01),
            "none": dict(reduction="none", label_smoothing=0.1, z_loss=0.02, temperature=0.8),
            "dft": dict(loss_type="dft", chunk_size=4)}
DISTILL_CASES = {"jsd": dict(beta=0.5, temperature=0.7, chunk_size=4), "forward_kl_hard": dict(
    beta=0.0, hard_label_weight=0.25), "reverse_kl": dict(beta=1.0)}


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def run_ops(rows: slice, group) -> dict[str, torch.Tensor]:
    """Every checked output with the vocabulary ``rows`` of the weights (all of it and group None in the parent).
    Keys ending in ``/dw``, ``/db``: this shard's gradient; the others the same on every rank."""
    out = {}
    for backend in BACKENDS:
        dtype = torch.float64 if backend == "torch" else torch.float32
        hidden, weight, b, targets = problem(dtype=dtype)
        for name, options in CE_CASES.items():
            h, w, bb = leaves(hidden, weight[rows], b[rows])
            res = fused_linear_cross_entropy(h, w, targets, bias=bb, backend=backend, process_group=group, **options)
            upstream = torch.linspace(-1, 1, res.loss.numel(), dtype=dtype).view(res.loss.shape)
            grads = torch.autograd.grad(res.loss, [h, w, bb], upstream)
            key = f"ce/{backend}/{name}"
            out.update({f"{key}/loss": res.loss.detach(), f"{key}/dh": grads[0], f"{key}/dw": grads[1],
                        f"{key}/db": grads[2], f"{key}/accuracy": res.metrics["mean_token_accuracy"],
                        f"{key}/entropy": res.metrics["entropy"], f"{key}/lse": res.lse})
    p = distill_problem(v=37)
    for backend, name in ((backend, name) for backend in BACKENDS for name in DISTILL_CASES):
        dtype = torch.float64 if backend == "torch" else torch.float32
        q = {k: v.to(dtype) if v.is_floating_point() else v for k, v in p.items()}
        h, w, bb = leaves(q["sh"], q["sw"][rows], q["sb"][rows])
        res = fused_linear_distill_loss(h, w, q["th"], q["tw"][rows], q["mask"], student_bias=bb,
                                        teacher_bias=q["tb"][rows], targets=q["targets"], backend=backend,
                                        process_group=group, **DISTILL_CASES[name])
        grads = torch.autograd.grad(res.loss, [h, w, bb])
        key = f"distill/{backend}/{name}"
        out.update({f"{key}/loss": res.loss.detach(), f"{key}/dh": grads[0], f"{key}/dw": grads[1],
                    f"{key}/db": grads[2], f"{key}/entropy": res.entropy,
                    **{f"{key}/metric/{k}": v for k, v in res.metrics.items()}})
    return out


def rank_main(rank: int, world_size: int) -> dict:
    sizes = SHARDS[world_size]
    start = sum(sizes[:rank])
    return run_ops(slice(start, start + sizes[rank]), dist.group.WORLD)


@pytest.mark.slow  # spawns 2 + 4 ranks: about 30 s of CPU, minutes of wall time on a loaded machine
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_sft_and_distill_equal_the_single_process_ops(world_size):
    ranks = run_ranks(rank_main, world_size)
    sizes = SHARDS[world_size]
    whole = run_ops(slice(None), None)
    for rank, got in enumerate(ranks):
        rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        assert got.keys() == whole.keys()
        for key, value in whole.items():
            want = value[rows] if key.endswith(("/dw", "/db")) else value
            tol = dict(rtol=1e-9, atol=1e-10) if "/triton/" not in key else dict(rtol=2e-4, atol=2e-5)
            torch.testing.assert_close(got[key], want, **tol, msg=lambda m: f"rank {rank}, {key}: {m}")
