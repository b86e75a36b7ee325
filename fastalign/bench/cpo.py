"""``--op simpo``, ``cpo``, ``orpo``: the reference-free pair losses against TRL's trainers on materialized logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import fused_linear_cpo_loss, fused_linear_orpo_loss
from .dpo import DPOInputs, make_dpo_inputs
from .harness import REGISTRY, OpBench, Step, VariantFactory
from .variants import fused_loss, naive_sequence_sums, sequence_loss_modes


SIMPO = dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)  # the SimPO paper's loss (no NLL term)


def fused_simpo(**options) -> VariantFactory:
    """fused_linear_cpo_loss(loss_type="simpo"), forward + backward; no reference model."""
    return fused_loss(lambda x, hidden, weight: fused_linear_cpo_loss(
        hidden, weight, x.targets, loss_type="simpo", backend=x.backend, **SIMPO, **options))


def naive_simpo(x: DPOInputs) -> Step:
    """TRL's CPO trainer with ``loss_type="simpo"`` in plain PyTorch: per-token mean log-probs, the SimPO loss."""
    hidden, weight = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

    def step():
        sums, mask = naive_sequence_sums(hidden, weight, x.targets)
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
        return lambda: torch.autograd.grad(loss_of(*naive_sequence_sums(hidden, weight, x.targets)), [hidden, weight])

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
