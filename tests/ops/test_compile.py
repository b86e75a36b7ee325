"""``torch.compile(fullgraph=True)`` through the fused ops: the registered operators (``torch.library.opcheck`` on
every backend available, values and gradients against a float64 reference that materializes the logits), every public op compiled without a graph
break and equal to eager, a tiny HF Llama with the fused DPO and GRPO losses, and recompiles over sequence lengths.

The public ops compile with ``aot_eager`` (dynamo with ``fullgraph=True``, then AOTAutograd's fake-tensor trace of the
forward and backward: everything but inductor's code generation, which sees the registered ops as opaque calls);
the log-probs op and the HF model also with inductor. Compile time counts in the suite's budget: shapes are tiny.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from fastalign import (fused_linear_cpo_loss, fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_kto_loss,
                       fused_linear_logprobs, fused_linear_orpo_loss, fused_linear_ppo_loss, fused_linear_rloo_loss)
from conftest import BACKENDS
from fastalign.ops import registered
from fastalign.ops.linear import LinearOptions

from helpers.distributed import run_ranks

IGNORE = -100


def naive_token_values(hidden, weight, bias, targets, temperature):
    """float64 reference: log-probs and entropy ``[N]`` from the materialized logits, 0 at ignored rows."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    log_p = (z / temperature).log_softmax(-1)
    valid = targets != IGNORE
    logprobs = log_p.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.where(valid, logprobs, 0.0), torch.where(valid, entropy, 0.0), z / temperature


def problem(n=7, h=5, v=37, bias=True, requires_grad=True):
    hidden = torch.randn(h, n).T  # non-contiguous [N, H]
    weight, b = torch.randn(v, h), (torch.randn(v) if bias else None)
    targets = torch.randint(0, v, (n,))
    if n > 1:
        targets[1] = IGNORE
    for t in (hidden, weight, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return hidden, weight, b, targets


SPECS = [(False, False, False, False), (True, True, True, True)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_opcheck_token_stats(bias, spec, backend):
    hidden, weight, b, targets = problem(bias=bias)
    args = registered.options_args(LinearOptions(backend, temperature=0.7, chunk_size=3))
    torch.library.opcheck(torch.ops.fastalign.token_stats, (hidden, weight, b, targets, *args, *spec))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend, deterministic", [("torch", False), ("torch", True), ("triton", False),
                                                    ("triton", True)])
def test_opcheck_logprobs_backward(bias, backend, deterministic):
    if backend not in BACKENDS:
        pytest.skip("triton is not installed")
    hidden, weight, b, targets = problem(bias=bias, requires_grad=False)
    n = hidden.shape[0]
    args = registered.options_args(LinearOptions(backend, temperature=0.7, chunk_size=3,
                                                 deterministic=deterministic))
    lse, entropy = torch.randn(n) + 3, torch.rand(n)
    for grad_entropy, need in ((torch.randn(n), (True, True, bias)), (None, (True, False, False))):
        torch.library.opcheck(torch.ops.fastalign.logprobs_backward,
                              (hidden, weight, b, targets, lse, entropy, torch.randn(n), grad_entropy, *args, *need))


@pytest.mark.parametrize("shape", [(7, 5, 37), (1, 1, 3)])
@pytest.mark.parametrize("frozen", [False, True])
def test_registered_values_and_grads_match_float64(shape, frozen):
    """The registered statistics op and its registered backward against the float64 reference: log-probs, entropy,
    lse2, logit sum, argmax, and the gradients of a loss of the log-probs, the entropy, the lse and the logit sum
    (temperature, bias, an ignored row, chunks of 3 rows over V = 37; N = H = 1; a frozen weight gets no
    gradient)."""
    n, h, v = shape
    hidden, weight, bias, targets = problem(n, h, v)
    weight.requires_grad_(not frozen)
    opts = LinearOptions(temperature=0.7, chunk_size=3)
    spec = registered.RowStatsSpec(entropy=True, lse2=True, logit_sum=True, argmax=True)
    logprobs, entropy, stats = registered.registered_token_stats(hidden, weight, bias, targets, opts, spec)
    a, c, e, f = (torch.randn(n, dtype=torch.float64) for _ in range(4))
    ((logprobs.double() * a).sum() + (entropy.double() * c).sum() + (stats.lse.double() * e).sum()
     + (stats.logit_sum.double() * f).sum()).backward()
    got = [hidden.grad, weight.grad, bias.grad]
    for t in (hidden, weight, bias):
        t.grad = None
    ref_lp, ref_ent, z = naive_token_values(hidden, weight, bias, targets, 0.7)
    valid = targets != -100
    ((ref_lp * a).sum() + (ref_ent * c).sum() + (torch.where(valid, z.logsumexp(-1), 0) * e).sum()
     + (torch.where(valid, z.sum(-1), 0) * f).sum()).backward()
    torch.testing.assert_close(logprobs.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    z = z.detach()[valid]  # the ignored rows get no logits: their statistics are 0
    torch.testing.assert_close(stats.lse.double()[valid], z.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.lse2.double()[valid], (2 * z).logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.logit_sum.double()[valid], z.sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.max_logit.double()[valid], z.max(-1).values, rtol=1e-5, atol=1e-5)
    assert all(bool((t[~valid] == 0).all()) for t in (stats.lse, stats.lse2, stats.logit_sum, stats.argmax))
    assert None not in (logprobs.grad_fn, stats.lse.grad_fn, stats.logit_sum.grad_fn)
    assert stats.lse2.grad_fn is None and stats.max_logit.grad_fn is None
    for g, t in zip(got, (hidden, weight, bias)):
        if t.grad is None:
            assert g is None
        else:
            torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)
    assert (weight.grad is None) == frozen


def _shard_run(rank, world_size, sizes):
    """One rank of a vocab-parallel check: opcheck of both registered ops with this rank's shard, and the values and
    gradients of the registered path against the whole vocabulary's float64 reference."""
    import torch.distributed as dist

    from fastalign.ops.vocab_parallel import vocab_shard

    torch.manual_seed(0)
    hidden, weight, bias, targets = problem(7, 5, sum(sizes))
    start = sum(sizes[:rank])
    w_shard = weight.detach()[start:start + sizes[rank]].clone().requires_grad_(True)
    b_shard = bias.detach()[start:start + sizes[rank]].clone().requires_grad_(True)
    shard = vocab_shard(dist.group.WORLD, w_shard, b_shard, reduce_hidden_grad=True, check_finite=True)
    opts = LinearOptions(temperature=0.7, chunk_size=3, shard=shard)
    args = registered.options_args(opts)
    torch.library.opcheck(torch.ops.fastalign.token_stats, (hidden, w_shard, b_shard, targets, *args, *SPECS[1]))
    n = hidden.shape[0]
    torch.library.opcheck(torch.ops.fastalign.logprobs_backward,
                          (hidden.detach(), w_shard.detach(), b_shard.detach(), targets, torch.randn(n) + 3,
                           torch.rand(n), torch.randn(n), torch.randn(n), *args, True, True, True))
    logprobs, entropy, _ = registered.registered_token_stats(hidden, w_shard, b_shard, targets, opts,
                                                             registered.RowStatsSpec(entropy=True))
    a, c = torch.randn(n), torch.randn(n)
    ((logprobs * a).sum() + (entropy * c).sum()).backward()
    grad_hidden, hidden.grad = hidden.grad, None
    ref_lp, ref_ent, _ = naive_token_values(hidden, weight, bias, targets, 0.7)
    ((ref_lp * a.double()).sum() + (ref_ent * c.double()).sum()).backward()
    rows = slice(start, start + sizes[rank])
    return [(logprobs.detach(), ref_lp.detach()), (entropy.detach(), ref_ent.detach()),
            (grad_hidden, hidden.grad), (w_shard.grad, weight.grad[rows]), (b_shard.grad, bias.grad[rows])]


@pytest.mark.slow
def test_registered_vocab_parallel_uneven_shards():
    """The registered ops with a vocabulary shard (the group travels by name): opcheck on 2 gloo ranks of an uneven
    split (V = 37 as 25 + 12), values and shard gradients equal to the whole vocabulary's float64 reference."""
    for pairs in run_ranks(_shard_run, 2, [25, 12]):
        for got, want in pairs:
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


# Public ops: a function of hidden states and the lm_head weight per op, with a tiny [4, 6] batch.
B, T, H, V = 2, 6, 8, 37


def _batch(length=T):
    hidden = torch.randn(2 * B, length, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (2 * B, length))
    targets[:, :2] = IGNORE  # prompt
    targets[1, -1] = IGNORE  # padding
    return hidden, weight, targets


def _inputs(length=T):
    g = torch.Generator().manual_seed(1)
    return dict(old=-3 + 0.1 * torch.randn(2 * B, length, generator=g), adv=torch.randn(2 * B, generator=g),
                ref=-5 - torch.rand(2 * B, generator=g))


def op_logprobs(hidden, weight, targets, x):
    logprobs, entropy = fused_linear_logprobs(hidden, weight, targets, temperature=0.8, return_entropy=True)
    return (logprobs * logprobs).sum() + entropy.sum(), {"logprobs": logprobs}


def op_ppo(hidden, weight, targets, x):
    out = fused_linear_ppo_loss(hidden, weight, targets, x["old"], x["adv"][:, None].expand_as(x["old"]),
                                entropy_coef=0.01, kl_coef=0.05, ref_logprobs=x["old"] + 0.1)
    return out.loss, out.metrics


def op_grpo(hidden, weight, targets, x):
    out = fused_linear_grpo_loss(hidden, weight, targets, x["adv"], old_logprobs=x["old"], beta=0.04,
                                 ref_logprobs=x["old"] + 0.1, top_entropy_quantile=0.5)
    return out.loss, {**out.metrics, "logprobs": out.logprobs, "entropy": out.entropy}


def op_gspo(hidden, weight, targets, x):
    out = fused_linear_grpo_loss(hidden, weight, targets, x["adv"], old_logprobs=x["old"],
                                 importance_sampling_level="sequence", loss_type="vespo")
    return out.loss, out.metrics


def op_dpo(hidden, weight, targets, x):
    out = fused_linear_dpo_loss(hidden, weight, targets, ref_logps=x["ref"].view(2, B), vocab_metrics=True,
                                loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    return out.loss, {**out.metrics, "logps": out.logps}


def op_wpo(hidden, weight, targets, x):  # the lse2 statistic without the entropy: p kept scaled (p_norm)
    out = fused_linear_dpo_loss(hidden, weight, targets, ref_logps=x["ref"].view(2, B), use_weighting=True)
    return out.loss, {**out.metrics, "logps": out.logps}


def op_kto(hidden, weight, targets, x):
    out = fused_linear_kto_loss(hidden, weight, targets, torch.tensor([True, False, True, True]),
                                ref_logps=x["ref"], kl=torch.tensor(0.1))
    return out.loss, out.metrics


def op_cpo(hidden, weight, targets, x):
    out = fused_linear_cpo_loss(hidden, weight, targets, loss_type="simpo")
    return out.loss, out.metrics


def op_orpo(hidden, weight, targets, x):
    out = fused_linear_orpo_loss(hidden, weight, targets)
    return out.loss, out.metrics


def op_rloo(hidden, weight, targets, x):
    out = fused_linear_rloo_loss(hidden, weight, targets, x["adv"], old_logprobs=x["old"], epsilon_high=0.28)
    return out.loss, {**out.metrics, "logprobs": out.logprobs, "entropy": out.entropy, "logps": out.logps}


OPS = [op_logprobs, op_ppo, op_grpo, op_gspo, op_dpo, op_wpo, op_kto, op_cpo, op_orpo, op_rloo]


def _run(fn, hidden, weight, targets, x):
    loss, outputs = fn(hidden, weight, targets, x)
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss, outputs, grads


def _assert_same(compiled, eager):
    (loss, outputs, grads), (ref_loss, ref_outputs, ref_grads) = compiled, eager
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert outputs.keys() == ref_outputs.keys()
    for name in outputs:
        torch.testing.assert_close(outputs[name], ref_outputs[name], rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
    assert ref_grads[0].abs().sum() > 0 and ref_grads[1].abs().sum() > 0  # the test can see a missing gradient


@pytest.mark.parametrize("fn", OPS, ids=lambda f: f.__name__)
def test_public_op_compiles_fullgraph(fn):
    """Each public op compiles with ``fullgraph=True`` (no graph break: ``explain`` counts 0) and the compiled loss,
    outputs, metrics and gradients equal eager's."""
    hidden, weight, targets = _batch()
    x = _inputs()
    explained = torch._dynamo.explain(fn)(hidden, weight, targets, x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_run(compiled, hidden, weight, targets, x), _run(fn, hidden, weight, targets, x))


TWO_PASSES = {op_logprobs, op_grpo}  # per-token outputs for the caller's loss; a batch quantile (top_entropy_quantile)


@pytest.mark.parametrize("fn", OPS, ids=lambda f: f.__name__)
def test_compiled_plan(fn, monkeypatch):
    """Under torch.compile a loss whose coupling allows it takes the one-pass plan, ``fastalign::chunk_log_probs``
    then ``fastalign::chunk_grads`` per chunk (three matmuls per row, as eager), the others the two registered
    passes (``fastalign::token_stats``, ``fastalign::logprobs_backward``); loss and gradients equal eager's, also
    in chunks of 5 rows (whole groups, or any 5 tokens)."""
    calls = {"one pass": 0, "two passes": 0}

    def counted(plan, impl):
        def call(*args, **kwargs):
            calls[plan] += 1
            return impl(*args, **kwargs)
        return call

    monkeypatch.setattr(registered, "chunk_log_probs", counted("one pass", registered.chunk_log_probs))
    monkeypatch.setattr(registered, "lse_forward", counted("two passes", registered.lse_forward))
    hidden, weight, targets = _batch()
    x = _inputs()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_run(compiled, hidden, weight, targets, x), _run(fn, hidden, weight, targets, x))
    plan = "two passes" if fn in TWO_PASSES else "one pass"
    assert calls[plan] > 0 and calls[({"one pass", "two passes"} - {plan}).pop()] == 0, calls
    if plan == "one pass":
        monkeypatch.setenv("FASTALIGN_CHUNK_BUDGET_MB", str(5 * V * 4 / 2 ** 20))  # 5 rows of [C, V] fp32
        torch._dynamo.reset()
        calls["one pass"] = 0
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        _assert_same(_run(compiled, hidden, weight, targets, x), _run(fn, hidden, weight, targets, x))
        assert calls["one pass"] > 1, calls


def test_logprobs_compiles_with_inductor():
    hidden, weight, targets = _batch()
    compiled = torch.compile(op_logprobs, fullgraph=True)
    _assert_same(_run(compiled, hidden, weight, targets, None), _run(op_logprobs, hidden, weight, targets, None))


def test_no_recompile_across_sequence_lengths():
    """With the sequence dimension marked dynamic, 5 batches of different lengths compile once (the issue allows one
    recompile; the fake kernels have no data-dependent shape, GRPO's compiled rows are all rows whatever the mask)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(op_grpo, fullgraph=True, backend=counter)
    for length in (5, 7, 9, 12, 16):
        hidden, weight, targets = _batch(length)
        x = _inputs(length)
        for t in (hidden, targets, x["old"]):
            torch._dynamo.mark_dynamic(t, 1)
        _assert_same(_run(compiled, hidden, weight, targets, x), _run(op_grpo, hidden, weight, targets, x))
    assert counter.frame_count == 1, counter.frame_count


def test_compiled_call_still_raises_clear_errors():
    """Under compile (without ``fullgraph``: the raise is the graph's end) a wrong shape still gets its ValueError;
    only the value checks that would sync (target range, NaN/inf) are skipped."""
    hidden, weight, targets = _batch()
    compiled = torch.compile(op_logprobs, backend="aot_eager")
    with pytest.raises(ValueError, match="targets: expected shape"):
        compiled(hidden, weight, targets[:, :-1], None)


@pytest.mark.slow
def test_tiny_llama_dpo_and_grpo_compile_fullgraph():
    """A tiny HF Llama's forward, the fused DPO and GRPO losses on its hidden states and the backward compile with
    inductor and ``fullgraph=True`` (0 graph breaks) and give eager's loss and every parameter's gradient."""
    from fastalign.hf import causal_lm_parts
    from fastalign.trainers.tiny import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    ids = torch.randint(3, len(tokenizer), (2 * B, 9))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    labels = ids.masked_fill(torch.arange(9) < 3, IGNORE)  # prompt
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.0])

    def step(ids, mask, labels):
        parts = causal_lm_parts(model, ids, mask, labels)
        dpo = fused_linear_dpo_loss(parts.hidden, parts.weight, parts.targets, bias=parts.bias,
                                    ref_logps=torch.full((2, B), -30.0))
        grpo = fused_linear_grpo_loss(parts.hidden, parts.weight, parts.targets, advantages)
        return dpo.loss + grpo.loss

    explained = torch._dynamo.explain(step)(ids, mask, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        loss = fn(ids, mask, labels)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in ref_grads) > 0


@pytest.mark.slow
def test_compiled_dpo_trainer_step_equals_eager(tmp_path):
    """``torch_compile=True`` (TRL's field; ``aot_eager`` to keep the test short): a DPO trainer's compiled steps
    give eager's losses and weights, and the compiled forward ran the registered ops."""
    from fastalign.trainers import DPOConfig, DPOTrainer
    from fastalign.trainers.tasks import CountingTask
    from fastalign.trainers.tiny import tiny_llama, word_tokenizer

    task = CountingTask()
    runs = []
    for compiled in (True, False):
        tokenizer = word_tokenizer(task.words)
        torch.manual_seed(0)
        model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
        config = DPOConfig(output_dir=str(tmp_path / str(compiled)), learning_rate=3e-3, per_device_train_batch_size=4,
                           max_steps=2, disable_tqdm=True, max_length=24, max_prompt_length=12,
                           torch_compile=compiled, torch_compile_backend="aot_eager")
        torch._dynamo.utils.counters.clear()
        history = DPOTrainer(model, tokenizer, task.preference_data(8, seed=1), config).train()
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compiled
        assert not torch._dynamo.utils.counters["graph_break"]
        runs.append(([record["loss"] for record in history if "loss" in record], model.state_dict()))
    (losses, state), (ref_losses, ref_state) = runs
    assert len(losses) == 2
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["grpo", "kto", "ppo"])
def test_compiled_trainers_forward_has_no_graph_break(tmp_path, trainer):
    """``torch_compile=True`` on the GRPO, KTO and PPO trainers (``aot_eager``, one step): the policy's forward is
    compiled (dynamo made graphs) without a graph break (their loss options are built outside the forward)."""
    from fastalign.trainers import GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, PPOConfig, PPOTrainer
    from fastalign.trainers.kto import unpair_preference_data
    from fastalign.trainers.tasks import CountingTask
    from fastalign.trainers.tiny import tiny_llama, word_tokenizer

    task = CountingTask()
    tokenizer = word_tokenizer(task.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    common = dict(output_dir=str(tmp_path), learning_rate=1e-3, per_device_train_batch_size=4, max_steps=1,
                  disable_tqdm=True, torch_compile=True, torch_compile_backend="aot_eager")
    if trainer == "grpo":
        run = GRPOTrainer(model, tokenizer, task.prompts(8, seed=3), task.score,
                          GRPOConfig(num_generations=4, max_completion_length=6, **common))
    elif trainer == "kto":
        run = KTOTrainer(model, tokenizer, unpair_preference_data(task.preference_data(4, seed=1)),
                         KTOConfig(max_length=24, max_prompt_length=12, **common))
    else:
        run = PPOTrainer(model, tokenizer, task.prompts(8, seed=3), task.score,
                         PPOConfig(response_length=6, temperature=1.0, **common))
    torch._dynamo.utils.counters.clear()
    run.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def _packed(length=T):
    """The batch of ``_batch`` packed (row 1 without its padding token): ``hidden [N, H]``, ``targets [N]``, the
    per-token inputs ``[N]`` and ``cu_seqlens``."""
    hidden, weight, targets = _batch(length)
    x = _inputs(length)
    lengths = [length - (row == 1) for row in range(2 * B)]
    keep = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).int()
    x = {**x, "old": x["old"][keep], "cu_seqlens": cu_seqlens, "packing": {"cu_seqlens": cu_seqlens}}
    return hidden.detach()[keep].requires_grad_(True), weight, targets[keep], x


def packed_dpo(hidden, weight, targets, x):
    out = fused_linear_dpo_loss(hidden, weight, targets, ref_logps=x["ref"].view(2, B), vocab_metrics=True,
                                **x["packing"])
    return out.loss, {**out.metrics, "logps": out.logps}


def packed_grpo(hidden, weight, targets, x):
    out = fused_linear_grpo_loss(hidden, weight, targets, x["adv"], old_logprobs=x["old"], beta=0.04,
                                 ref_logprobs=x["old"] + 0.1, **x["packing"])
    return out.loss, {**out.metrics, "logprobs": out.logprobs, "entropy": out.entropy}


def packed_kto(hidden, weight, targets, x):
    out = fused_linear_kto_loss(hidden, weight, targets, torch.tensor([True, False, True, True]),
                                ref_logps=x["ref"], kl=torch.tensor(0.1), **x["packing"])
    return out.loss, out.metrics


def packed_orpo(hidden, weight, targets, x):
    out = fused_linear_orpo_loss(hidden, weight, targets, **x["packing"])
    return out.loss, out.metrics


def packed_ppo(hidden, weight, targets, x):
    out = fused_linear_ppo_loss(hidden, weight, targets, x["old"], torch.ones_like(x["old"]), entropy_coef=0.01,
                                loss_agg="seq-mean-token-mean", cu_seqlens=x["cu_seqlens"])
    return out.loss, out.metrics


@pytest.mark.slow
@pytest.mark.parametrize("fn", [packed_dpo, packed_grpo, packed_kto, packed_orpo, packed_ppo],
                         ids=lambda f: f.__name__)
def test_packed_batch_compiles_fullgraph(fn):
    """A packed batch (``cu_seqlens``) compiles without a graph break and gives eager's loss, outputs, metrics and
    gradients (eager packed equals padded: test_packed.py)."""
    hidden, weight, targets, x = _packed()
    explained = torch._dynamo.explain(fn)(hidden, weight, targets, x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_run(compiled, hidden, weight, targets, x), _run(fn, hidden, weight, targets, x))


@pytest.mark.slow
@pytest.mark.parametrize("fn", [packed_dpo, packed_grpo], ids=lambda f: f.__name__)
def test_position_ids_compile_fullgraph(fn):
    """Packed by ``position_ids`` (the number of sequences from a per-sequence argument: ``ref_logps``,
    ``advantages``; KTO's ``labels`` take GRPO's path), compiled with ``fullgraph=True``: eager's loss, outputs, metrics and gradients with
    ``cu_seqlens``."""
    hidden, weight, targets, x = _packed()
    by_positions = {**x, "packing": {"position_ids": torch.cat([torch.arange(int(n))
                                                                for n in x["cu_seqlens"].diff()])}}
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_run(compiled, hidden, weight, targets, by_positions), _run(fn, hidden, weight, targets, x))


def test_position_ids_without_a_sequence_count_raise_clearly_under_compile():
    """ORPO has no per-sequence argument: ``position_ids`` under compile raise (the number of sequences they hold is
    a data-dependent size), with ``fullgraph=True`` (without it, dynamo breaks the graph at the raise)."""
    hidden, weight, targets, x = _packed()
    position_ids = torch.cat([torch.arange(int(n)) for n in x["cu_seqlens"].diff()])

    def fn(hidden, weight, targets):
        return fused_linear_orpo_loss(hidden, weight, targets, position_ids=position_ids).loss

    with pytest.raises(Exception, match="position_ids: a packed batch under torch.compile needs cu_seqlens, or a "
                                        "per-sequence argument"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(hidden, weight, targets)
