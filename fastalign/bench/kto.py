"""``--op kto``: the fused KTO loss against TRL's ``kto_loss`` on materialized logits."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..functional import fused_linear_kto_loss
from .harness import REGISTRY, OpBench, Problem, Step, VariantFactory
from .variants import fused_loss, naive_sequence_sums, placer, sequence_loss_modes


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


def fused_kto(**options) -> VariantFactory:
    """fused_linear_kto_loss (kto), forward + backward."""
    return fused_loss(lambda x, hidden, weight: fused_linear_kto_loss(
        hidden, weight, x.targets, x.labels, ref_logps=x.ref_logps, kl=x.kl, backend=x.backend, **options))


def naive_kto(x: KTOInputs) -> Step:
    """TRL's KTO in plain PyTorch (``kto_loss`` on ``get_batch_logps`` sums), forward + backward."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

    def step():
        logratios = naive_sequence_sums(hidden, weight, x.targets)[0] - x.ref_logps
        losses = torch.where(x.labels, 1 - torch.sigmoid(0.1 * (logratios - x.kl)),
                             1 - torch.sigmoid(0.1 * (x.kl - logratios)))
        return torch.autograd.grad(losses.mean(), [hidden, weight])

    return step


REGISTRY["kto"] = OpBench(make_kto_inputs, sequence_loss_modes(
    "KTO fwd+bwd, reference sums and KL precomputed", fused_kto, naive_kto))
