"""Vocab-parallel lm_head: the three ops on P gloo ranks, each holding one vocabulary shard of the weight (uneven
splits), against the single-process op on the full weight: loss, log-probs, metrics, ``d hidden`` and each rank's
``d weight`` / ``d bias`` shard, on both backends (triton under the interpreter, inherited by the ranks)."""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from conftest import BACKENDS
from helpers.distributed import TIMEOUT, run_ranks
from helpers.reference import reference_logprobs, reference_row_stats
from helpers.vocab_parallel import SHARDS, compare_ranks, leaves, problem
from fastalign import FusedLinearLogProbs, fused_linear_dpo_loss, fused_linear_logprobs, fused_linear_ppo_loss
from fastalign.kernels.lse_forward import merge_lse_partials
from fastalign.ops import torch_backend
from fastalign.ops.linear import lse_forward, triton_lse_partials
from fastalign.ops.logprobs import prepare_linear
from fastalign.ops.torch_backend import RowStatsSpec

ALL_STATS = RowStatsSpec(entropy=True, lse2=True, logit_sum=True, argmax=True)


def run_ops(p: dict, rows: slice, backend: str, group) -> dict[str, torch.Tensor]:
    """Every checked output of the three ops with the vocabulary ``rows`` of the lm_head (the whole of it and group
    None in the parent). Key suffixes: ``/dw``, ``/db`` a gradient of this shard; ``/dh_partial`` this rank's
    partial ``d hidden`` (the ranks' sum is the whole); any other is the same on every rank."""
    out = {}
    kw = dict(backend=backend, process_group=group)
    w, b, rw, rb = p["weight"][rows], p["bias"][rows], p["ref_weight"][rows], p["ref_bias"][rows]

    # Log-probs and entropy with bias and temperature, upstream gradients on both outputs.
    h, wl, bl = leaves(p["hidden"], w, b)
    lp, ent = fused_linear_logprobs(h, wl, p["targets"], bias=bl, temperature=0.7, return_entropy=True, **kw)
    grads = torch.autograd.grad((p["g_lp"] * lp + p["g_ent"] * ent).sum(), [h, wl, bl])
    out.update({"lp": lp, "lp/ent": ent, "lp/dh": grads[0], "lp/dw": grads[1], "lp/db": grads[2]})
    with torch.no_grad():
        out["lp/no_grad"] = fused_linear_logprobs(p["hidden"], w, p["targets"], bias=b, temperature=0.7, **kw)

    # Frozen lm_head (no moments shortcut when sharded), another ignore_index, d hidden left to the caller.
    (h,) = leaves(p["hidden"])
    module = FusedLinearLogProbs(ignore_index=-1, reduce_hidden_grad=False, **kw)
    lp = module(h, w, p["targets"].masked_fill(p["targets"] == -100, -1), b)
    out["frozen"] = lp
    out["frozen/dh_partial"] = torch.autograd.grad((p["g_lp"] * lp).sum(), h)[0]

    # PPO: KL, entropy bonus, asymmetric clip, value head; d hidden reduced here, then left to the caller.
    for reduce in (True, False):
        h, wl, bl, vh, vb = leaves(p["hidden"], w, b, p["vhead"], p["vbias"])
        ppo = fused_linear_ppo_loss(h, wl, p["targets"], p["old"], p["adv"], mask=p["mask"], bias=bl,
                                    ref_logprobs=p["ref_lp"], kl_coef=0.05, cliprange_high=0.28, entropy_coef=0.01,
                                    temperature=0.9, value_head_weight=vh, value_head_bias=vb,
                                    old_values=p["old_values"], returns=p["returns"], reduce_hidden_grad=reduce, **kw)
        grads = torch.autograd.grad(ppo.loss, [h, wl, bl, vh, vb])
        name = "ppo" if reduce else "ppo_partial"
        out.update({f"{name}/loss": ppo.loss, f"{name}/lp": ppo.logprobs, f"{name}/ent": ppo.entropy,
                    f"{name}/values": ppo.values, f"{name}/dw": grads[1], f"{name}/db": grads[2],
                    f"{name}/dvhead": grads[3], f"{name}/dvbias": grads[4],
                    f"{name}/dh" if reduce else f"{name}/dh_partial": grads[0]})
        out.update({f"{name}/metric/{k}": v for k, v in ppo.metrics.items()})

    # DPO: a reference computed from its own sharded lm_head, with RPO; then a precomputed one (ipo, means).
    h, wl, bl = leaves(p["hidden"], w, b)
    dpo = fused_linear_dpo_loss(h, wl, p["targets"], bias=bl, ref_hidden=p["ref_hidden"], ref_weight=rw,
                                ref_bias=rb, rpo_alpha=0.5, beta=0.5, **kw)
    grads = torch.autograd.grad(dpo.loss, [h, wl, bl])
    out.update({"dpo/dh": grads[0], "dpo/dw": grads[1], "dpo/db": grads[2]})
    out.update({f"dpo/{k}": v for k, v in dpo._asdict().items() if k not in ("metrics", "bco_state")})
    out.update({f"dpo/metric/{k}": v for k, v in dpo.metrics.items()})
    h, wl = leaves(p["hidden"], w)
    dpo = fused_linear_dpo_loss(h, wl, p["targets"], ref_chosen_logps=p["ref_logps"][:2],
                                ref_rejected_logps=p["ref_logps"][2:], loss_type="ipo", temperature=1.3,
                                reduce_hidden_grad=False, **kw)
    grads = torch.autograd.grad(dpo.loss, [h, wl])
    out.update({"ipo/loss": dpo.loss, "ipo/chosen_logps": dpo.chosen_logps, "ipo/dh_partial": grads[0],
                "ipo/dw": grads[1]})
    # A ranking of the 4 rows (one prompt, K = 4) with sft, LD-DPO, WPO and the metrics over the vocabulary.
    h, wl = leaves(p["hidden"], w)
    rank = fused_linear_dpo_loss(h, wl, p["targets"], ref_logps=p["ref_logps"].view(4, 1), num_responses=4,
                                 loss_type=["sigmoid", "sft"], ld_alpha=0.5, use_weighting=True, vocab_metrics=True,
                                 **kw)
    grads = torch.autograd.grad(rank.loss, [h, wl])
    out.update({"rank/loss": rank.loss, "rank/logps": rank.logps, "rank/dh": grads[0], "rank/dw": grads[1]})
    # (not mean_token_accuracy: an arg-max of float-noise-level ties; its merge is tested in test_logprobs.py)
    out.update({f"rank/metric/{k}": v for k, v in rank.metrics.items() if k != "mean_token_accuracy"})
    out.update(row_stats(p, rows, backend, group))
    return {k: v.detach() for k, v in out.items()}


def row_stats(p: dict, rows: slice, backend: str, group) -> dict[str, torch.Tensor]:
    """Every optional row statistic (``stats/<name>``) of the float and the integer problems through
    ``lse_forward``; on torch also from the one-pass loss (merged chunk by chunk), on triton also from the
    epilogues' partials (the merged statistics as one split)."""
    out = {}
    for kind, hidden, weight, bias in (("float", p["hidden"], p["weight"], p["bias"]),
                                       ("int", p["int_hidden"], p["int_weight"], None)):
        inputs, opts = prepare_linear(hidden, weight[rows], p["targets"], None if bias is None else bias[rows],
                                      temperature=0.7 if bias is not None else 1.0, ignore_index=-100,
                                      backend=backend, chunk_size=None, check_finite=True, process_group=group)
        args = (inputs.hidden, inputs.weight, inputs.bias, inputs.targets)
        ways = {"": lse_forward(*args, opts, spec=ALL_STATS)}
        if backend == "torch":
            ways["fused/"] = torch_backend.linear_logprobs_fused(
                *args, lambda rows, lp, ent, stats: (torch.zeros_like(lp), None), spec=ALL_STATS,
                inv_temperature=opts.inv_temperature, ignore_index=-100, chunk_size=5, shard=opts.shard).stats
        else:
            ways["partials/"] = merge_lse_partials(triton_lse_partials(*args, opts, ALL_STATS))
        for way, stats in ways.items():
            out.update({f"stats/{kind}/{way}{name}": value for name, value in stats._asdict().items()})
    return out


def error_of(call) -> str:
    try:
        call()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def bad_inputs(p: dict, rows: slice, group) -> dict[str, str]:
    """The error each bad call raises (on every rank alike, so no rank is left waiting in a collective)."""
    h, t, w = p["hidden"], p["targets"], p["weight"]
    logprobs = lambda **kw: lambda: fused_linear_logprobs(  # noqa: E731
        kw.pop("hidden", h), kw.pop("weight", w[rows]), kw.pop("targets", t), backend="torch", process_group=group,
        **kw)
    return {
        "target_past_global_vocab": error_of(logprobs(targets=t.masked_fill(t == 0, w.shape[0]))),
        "full_bias": error_of(logprobs(bias=p["bias"])),
        "empty_shard": error_of(logprobs(weight=w[rows][:0] if dist.get_rank(group) == 1 else w[rows])),
        "nan_in_one_shard": error_of(logprobs(bias=p["bias"][rows].index_fill(0, torch.tensor([3]), float(
            "nan")) if dist.get_rank(group) == 1 else p["bias"][rows])),
        "hidden_width": error_of(logprobs(hidden=h[..., :-1])),
        "reduce_flag": error_of(logprobs(reduce_hidden_grad=1)),
        "full_ref_weight": error_of(lambda: fused_linear_dpo_loss(
            h, w[rows], t, ref_hidden=h, ref_weight=p["ref_weight"], backend="torch", process_group=group)),
    }


def rank_main(rank: int, world_size: int, backend: str) -> dict:
    """One rank: its shard of the problem's vocabulary, the outputs and (2 ranks) the errors."""
    sizes = SHARDS[world_size]
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    p = problem(sizes)
    group = dist.new_group(list(range(world_size)), timeout=TIMEOUT)  # a group other than the default one
    return {"rows": rows, "outputs": run_ops(p, rows, backend, group),
            "errors": bad_inputs(p, rows, group) if world_size == 2 else None}


# 4 ranks on the torch backend: test_one_pass_losses_walk_the_same_chunks_on_every_rank (the same ops, many chunks)
@pytest.mark.parametrize("world_size, backend", [(2, b) for b in BACKENDS] + [(4, b) for b in BACKENDS if b != "torch"])
def test_sharded_ops_equal_the_single_process_op(world_size, backend):
    ranks = run_ranks(rank_main, world_size, backend)
    check_against_single_process(ranks, problem(SHARDS[world_size]), backend)
    if world_size == 2:
        check_errors(ranks)


def check_against_single_process(ranks: list[dict], p: dict, backend: str) -> None:
    """Every rank's outputs against the single-process ops on the whole lm_head (``run_ops`` keys)."""
    want = run_ops(p, slice(None), backend, None)

    # The log-probs and entropy against materialized float64 logits too (independent of fastalign).
    ref_lp, ref_ent = reference_logprobs(p["hidden"], p["weight"], p["targets"], p["bias"], temperature=0.7)
    torch.testing.assert_close(ranks[0]["outputs"]["lp"].double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[0]["outputs"]["lp/ent"].double(), ref_ent, rtol=1e-5, atol=1e-5)
    # The row statistics too; on the exact integer logits, ties at the max go to the smallest id across shards.
    for kind, hidden, weight, bias, temperature in (("float", p["hidden"], p["weight"], p["bias"], 0.7),
                                                    ("int", p["int_hidden"], p["int_weight"], None, 1.0)):
        ref, z = reference_row_stats(hidden.flatten(0, 1), weight, p["targets"].flatten(), bias,
                                     temperature=temperature)
        if kind == "int":  # a row max in the first shard that recurs in another
            boundary = ranks[1]["rows"].start
            assert ((ref["argmax"] < boundary) & (z[:, boundary:].max(1).values == ref["max_logit"])).sum() >= 3
        for key in [k for k in want if k.startswith(f"stats/{kind}/")]:
            name = key.rsplit("/", 1)[1]
            got = ranks[0]["outputs"][key]
            if name == "argmax" and kind == "float":  # near-ties may go either way: a maximal column
                torch.testing.assert_close(z.gather(1, got[:, None])[:, 0], ref["max_logit"], rtol=0, atol=1e-4)
            else:
                torch.testing.assert_close(got.to(ref[name].dtype), ref[name], rtol=1e-5, atol=2e-5, msg=key)

    compare_ranks(ranks, want, checked_above=lambda key: key.startswith("stats/float/") and key.endswith("argmax"))


def check_errors(ranks: list[dict]) -> None:
    """The bad calls of ``bad_inputs`` (2 ranks): the same clear error on every rank."""
    expected = {
        "target_past_global_vocab": r"ValueError: targets: expected ids in \[0, 97\)",
        "full_bias": r"ValueError: bias: expected shape \(\d+,\) \(one entry per row of weight\), got \(97,\)",
        "empty_shard": r"ValueError: weight: expected a non-empty vocabulary shard .* got shard sizes \[50, 0\]",
        "nan_in_one_shard": r"ValueError: weight: expected finite values in the weight and bias shards of every "
                            r"rank, got NaN/inf on rank\(s\) \[1\]",
        "hidden_width": r"ValueError: hidden: expected last dimension H=16",
        "reduce_flag": r"TypeError: reduce_hidden_grad: expected a bool, got int",
        "full_ref_weight": r"ValueError: ref_weight: expected shape \(\d+, 16\) \(the shape of weight\), "
                           r"got \(97, 16\)",
    }
    for name, pattern in expected.items():
        for r in ranks:
            assert re.search(pattern, r["errors"][name]), f"{name}: {r['errors'][name]}"


def test_one_pass_losses_walk_the_same_chunks_on_every_rank(monkeypatch):
    """The torch backend's one-pass PPO loss merges each chunk's statistics across the group: with a budget of a
    few rows per chunk, shards of 200 to 300 columns would choose different chunks (3 rows at 300 columns, 5 at 200)
    if each rank sized them from its own shard, and the collectives would not match."""
    monkeypatch.setenv("FASTALIGN_CHUNK_BUDGET_MB", str(4096 / 2 ** 20))  # 4 KiB, inherited by the ranks
    ranks = run_ranks(rank_main, 4, "torch")
    check_against_single_process(ranks, problem(SHARDS[4]), "torch")


def test_process_group_must_be_a_process_group():
    hidden, weight, targets = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="process_group: expected None or a torch.distributed.ProcessGroup .* got "
                                        "int"):
        fused_linear_logprobs(hidden, weight, targets, process_group=1)
    with pytest.raises(TypeError, match="process_group: expected None or a torch.distributed.ProcessGroup"):
        fused_linear_ppo_loss(hidden, weight, targets, torch.zeros(3), torch.zeros(3), process_group="tp")
