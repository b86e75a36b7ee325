"""Benchmark harness: each fused op against naive PyTorch and plain-matmul floors, in time and extra peak memory.

What is compared is data: ``REGISTRY`` maps an op name to its inputs builder and its modes; a mode (forward only,
fwd+bwd with a trainable or frozen weight...) holds its variants (``name -> factory``), which of them is the
candidate, the baseline and the floor, and the targets the candidate must meet. Adding an op is a few lines:
an inputs builder (its inputs need ``hidden`` and ``weight`` for the matmul floors), one variant factory per
implementation, one ``Mode`` per mode, e.g.::

    REGISTRY["ppo"] = OpBench(make_ppo_inputs, {"fwd+bwd": Mode(
        "PPO loss, fwd+bwd", {"fused": fused_ppo, "naive": naive_ppo, "3 matmuls": matmul_floor(3)},
        floor="3 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15)))})

Measurements:
  * time: the variants of a mode run interleaved in one process, ``rounds`` times after one warm-up call each;
    the minimum per variant is kept (the machine is noisy: the same call can swing 30%).
  * memory: each variant runs once in a fresh subprocess (``python -m fastalign.bench --memory-worker ...``).
    Extra peak memory is the peak during the call minus what was in use once the inputs were allocated: peak RSS
    (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) on Linux CPUs, ``max_memory_allocated`` on CUDA.

``python -m fastalign.bench --help`` (or ``fastalign bench --help``) lists the options; ``--op all`` runs
``ALL_OPS`` (logprobs, ppo, grpo, dpo) in sequence, one table each (``dpo-long-pair`` only by name: ~12 GB for naive).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import (fused_linear_cpo_loss, fused_linear_cross_entropy, fused_linear_distill_loss,
                         fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_kto_loss, fused_linear_logprobs,
                         fused_linear_orpo_loss, fused_linear_ppo_loss, fused_linear_rloo_loss)
from .objectives.grpo import GRPOLossConfig, grpo_loss
from .objectives.rloo import rloo_loss

Step = Callable[[], object]
"""One measured call of a variant; its result is dropped."""
VariantFactory = Callable[[Any], Step]
"""``factory(inputs) -> step``: untimed set-up of a variant on an op's inputs, returning the step to measure."""

MiB = 1 << 20
BUSY_SHARE = 0.10
"""Above this share of the CPUs used by other processes while timing, the table warns that its timings are unreliable."""


@dataclass(frozen=True)
class Problem:
    """One benchmark size and placement: ``hidden [tokens, hidden_size]``, ``weight [vocab_size, hidden_size]``."""

    tokens: int
    hidden_size: int
    vocab_size: int
    dtype: str = "float32"
    device: str = "cpu"
    bias: bool = False
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def backend(self) -> str:
        """The fused ops' backend: the chunked torch backend on CPU (never the Triton interpreter), auto elsewhere."""
        return "torch" if self.device == "cpu" else "auto"

    def describe(self) -> str:
        return (f"N={self.tokens} tokens, H={self.hidden_size}, V={self.vocab_size}, {self.dtype}"
                f"{', with bias' if self.bias else ''}, {self.device}, {self.backend} backend")


ISSUE_PROBLEM = Problem(tokens=4096, hidden_size=512, vocab_size=32768)
"""The sizes at which the targets are set (fp32, N=4096, H=512, V=32768)."""
QUICK_PROBLEM = Problem(tokens=256, hidden_size=64, vocab_size=2048)
"""Tiny sizes: a smoke test of the whole table (timings there are dominated by overheads)."""


@dataclass(frozen=True)
class Target:
    """The candidate's ``metric`` ("time" or "memory") must be at most ``limit`` times that of ``reference``."""

    metric: str
    reference: str
    limit: float


@dataclass(frozen=True)
class Mode:
    """One way of calling an op: its variants in table order, and how the candidate is judged."""

    title: str
    variants: dict[str, VariantFactory]
    floor: str | None  # the variant that is the compute floor (plain matmuls), if any
    targets: tuple[Target, ...]
    candidate: str = "fused"
    baseline: str = "naive"
    also_memory: tuple[str, ...] = ()  # more variants whose memory is measured

    @property
    def memory_variants(self) -> tuple[str, ...]:
        """Variants whose extra peak memory is measured: the candidate, the baseline, every other reference of a
        memory target and ``also_memory`` (the floors' is not of interest)."""
        references = [t.reference for t in self.targets if t.metric == "memory"]
        return tuple(dict.fromkeys([self.candidate, self.baseline, *references, *self.also_memory]))


@dataclass(frozen=True)
class OpBench:
    """An op's inputs builder (``Problem -> inputs``, shared by all its variants), its modes, and the sizes at which
    its targets are set (the default problem of ``fastalign bench --op <op>``)."""

    make_inputs: Callable[[Problem], Any]
    modes: dict[str, Mode]
    issue_problem: Problem = ISSUE_PROBLEM


def matmul_floor(count: int) -> VariantFactory:
    """``count`` plain ``[N, H] x [H, V]`` matmuls (``torch.mm``) into a ``[N, V]`` buffer allocated and touched at
    set-up: the compute floor of an op that needs ``count`` matmuls of that size. Inputs need ``hidden`` (``[N, H]``
    or ``[B, T, H]``, flattened to ``N = B*T`` rows) and ``weight``."""

    def factory(inputs) -> Step:
        hidden, weight_t = inputs.hidden.reshape(-1, inputs.hidden.shape[-1]), inputs.weight.t()
        out = torch.mm(hidden, weight_t)

        def step():
            for _ in range(count):
                torch.mm(hidden, weight_t, out=out)

        return step

    return factory


def placer(problem: Problem) -> Callable[[Tensor], Tensor]:
    """Moves a CPU tensor made from the seed to ``problem``'s device, floats to its dtype (ids keep theirs)."""

    def place(t: Tensor) -> Tensor:
        return t.to(device=problem.device, dtype=problem.torch_dtype if t.is_floating_point() else t.dtype)

    return place


# --- log-probs -----------------------------------------------------------------------------------------------

class LogprobInputs(NamedTuple):
    """Inputs of the log-prob op (no tensor requires grad; the variants make their own leaves)."""

    hidden: Tensor  # [N, H]
    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    targets: Tensor  # [N] int64
    grad_logprobs: Tensor  # [N] fp32 random upstream gradient on the log-probs
    backend: str


def make_logprob_inputs(problem: Problem) -> LogprobInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``."""
    gen = torch.Generator().manual_seed(problem.seed)
    n, h, v = problem.tokens, problem.hidden_size, problem.vocab_size
    place = placer(problem)
    hidden = place(torch.randn(n, h, generator=gen))
    weight = place(torch.randn(v, h, generator=gen) * h ** -0.5)
    bias = place(torch.randn(v, generator=gen)) if problem.bias else None
    targets = place(torch.randint(0, v, (n,), generator=gen))
    grad_logprobs = torch.randn(n, generator=gen).to(problem.device)
    return LogprobInputs(hidden, weight, bias, targets, grad_logprobs, problem.backend)


def fused_logprobs(x: LogprobInputs, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[N]`` log-probs from the fused op."""
    return fused_linear_logprobs(hidden, weight, x.targets, bias=bias, backend=x.backend)


def naive_logprobs(x: LogprobInputs, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[N]`` log-probs in plain PyTorch: the ``[N, V]`` logits and log-softmax are materialized."""
    logits = F.linear(hidden, weight, bias)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, x.targets.unsqueeze(-1)).squeeze(-1)


LogprobImpl = Callable[[LogprobInputs, Tensor, Tensor, Tensor | None], Tensor]


def logprobs_forward(impl: LogprobImpl) -> VariantFactory:
    """Forward only, under ``torch.no_grad()``."""

    def factory(x: LogprobInputs) -> Step:
        def step():
            with torch.no_grad():
                return impl(x, x.hidden, x.weight, x.bias)

        return step

    return factory


def logprobs_forward_backward(impl: LogprobImpl, *, train_weight: bool) -> VariantFactory:
    """Forward, then the gradients for the random upstream gradient: of ``hidden``, and of ``weight`` and ``bias``
    when ``train_weight`` (otherwise they are frozen)."""

    def factory(x: LogprobInputs) -> Step:
        hidden = x.hidden.detach().requires_grad_(True)
        weight = x.weight.detach().requires_grad_(train_weight)
        bias = None if x.bias is None else x.bias.detach().requires_grad_(train_weight)
        leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]

        def step():
            return torch.autograd.grad(impl(x, hidden, weight, bias), leaves, x.grad_logprobs)

        return step

    return factory


REGISTRY: dict[str, OpBench] = {
    "logprobs": OpBench(make_logprob_inputs, {
        "trainable": Mode(
            "fwd+bwd, trainable weight",
            {"fused": logprobs_forward_backward(fused_logprobs, train_weight=True),
             "naive": logprobs_forward_backward(naive_logprobs, train_weight=True),
             "4 matmuls": matmul_floor(4)},
            floor="4 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "4 matmuls", 1.15))),
        "frozen": Mode(
            "fwd+bwd, frozen weight",
            {"fused": logprobs_forward_backward(fused_logprobs, train_weight=False),
             "naive": logprobs_forward_backward(naive_logprobs, train_weight=False),
             "2 matmuls": matmul_floor(2)},
            floor="2 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "2 matmuls", 1.20))),
        "forward": Mode(
            "forward only (no_grad)",
            {"fused": logprobs_forward(fused_logprobs),
             "naive": logprobs_forward(naive_logprobs),
             "1 matmul": matmul_floor(1)},
            floor="1 matmul", targets=(Target("memory", "naive", 0.10), Target("time", "1 matmul", 1.20))),
    }),
}


# --- PPO -------------------------------------------------------------------------------------------------------

PPO_SEQUENCES = 4
"""The issue's layout: B=4 sequences of T = tokens / 4 (T=1024 at N=4096)."""
PPO_CLIPRANGE, PPO_CLIPRANGE_VALUE, PPO_VF_COEF = 0.2, 0.2, 0.1  # fused_linear_ppo_loss's defaults


class PPOInputs(NamedTuple):
    """Inputs of the PPO loss with a linear value head on the same hidden states (every token a response token)."""

    hidden: Tensor  # [B, T, H]
    weight: Tensor  # [V, H]
    targets: Tensor  # [B, T] sampled ids
    old_logprobs: Tensor  # [B, T]: the current log-probs plus noise, so that some ratios are clipped
    advantages: Tensor  # [B, T]
    value_weight: Tensor  # [H]
    value_bias: Tensor  # []
    old_values: Tensor  # [B, T]
    returns: Tensor  # [B, T]
    backend: str


def make_ppo_inputs(problem: Problem, sequences: int = PPO_SEQUENCES) -> PPOInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``; ``tokens`` split into ``sequences`` rows."""
    gen = torch.Generator().manual_seed(problem.seed)
    length, h, v = max(problem.tokens // sequences, 1), problem.hidden_size, problem.vocab_size
    place = placer(problem)
    hidden = place(torch.randn(sequences, length, h, generator=gen))
    weight = place(torch.randn(v, h, generator=gen) * h ** -0.5)
    targets = place(torch.randint(0, v, (sequences, length), generator=gen))
    with torch.no_grad():
        current = fused_linear_logprobs(hidden, weight, targets, backend=problem.backend).float().cpu()
    noise = lambda scale: scale * torch.randn(sequences, length, generator=gen)  # noqa: E731
    return PPOInputs(hidden, weight, targets, place(current + noise(0.3)), place(noise(1.0)),
                     place(torch.randn(h, generator=gen) * h ** -0.5), place(torch.zeros(())),
                     place(noise(1.0)), place(noise(1.0)), problem.backend)


def _ppo_leaves(x: PPOInputs) -> list[Tensor]:
    """Trainable copies of hidden, lm_head weight, value-head weight and bias."""
    return [t.detach().requires_grad_(True) for t in (x.hidden, x.weight, x.value_weight, x.value_bias)]


def fused_ppo(x: PPOInputs) -> Step:
    """fused_linear_ppo_loss with the value head, token-mean, forward + backward."""
    leaves = _ppo_leaves(x)
    hidden, weight, value_weight, value_bias = leaves

    def step():
        out = fused_linear_ppo_loss(hidden, weight, x.targets, x.old_logprobs, x.advantages,
                                    value_head_weight=value_weight, value_head_bias=value_bias,
                                    old_values=x.old_values, returns=x.returns, cliprange=PPO_CLIPRANGE,
                                    cliprange_value=PPO_CLIPRANGE_VALUE, vf_coef=PPO_VF_COEF, backend=x.backend)
        return torch.autograd.grad(out.loss, leaves)

    return step


def naive_ppo(x: PPOInputs) -> Step:
    """PPO in plain PyTorch: materialized logits, log_softmax, gather, ratio, clipped surrogate, clipped value loss
    of the linear value head, token-mean; forward + backward."""
    leaves = _ppo_leaves(x)
    hidden, weight, value_weight, value_bias = leaves
    index = x.targets.unsqueeze(-1)

    def step():
        logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(-1, index).squeeze(-1)
        ratio = torch.exp(logprobs - x.old_logprobs)
        clipped_ratio = ratio.clamp(1 - PPO_CLIPRANGE, 1 + PPO_CLIPRANGE)
        policy = torch.maximum(-x.advantages * ratio, -x.advantages * clipped_ratio)
        values = (hidden @ value_weight + value_bias).float()
        values_clipped = x.old_values + (values - x.old_values).clamp(-PPO_CLIPRANGE_VALUE, PPO_CLIPRANGE_VALUE)
        value = 0.5 * torch.maximum((values - x.returns) ** 2, (values_clipped - x.returns) ** 2)
        loss = policy.mean() + PPO_VF_COEF * value.mean()
        return torch.autograd.grad(loss, leaves)

    return step


REGISTRY["ppo"] = OpBench(make_ppo_inputs, {
    "fwd+bwd": Mode(
        "PPO loss with value head, fwd+bwd",
        {"fused": fused_ppo, "naive": naive_ppo, "3 matmuls": matmul_floor(3)},
        floor="3 matmuls",
        targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15), Target("time", "naive", 1.0))),
})


# --- GRPO ------------------------------------------------------------------------------------------------------

GRPO_SEQUENCES = 8
"""The issue's layout: B=8 completions of T = tokens / 8 (T=512 at N=4096), every token a completion token."""


class GRPOInputs(NamedTuple):
    """Inputs of the GRPO loss: ``hidden [B, T, H]``, ``weight [V, H]``, sampled ``targets [B, T]``, ``old_logprobs``
    (the current log-probs plus noise, so that some ratios are clipped), one advantage per completion ``[B]``."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    backend: str


def make_grpo_inputs(problem: Problem, sequences: int = GRPO_SEQUENCES) -> GRPOInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``."""
    ppo = make_ppo_inputs(problem, sequences)
    gen = torch.Generator().manual_seed(problem.seed + 1)
    return GRPOInputs(ppo.hidden, ppo.weight, ppo.targets, ppo.old_logprobs,
                      placer(problem)(torch.randn(sequences, generator=gen)), problem.backend)


def fused_grpo(**options) -> VariantFactory:
    """fused_linear_grpo_loss (entropy computed for TRL's metric, as TRL does), forward + backward."""

    def factory(x: GRPOInputs) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

        def step():
            out = fused_linear_grpo_loss(hidden, weight, x.targets, x.advantages, old_logprobs=x.old_logprobs,
                                         backend=x.backend, **options)
            return torch.autograd.grad(out.loss, [hidden, weight])

        return step

    return factory


def naive_completion_loss(loss_of: Callable[[Tensor, Tensor, Tensor, GRPOInputs], Tensor]) -> VariantFactory:
    """TRL's way: materialized logits, log_softmax, gather, entropy, then ``loss_of(logprobs, entropy, mask,
    inputs)`` (the same formulas as the fused op's); fwd + bwd."""

    def factory(x: GRPOInputs) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
        index, mask = x.targets.unsqueeze(-1), torch.ones(x.targets.shape, device=x.targets.device)

        def step():
            logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
            logprobs = logp.gather(-1, index).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            return torch.autograd.grad(loss_of(logprobs, entropy, mask, x), [hidden, weight])

        return step

    return factory


def naive_grpo(**options) -> VariantFactory:
    """TRL's GRPO on materialized logits (:func:`naive_completion_loss`)."""
    config = GRPOLossConfig(**options)
    return naive_completion_loss(lambda logprobs, entropy, mask, x: grpo_loss(
        logprobs, x.advantages.float(), mask, config, old_logprobs=x.old_logprobs.float(), entropy=entropy).loss)


GRPO_SEQUENCE_LEVEL = dict(loss_type="grpo", importance_sampling_level="sequence")
REGISTRY["grpo"] = OpBench(make_grpo_inputs, {
    "dapo": Mode(
        "GRPO loss, dapo, token-level ratios, fwd+bwd",
        {"fused": fused_grpo(loss_type="dapo"), "naive": naive_grpo(loss_type="dapo"), "3 matmuls": matmul_floor(3)},
        floor="3 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15))),
    "gspo": Mode(
        "GRPO loss, grpo, sequence-level ratios (GSPO), fwd+bwd (whole sequences per chunk)",
        {"fused": fused_grpo(**GRPO_SEQUENCE_LEVEL), "naive": naive_grpo(**GRPO_SEQUENCE_LEVEL),
         "3 matmuls": matmul_floor(3)},
        floor="3 matmuls", targets=(Target("memory", "naive", 0.10), Target("time", "3 matmuls", 1.15))),
})


# --- DPO -------------------------------------------------------------------------------------------------------

DPO_PAIRS = 2
"""The issue's layout: B=2 pairs, 2B=4 sequences of T = tokens / 4 (T=1024 at N=4096)."""
DPO_BETA = 0.1  # fused_linear_dpo_loss's default


class DPOInputs(NamedTuple):
    """``hidden``/``ref_hidden`` ``[K*B, T, H]`` (K groups of B rows, best first; pairs: B chosen then B rejected),
    a shared lm_head ``weight [V, H]``, ``targets [K*B, T]`` (every token a response token: no prompt rows for the
    fused op to skip)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    ref_hidden: Tensor
    backend: str
    responses: int = 2


def make_dpo_inputs(problem: Problem, pairs: int = DPO_PAIRS, responses: int = 2) -> DPOInputs:
    """Random inputs with logits of unit scale, from ``problem.seed``; ``tokens`` split into ``responses * pairs``
    rows."""
    gen = torch.Generator().manual_seed(problem.seed)
    rows = responses * pairs
    length, h, v = max(problem.tokens // rows, 1), problem.hidden_size, problem.vocab_size
    place = placer(problem)
    return DPOInputs(place(torch.randn(rows, length, h, generator=gen)),
                     place(torch.randn(v, h, generator=gen) * h ** -0.5),
                     place(torch.randint(0, v, (rows, length), generator=gen)),
                     place(torch.randn(rows, length, h, generator=gen)), problem.backend, responses)


def fused_dpo(**options) -> VariantFactory:
    """fused_linear_dpo_loss, reference computed in the call, forward + backward (trainable hidden and weight)."""

    def factory(x: DPOInputs) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

        def step():
            out = fused_linear_dpo_loss(hidden, weight, x.targets, ref_hidden=x.ref_hidden, ref_weight=x.weight,
                                        beta=DPO_BETA, backend=x.backend, num_responses=x.responses, **options)
            return torch.autograd.grad(out.loss, [hidden, weight])

        return step

    return factory


def naive_dpo(x: DPOInputs) -> Step:
    """TRL-style DPO in plain PyTorch: materialized logits, log_softmax, gather, masked sums, then the
    Plackett-Luce loss of the K groups (the sigmoid loss for pairs); the reference's sums from ``ref_hidden`` and
    the same weight under no_grad; forward + backward."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    mask = x.targets != -100
    index = x.targets.clamp(min=0).unsqueeze(-1)

    def sums(h: Tensor, w: Tensor) -> Tensor:
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        return (logp.gather(-1, index).squeeze(-1) * mask).sum(-1)

    def step():
        policy = sums(hidden, weight)
        with torch.no_grad():
            ref = sums(x.ref_hidden, x.weight)
        rewards = DPO_BETA * (policy - ref).view(x.responses, -1)
        tail_lse = torch.logcumsumexp(rewards.flip(0), dim=0).flip(0)
        loss = -(rewards - tail_lse)[:-1].sum(0).mean()
        return torch.autograd.grad(loss, [hidden, weight])

    return step


def naive_wpo(x: DPOInputs) -> Step:
    """TRL-style WPO-weighted sigmoid DPO (pairs) in plain PyTorch: materialized logits, each pair's loss times the
    detached ``exp`` of its responses' mean ``log p_y - log sum_v p_v^2``; forward + backward."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    mask = x.targets != -100
    index = x.targets.clamp(min=0).unsqueeze(-1)

    def sums(h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        token = logp.gather(-1, index).squeeze(-1)
        aligned = ((token - torch.logsumexp(2 * logp, dim=-1)) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return (token * mask).sum(-1), aligned.detach()

    def step():
        policy, log_weight = sums(hidden, weight)
        with torch.no_grad():
            ref = sums(x.ref_hidden, x.weight)[0]
        chosen, rejected = (policy - ref).view(2, -1)
        pair_weight = log_weight.view(2, -1).sum(0).exp()
        loss = (pair_weight * -F.logsigmoid(DPO_BETA * (chosen - rejected))).mean()
        return torch.autograd.grad(loss, [hidden, weight])

    return step


def liger_dpo(compiled: bool) -> VariantFactory:
    """Liger-Kernel's LigerFusedLinearDPOLoss (whole pairs per chunk), when installed."""

    def factory(x: DPOInputs) -> Step:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, compiled=compiled)
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

        def step():
            out = loss_fn(weight, hidden, x.targets, ref_input=x.ref_hidden, ref_weight=x.weight)
            return torch.autograd.grad(out[0] if isinstance(out, tuple) else out, [hidden, weight])

        return step

    return factory


def _installed(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


_LIGER_DPO = {"liger": liger_dpo(False), "liger compiled": liger_dpo(True)} if _installed("liger_kernel") else {}
_BEAT_LIGER_DPO = tuple(Target(metric, name, 1.0) for name in _LIGER_DPO for metric in ("time", "memory"))

REGISTRY["dpo"] = OpBench(make_dpo_inputs, {
    "default": Mode(
        "DPO fwd+bwd with the reference forward, default settings (whole pairs)",
        {"fused": fused_dpo(), "naive": naive_dpo, **_LIGER_DPO, "4 matmuls": matmul_floor(4)},
        floor="4 matmuls",
        targets=(Target("time", "naive", 0.88), Target("memory", "naive", 0.50), *_BEAT_LIGER_DPO)),
    "chunk256": Mode(
        "DPO fwd+bwd with the reference forward, chunk_size=256 (two passes)",
        {"fused": fused_dpo(chunk_size=256), "naive": naive_dpo, "5 matmuls": matmul_floor(5)},
        floor="5 matmuls", targets=(Target("time", "naive", 1.15), Target("memory", "naive", 0.10))),
    "wpo": Mode(
        "DPO with WPO weighting and TRL's vocabulary metrics (lse(2z), sum of logits, arg-max in the same pass)",
        {"fused": fused_dpo(use_weighting=True, vocab_metrics=True), "plain sigmoid": fused_dpo(),
         "naive": naive_wpo, "4 matmuls": matmul_floor(4)},
        floor="4 matmuls",
        targets=(Target("time", "plain sigmoid", 1.10), Target("memory", "plain sigmoid", 1.05))),
})
# One pair of T=16384 (32768 tokens, its default): naive needs >= 10x the memory of fused (~12 GB for naive).
# A ranking of K=4 responses to B=2 prompts of T=1024 tokens (8192 tokens at its default problem).
REGISTRY["dpo-ranking"] = OpBench(lambda problem: make_dpo_inputs(problem, pairs=2, responses=4), {
    "default": Mode("DPO ranking (Plackett-Luce), K=4 responses to B=2 prompts, fwd+bwd with the reference forward",
                    {"fused": fused_dpo(), "naive": naive_dpo, "4 matmuls": matmul_floor(4)},
                    floor="4 matmuls", targets=(Target("memory", "naive", 0.10),)),
}, replace(ISSUE_PROBLEM, tokens=8192))
REGISTRY["dpo-long-pair"] = OpBench(lambda problem: make_dpo_inputs(problem, pairs=1), {
    "default": Mode("DPO, one long pair, fwd+bwd with the reference forward",
                    {"fused": fused_dpo(), "naive": naive_dpo, "4 matmuls": matmul_floor(4)},
                    floor="4 matmuls", targets=(Target("memory", "naive", 0.10),)),
}, issue_problem=replace(ISSUE_PROBLEM, tokens=32768))


# --- KTO and SimPO ---------------------------------------------------------------------------------------------

KTO_SEQUENCES = 4
"""B=4 unpaired completions of T = tokens / 4 (T=1024 at N=4096: the DPO bench's sequences), two of each label."""


class KTOInputs(NamedTuple):
    """``hidden [B, T, H]``, ``weight [V, H]``, ``targets [B, T]`` (all response tokens), ``labels [B]``, the
    reference's sequence sums ``[B]`` and the batch KL estimate (precomputed, as the trainer passes them)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    labels: Tensor
    ref_logps: Tensor
    kl: Tensor
    backend: str


def make_kto_inputs(problem: Problem, sequences: int = KTO_SEQUENCES) -> KTOInputs:
    gen = torch.Generator().manual_seed(problem.seed)
    length, h, v = max(problem.tokens // sequences, 1), problem.hidden_size, problem.vocab_size
    place = placer(problem)
    return KTOInputs(place(torch.randn(sequences, length, h, generator=gen)),
                     place(torch.randn(v, h, generator=gen) * h ** -0.5),
                     place(torch.randint(0, v, (sequences, length), generator=gen)),
                     place(torch.arange(sequences) % 2 == 0),
                     place(-length * math.log(v) + torch.randn(sequences, generator=gen).double()).float(),
                     place(torch.tensor(0.5)), problem.backend)


def _naive_sequence_sums(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """TRL's ``get_batch_logps``: materialized logits, log_softmax, gather, masked sums ``[B]``."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    mask = targets != -100
    return (logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1), mask


def fused_loss(call: Callable[..., Any]) -> VariantFactory:
    """A fused loss op, forward + backward (trainable hidden and weight): ``call(inputs, hidden, weight)`` returns
    the op's output."""

    def factory(x) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(call(x, hidden, weight).loss, [hidden, weight])

    return factory


def fused_kto(**options) -> VariantFactory:
    """fused_linear_kto_loss (kto), forward + backward."""
    return fused_loss(lambda x, hidden, weight: fused_linear_kto_loss(
        hidden, weight, x.targets, x.labels, ref_logps=x.ref_logps, kl=x.kl, backend=x.backend, **options))


def naive_kto(x: KTOInputs) -> Step:
    """TRL's KTO in plain PyTorch (``kto_loss`` on ``get_batch_logps`` sums), forward + backward."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

    def step():
        logratios = _naive_sequence_sums(hidden, weight, x.targets)[0] - x.ref_logps
        losses = torch.where(x.labels, 1 - torch.sigmoid(0.1 * (logratios - x.kl)),
                             1 - torch.sigmoid(0.1 * (x.kl - logratios)))
        return torch.autograd.grad(losses.mean(), [hidden, weight])

    return step


def sequence_loss_modes(title: str, fused: Callable[..., VariantFactory], naive: VariantFactory) -> dict[str, Mode]:
    """A sequence-level loss with the default chunks (whole groups, one pass) and with ``chunk_size=256`` (two
    passes), each against naive PyTorch and its matmul floor. The targets, one pair per plan (a token's gradient
    depends on its whole sequence: one pass holds a group's ``[rows, V]``, O(chunk) memory takes two passes): the
    one pass <= 0.90x naive time at <= 0.25x its memory, ``chunk_size=`` <= 0.10x naive memory at <= 1.20x its time."""
    return {"default": Mode(f"{title}, default settings (whole groups, one pass)",
                            {"fused": fused(), "naive": naive, "3 matmuls": matmul_floor(3)},
                            floor="3 matmuls",
                            targets=(Target("time", "naive", 0.90), Target("memory", "naive", 0.25))),
            "chunk256": Mode(f"{title}, chunk_size=256 (two passes)",
                             {"fused": fused(chunk_size=256), "naive": naive, "4 matmuls": matmul_floor(4)},
                             floor="4 matmuls",
                             targets=(Target("memory", "naive", 0.10), Target("time", "naive", 1.20)))}


REGISTRY["kto"] = OpBench(make_kto_inputs, sequence_loss_modes(
    "KTO fwd+bwd, reference sums and KL precomputed", fused_kto, naive_kto))


# --- RLOO: GRPO's inputs (old log-probs summed per completion) -------------------------------------------------

def fused_rloo(**options) -> VariantFactory:
    """fused_linear_rloo_loss (entropy computed for TRL's metric, as TRL does), forward + backward."""
    return fused_loss(lambda x, hidden, weight: fused_linear_rloo_loss(
        hidden, weight, x.targets, x.advantages, old_logprobs=x.old_logprobs, backend=x.backend, **options))


NAIVE_RLOO = naive_completion_loss(lambda logprobs, entropy, mask, x: rloo_loss(
    logprobs, x.advantages.float(), mask, old_logps=x.old_logprobs.float().sum(-1), entropy=entropy).loss)
REGISTRY["rloo"] = OpBench(make_grpo_inputs, sequence_loss_modes(
    "RLOO fwd+bwd, sequence ratio, old log-probs precomputed", fused_rloo, NAIVE_RLOO))

SIMPO = dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)  # the SimPO paper's loss (no NLL term)


def fused_simpo(**options) -> VariantFactory:
    """fused_linear_cpo_loss(loss_type="simpo"), forward + backward; no reference model."""
    return fused_loss(lambda x, hidden, weight: fused_linear_cpo_loss(
        hidden, weight, x.targets, loss_type="simpo", backend=x.backend, **SIMPO, **options))


def naive_simpo(x: DPOInputs) -> Step:
    """TRL's CPO trainer with ``loss_type="simpo"`` in plain PyTorch: per-token mean log-probs, the SimPO loss."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

    def step():
        sums, mask = _naive_sequence_sums(hidden, weight, x.targets)
        logps = sums / mask.sum(-1)
        b = logps.shape[0] // 2
        margin = logps[:b] - logps[b:] - SIMPO["simpo_gamma"] / SIMPO["beta"]
        return torch.autograd.grad(-F.logsigmoid(SIMPO["beta"] * margin).mean(), [hidden, weight])

    return step


REGISTRY["simpo"] = OpBench(make_dpo_inputs, sequence_loss_modes(
    "SimPO fwd+bwd (no reference model)", fused_simpo, naive_simpo))

CPO_BETA, CPO_ALPHA = 0.1, 1.0  # fused_linear_cpo_loss's defaults (TRL's CPOConfig)


def fused_cpo(**options) -> VariantFactory:
    """fused_linear_cpo_loss (sigmoid, with its NLL term on the chosen responses), forward + backward."""
    return fused_loss(lambda x, hidden, weight: fused_linear_cpo_loss(hidden, weight, x.targets, backend=x.backend,
                                                                      **options))


def naive_pair_loss(loss_of: Callable[[Tensor, Tensor], Tensor]) -> VariantFactory:
    """A pair loss of TRL's trainers in plain PyTorch, forward + backward: ``loss_of(sums [2B], mask [2B, T])`` on
    the sequence sums of materialized log-probs (``get_batch_logps``), chosen rows first."""

    def factory(x: DPOInputs) -> Step:
        hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(loss_of(*_naive_sequence_sums(hidden, weight, x.targets)), [hidden, weight])

    return factory


def _cpo_loss(sums: Tensor, mask: Tensor) -> Tensor:
    """CPO (sigmoid) on sequence sums plus the chosen tokens' NLL."""
    b = sums.shape[0] // 2
    return -F.logsigmoid(CPO_BETA * (sums[:b] - sums[b:])).mean() - CPO_ALPHA * sums[:b].sum() / mask[:b].sum()


def fused_orpo(**options) -> VariantFactory:
    """fused_linear_orpo_loss, forward + backward; no reference model."""
    return fused_loss(lambda x, hidden, weight: fused_linear_orpo_loss(hidden, weight, x.targets, backend=x.backend,
                                                                       **options))


def _orpo_loss(sums: Tensor, mask: Tensor) -> Tensor:
    """ORPO: the log odds ratio of per-token means, plus the chosen tokens' NLL."""
    b = sums.shape[0] // 2
    logps = sums / mask.sum(-1)
    chosen, rejected = logps[:b], logps[b:]
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    return -sums[:b].sum() / mask[:b].sum() - CPO_BETA * F.logsigmoid(log_odds).mean()


REGISTRY["cpo"] = OpBench(make_dpo_inputs, sequence_loss_modes("CPO fwd+bwd (sigmoid + NLL)", fused_cpo,
                                                                naive_pair_loss(_cpo_loss)))
REGISTRY["orpo"] = OpBench(make_dpo_inputs, sequence_loss_modes("ORPO fwd+bwd", fused_orpo,
                                                                 naive_pair_loss(_orpo_loss)))
# --- SFT cross-entropy and distillation -------------------------------------------------------------------------

def naive_ce(x: LogprobInputs) -> Step:
    """The plain way (transformers' ``ForCausalLMLoss``): materialized logits, ``F.cross_entropy``; fwd + bwd."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(F.cross_entropy((hidden @ weight.T).float(), x.targets), [hidden, weight])


def cce_ce(x: LogprobInputs) -> Step:
    """Apple's Cut Cross-Entropy (``linear_cross_entropy``): its Triton kernels on CUDA, its ``torch_compile``
    implementation elsewhere; fwd + bwd."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if x.hidden.is_cuda else "torch_compile"
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(linear_cross_entropy(hidden, weight, x.targets, impl=impl), [hidden, weight])


# Liger's fused linear cross-entropy is Triton only (CUDA): not a variant on this CPU-only harness's default device.
_CE_PEERS = {"cut cross-entropy": cce_ce} if _installed("cut_cross_entropy") else {}
REGISTRY["ce"] = OpBench(make_logprob_inputs, {"fwd+bwd": Mode(
    "SFT cross-entropy (mean over the tokens), fwd+bwd",
    {"fused": fused_loss(lambda x, hidden, weight: fused_linear_cross_entropy(hidden, weight, x.targets,
                                                                              backend=x.backend)),
     "naive": naive_ce, **_CE_PEERS, "3 matmuls": matmul_floor(3)},
    floor="3 matmuls", targets=(Target("time", "3 matmuls", 1.10), Target("memory", "naive", 0.10),
                                *(Target("time", name, 1.0) for name in _CE_PEERS)))})

DISTILL_BETA = 0.5  # the symmetric JSD: TRL's and Liger's beta agree there


class DistillInputs(NamedTuple):
    """Student ``hidden [N, H]`` and ``weight [V, H]``, teacher ``teacher_hidden [N, 2H]`` and ``teacher_weight
    [V, 2H]`` (the issue's sizes: a teacher twice as wide), ``targets [N]`` (Liger's API wants them)."""

    hidden: Tensor
    weight: Tensor
    teacher_hidden: Tensor
    teacher_weight: Tensor
    targets: Tensor
    backend: str


def make_distill_inputs(problem: Problem) -> DistillInputs:
    """Random inputs with logits of unit scale for both models, from ``problem.seed``."""
    x = make_logprob_inputs(problem)
    gen = torch.Generator().manual_seed(problem.seed + 2)
    n, h, v = problem.tokens, 2 * problem.hidden_size, problem.vocab_size
    place = placer(problem)
    return DistillInputs(x.hidden, x.weight, place(torch.randn(n, h, generator=gen)),
                         place(torch.randn(v, h, generator=gen) * h ** -0.5), x.targets, x.backend)


def naive_distill(x: DistillInputs) -> Step:
    """TRL's non-chunked way: both models' logits materialized, log-softmax, the generalized JSD; fwd + bwd of the
    student."""
    from .objectives.distill import divergence_terms

    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

    def step():
        log_ps = torch.log_softmax((hidden @ weight.T).float(), -1)
        with torch.no_grad():
            log_pt = torch.log_softmax((x.teacher_hidden @ x.teacher_weight.T).float(), -1)
        return torch.autograd.grad(divergence_terms(log_ps, log_pt, DISTILL_BETA)[0].mean(), [hidden, weight])

    return step


def liger_distill(x: DistillInputs) -> Step:
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked PyTorch, compiled chunks), soft loss only."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=DISTILL_BETA)
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(loss_fn(hidden, weight, x.teacher_hidden, x.teacher_weight, x.targets),
                                       [hidden, weight])


def distill_floor(x: DistillInputs) -> Step:
    """The distillation loss's four matmuls: the student's and the teacher's logits (the teacher's twice as wide),
    ``d hidden`` and ``d weight`` of the student, into buffers allocated at set-up."""
    logits = torch.mm(x.hidden, x.weight.t())
    d_hidden, d_weight = torch.empty_like(x.hidden), torch.empty_like(x.weight)

    def step():
        torch.mm(x.hidden, x.weight.t(), out=logits)
        torch.mm(x.teacher_hidden, x.teacher_weight.t(), out=logits)
        torch.mm(logits, x.weight, out=d_hidden)
        torch.mm(logits.t(), x.hidden, out=d_weight)

    return step


_DISTILL_PEERS = {"liger": liger_distill} if _installed("liger_kernel") else {}
REGISTRY["distill"] = OpBench(make_distill_inputs, {"fwd+bwd": Mode(
    f"Distillation, generalized JSD (beta={DISTILL_BETA}), teacher twice as wide, fwd+bwd of the student",
    {"fused": fused_loss(lambda x, hidden, weight: fused_linear_distill_loss(
        hidden, weight, x.teacher_hidden, x.teacher_weight, beta=DISTILL_BETA, backend="torch")),
     "naive": naive_distill, **_DISTILL_PEERS, "4 matmuls": distill_floor},
    floor="4 matmuls", targets=(Target("time", "4 matmuls", 1.15), Target("memory", "naive", 0.10),
                                *(Target("time", name, 1.0) for name in _DISTILL_PEERS)))})

# --- train-long: one DPO training step of a whole model on one long pair ----------------------------------------

TRAIN_LONG_LAYERS = 4


class TrainLongInputs(NamedTuple):
    trainer: Any  # a DPOTrainer of a Llama-style model built in code
    batch: dict  # one pair of 2 x N/2 tokens, collated, with (constant) reference log-probs


def make_train_long_inputs(problem: Problem) -> TrainLongInputs:
    """A Llama-style model built in code (``TRAIN_LONG_LAYERS`` layers, hidden H, MLP 4H, H/64 heads, vocabulary V,
    random init) in a DPO trainer, and one pair of random token sequences of N/2 tokens each (the first N/32 the
    prompt). The reference log-probs are constants: their values change neither time nor memory. One warm-up step
    on the first 64 tokens allocates AdamW's state, so it is not counted as the step's extra memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .trainers import DPOConfig, DPOTrainer
    from .trainers.tiny import word_tokenizer

    torch.manual_seed(0)
    length, h, v = max(problem.tokens // 2, 2), problem.hidden_size, problem.vocab_size
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=TRAIN_LONG_LAYERS,
        num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 64), max_position_embeddings=length,
        tie_word_embeddings=False, pad_token_id=0)).to(problem.device)
    config = DPOConfig(output_dir="unused", per_device_train_batch_size=1, disable_tqdm=True, max_length=None,
                       max_prompt_length=None)
    trainer = DPOTrainer(model, word_tokenizer([]), [{"prompt": "", "chosen": "unused", "rejected": ""}], config)
    trainer.setup_optimizer(2)
    ids = torch.randint(1, v, (2, length), device=problem.device)
    labels = ids.clone()
    labels[:, :max(length // 16, 1)] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "ref_logps": torch.full((2, 1), -float(length), device=problem.device)}
    train_long_step("fused", False, False)(TrainLongInputs(trainer, {
        k: v[:, :64] if k != "ref_logps" else v for k, v in batch.items()}))()
    return TrainLongInputs(trainer, batch)


def train_long_step(loss_backend: str, checkpointing: bool, bf16: bool) -> VariantFactory:
    """One training step (forward, backward, AdamW step) with this loss backend, gradient checkpointing on or off,
    bf16 autocast or fp32, set on the shared trainer before each call."""
    from . import hf

    def factory(x: TrainLongInputs) -> Step:
        def step():
            trainer = x.trainer
            trainer.config.loss_backend = loss_backend
            hf.set_gradient_checkpointing(trainer.model, checkpointing)
            trainer.policy.autocast_dtype = torch.bfloat16 if bf16 else None
            loss, _ = trainer.compute_loss(x.batch)
            trainer.backward(loss)
            trainer.optimizer_step(True)

        return step

    return factory


REGISTRY["train-long"] = OpBench(make_train_long_inputs, {
    "step": Mode("DPO training step of a 4-layer Llama, one long pair",
                 {"reference loss": train_long_step("reference", False, False),
                  "fused": train_long_step("fused", False, False),
                  "fused + checkpointing": train_long_step("fused", True, False),
                  "fused + checkpointing + bf16": train_long_step("fused", True, True)},
                 floor=None, targets=(Target("memory", "reference loss", 0.15),), candidate="fused + checkpointing",
                 baseline="reference loss", also_memory=("fused", "fused + checkpointing + bf16")),
}, issue_problem=replace(ISSUE_PROBLEM, tokens=32768))

# --- packed: one DPO training step of the tiny Llama on pairs of uneven lengths, packed vs padded ------------------

PACKED_PAIRS = 16


class PackedStepInputs(NamedTuple):
    model: Any  # the tiny Llama (each variant trains its own copy)
    batch: dict  # 16 pairs collated [2B, T] (chosen first), right padding, constant reference log-probs


def packed_lengths(problem: Problem) -> list[int]:
    """``2 x PACKED_PAIRS`` sequence lengths drawn log-uniformly in ``[N/64, N]`` (``[64, 4096]`` at the issue's
    N=4096) from the problem's seed."""
    g = torch.Generator().manual_seed(problem.seed)
    low, high = math.log(max(problem.tokens // 64, 2)), math.log(problem.tokens)
    return torch.exp(low + (high - low) * torch.rand(2 * PACKED_PAIRS, generator=g)).round().long().tolist()


def make_packed_inputs(problem: Problem) -> PackedStepInputs:
    """The tiny Llama (``fastalign.trainers.tiny``: 2 layers, hidden H, MLP 2H, 4 heads, vocabulary V, sdpa) and a
    DPO batch of ``PACKED_PAIRS`` pairs of random tokens with :func:`packed_lengths` (each pair's prompt: the first
    quarter of its shorter sequence, shared)."""
    from .trainers.tiny import tiny_llama, word_tokenizer

    torch.manual_seed(problem.seed)
    h, v = problem.hidden_size, problem.vocab_size
    model = tiny_llama(word_tokenizer([]), vocab_size=v, hidden_size=h, intermediate_size=2 * h,
                       max_position_embeddings=problem.tokens, pad_token_id=0).to(problem.device)
    lengths = packed_lengths(problem)
    ids = torch.randint(1, v, (2 * PACKED_PAIRS, max(lengths)))
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        pair = i % PACKED_PAIRS
        prompt = max(min(lengths[pair], lengths[pair + PACKED_PAIRS]) // 4, 1)
        ids[i, :prompt] = ids[pair, :prompt]
        mask[i, :length] = 1
        labels[i, prompt:length] = ids[i, prompt:length]
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels,
             "ref_logps": -torch.tensor(lengths, dtype=torch.float32).view(2, PACKED_PAIRS)}
    return PackedStepInputs(model, {k: t.to(problem.device) for k, t in batch.items()})


def packed_step(padding_free: bool) -> VariantFactory:
    """One DPO training step (forward, backward, AdamW step) of a copy of the tiny Llama, the batch packed into one
    row (``padding_free=True``: per-sequence sdpa, ``fastalign.hf.segment_attention``) or padded; returns the loss.
    AdamW's state is allocated at set-up, by a step on the batch's first two columns."""
    import copy

    from .trainers import DPOConfig, DPOTrainer
    from .trainers.tiny import word_tokenizer

    def factory(x: PackedStepInputs) -> Step:
        config = DPOConfig(output_dir="unused", per_device_train_batch_size=PACKED_PAIRS, disable_tqdm=True,
                           max_length=None, max_prompt_length=None, padding_free=padding_free)
        trainer = DPOTrainer(copy.deepcopy(x.model), word_tokenizer([]), [{"prompt": "", "chosen": "unused",
                                                                           "rejected": ""}], config)
        trainer.setup_optimizer(2)

        def step(batch: dict = x.batch):
            loss, _ = trainer.compute_loss(batch)
            trainer.backward(loss)
            trainer.optimizer_step(True)
            return loss.detach()

        step({k: t if k == "ref_logps" else t[:, :2] for k, t in x.batch.items()})  # AdamW's state, 2 tokens a row
        return step

    return factory


# --- torch.compile -----------------------------------------------------------------------------------------------

class CompileInputs(NamedTuple):
    model: Any  # the tiny Llama (fastalign.trainers.tiny.TINY_LLAMA shape, hidden H, vocabulary V)
    ids: Tensor  # [2B, T] token ids of B pairs (chosen rows first)
    labels: Tensor  # [2B, T] the first T/4 tokens ignored (the prompt)


COMPILE_PAIRS = 4


def make_compile_inputs(problem: Problem) -> CompileInputs:
    """The tiny Llama of ``fastalign.trainers.tiny`` with hidden size H and vocabulary V, and ``COMPILE_PAIRS`` random
    pairs of T = N / (2 * COMPILE_PAIRS) tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .trainers.tiny import TINY_LLAMA

    torch.manual_seed(problem.seed)
    heads = max(1, problem.hidden_size // 16)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "hidden_size": problem.hidden_size,
                                            "intermediate_size": 2 * problem.hidden_size,
                                            "num_attention_heads": heads, "num_key_value_heads": heads,
                                            "vocab_size": problem.vocab_size})).to(problem.device)
    length = max(problem.tokens // (2 * COMPILE_PAIRS), 4)
    ids = torch.randint(0, problem.vocab_size, (2 * COMPILE_PAIRS, length), device=problem.device)
    return CompileInputs(model, ids, ids.masked_fill(torch.arange(length, device=ids.device) < length // 4, -100))


def dpo_model_step(compiled: bool) -> VariantFactory:
    """One DPO step of the model without the optimizer: forward, fused DPO loss (precomputed reference log-probs),
    backward; ``compiled``: forward and loss through ``torch.compile(fullgraph=True)`` (inductor, which compiles their
    backward too; the warm-up call compiles)."""
    from .hf import causal_lm_parts

    def factory(x: CompileInputs) -> Step:
        params = [p for p in x.model.parameters() if p.requires_grad]
        ref_logps = torch.full((2, COMPILE_PAIRS), -10.0, device=x.ids.device)

        def forward():
            parts = causal_lm_parts(x.model, x.ids, None, x.labels)
            return fused_linear_dpo_loss(parts.hidden, parts.weight, parts.targets, bias=parts.bias,
                                         ref_logps=ref_logps, beta=DPO_BETA).loss

        loss = torch.compile(forward, fullgraph=True) if compiled else forward
        return lambda: torch.autograd.grad(loss(), params)

    return factory


REGISTRY["packed"] = OpBench(make_packed_inputs, {
    "step": Mode(f"DPO training step of the tiny Llama, {PACKED_PAIRS} pairs of log-uniform lengths in [N/64, N]",
                 {"padded": packed_step(False), "packed": packed_step(True)}, floor=None,
                 targets=(Target("time", "padded", 0.5), Target("memory", "padded", 0.5)), candidate="packed",
                 baseline="padded"),
}, issue_problem=Problem(tokens=4096, hidden_size=64, vocab_size=128))


REGISTRY["compile"] = OpBench(make_compile_inputs, {
    "dpo-step": Mode("One DPO step (forward, fused loss, backward) of the tiny Llama, torch.compile vs eager",
                     {"compiled": dpo_model_step(True), "eager": dpo_model_step(False)},
                     floor=None, targets=(Target("time", "eager", 1.00),), candidate="compiled", baseline="eager"),
}, issue_problem=Problem(tokens=2048, hidden_size=64, vocab_size=4096))

# --- inside TRL (needs fastalign[trl]) --------------------------------------------------------------------------

TRL_DPO_PAIRS, TRL_GRPO_COMPLETIONS, TRL_GRPO_PROMPT = 2, 8, 64


class TRLInputs(NamedTuple):
    """A 2-layer Llama's config and word-level tokenizer (``problem``'s H and V) and one batch per trainer, laid out
    as TRL's collators / generation give them: DPO ``input_ids [2B, T]`` (B = ``TRL_DPO_PAIRS``, chosen rows first,
    T = N / 2B, the second half of each row the completion); GRPO ``TRL_GRPO_COMPLETIONS`` completions of
    N / ``TRL_GRPO_COMPLETIONS`` tokens after ``TRL_GRPO_PROMPT`` prompt tokens, random advantages."""

    problem: Problem
    tokenizer: Any
    config: Any
    dpo_batch: dict
    grpo_batch: dict


def make_trl_inputs(problem: Problem) -> TRLInputs:
    from .trainers.tiny import tiny_config, word_tokenizer

    tokenizer = word_tokenizer([f"w{i}" for i in range(problem.vocab_size - 3)])
    heads = max(1, problem.hidden_size // 64)
    config = tiny_config(tokenizer, hidden_size=problem.hidden_size, intermediate_size=2 * problem.hidden_size,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(4096, problem.tokens))
    g = torch.Generator().manual_seed(problem.seed)
    place = lambda t: t.to(problem.device)  # noqa: E731
    length = max(2, problem.tokens // (2 * TRL_DPO_PAIRS))
    ids = torch.randint(3, problem.vocab_size, (2 * TRL_DPO_PAIRS, length), generator=g)
    completion = (torch.arange(length) >= length // 2).long().expand_as(ids)
    dpo = {"input_ids": place(ids), "attention_mask": place(torch.ones_like(ids)), "completion_mask": place(completion)}
    rows, length = TRL_GRPO_COMPLETIONS, max(1, problem.tokens // TRL_GRPO_COMPLETIONS)
    prompt = torch.randint(3, problem.vocab_size, (rows, TRL_GRPO_PROMPT), generator=g)
    completion = torch.randint(3, problem.vocab_size, (rows, length), generator=g)
    grpo = {"prompt_ids": place(prompt), "prompt_mask": place(torch.ones_like(prompt)),
            "completion_ids": place(completion), "completion_mask": place(torch.ones_like(completion)),
            "advantages": place(torch.randn(rows, generator=g)),
            "num_items_in_batch": place(torch.tensor(float(completion.numel())))}
    return TRLInputs(problem, tokenizer, config, dpo, grpo)


def trl_step(kind: str, fused: bool) -> VariantFactory:
    """One training step (the trainer's ``compute_loss`` on the batch, then the gradients of the weights, returned) of
    TRL 1.16's ``DPOTrainer`` (a reference model) or ``GRPOTrainer`` (dapo, on-policy), or of fastalign.trl's
    subclass; the same random Llama for both (seeded)."""

    def factory(x: TRLInputs) -> Step:
        import tempfile

        import trl
        from datasets import Dataset
        from transformers import LlamaForCausalLM

        import fastalign.trl as fatrl

        torch.manual_seed(x.problem.seed)
        model = LlamaForCausalLM(x.config).to(x.problem.device, x.problem.torch_dtype)
        common = dict(output_dir=tempfile.mkdtemp(prefix="fastalign-bench-trl-"), report_to="none",
                      use_cpu=x.problem.device == "cpu", bf16=False, disable_tqdm=True)
        extra = {"fastalign_options": {"backend": x.problem.backend}} if fused else {}
        module = fatrl if fused else trl
        if kind == "dpo":
            ref = LlamaForCausalLM(x.config).to(x.problem.device, x.problem.torch_dtype)
            trainer = module.DPOTrainer(model=model, ref_model=ref, args=trl.DPOConfig(**common),
                                        train_dataset=Dataset.from_dict({"prompt": ["w1"], "chosen": [" w2"],
                                                                         "rejected": [" w3"]}),
                                        processing_class=x.tokenizer, **extra)
            batch = x.dpo_batch
        else:
            trainer = module.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                         args=trl.GRPOConfig(**common, per_device_train_batch_size=8,
                                                             num_generations=8, loss_type="dapo"),
                                         train_dataset=Dataset.from_dict({"prompt": ["w1"]}),
                                         processing_class=x.tokenizer, **extra)
            trainer.current_gradient_accumulation_steps = 1
            batch = x.grpo_batch
        trainer.model.train()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(trainer.compute_loss(trainer.model, batch), params)

    return factory


def _trl_mode(kind: str, title: str) -> Mode:
    return Mode(title, {"fastalign.trl": trl_step(kind, True), "trl": trl_step(kind, False)}, floor=None,
                targets=(Target("time", "trl", 0.90), Target("memory", "trl", 1.0)), candidate="fastalign.trl",
                baseline="trl")


REGISTRY["trl"] = OpBench(make_trl_inputs, {
    "dpo": _trl_mode("dpo", f"TRL 1.16 DPOTrainer step ({TRL_DPO_PAIRS} pairs of 2 x N/{2 * TRL_DPO_PAIRS} tokens, "
                            f"reference model) vs fastalign.trl's, 2-layer Llama"),
    "grpo": _trl_mode("grpo", f"TRL 1.16 GRPOTrainer loss step ({TRL_GRPO_COMPLETIONS} completions of "
                              f"N/{TRL_GRPO_COMPLETIONS} tokens, dapo) vs fastalign.trl's, 2-layer Llama"),
}, issue_problem=Problem(tokens=8192, hidden_size=512, vocab_size=32768))


ALL_OPS = ("logprobs", "ppo", "grpo", "dpo")
"""What ``--op all`` runs, in order (not ``dpo-long-pair`` nor ``train-long``: their reference variants need over
10 GB at their sizes; nor ``packed``, a training step; ask for them by name)."""


# --- measuring -------------------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(op: str, mode: str, problem: Problem, rounds: int, *, inputs=None) -> dict[str, list[float]]:
    """Seconds per call of every variant of ``mode``, ``rounds`` each, interleaved (round-robin) after a warm-up."""
    spec = REGISTRY[op]
    inputs = spec.make_inputs(problem) if inputs is None else inputs
    device = torch.device(problem.device)
    steps = {name: factory(inputs) for name, factory in spec.modes[mode].variants.items()}
    for step in steps.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            gc.collect()
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def extra_peak_bytes(step: Step, device: torch.device) -> int:
    """Peak memory during ``step()`` minus the memory in use just before it, in bytes.

    CUDA: ``max_memory_allocated`` after a reset. Linux CPU: ``VmHWM`` (peak RSS) after resetting it to the
    current RSS by writing "5" to ``/proc/self/clear_refs``. Meaningful in a fresh process whose allocator returns
    freed blocks to the system (``memory_in_subprocess`` sees to it).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("measuring CPU memory needs Linux (/proc/self/clear_refs); pass --no-memory")
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    step()
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def memory_worker(op: str, mode: str, variant: str, problem: Problem) -> int:
    """Extra peak bytes of one variant in this process: a tiny warm-up call (libraries, threads), then the real one."""
    factory = REGISTRY[op].modes[mode].variants[variant]
    tiny = replace(problem, tokens=4, hidden_size=8, vocab_size=16)
    factory(REGISTRY[op].make_inputs(tiny))()
    step = factory(REGISTRY[op].make_inputs(problem))
    return extra_peak_bytes(step, torch.device(problem.device))


def memory_in_subprocess(op: str, mode: str, variant: str, problem: Problem) -> int:
    """``memory_worker`` in a fresh ``python -m fastalign.bench --memory-worker`` process; extra peak bytes.

    glibc's mmap threshold is pinned at 64 KiB there, so that freed tensors go back to the system at once and
    RSS follows the live tensors (with its default dynamic threshold, freed blocks may stay resident). The worker
    starts in the directory holding this very ``fastalign`` package, so that it imports the same code.
    """
    command = [sys.executable, "-m", "fastalign.bench", "--memory-worker", "--op", op, "--mode", mode,
               "--variant", variant, *problem_arguments(problem)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    package_parent = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=package_parent)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed ({' '.join(command)}):\n{done.stderr}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["extra_peak_bytes"])


class OthersCpuShare:
    """Context manager: the share of all CPUs that other processes kept busy while it was open (``share``, 0..1).

    From the machine's busy time in ``/proc/stat`` minus this process's own CPU time; None where there is no
    ``/proc/stat``. On a shared machine this tells whether the timings measured the code or the neighbours.
    """

    share: float | None = None

    @staticmethod
    def _machine_busy_seconds() -> float | None:
        if not os.path.exists("/proc/stat"):
            return None
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_cpu_seconds() -> float:
        own = os.times()
        return own.user + own.system

    def __enter__(self) -> OthersCpuShare:
        self._start = (time.perf_counter(), self._machine_busy_seconds(), self._own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = time.perf_counter(), self._machine_busy_seconds(), self._own_cpu_seconds()
        wall0, busy0, own0 = self._start
        if busy is not None and wall > wall0:
            others = (busy - busy0) - (own - own0)
            self.share = min(1.0, max(0.0, others / ((wall - wall0) * os.cpu_count())))


def cpu_model() -> str:
    """The CPU model: ``lscpu``'s "Model name", else ``platform.processor()``, else "unknown CPU"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    model = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return model.group(1).strip() if model else platform.processor() or "unknown CPU"


def machine_facts(device: str) -> dict:
    """CPU model and count, load average, torch build and threads, device name: the context a timing needs."""
    facts = {"cpu": cpu_model(), "nproc": os.cpu_count(), "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
             "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        facts["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def summarize_mode(mode: Mode, seconds: dict[str, list[float]], memory: dict[str, int]) -> dict:
    """The JSON record of one mode: per-variant best time and memory, the candidate's ratios and its targets."""
    variants = {name: {"seconds": min(seconds[name]), "round_seconds": seconds[name],
                       "extra_peak_bytes": memory.get(name)} for name in mode.variants}

    def ratio(metric: str, reference: str) -> float | None:
        key = "seconds" if metric == "time" else "extra_peak_bytes"
        return _ratio(variants[mode.candidate][key], variants[reference][key])

    targets = []
    for target in mode.targets:
        value = ratio(target.metric, target.reference)
        targets.append({**asdict(target), "ratio": value, "passed": None if value is None else value <= target.limit})
    return {
        "title": mode.title, "candidate": mode.candidate, "baseline": mode.baseline, "floor": mode.floor,
        "variants": variants,
        "ratios": {"time_vs_baseline": ratio("time", mode.baseline),
                   "time_vs_floor": ratio("time", mode.floor) if mode.floor else None,
                   "memory_vs_baseline": ratio("memory", mode.baseline)},
        "targets": targets,
    }


def run_benchmark(op: str = "logprobs", problem: Problem = ISSUE_PROBLEM, *, rounds: int = 3, memory: bool = True,
                  memory_jobs: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Time every mode of ``op`` (and measure memory in subprocesses, ``memory_jobs`` at a time, default one per
    CPU; 1 keeps the peak of the whole run at the largest variant's); the results as a JSON-ready dict."""
    if op not in REGISTRY:
        raise ValueError(f"op: expected one of {sorted(REGISTRY)}, got {op!r}")
    if rounds < 1:
        raise ValueError(f"rounds: expected a positive int, got {rounds!r}")
    memory_jobs = os.cpu_count() if memory_jobs is None else memory_jobs
    if isinstance(memory_jobs, bool) or not isinstance(memory_jobs, int) or memory_jobs < 1:
        raise ValueError(f"memory_jobs: expected None or an int >= 1, got {memory_jobs!r}")
    log = log or (lambda message: None)
    spec = REGISTRY[op]
    memory_bytes: dict[str, dict[str, int]] = {name: {} for name in spec.modes}
    if memory:
        jobs = [(mode_name, variant) for mode_name, mode in spec.modes.items() for variant in mode.memory_variants]
        log(f"memory: {len(jobs)} variants, each in a fresh process, {memory_jobs} at a time")
        with ThreadPoolExecutor(max_workers=memory_jobs) as pool:
            measured = pool.map(lambda job: memory_in_subprocess(op, *job, problem), jobs)
            for done, ((mode_name, variant), extra) in enumerate(zip(jobs, measured), 1):
                memory_bytes[mode_name][variant] = extra
                log(f"memory: {done}/{len(jobs)} {mode_name} {variant}: {extra / MiB:.0f} MiB")
    inputs = spec.make_inputs(problem)
    modes = {}
    with OthersCpuShare() as contention:
        for mode_name, mode in spec.modes.items():
            log(f"time: {mode.title}, {len(mode.variants)} variants x {rounds} rounds (+1 warm-up)")
            seconds = time_mode(op, mode_name, problem, rounds, inputs=inputs)
            modes[mode_name] = summarize_mode(mode, seconds, memory_bytes[mode_name])
    machine = {**machine_facts(problem.device), "others_cpu_share_while_timing": contention.share}
    return {"op": op, "problem": asdict(problem), "at_issue_sizes": _same_sizes(problem, spec.issue_problem),
            "rounds": rounds, "memory_measured": memory, "machine": machine, "modes": modes}


def _same_sizes(problem: Problem, other: Problem) -> bool:
    keys = ("tokens", "hidden_size", "vocab_size", "dtype")
    return all(getattr(problem, k) == getattr(other, k) for k in keys)


# --- rendering -------------------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _setting_lines(results: dict) -> list[str]:
    problem, machine = Problem(**results["problem"]), results["machine"]
    load = " ".join(f"{x:.2f}" for x in machine.get("load_average", [])) or "?"
    others = machine["others_cpu_share_while_timing"]
    lines = [
        f"CPU: {machine['cpu']}; torch {machine['torch']}, {machine['torch_threads']} threads.",
        "",
        f"{problem.describe()}. Time: best of {results['rounds']} rounds, the variants of a mode interleaved in one "
        f"process; spread: slowest round over the best. Extra peak memory: peak during the call minus the inputs "
        f"(gradients included), one fresh process per variant.",
        f"Machine: {machine['cpu']}{', ' + machine['gpu'] if 'gpu' in machine else ''}; "
        f"{machine['nproc']} CPUs; load average (1, 5, 15 min) {load} after the run; other processes used "
        f"{'?' if others is None else format(others, '.0%')} of the CPUs while timing.",
    ]
    if others is not None and others > BUSY_SHARE:
        lines.append(f"**Busy machine**: other processes used {others:.0%} of the CPUs while timing; the timings and "
                     f"their ratios are unreliable.")
    return lines


def _variant_rows(mode: dict) -> list[str]:
    variants = mode["variants"]
    baseline, floor = variants[mode["baseline"]], variants.get(mode["floor"], {}).get("seconds")
    rows = []
    for i, (name, v) in enumerate(variants.items()):
        memory = v["extra_peak_bytes"]
        rows.append(f"| {mode['title'] if i == 0 else ''} | {name} | {v['seconds']:.3f} "
                    f"| {max(v['round_seconds']) / v['seconds'] - 1:.0%} "
                    f"| {_fmt(_ratio(v['seconds'], baseline['seconds']), '.2f')} "
                    f"| {_fmt(_ratio(v['seconds'], floor), '.2f')} "
                    f"| {_fmt(None if memory is None else memory / MiB, '.1f')} "
                    f"| {_fmt(_ratio(memory, baseline['extra_peak_bytes']), '.3f')} |")
    return rows


QUICK_VERDICT = "n/a at quick sizes"  # a target's verdict at sizes other than its own: a smoke test, not a mark


def _target_rows(mode: dict, verdicts: bool) -> list[str]:
    """One row per target (PASS/FAIL only with ``verdicts``: at the targets' sizes; else "n/a at quick sizes")."""
    rows = []
    for t in mode["targets"]:
        what = "extra peak memory" if t["metric"] == "memory" else "time"
        result = {True: "PASS", False: "**FAIL**", None: "not measured"}[t["passed"]]
        if not verdicts and t["passed"] is not None:
            result = QUICK_VERDICT
        rows.append(f"| {mode['title']}: {what} / {t['reference']} | {_fmt(t['ratio'], '.3f')} "
                    f"| <= {t['limit']:.2f} | {result} |")
    if any(t["metric"] == "time" and t["reference"] == mode["baseline"] for t in mode["targets"]):
        return rows  # time / baseline is already a target row
    versus_baseline = mode["ratios"]["time_vs_baseline"]
    rows.append(f"| {mode['title']}: time / {mode['baseline']} | {versus_baseline:.3f} | no target "
                f"| {'slower' if versus_baseline > 1 else 'faster'} than {mode['baseline']} |")
    return rows


def render_markdown(results: dict) -> str:
    """The results as Markdown: CPU and torch, the setting and machine, a table of variants, a table of targets
    (PASS/FAIL at the targets' sizes)."""
    modes = results["modes"].values()
    lines = [f"### fastalign bench: {results['op']}", "", *_setting_lines(results), "",
             "| mode | variant | time (s) | spread | time / naive | time / floor | extra peak memory (MiB) "
             "| memory / naive |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             *(row for mode in modes for row in _variant_rows(mode)), "",
             "| target (candidate: fused) | measured | limit | result |",
             "| --- | ---: | ---: | --- |",
             *(row for mode in modes for row in _target_rows(mode, results["at_issue_sizes"]))]
    if not results["at_issue_sizes"]:
        issue = REGISTRY[results["op"]].issue_problem
        lines += ["", f"The targets are set at N={issue.tokens}, H={issue.hidden_size}, V={issue.vocab_size}, "
                      f"{issue.dtype}; at these sizes the ratios are indicative only and get no verdict."]
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------------------------------

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastalign bench`` and ``python -m fastalign.bench``."""
    parser.add_argument("--op", choices=[*REGISTRY, "all"], default="logprobs",
                        help=f"which fused op to benchmark (default logprobs); 'all': {', '.join(ALL_OPS)} in "
                             f"sequence, one table each. logprobs: N rows; ppo: B={PPO_SEQUENCES} sequences "
                             f"of T=N/{PPO_SEQUENCES}, value head; dpo: B={DPO_PAIRS} pairs of T=N/{2 * DPO_PAIRS}, "
                             f"reference forward included; dpo-ranking: K=4 responses to B=2 prompts, T=N/8 (default "
                             f"N=8192). dpo-long-pair (one pair of T=N/2, default N=32768) is not part of 'all': its "
                             f"naive variant needs ~12 GB; ask for it by name. train-long (not in 'all' either): one "
                             f"DPO training step (forward, backward, AdamW) of a {TRAIN_LONG_LAYERS}-layer Llama-style "
                             f"model with hidden size H and vocabulary V on one pair of T=N/2 (default N=32768): "
                             f"reference loss, fused, + gradient checkpointing, + bf16. compile: one DPO step of the "
                             f"tiny Llama (hidden H, vocabulary V, {COMPILE_PAIRS} pairs of T=N/{2 * COMPILE_PAIRS}, "
                             f"default N=2048, H=64, V=4096) compiled with torch.compile vs eager. kto, simpo, cpo, "
                             f"orpo: 4 sequences (2 pairs) of T=N/4, the default one pass (target <= 0.90x naive "
                             f"time at <= 0.25x its memory) and chunk_size=256 (<= 0.10x memory at <= 1.20x time)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"N, tokens in the batch (default {ISSUE_PROBLEM.tokens}; "
                             f"{REGISTRY['dpo-ranking'].issue_problem.tokens} for dpo-ranking, "
                             f"{REGISTRY['dpo-long-pair'].issue_problem.tokens} for dpo-long-pair and train-long)")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"H, hidden size of the model (default {ISSUE_PROBLEM.hidden_size})")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"V, vocabulary size (default {ISSUE_PROBLEM.vocab_size})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of hidden states and weight (default float32, the targets are set for it; "
                             "bfloat16 with --gpu-model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run: cpu or cuda (default: cuda when available)")
    parser.add_argument("--bias", action="store_true", help="give the lm_head a bias (logprobs only)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the best is kept (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement (one process each)")
    parser.add_argument("--memory-jobs", type=int, default=None,
                        help="memory measurements run at the same time (default: one per CPU); 1 for the sizes whose "
                             "reference variant needs many GB (dpo-long-pair, train-long)")
    parser.add_argument("--json-out", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes, a smoke test (N={QUICK_PROBLEM.tokens}, H={QUICK_PROBLEM.hidden_size}, "
                             f"V={QUICK_PROBLEM.vocab_size}); explicit --tokens/--hidden/--vocab still win")
    parser.add_argument("--gpu-model", action="store_true",
                        help="print the GPU cost model of the triton kernels instead of running anything: per launch "
                             "FLOPs, bytes, atomics and the H100 roofline time, ESTIMATES (default sizes N=32768, "
                             "H=4096, V=128256, bfloat16; --tokens/--hidden/--vocab/--dtype override)")


def problem_from_arguments(args: argparse.Namespace, op: str | None = None) -> Problem:
    """The problem the options describe for ``op`` (default ``args.op``): unset sizes from ``--quick`` or the op's
    issue sizes."""
    op = args.op if op is None else op
    base = QUICK_PROBLEM if args.quick else REGISTRY[op].issue_problem if op in REGISTRY else ISSUE_PROBLEM
    return Problem(tokens=args.tokens or base.tokens, hidden_size=args.hidden or base.hidden_size,
                   vocab_size=args.vocab or base.vocab_size, dtype=args.dtype or "float32", device=args.device,
                   bias=args.bias)


def problem_arguments(problem: Problem) -> list[str]:
    """The command-line options that rebuild ``problem`` (for the memory worker)."""
    return ["--tokens", str(problem.tokens), "--hidden", str(problem.hidden_size), "--vocab", str(problem.vocab_size),
            "--dtype", problem.dtype, "--device", problem.device, *(["--bias"] if problem.bias else [])]


def run_from_arguments(args: argparse.Namespace) -> dict:
    """Run the benchmark(s) the options describe, print the Markdown tables, write the JSON if asked; the results
    (with ``--op all``: ``{"ops": {op: results}}``, each op's as for a single op)."""
    if args.gpu_model:
        from . import gpu_model

        problem = gpu_model.Problem(args.tokens or 32768, args.hidden or 4096, args.vocab or 128256,
                                    getattr(torch, args.dtype or "bfloat16"))
        print(gpu_model.render(problem), flush=True)
        return {}
    ops = ALL_OPS if args.op == "all" else (args.op,)
    everything = {}
    for op in ops:
        log = lambda message, op=op: print(f"[bench {op}] {message}", file=sys.stderr, flush=True)  # noqa: E731
        everything[op] = run_benchmark(op, problem_from_arguments(args, op), rounds=args.rounds,
                                       memory=not args.no_memory, memory_jobs=args.memory_jobs, log=log)
        print(render_markdown(everything[op]), flush=True)
    results = {"ops": everything} if args.op == "all" else everything[args.op]
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(results, out, indent=2)
            out.write("\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastalign.bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        extra = memory_worker(args.op, args.mode, args.variant, problem_from_arguments(args))
        print(json.dumps({"extra_peak_bytes": extra}))
    else:
        run_from_arguments(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
