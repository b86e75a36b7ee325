"""The GRPO op with a vocab-parallel lm_head: on 2 and 4 gloo ranks with uneven vocabulary shards it equals the
single-process op on the full weight (loss, metrics, log-probs, entropy, d hidden, each rank's d weight / d bias
shard), in its three plans: one pass (per-token loss), whole sequences per chunk, two passes (entropy quantile)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import BACKENDS
from helpers.distributed import TIMEOUT, run_ranks
from helpers.vocab_parallel import SHARDS, compare_ranks, leaves, problem
from fastalign import fused_linear_grpo_loss

CASES = {
    "dapo-token": dict(loss_type="dapo", beta=0.05, entropy_coef=0.01, epsilon_high=0.28),
    "gspo-sequence": dict(loss_type="grpo", importance_sampling_level="sequence", delta=2.0, beta=0.05,
                          use_bias_correction_kl=True),
    "entropy-quantile": dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.02),
}


def run_grpo(p: dict, rows: slice, backend: str, group, reduce: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    w, b = p["weight"][rows], p["bias"][rows]
    advantages = p["adv"][:, 0]
    for name, options in CASES.items():
        h, wl, bl = leaves(p["hidden"], w, b)
        res = fused_linear_grpo_loss(h, wl, p["targets"], advantages, old_logprobs=p["old"], mask=p["mask"], bias=bl,
                                     ref_logprobs=p["ref_lp"], temperature=0.9, backend=backend,
                                     process_group=group, reduce_hidden_grad=reduce, **options)
        grads = torch.autograd.grad(res.loss, [h, wl, bl])
        out.update({f"{name}/loss": res.loss, f"{name}/lp": res.logprobs, f"{name}/ent": res.entropy,
                    f"{name}/dw": grads[1], f"{name}/db": grads[2],
                    f"{name}/dh" if reduce else f"{name}/dh_partial": grads[0]})
        out.update({f"{name}/metric/{k}": v for k, v in res.metrics.items()})
    return {k: v.detach() for k, v in out.items()}


def rank_main(rank: int, world_size: int, backend: str) -> dict:
    sizes = SHARDS[world_size]
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    group = dist.new_group(list(range(world_size)), timeout=TIMEOUT)
    p = problem(sizes)
    return {"rows": rows, "outputs": {**run_grpo(p, rows, backend, group),
                                      **{f"partial/{k}": v for k, v in
                                         run_grpo(p, rows, backend, group, reduce=False).items()}}}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_grpo_equals_the_single_process_op(world_size, backend):
    ranks = run_ranks(rank_main, world_size, backend)
    p = problem(SHARDS[world_size])
    want = run_grpo(p, slice(None), backend, None)
    want.update({f"partial/{k}": v for k, v in run_grpo(p, slice(None), backend, None, reduce=False).items()})
    compare_ranks(ranks, want)
