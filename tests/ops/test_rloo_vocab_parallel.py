"""The RLOO op with a vocab-parallel lm_head: on 2 gloo ranks with uneven vocabulary shards it equals the
single-process op on the full weight (loss, metrics, log-probs, entropy, d hidden, each rank's d weight / d bias
shard), in its two plans: whole sequences per chunk (one pass) and two passes (chunks smaller than a sequence)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import BACKENDS
from helpers.distributed import TIMEOUT, run_ranks
from helpers.vocab_parallel import SHARDS, compare_ranks, leaves, problem
from fastalign import fused_linear_rloo_loss

CASES = {"one-pass": dict(epsilon_high=0.28), "two-pass": dict(epsilon=0.1, chunk_size=2)}


def run_rloo(p: dict, rows: slice, backend: str, group) -> dict[str, torch.Tensor]:
    out = {}
    w, b = p["weight"][rows], p["bias"][rows]
    old = torch.where(p["mask"], p["old"], 0.0).sum(1) / 4  # log-ratios of either sign, some beyond the clip
    for name, options in CASES.items():
        if backend != "torch":
            options = {k: v for k, v in options.items() if k != "chunk_size"}
        h, wl, bl = leaves(p["hidden"], w, b)
        res = fused_linear_rloo_loss(h, wl, p["targets"], p["adv"][:, 0], old_logprobs=old, mask=p["mask"],
                                     bias=bl, temperature=0.9, backend=backend, process_group=group, **options)
        grads = torch.autograd.grad(res.loss, [h, wl, bl])
        out.update({f"{name}/loss": res.loss, f"{name}/lp": res.logprobs, f"{name}/ent": res.entropy,
                    f"{name}/logps": res.logps, f"{name}/dh": grads[0], f"{name}/dw": grads[1],
                    f"{name}/db": grads[2]})
        out.update({f"{name}/metric/{k}": v for k, v in res.metrics.items()})
    return {k: v.detach() for k, v in out.items()}


def rank_main(rank: int, world_size: int, backend: str) -> dict:
    sizes = SHARDS[world_size]
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    group = dist.new_group(list(range(world_size)), timeout=TIMEOUT)
    return {"rows": rows, "outputs": run_rloo(problem(sizes), rows, backend, group)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_rloo_equals_the_single_process_op(backend):
    ranks = run_ranks(rank_main, 2, backend)
    want = run_rloo(problem(SHARDS[2]), slice(None), backend, None)
    assert 0 < float(want["one-pass/metric/clip_ratio/region_mean"]) < 1  # some sequences clipped, some not
    compare_ranks(ranks, want)
