"""Reference-free preference losses on per-sequence log-probs: CPO, SimPO, AlphaPO and ORPO.

Formulas, names and metrics follow TRL's ``CPOTrainer`` (``trl/experimental/cpo/cpo_trainer.py``: ``cpo_loss``,
``concatenated_forward``, ``get_batch_loss_metrics``) and ``ORPOTrainer`` (``trl/experimental/orpo/orpo_trainer.py``:
``odds_ratio_loss``, ``log1mexp``). Inputs are one number per response, shape ``[B]`` for ``B`` pairs.

CPO family. With ``u = chosen - rejected`` (AlphaPO, ``alpha != 0``: ``u = g(chosen) - g(rejected)`` with
``g(l) = (1 - exp(-alpha l)) / alpha``, i.e. TRL's ``(1 - p^-alpha) / alpha`` for ``p = exp(l)``), ``b = beta``,
``e = label_smoothing``:

========= ============================================================= =====================================
loss_type per-pair loss                                                 log-probs in ``u``
========= ============================================================= =====================================
sigmoid   ``-(1-e) log s(b u) - e log s(-b u)``  (CPO, arXiv:2401.08417) sums over the response
hinge     ``relu(1 - b u)``                       (SLiC)                 sums
ipo       ``(u - 1/(2b))^2``                      (IPO)                  means over the response tokens
simpo     sigmoid on ``u - simpo_gamma / b``      (SimPO, arXiv:2405.14734) means
========= ============================================================= =====================================

The loss is ``mean(losses) + cpo_alpha * nll``, ``nll`` the mean negative log-likelihood per chosen response token
(``rpo_nll``; TRL's ``CrossEntropyLoss`` on the chosen labels), TRL's default ``cpo_alpha=1.0``; the SimPO paper has
no NLL term (set ``cpo_alpha=0``; TRL's ``loss_type="alphapo"`` is ``simpo`` with ``cpo_alpha=0``). AlphaPO
(arXiv:2501.03884) normalizes by length through the SimPO means; TRL applies ``alpha`` to every loss type, and so
does this module. The rewards are ``beta * l`` (``beta * g(l)`` with ``alpha``).

ORPO (Hong et al. 2024, arXiv:2403.07691 Eqs. 4 and 7), on per-token mean log-probs ``l_c``, ``l_r``:
``log_odds = (l_c - l_r) - (log1mexp(l_c) - log1mexp(l_r))``, ``loss = nll - mean(beta * log s(log_odds))``, with
TRL's branch of ``log1mexp(x) = log(1 - exp(x))`` at ``-ln 2``, computed in at least float32. TRL's ``nll`` covers
the chosen prompt and response tokens (not only the response). TRL 1.16; deviations: ``docs/trl-semantics.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from .dpo import DPOResult, _check_real, _check_scalar, check_count, dpo_metrics

CPOLossType = Literal["sigmoid", "hinge", "ipo", "simpo"]
CPO_LOSS_TYPES: tuple[str, ...] = get_args(CPOLossType)
AVERAGED_CPO_LOSS_TYPES = ("ipo", "simpo")
"""CPO loss types that take per-token mean log-probs (TRL's ``average_log_prob``)."""

_LOG_HALF = -math.log(2.0)


def check_sequence_logps(name: str, value: object, like: Tensor | None = None) -> Tensor:
    """A floating-point ``[B]`` tensor of per-sequence log-probs (shaped like ``like`` when given)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if like is None:
        if value.dim() != 1:
            raise ValueError(f"{name}: expected shape [B] (one log-prob per sequence), got {tuple(value.shape)}")
    elif value.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(value.shape)}")
    return value


@dataclass(frozen=True)
class CPOOptions:
    """Options of the CPO loss family, with TRL's ``CPOConfig`` names and defaults.

    beta: > 0. loss_type: one of ``CPO_LOSS_TYPES``. label_smoothing: in ``[0, 0.5)`` for ``sigmoid`` and
    ``simpo`` (the probability of a flipped label, as the DPO op's: at 0.5 and above the loss prefers the rejected
    response), 0 otherwise (TRL ignores it there). simpo_gamma: target margin of ``simpo``, >= 0. cpo_alpha: weight
    of the NLL term, >= 0 (0: no term, TRL logs ``nll_loss`` 0). alpha: AlphaPO reward shape, 0 for plain
    log-probs.
    """

    beta: float = 0.1
    loss_type: CPOLossType = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {CPO_LOSS_TYPES}, got {self.loss_type!r}")
        if _check_real("beta", self.beta) <= 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")
        eps = _check_real("label_smoothing", self.label_smoothing)
        smoothed = self.loss_type in ("sigmoid", "simpo")
        if not (0.0 <= eps < 0.5 if smoothed else eps == 0.0):
            expected = "[0.0, 0.5)" if smoothed else "0.0 (not used by this loss)"
            raise ValueError(f"label_smoothing: expected {expected} for loss_type={self.loss_type!r}, got {eps!r}")
        if _check_real("simpo_gamma", self.simpo_gamma) < 0:
            raise ValueError(f"simpo_gamma: expected a number >= 0 (SimPO's target margin), got {self.simpo_gamma!r}")
        _check_real("alpha", self.alpha)
        if _check_real("cpo_alpha", self.cpo_alpha) < 0:
            raise ValueError(f"cpo_alpha: expected a number >= 0, got {self.cpo_alpha!r}")

    @property
    def average_log_prob(self) -> bool:
        """Whether the loss takes per-token means (``ipo``, ``simpo``) instead of sums."""
        return self.loss_type in AVERAGED_CPO_LOSS_TYPES


def _alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    # TRL: (1 - exp(logps) ** -alpha) / alpha; the same number, without exp(logps) underflowing to 0 for long sums.
    return (1 - torch.exp(-alpha * logps)) / alpha


def cpo_losses(chosen_logps: Tensor, rejected_logps: Tensor,
               options: CPOOptions = CPOOptions()) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and rewards, as TRL's ``cpo_loss``: inputs ``[B]`` (sums, or means for ``ipo``/``simpo``),
    returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``, the rewards detached."""
    if not isinstance(options, CPOOptions):
        raise TypeError(f"options: expected CPOOptions, got {type(options).__name__}")
    check_sequence_logps("chosen_logps", chosen_logps)
    check_sequence_logps("rejected_logps", rejected_logps, chosen_logps)
    if options.alpha != 0:
        chosen, rejected = _alphapo_reward(chosen_logps, options.alpha), _alphapo_reward(rejected_logps, options.alpha)
    else:
        chosen, rejected = chosen_logps, rejected_logps
    beta, eps, u = options.beta, options.label_smoothing, chosen - rejected
    if options.loss_type == "simpo":
        u = u - options.simpo_gamma / beta
    if options.loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * u) * (1 - eps) - F.logsigmoid(-beta * u) * eps
    elif options.loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    else:  # ipo
        losses = (u - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _mean_or_share(losses: Tensor, num_pairs: int | Tensor | None) -> Tensor:
    if num_pairs is None:
        if losses.numel() == 0:
            raise ValueError("chosen_logps: expected at least one pair (or pass num_pairs), got shape (0,)")
        return losses.mean()
    return losses.sum() / check_count("num_pairs", num_pairs, max(losses.numel(), 1), "at least the pairs here")


def cpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, options: CPOOptions = CPOOptions(), *,
             chosen_nll: Tensor | None = None, num_pairs: int | Tensor | None = None) -> DPOResult:
    """CPO/SimPO/AlphaPO loss of ``B`` pairs: ``mean(losses) + cpo_alpha * chosen_nll``.

    chosen_nll: scalar from ``rpo_nll`` on the chosen responses' log-prob sums, required when ``cpo_alpha > 0``
    (else None; the result's ``nll`` is then 0, the ``nll_loss`` TRL logs). num_pairs: global pair count, the pair
    losses' sum is divided by it (compute ``chosen_nll`` with the global token count then too).
    """
    losses, chosen_rewards, rejected_rewards = cpo_losses(chosen_logps, rejected_logps, options)
    loss = _mean_or_share(losses, num_pairs)
    if options.cpo_alpha == 0:
        if chosen_nll is not None:
            raise ValueError("chosen_nll: expected None since cpo_alpha=0, got a tensor")
        nll = losses.new_zeros(())
    else:
        if chosen_nll is None:
            raise ValueError(f"chosen_nll: expected a scalar tensor since cpo_alpha={options.cpo_alpha}, got None")
        nll = _check_scalar("chosen_nll", chosen_nll)
        loss = loss + options.cpo_alpha * nll
    return DPOResult(loss, losses, torch.stack([chosen_rewards, rejected_rewards]), nll)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, TRL's ORPO branch at ``-ln 2`` (the unused branch kept finite)."""
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x.clamp_max(_LOG_HALF))), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """``[B]`` log odds ratio of chosen over rejected from per-token mean log-probs ``[B]``, in float32 or wider
    (TRL casts to float32; float64 stays float64)."""
    check_sequence_logps("chosen_logps", chosen_logps)
    check_sequence_logps("rejected_logps", rejected_logps, chosen_logps)
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor, beta: float = 0.1, *,
              num_pairs: int | Tensor | None = None, valid: Tensor | None = None) -> DPOResult:
    """ORPO loss of ``B`` pairs: ``chosen_nll - mean(beta * log s(log_odds))`` (TRL's ``odds_ratio_loss``).

    chosen_logps, rejected_logps: ``[B]`` per-token means over each response. chosen_nll: scalar NLL of the chosen
    sequences (``rpo_nll``; TRL: over prompt and response tokens). Result ``losses`` is ``beta * log s(log_odds)``
    (TRL's sign: the loss subtracts their mean), rewards ``beta * logps``. valid: ``[B]`` bool, False for a pair
    with a response without tokens (TRL's mean is then 0/0, a NaN loss): such a pair's odds-ratio term is 0 (it
    still counts in the mean), so an empty response or an all-masked batch gives a finite loss.
    """
    if _check_real("beta", beta) <= 0:
        raise ValueError(f"beta: expected a positive number, got {beta!r}")
    losses = beta * F.logsigmoid(orpo_log_odds(*_valid_pairs(chosen_logps, rejected_logps, valid)))
    if valid is not None:
        losses = torch.where(valid, losses, 0.0)
    loss = _check_scalar("chosen_nll", chosen_nll) - _mean_or_share(losses, num_pairs)
    rewards = beta * torch.stack([chosen_logps.detach(), rejected_logps.detach()])
    return DPOResult(loss, losses, rewards, chosen_nll)


def _valid_pairs(chosen_logps: Tensor, rejected_logps: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """The log-probs with those of invalid pairs replaced by -1 (finite log odds, no NaN gradient through them)."""
    if valid is None:
        return chosen_logps, rejected_logps
    return torch.where(valid, chosen_logps, -1.0), torch.where(valid, rejected_logps, -1.0)


def orpo_metrics(result: DPOResult, chosen_logps: Tensor, rejected_logps: Tensor,
                 valid: Tensor | None = None) -> dict[str, Tensor]:
    """TRL's ORPO metrics: those of ``dpo_metrics`` (``rewards/*``, ``logps/*``, ``nll_loss``) and
    ``log_odds_ratio`` (mean ``log s(log_odds)``), ``log_odds_chosen`` (mean ``log_odds``); pairs not ``valid``
    (see ``orpo_loss``) count 0 in both."""
    log_odds = orpo_log_odds(*_valid_pairs(chosen_logps.detach(), rejected_logps.detach(), valid))
    ratio = F.logsigmoid(log_odds)
    if valid is not None:
        log_odds, ratio = torch.where(valid, log_odds, 0.0), torch.where(valid, ratio, 0.0)
    return {**dpo_metrics(result, torch.stack([chosen_logps, rejected_logps])),
            "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()}
