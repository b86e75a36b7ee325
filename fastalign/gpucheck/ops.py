"""The table of public ops the GPU check runs (numerics, determinism, vocab parallelism): one ``OpCase`` each.

A case builds its extra inputs (float64, CPU, from a generator) for ``rows`` sequences of ``length`` tokens, and runs
the public op on ``hidden [rows, length, H]``, ``weight [V, H]``, ``bias [V]``, ``targets [rows, length]``,
returning the values to compare: ``loss`` (scalar, differentiated for the gradients) and the op's per-token or
per-sequence outputs. A new op joins with one entry in ``OPS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import functional as F

Extras = dict[str, Tensor]


@dataclass(frozen=True)
class OpCase:
    name: str
    rows: int  # sequences in the batch (K groups of B for preference ops)
    make: Callable[[torch.Generator, Tensor, int], Extras]  # (gen, targets [rows, T], V) -> extra inputs
    run: Callable[..., dict[str, Tensor]]  # (hidden, weight, bias, targets, extras, **options) -> named values
    prompt: int = 1  # leading tokens of every sequence whose target is ignored (prompt)


def _noise(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def _seq_logps(targets: Tensor, vocab: int, gen: torch.Generator) -> Tensor:
    """Plausible reference sequence log-prob sums ``[rows]``."""
    count = (targets != -100).sum(-1).double()
    return -count * torch.log(torch.tensor(float(vocab), dtype=torch.float64)) + _noise(gen, targets.shape[0])


def _logprobs(hidden, weight, bias, targets, x, **options):
    logprobs, entropy = F.fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.7,
                                                return_entropy=True, **options)
    return {"loss": (logprobs * x["grad_logprobs"]).sum() + (entropy * x["grad_entropy"]).sum(),
            "logprobs": logprobs, "entropy": entropy}


def _ppo(hidden, weight, bias, targets, x, **options):
    out = F.fused_linear_ppo_loss(hidden, weight, targets, x["old_logprobs"], x["advantages"], bias=bias,
                                  ref_logprobs=x["old_logprobs"], kl_coef=0.05, entropy_coef=0.01, temperature=0.7,
                                  **options)
    return {"loss": out.loss, "logprobs": out.logprobs, "entropy": out.entropy}


def _grpo(**config):
    def run(hidden, weight, bias, targets, x, **options):
        out = F.fused_linear_grpo_loss(hidden, weight, targets, x["sequence_advantages"], bias=bias,
                                       old_logprobs=x["old_logprobs"], **config, **options)
        return {"loss": out.loss, "logprobs": out.logprobs}

    return run


def _rloo(hidden, weight, bias, targets, x, **options):
    out = F.fused_linear_rloo_loss(hidden, weight, targets, x["sequence_advantages"], bias=bias,
                                   old_logprobs=x["old_logprobs"], **options)
    return {"loss": out.loss, "logprobs": out.logprobs, "logps": out.logps}


def _ce(hidden, weight, bias, targets, x, **options):
    out = F.fused_linear_cross_entropy(hidden, weight, targets, bias=bias, label_smoothing=0.1, z_loss=1e-3,
                                       temperature=0.7, **options)
    return {"loss": out.loss, "logprobs": out.logprobs, "lse": out.lse}


def _distill(hidden, weight, bias, targets, x, **options):
    """The student's head against a teacher of the same rows (its hidden states rolled, its weight rows scaled: a
    row shard of the student's weight gives the teacher's shard)."""
    out = F.fused_linear_distill_loss(hidden, weight, hidden.detach().roll(1, -1), 1.5 * weight.detach(),
                                      targets != -100, beta=0.5, temperature=0.7, student_bias=bias, **options)
    return {"loss": out.loss, "entropy": out.entropy}


def _dpo(hidden, weight, bias, targets, x, **options):
    b = targets.shape[0] // 2
    out = F.fused_linear_dpo_loss(hidden, weight, targets, bias=bias, ref_chosen_logps=x["ref_logps"][:b],
                                  ref_rejected_logps=x["ref_logps"][b:], **options)
    return {"loss": out.loss, "logps": out.logps}


def _ranking(hidden, weight, bias, targets, x, **options):
    out = F.fused_linear_dpo_loss(hidden, weight, targets, bias=bias, ref_logps=x["ref_logps"].view(3, -1),
                                  num_responses=3, **options)
    return {"loss": out.loss, "logps": out.logps}


def _kto(hidden, weight, bias, targets, x, **options):
    out = F.fused_linear_kto_loss(hidden, weight, targets, x["labels"], ref_logps=x["ref_logps"], kl=x["kl"],
                                  bias=bias, **options)
    return {"loss": out.loss, "logps": out.logps}


def _cpo(**config):
    def run(hidden, weight, bias, targets, x, **options):
        out = F.fused_linear_cpo_loss(hidden, weight, targets, bias=bias, **config, **options)
        return {"loss": out.loss, "logps": out.logps}

    return run


def _orpo(hidden, weight, bias, targets, x, **options):
    out = F.fused_linear_orpo_loss(hidden, weight, targets, bias=bias, **options)
    return {"loss": out.loss, "logps": out.logps}


def _token_inputs(gen, targets, vocab):
    return {"grad_logprobs": _noise(gen, *targets.shape), "grad_entropy": _noise(gen, *targets.shape, scale=0.1),
            "old_logprobs": -2.0 + _noise(gen, *targets.shape, scale=0.3),
            "advantages": _noise(gen, *targets.shape), "sequence_advantages": _noise(gen, targets.shape[0])}


def _reference_inputs(gen, targets, vocab):
    rows = targets.shape[0]
    return {"ref_logps": _seq_logps(targets, vocab, gen), "labels": torch.arange(rows) % 2 == 0,
            "kl": torch.tensor(0.5, dtype=torch.float64)}


OPS: tuple[OpCase, ...] = (
    OpCase("logprobs", 3, _token_inputs, _logprobs, prompt=0),
    OpCase("ppo", 3, _token_inputs, _ppo, prompt=0),
    OpCase("grpo-dapo", 4, _token_inputs, _grpo(loss_type="dapo")),
    OpCase("grpo-gspo", 4, _token_inputs, _grpo(loss_type="grpo", importance_sampling_level="sequence")),
    OpCase("rloo", 4, _token_inputs, _rloo),
    OpCase("ce", 3, _token_inputs, _ce),
    OpCase("distill", 3, _token_inputs, _distill),
    OpCase("dpo", 4, _reference_inputs, _dpo),
    OpCase("dpo-ranking", 6, _reference_inputs, _ranking),
    OpCase("kto", 4, _reference_inputs, _kto),
    OpCase("cpo", 4, _reference_inputs, _cpo()),
    OpCase("simpo", 4, _reference_inputs, _cpo(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
    OpCase("orpo", 4, _reference_inputs, _orpo),
)


@dataclass(frozen=True)
class Problem:
    """One op's inputs: float64 on CPU; ``cast(dtype, device)`` gives a run's copies."""

    hidden: Tensor  # [rows, T, H]
    weight: Tensor  # [V, H]
    bias: Tensor  # [V]
    targets: Tensor  # [rows, T]
    extras: Extras

    def cast(self, dtype: torch.dtype, device: torch.device, *, requires_grad: bool = True):
        """``(hidden, weight, bias, targets, extras)`` on ``device``: the lm_head in ``dtype`` (leaves that require
        grad), the other float inputs fp32 (float64 for float64 runs)."""
        other = torch.float64 if dtype == torch.float64 else torch.float32
        lm = [t.to(device, dtype).requires_grad_(requires_grad) for t in (self.hidden, self.weight, self.bias)]
        extras = {k: v.to(device, other) if v.is_floating_point() else v.to(device) for k, v in self.extras.items()}
        return (*lm, self.targets.to(device), extras)

    def rounded(self, dtype: torch.dtype) -> Problem:
        """The same problem with the lm_head rounded to ``dtype`` (kept float64): the reference of a ``dtype`` run."""
        r = lambda t: t.to(dtype).double()  # noqa: E731
        return Problem(r(self.hidden), r(self.weight), r(self.bias), self.targets, self.extras)


def make_problem(case: OpCase, tokens: int, hidden_size: int, vocab: int, seed: int = 0) -> Problem:
    """Random float64 inputs of about ``tokens`` tokens (at least 3 per sequence), logits of unit scale."""
    gen = torch.Generator().manual_seed(seed)
    length = max(tokens // case.rows, case.prompt + 2)
    hidden = torch.randn(case.rows, length, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * hidden_size ** -0.5
    bias = 0.1 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (case.rows, length), generator=gen)
    targets[:, :case.prompt] = -100
    targets[-1, -1] = -100  # padding at the end of one sequence
    return Problem(hidden, weight, bias, targets, case.make(gen, targets, vocab))
