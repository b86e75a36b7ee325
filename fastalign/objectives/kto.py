"""KTO on per-sequence log-probs of unpaired examples: losses, the batch KL estimate, TRL-named metrics.

Formulas, names and metrics follow TRL's ``KTOTrainer`` (``trl/experimental/kto/kto_trainer.py``: ``kto_loss``,
``get_batch_loss_metrics``, ``log``). Each of ``B`` examples is a prompt, a completion and a label (True:
desirable); inputs are one number per completion, shape ``[B]``: the sum over its tokens of the token log-probs,
for the policy and for the reference model. With ``c = policy - reference`` (the log-ratio), ``b = beta``,
``s`` the logistic sigmoid and ``kl`` the detached batch KL estimate (``kto_kl``):

================== ==================================== ==================================== ======================
loss_type          desirable example                    undesirable example                  paper
================== ==================================== ==================================== ======================
kto                ``w_d (1 - s(b (c - kl)))``          ``w_u (1 - s(b (kl - c)))``          KTO, Ethayarajh et al.
                                                                                             2024, arXiv:2402.01306
                                                                                             Eq. 7
apo_zero_unpaired  ``w_d (1 - s(b c))``                 ``w_u s(b c)``                       APO, D'Oosterlinck et
                                                                                             al. 2024,
                                                                                             arXiv:2408.06266 Eq. 7
================== ==================================== ==================================== ======================

``w_d = desirable_weight``, ``w_u = undesirable_weight``. The loss is the mean over the ``B`` examples (TRL's
``losses.nanmean()`` over the concatenated desirable and undesirable losses; here a NaN propagates instead of being
skipped). The paper writes ``lambda_D``, ``lambda_U`` for the weights and takes ``kl`` as the KL of the policy on
mismatched prompt/completion pairs; TRL (and this module) estimate it as the batch mean of ``policy - reference``
sequence log-probs on those pairs, detached and clamped at 0 (see ``kto_kl``). TRL 1.16; deviations:
``docs/trl-semantics.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from .dpo import _check_real, check_count
from .preference import check_sequence_logps

KTOLossType = Literal["kto", "apo_zero_unpaired"]
KTO_LOSS_TYPES: tuple[str, ...] = get_args(KTOLossType)


@dataclass(frozen=True)
class KTOOptions:
    """Options of the KTO loss, with TRL's ``KTOConfig`` names and defaults.

    beta: inverse temperature of the implicit reward, > 0. loss_type: one of ``KTO_LOSS_TYPES``.
    desirable_weight, undesirable_weight: factors on the desirable and undesirable examples' losses, >= 0.
    """

    beta: float = 0.1
    loss_type: KTOLossType = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {KTO_LOSS_TYPES}, got {self.loss_type!r}")
        if _check_real("beta", self.beta) <= 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")
        for name in ("desirable_weight", "undesirable_weight"):
            if _check_real(name, getattr(self, name)) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")

    @property
    def uses_kl(self) -> bool:
        """Whether the loss takes the batch KL estimate (TRL's ``calculate_KL``): ``kto`` does, APO does not."""
        return self.loss_type == "kto"


@dataclass(frozen=True)
class KTOResult:
    """Output of ``kto_loss``.

    loss: scalar to minimize (differentiable). losses: ``[B]`` weighted per-example losses, in input order.
    rewards: ``[B]`` implicit rewards ``beta * (policy - reference)``, detached. labels: ``[B]`` bool, desirable.
    kl: the 0-dim KL estimate the loss used (zero for ``apo_zero_unpaired``, as TRL), detached.
    """

    loss: Tensor
    losses: Tensor
    rewards: Tensor
    labels: Tensor
    kl: Tensor


def _check_labels(labels: object, like: Tensor) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype != torch.bool or labels.shape != like.shape:
        got = f"dtype {labels.dtype} shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else \
            type(labels).__name__
        raise ValueError(f"labels: expected a bool tensor of shape {tuple(like.shape)} (True: desirable), got {got}")
    return labels


def kto_kl(policy_kl_logps: Tensor, reference_kl_logps: Tensor, *, process_group=None) -> Tensor:
    """TRL's batch KL estimate: ``mean(policy_kl_logps - reference_kl_logps)``, detached, averaged over the ranks
    of ``process_group`` (each rank's mean equally, as TRL's ``gather_for_metrics(kl).mean()``; None: the default
    group when ``torch.distributed`` is initialized), then clamped at 0. Inputs ``[B]``: sequence log-probs of the
    mismatched (prompt, completion) pairs. Returns a 0-dim tensor."""
    check_sequence_logps("policy_kl_logps", policy_kl_logps)
    check_sequence_logps("reference_kl_logps", reference_kl_logps, policy_kl_logps)
    kl = (policy_kl_logps.detach() - reference_kl_logps.detach()).mean()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        kl = kl.clone()
        dist.all_reduce(kl, group=process_group)
        kl = kl / dist.get_world_size(process_group)
    return kl.clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    kl: Tensor | None,
    options: KTOOptions = KTOOptions(),
    *,
    num_examples: int | Tensor | None = None,
) -> KTOResult:
    """KTO loss of ``B`` unpaired examples (TRL's ``kto_loss`` then ``losses.nanmean()``).

    policy_logps, reference_logps: ``[B]`` sequence log-prob sums of the completions. labels: ``[B]`` bool, True for
    desirable. kl: 0-dim detached estimate from ``kto_kl`` (required for ``kto``, must be None for
    ``apo_zero_unpaired``). num_examples: global example count (all micro-batches and ranks); the loss becomes
    ``sum(losses) / num_examples`` so that the parts add up to the whole. A batch may hold only desirable or only
    undesirable examples (TRL's empty-side branch).
    """
    if not isinstance(options, KTOOptions):
        raise TypeError(f"options: expected KTOOptions, got {type(options).__name__}")
    check_sequence_logps("policy_logps", policy_logps)
    check_sequence_logps("reference_logps", reference_logps, policy_logps)
    labels = _check_labels(labels, policy_logps)
    if options.uses_kl:
        if not isinstance(kl, Tensor) or kl.numel() != 1 or not kl.is_floating_point():
            got = f"shape {tuple(kl.shape)} dtype {kl.dtype}" if isinstance(kl, Tensor) else type(kl).__name__
            raise ValueError(f"kl: expected a one-element floating-point tensor for loss_type='kto', got {got}")
        kl = kl.detach().reshape(()).to(policy_logps.dtype)
    else:
        if kl is not None:
            raise ValueError(f"kl: expected None for loss_type={options.loss_type!r} (it takes no KL term), "
                             f"got a tensor")
        kl = policy_logps.new_zeros(())
    beta = options.beta
    logratios = policy_logps - reference_logps
    if options.loss_type == "kto":
        desirable = 1 - torch.sigmoid(beta * (logratios - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired; KTOOptions rejects any other value
        desirable = 1 - torch.sigmoid(beta * logratios)
        undesirable = torch.sigmoid(beta * logratios)
    losses = torch.where(labels, options.desirable_weight * desirable, options.undesirable_weight * undesirable)
    if num_examples is None:
        if losses.numel() == 0:
            raise ValueError("policy_logps: expected at least one example (or pass num_examples), got shape (0,)")
        loss = losses.mean()
    else:
        loss = losses.sum() / check_count("num_examples", num_examples, max(losses.numel(), 1),
                                          "at least the examples in this batch")
    return KTOResult(loss, losses, beta * logratios.detach(), labels, kl)


def kto_metrics(result: KTOResult, policy_logps: Tensor) -> dict[str, Tensor]:
    """TRL's per-batch KTO metrics, detached: ``kl``, and for each side present in the batch the sums
    ``rewards/chosen_sum``, ``logps/chosen_sum``, ``count/chosen`` (``rejected`` likewise). Sum them over
    micro-batches and ranks, then ``kto_metric_means`` gives what TRL logs (under ``torch.compile`` both sides are
always present, an absent one with count 0). TRL's ``logits/*`` come from ``kto_logit_metrics`` (the op's
    ``vocab_metrics``)."""
    check_sequence_logps("policy_logps", policy_logps, result.rewards)
    metrics = {"kl": result.kl.detach()}
    for side, mask in (("chosen", result.labels), ("rejected", ~result.labels)):
        if torch.compiler.is_compiling() or bool(mask.any()):  # compiled: both sides (keys cannot depend on data)
            metrics[f"rewards/{side}_sum"] = torch.where(mask, result.rewards, 0.0).sum()
            metrics[f"logps/{side}_sum"] = torch.where(mask, policy_logps.detach(), 0.0).sum()
            metrics[f"count/{side}"] = mask.sum().to(result.rewards.dtype)
    return metrics


def kto_logit_metrics(logit_means: Tensor, chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """TRL 1.16's per-batch sums behind ``logits/chosen`` and ``logits/rejected``: ``logits/{side}_sum``, the sum
    of ``logit_means`` (``[M]``, each completion token's mean logit over the vocabulary) over the tokens of the
    desirable (``chosen [M]`` bool) / undesirable (``rejected``) completions, and ``count/{side}_tokens``.
    ``kto_metric_means`` divides them (a side without tokens is not logged, as TRL)."""
    return {key: value for side, where in (("chosen", chosen), ("rejected", rejected))
            for key, value in ((f"logits/{side}_sum", (logit_means * where).sum()),
                               (f"count/{side}_tokens", where.sum().to(logit_means.dtype)))}


def kto_metric_means(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's ``KTOTrainer.log``: ``rewards/{side}`` and ``logps/{side}`` as sum over count for each side present,
    ``logits/{side}`` as sum over tokens (``kto_logit_metrics``) for each side with tokens, ``rewards/margins`` when
    both sides are present, the other keys as given (``count/*`` and ``*_sum`` keys are consumed)."""
    out = {k: v for k, v in metrics.items() if not (k.startswith("count/") or k.endswith("_sum"))}
    for side in ("chosen", "rejected"):
        count = metrics.get(f"count/{side}", 0)
        if count > 0:
            for name in ("rewards", "logps"):
                out[f"{name}/{side}"] = metrics[f"{name}/{side}_sum"] / count
        if metrics.get(f"count/{side}_tokens", 0) > 0:
            out[f"logits/{side}"] = metrics[f"logits/{side}_sum"] / metrics[f"count/{side}_tokens"]
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
