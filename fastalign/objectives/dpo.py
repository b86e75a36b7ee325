"""DPO and its variants on per-sequence log-probs: losses, implicit rewards and TRL-named metrics.

Formulas, parameter names and metric names follow TRL's ``DPOTrainer.dpo_loss`` and
``get_batch_loss_metrics`` (``trl/trainer/dpo_trainer.py``). Inputs are one number per sequence, shape ``[B]``:
the sum over the response tokens of the log-prob of each token (``ipo`` excepted, see ``DPOOptions``), for the
policy and the reference model, on the chosen and the rejected response of each of ``B`` pairs.

With ``z = (chosen - rejected) - (ref_chosen - ref_rejected)``, ``c = chosen - ref_chosen``,
``r = rejected - ref_rejected``, ``b = beta``, ``e = label_smoothing`` and ``s`` the logistic sigmoid:

========== ============================================================ =============================================
loss_type  per-pair loss                                                paper
========== ============================================================ =============================================
sigmoid    ``-(1-e) log s(b z) - e log s(-b z)``                        DPO, Rafailov et al. 2023, arXiv:2305.18290
                                                                        Eq. 7; ``e > 0``: conservative DPO (cDPO),
                                                                        Mitchell 2023, https://ericmitchell.ai/cdpo.pdf
robust     ``(-(1-e) log s(b z) + e log s(-b z)) / (1 - 2e)``           Robust DPO, Chowdhury et al. 2024,
                                                                        arXiv:2403.00409
hinge      ``relu(1 - b z)``                                            SLiC-HF, Zhao et al. 2023, arXiv:2305.10425
                                                                        (with ``b``: RSO, Liu et al. 2023,
                                                                        arXiv:2309.06657)
ipo        ``(z - 1/(2b))^2``                                           IPO, Azar et al. 2023, arXiv:2310.12036 Eq. 17
sppo_hard  ``(c - 1/(2b))^2 + (r + 1/(2b))^2``                          SPPO, Wu et al. 2024, arXiv:2405.00675 Eq. 4.7
                                                                        with hard win probabilities 1 and 0
nca_pair   ``-log s(b c) - log s(-b c)/2 - log s(-b r)/2``              NCA, Chen et al. 2024, arXiv:2402.05369
apo_zero   ``1 - s(b c) + s(b r)``                                      APO-zero, D'Oosterlinck et al. 2024,
                                                                        arXiv:2408.06266 Eq. 7
apo_down   ``s(b c) + 1 - s(b z)``                                      APO-down, same paper, Eq. 8
========== ============================================================ =============================================

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733 v3) adds
``rpo_alpha * nll`` to the loss, ``nll`` being the mean negative log-likelihood per chosen token (``rpo_nll``).

Not included: ``bco_pair`` (its reward shift is a running mean over training steps, state that does not belong in a
pure function), and TRL's rarer ``exo_pair``, ``aot``, ``aot_pair``, ``discopop`` and f-divergence options.

Everything is differentiable with autograd (float32 and float64): the fused op takes the gradient of ``dpo_loss``
with respect to each sequence's log-prob by ``torch.autograd.grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "robust", "hinge", "ipo", "sppo_hard", "nca_pair", "apo_zero", "apo_down"]
DPO_LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)

# Allowed label_smoothing per loss type, as (low, high, high included); the other types take no label smoothing.
_LABEL_SMOOTHING_RANGES = {"sigmoid": (0.0, 1.0, True), "robust": (0.0, 0.5, False)}


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPOOptions:
    """Options of the DPO loss, with TRL's ``DPOConfig`` names and defaults.

    beta: inverse temperature of the implicit reward (``tau`` of the IPO paper), > 0.
    loss_type: one of ``DPO_LOSS_TYPES``.
    label_smoothing: assumed probability that a preference label is flipped; ``sigmoid`` (cDPO) takes ``[0, 1]``,
        ``robust`` takes ``[0, 0.5)``, every other loss type requires ``0.0`` (TRL ignores it there with a warning;
        here it is an error).
    reference_free: take every reference log-prob as 0 (pass ``None`` for the reference log-probs). Applied to all
        loss types and to the rewards alike; TRL applies it to the pairwise margin ``z`` and the APO log-ratios, but
        not to ``sppo_hard``, ``nca_pair`` or the logged rewards.
    rpo_alpha: weight of the NLL term on the chosen responses (RPO); ``None`` for none. The paper recommends 1.0.

    For ``ipo``, TRL feeds the loss length-normalized log-probs: pass ``sum of token log-probs / number of response
    tokens`` for all four inputs (policy and reference, chosen and rejected), each response divided by its own
    length. Every other loss type takes the plain sums.
    """

    beta: float = 0.1
    loss_type: DPOLossType = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    rpo_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if _check_real("beta", self.beta) <= 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")
        eps = _check_real("label_smoothing", self.label_smoothing)
        low, high, high_included = _LABEL_SMOOTHING_RANGES.get(self.loss_type, (0.0, 0.0, True))
        if not (low <= eps and (eps <= high if high_included else eps < high)):
            expected = f"[{low}, {high}{']' if high_included else ')'}" if high > 0 else "0.0 (not used by this loss)"
            raise ValueError(f"label_smoothing: expected {expected} for loss_type={self.loss_type!r}, got {eps!r}")
        if not isinstance(self.reference_free, bool):
            raise TypeError(f"reference_free: expected a bool, got {type(self.reference_free).__name__}")
        if self.rpo_alpha is not None and _check_real("rpo_alpha", self.rpo_alpha) < 0:
            raise ValueError(f"rpo_alpha: expected None or a number >= 0, got {self.rpo_alpha!r}")


@dataclass(frozen=True)
class DPOResult:
    """Output of ``dpo_loss``.

    loss: scalar to minimize (differentiable). losses: ``[B]`` per-pair DPO loss, without the RPO term.
    chosen_rewards, rejected_rewards: ``[B]`` implicit rewards ``beta * (policy - reference)``, detached.
    nll: scalar chosen NLL that entered the loss (RPO), or ``None``.
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    nll: Tensor | None = None


def _check_logps(name: str, value: object, like: Tensor | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if like is None:
        if value.dim() != 1:
            raise ValueError(f"{name}: expected shape [B] (one log-prob per sequence), got {tuple(value.shape)}")
    elif value.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} like chosen_logps, got {tuple(value.shape)}")
    return value


def _check_scalar(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 0:
        got = f"shape {tuple(value.shape)} dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a 0-dim floating-point tensor, got {got}")
    return value


def _logratios(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    reference_free: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated ``(c, r, z)``: per-response log-ratios to the reference and the pairwise margin, each ``[B]``."""
    _check_logps("chosen_logps", chosen_logps)
    _check_logps("rejected_logps", rejected_logps, chosen_logps)
    if reference_free:
        for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if ref is not None:
                raise ValueError(
                    f"{name}: expected None with reference_free=True (reference log-probs are taken as 0), "
                    f"got a tensor"
                )
        return chosen_logps, rejected_logps, chosen_logps - rejected_logps
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is None:
            raise ValueError(f"{name}: expected a tensor of shape [B] (None only with reference_free=True), got None")
        _check_logps(name, ref, chosen_logps)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    # TRL's grouping: policy log-ratio minus reference log-ratio.
    margin = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return chosen_logratios, rejected_logratios, margin


def dpo_losses(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    options: DPOOptions = DPOOptions(),
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and implicit rewards, as TRL's ``dpo_loss``.

    All inputs ``[B]`` (reference ones ``None`` with ``reference_free``). Returns ``(losses, chosen_rewards,
    rejected_rewards)``, each ``[B]``; the rewards ``beta * (policy - reference)`` are detached.
    """
    if not isinstance(options, DPOOptions):
        raise TypeError(f"options: expected DPOOptions, got {type(options).__name__}")
    c, r, z = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, options.reference_free)
    beta, eps, loss_type = options.beta, options.label_smoothing, options.loss_type
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * z) * (1 - eps) + F.logsigmoid(-beta * z) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "sppo_hard":
        losses = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    else:  # apo_down; DPOOptions rejects any other value
        losses = torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * z))
    return losses, beta * c.detach(), beta * r.detach()


def check_count(name: str, value: int | Tensor, minimum: int, meaning: str) -> int | Tensor:
    """A positive count given as an int (checked against ``minimum``) or a one-element tensor (not checked: no sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected an int or a one-element tensor, got shape {tuple(value.shape)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int or a one-element tensor, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum} ({meaning}), got {value}")
    return value


def rpo_nll(chosen_logps: Tensor, chosen_num_tokens: Tensor, *, num_tokens: int | Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood per chosen token, the RPO term: ``-sum(chosen_logps) / sum(chosen_num_tokens)``.

    chosen_logps: ``[B]`` sums of the policy's token log-probs over each chosen response (sums even for ``ipo``).
    chosen_num_tokens: ``[B]`` number of response tokens in each. num_tokens: global token count replacing
    ``sum(chosen_num_tokens)`` under gradient accumulation or data parallelism, so that the partial NLLs add up.
    Equals TRL's ``cross_entropy`` over the chosen tokens, except that TRL also drops real tokens of id 0.
    """
    _check_logps("chosen_logps", chosen_logps)
    if not isinstance(chosen_num_tokens, Tensor) or chosen_num_tokens.shape != chosen_logps.shape:
        got = tuple(chosen_num_tokens.shape) if isinstance(chosen_num_tokens, Tensor) else type(chosen_num_tokens)
        raise ValueError(f"chosen_num_tokens: expected a tensor of shape {tuple(chosen_logps.shape)}, got {got}")
    if num_tokens is None:
        return -chosen_logps.sum() / chosen_num_tokens.sum()
    return -chosen_logps.sum() / check_count("num_tokens", num_tokens, 1, "a token count")


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    options: DPOOptions = DPOOptions(),
    *,
    chosen_nll: Tensor | None = None,
    num_pairs: int | Tensor | None = None,
) -> DPOResult:
    """DPO loss of a batch of ``B`` pairs: ``mean(losses) + rpo_alpha * chosen_nll``.

    Log-probs ``[B]`` as in ``dpo_losses``. chosen_nll: scalar from ``rpo_nll``, required exactly when
    ``options.rpo_alpha`` is set. num_pairs: global pair count (all micro-batches and ranks); the DPO term becomes
    ``sum(losses) / num_pairs``, so that summing the losses of the parts gives the loss of the whole (compute
    ``chosen_nll`` with its global ``num_tokens`` then too). Checked to be >= B when an int.
    """
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, options
    )
    if num_pairs is None:
        if losses.numel() == 0:
            raise ValueError("chosen_logps: expected at least one pair (or pass num_pairs), got shape (0,)")
        loss = losses.mean()
    else:
        loss = losses.sum() / check_count(
            "num_pairs", num_pairs, max(losses.numel(), 1), "at least the pairs in this batch"
        )
    if options.rpo_alpha is None:
        if chosen_nll is not None:
            raise ValueError("chosen_nll: expected None since options.rpo_alpha is None, got a tensor")
    else:
        if chosen_nll is None:
            raise ValueError(f"chosen_nll: expected a scalar tensor since rpo_alpha={options.rpo_alpha}, got None")
        loss = loss + options.rpo_alpha * _check_scalar("chosen_nll", chosen_nll)
    return DPOResult(loss, losses, chosen_rewards, rejected_rewards, chosen_nll)


def dpo_metrics(result: DPOResult, chosen_logps: Tensor, rejected_logps: Tensor) -> dict[str, Tensor]:
    """TRL's DPO metrics for this batch, detached scalars (gather across ranks before logging, as TRL does).

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (fraction of pairs with chosen reward >
    rejected reward), ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (batch means of the ``[B]`` inputs
    given to the loss), and ``nll_loss`` when the loss had an RPO term.
    """
    _check_logps("chosen_logps", chosen_logps, result.chosen_rewards)
    _check_logps("rejected_logps", rejected_logps, result.chosen_rewards)
    chosen_rewards, rejected_rewards = result.chosen_rewards, result.rejected_rewards
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    if result.nll is not None:
        metrics["nll_loss"] = result.nll.detach()
    return metrics
