"""DPO, its variants and rankings on per-sequence log-probs: losses, implicit rewards and TRL-named metrics.

Formulas, option names and metric names follow TRL's ``DPOTrainer._compute_loss`` and ``DPOConfig`` (TRL 1.16,
``trl/trainer/dpo_trainer.py``). Inputs are one number per response, laid out ``[K, B]``: ``K`` responses to each of
``B`` prompts, best first (``K = 2``: row 0 chosen, row 1 rejected). Each number is the sum over the response's
completion tokens of the token log-probs (LD-DPO: the tokens past the group's shortest response weighted by
``ld_alpha``, ``ld_token_weights``), for the policy and the reference alike. Precomputed reference log-probs are such
sums for every loss type, as TRL precomputes them.

With ``c = logp_chosen - ref_chosen`` and ``r = logp_rejected - ref_rejected`` (the log-ratios), their
f-divergence scores ``sc = f(c)``, ``sr = f(r)`` (``f_divergence_type``: ``reverse_kl`` ``x``, ``forward_kl``
``1 - exp(-x)``, ``js_divergence`` ``log 2 + log s(x)``, ``alpha_divergence`` ``(exp((a-1) x) - 1) / (a-1)``, its
exponent clamped at 80 as TRL), ``d = sc - sr``, ``b = beta``, ``e = label_smoothing``, ``s`` the logistic sigmoid,
``n_c, n_r`` the completion lengths:

============= ========================================================= ============================================
loss_type     per-pair loss                                             paper
============= ========================================================= ============================================
sigmoid       ``-(1-e) log s(b d) - e log s(-b d)``                     DPO, arXiv:2305.18290 Eq. 7; ``e > 0``: cDPO
                                                                        (https://ericmitchell.ai/cdpo.pdf)
hinge         ``relu(1 - b d)``                                         SLiC-HF arXiv:2305.10425, RSO 2309.06657
ipo           ``(sc/n_c - sr/n_r - 1/(2b))^2``                          IPO, arXiv:2310.12036 Eq. 17
exo_pair      ``q log(q/(1-e)) + (1-q) log((1-q)/e)``, ``q = s(b d)``   EXO, arXiv:2402.00856 Eq. 16
nca_pair      ``-log s(b c) - log s(-b c)/2 - log s(-b r)/2``           NCA, arXiv:2402.05369
robust        ``(-(1-e) log s(b d) + e log s(-b d)) / (1 - 2e)``        Robust DPO, arXiv:2403.00409
bco_pair      ``-log s(b c - m) - log s(-(b r - m))``                   BCO, arXiv:2404.04656 (``m``: see below)
sppo_hard     ``(c - 1/(2b))^2 + (r + 1/(2b))^2``                       SPPO, arXiv:2405.00675 Eq. 4.7, hard P
aot           cDPO form on ``sort(logp_c - logp_r) - sort(ref_c - ref_r)`` AOT, arXiv:2406.05882 (sorted over the batch)
aot_unpaired  cDPO form on ``sort(c) - sort(r)``                        AOT, unpaired
apo_zero      ``1 - s(b c) + s(b r)``                                   APO, arXiv:2408.06266 Eq. 7
apo_down      ``s(b c) + 1 - s(b (c - r))``                             APO, Eq. 8
discopop      ``-log s(L) (1 - s(L/tau)) + exp(-L) s(L/tau)``, ``L=b d`` DiscoPOP, arXiv:2406.08414 Eq. 5
sft           the chosen tokens' mean NLL (``chosen_nll``)              (MPO combines it with sigmoid and bco_pair)
sigmoid_norm  ``-log s(b (sc/n_c - sr/n_r))``                           SimPO-style length normalization (TRL's
                                                                        form keeps the reference)
============= ========================================================= ============================================

Each loss type is one function of ``PairTerms`` in the ``DPO_PAIR_LOSSES`` registry (``register_dpo_loss``;
``docs/loss-registries.md``). ``loss_type`` may be a list, with ``loss_weights`` (default 1.0 each): the loss is the
weighted sum of each type's mean over the pairs. WPO (``use_weighting``, arXiv:2406.11827 Eq. 2) multiplies every
pair's loss by the detached product of its responses' weights ``exp(mean over completion tokens of (log p_y - log
sum_v p_v^2))``. Beyond TRL: ``num_responses = K > 2``, the Plackett-Luce likelihood of the ranking over the implicit
rewards ``u_k = b f(logp_k - ref_k)``, ``-sum_{k<K-1} (u_k - log sum_{j>=k} exp u_j)`` (the DPO paper's listwise
form, arXiv:2305.18290 Appendix A.3), under ``loss_type="sigmoid"`` (equal to it at ``K = 2``; ``sft`` on the best;
LD-DPO shortens to the group's shortest response, WPO multiplies all K weights); ``rpo_alpha`` (RPO,
arXiv:2404.19733, TRL < 1.0) adds ``rpo_alpha * chosen_nll``; ``bco_pair``'s TRL < 1.0 running mean as explicit
state (``RunningMean``). ``label_smoothing`` ranges: ``[0, 0.5)`` for ``sigmoid`` (cDPO, kept), ``robust``, ``aot``,
``aot_unpaired``; ``(0, 0.5)`` for ``exo_pair``; ``0`` when no listed loss type uses it. Every deviation from TRL
1.16 is listed in ``docs/trl-semantics.md``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterization leaves a beta log Z(x) term that cancels only in the chosen - rejected difference.
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                     "sft"})
LENGTH_NORMALIZED_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})
RANKING_LOSS_TYPES = frozenset({"sigmoid", "sft"})
# label_smoothing per loss type that uses it: (low, low included); the upper end is 0.5, excluded.
_LABEL_SMOOTHING = {"sigmoid": True, "robust": True, "aot": True, "aot_unpaired": True, "exo_pair": False}


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _loss_types(loss_type: object) -> tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or not types or not all(isinstance(t, str) for t in types):
        raise TypeError(f"loss_type: expected a loss type name or a non-empty list of names, got {loss_type!r}")
    for name in types:
        if name not in DPO_PAIR_LOSSES:
            raise ValueError(f"loss_type: expected names from {tuple(DPO_PAIR_LOSSES)}, got {name!r}")
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type: expected each name at most once, got {list(types)}")
    return tuple(types)


@dataclass(frozen=True)
class DPOOptions:
    """Options of the DPO loss, with TRL's ``DPOConfig`` names and defaults.

    beta: inverse temperature of the implicit reward (``tau`` of the IPO paper), > 0.
    loss_type: a name from ``DPO_LOSS_TYPES`` or a list of them; ``loss_weights``: one weight per name (default 1.0).
    label_smoothing: see the module docstring for the range of each loss type.
    reference_free: every reference log-prob is 0 (pass ``None`` for them); applied to all loss types and rewards.
    rpo_alpha: weight of the chosen NLL term (RPO), or None.
    f_divergence_type, f_alpha_divergence_coef: the f-divergence of the scores (only with the loss types of
        ``F_DIVERGENCE_LOSS_TYPES`` when not ``reverse_kl``, as TRL).
    discopop_tau: the DiscoPOP temperature, > 0. ld_alpha: LD-DPO weight of the tokens past the shorter response's
        length, in ``[0, 1]``, or None. use_weighting: WPO pair weights (not with ``aot``/``aot_unpaired``, as TRL).
    num_responses: ``K >= 2`` responses per prompt, best first; ``K > 2`` takes ``sigmoid`` (Plackett-Luce) and
        ``sft`` only.
    """

    beta: float = 0.1
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    reference_free: bool = False
    rpo_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    ld_alpha: float | None = None
    use_weighting: bool = False
    num_responses: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.num_responses, bool) or not isinstance(self.num_responses, int):
            raise TypeError(f"num_responses: expected an int >= 2, got {type(self.num_responses).__name__} "
                            f"{self.num_responses!r}")
        types = _loss_types(self.loss_type)
        object.__setattr__(self, "loss_type", types[0] if isinstance(self.loss_type, str) else types)
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, (list, tuple)) or len(self.loss_weights) != len(types):
                raise ValueError(f"loss_weights: expected one weight per loss type ({len(types)}: {list(types)}), "
                                 f"got {self.loss_weights!r}")
            object.__setattr__(self, "loss_weights",
                               tuple(_check_real("loss_weights", w) for w in self.loss_weights))
            if min(self.loss_weights) < 0:  # a negative weight maximizes its loss type
                raise ValueError(f"loss_weights: expected weights >= 0, got {list(self.loss_weights)}")
        if _check_real("beta", self.beta) <= 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")
        self._check_label_smoothing(types)
        if not isinstance(self.reference_free, bool):
            raise TypeError(f"reference_free: expected a bool, got {type(self.reference_free).__name__}")
        if self.rpo_alpha is not None and _check_real("rpo_alpha", self.rpo_alpha) < 0:
            raise ValueError(f"rpo_alpha: expected None or a number >= 0, got {self.rpo_alpha!r}")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type: expected one of {F_DIVERGENCE_TYPES}, got "
                             f"{self.f_divergence_type!r}")
        if _check_real("f_alpha_divergence_coef", self.f_alpha_divergence_coef) <= 0:
            raise ValueError(f"f_alpha_divergence_coef: expected a number > 0 (the f-DPO paper's alpha; alpha -> 0 "
                             f"is f_divergence_type='forward_kl'), got {self.f_alpha_divergence_coef!r}")
        if self.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(f"f_divergence_type: {self.f_divergence_type!r} is only defined for the loss types "
                             f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got loss_type {list(types)}")
        if _check_real("discopop_tau", self.discopop_tau) <= 0:
            raise ValueError(f"discopop_tau: expected a positive number, got {self.discopop_tau!r}")
        if self.ld_alpha is not None and not 0 <= _check_real("ld_alpha", self.ld_alpha) <= 1:
            raise ValueError(f"ld_alpha: expected None or a number in [0, 1], got {self.ld_alpha!r}")
        if not isinstance(self.use_weighting, bool):
            raise TypeError(f"use_weighting: expected a bool, got {type(self.use_weighting).__name__}")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(types):
            raise ValueError(f"use_weighting: not defined for 'aot'/'aot_unpaired' (they sort the pairs, which "
                             f"would misalign the pair weights), got loss_type {list(types)}")
        k = self.num_responses
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"num_responses: expected an int >= 2, got {k!r}")
        if k > 2 and not set(types) <= RANKING_LOSS_TYPES:
            raise ValueError(f"loss_type: with num_responses={k} (a ranking) expected names from "
                             f"{sorted(RANKING_LOSS_TYPES)} ('sigmoid' is the Plackett-Luce loss), got {list(types)}")

    def _check_label_smoothing(self, types: tuple[str, ...]) -> None:
        eps = _check_real("label_smoothing", self.label_smoothing)
        users = [t for t in types if t in _LABEL_SMOOTHING]
        if self.num_responses > 2 and eps != 0:
            raise ValueError(f"label_smoothing: expected 0.0 with num_responses={self.num_responses} (a ranking), "
                             f"got {eps!r}")
        if not users:
            if eps != 0:
                raise ValueError(f"label_smoothing: expected 0.0 (not used by loss_type {list(types)}), got {eps!r}")
            return
        for name in users:
            low_included = _LABEL_SMOOTHING[name]
            if not ((eps >= 0 if low_included else eps > 0) and eps < 0.5):
                expected = "[0.0, 0.5)" if low_included else "(0.0, 0.5) (the EXO paper recommends 1e-3)"
                raise ValueError(f"label_smoothing: expected {expected} for loss_type {name!r}, got {eps!r}")

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights or (1.0,) * len(self.loss_types)

    @property
    def needs_lengths(self) -> bool:
        return bool(LENGTH_NORMALIZED_LOSS_TYPES & set(self.loss_types))

    @property
    def needs_nll(self) -> bool:
        return self.rpo_alpha is not None or "sft" in self.loss_types


class RunningMean(NamedTuple):
    """The running mean of the batches' mean implicit reward (TRL < 1.0 ``bco_pair``): 0-dim ``mean`` and ``count``.

    ``RunningMean.initial()`` starts it (TRL's ``RunningMoments``: mean 0, count 1e-24); each ``dpo_loss`` call with
    ``bco_pair`` updates it with the batch's mean reward over its ``2B`` responses and uses the updated mean.
    """

    mean: Tensor
    count: Tensor

    @classmethod
    def initial(cls, device=None, dtype=torch.float32) -> RunningMean:
        return cls(torch.zeros((), device=device, dtype=dtype), torch.full((), 1e-24, device=device, dtype=dtype))

    def update(self, value: Tensor) -> RunningMean:
        count = self.count + 1
        return RunningMean(self.mean + (value.detach().to(self.mean.dtype) - self.mean) / count, count)


@dataclass(frozen=True)
class DPOResult:
    """Output of ``dpo_loss``.

    loss: scalar to minimize (differentiable). losses: ``[B]`` per-group loss, the weighted sum of the loss types'
    (WPO-weighted) per-pair losses, without the RPO term. rewards: ``[K, B]`` implicit rewards ``beta * (policy -
    reference)``, detached. nll: the chosen NLL that entered the loss (sft / RPO), or None. bco_state: the updated
    running mean (``bco_pair`` with a state), or None.
    """

    loss: Tensor
    losses: Tensor
    rewards: Tensor
    nll: Tensor | None = None
    bco_state: RunningMean | None = None

    @property
    def chosen_rewards(self) -> Tensor:
        return self.rewards[0]

    @property
    def rejected_rewards(self) -> Tensor:
        return self.rewards[-1]


def _check_group_tensor(name: str, value: object, shape: tuple[int, ...] | None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if shape is None:
        if value.dim() != 2 or value.shape[0] < 2:
            raise ValueError(f"{name}: expected shape [K, B] (K >= 2 responses, best first, to B prompts), got "
                             f"{tuple(value.shape)}")
    elif tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)} like logps, got {tuple(value.shape)}")
    return value


def _check_scalar(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 0:
        got = f"shape {tuple(value.shape)} dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a 0-dim floating-point tensor, got {got}")
    return value


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


def f_divergence_scores(logratios: Tensor, options: DPOOptions) -> Tensor:
    """TRL's scores ``f'(exp(logratio))`` of the log-ratios (any shape) for ``options.f_divergence_type``."""
    kind = options.f_divergence_type
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    alpha = options.f_alpha_divergence_coef
    if kind == "reverse_kl" or abs(alpha - 1.0) < 1e-6:  # f'(t) = log t (the alpha -> 1 limit too)
        return logratios
    # alpha-divergence: f'(t) = (t^(alpha-1) - 1) / (alpha - 1); the exponent clamped at 80 as TRL
    return (torch.exp(torch.clamp((alpha - 1.0) * logratios, max=80.0)) - 1.0) / (alpha - 1.0)


def _cdpo(delta: Tensor, beta: float, eps: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps


def plackett_luce_losses(rewards: Tensor) -> Tensor:
    """``[B]`` negative log-likelihood of the ranking best-first of ``rewards [K, B]`` under Plackett-Luce."""
    tail_lse = torch.logcumsumexp(rewards.flip(0), dim=0).flip(0)  # log sum_{j >= k} exp u_j
    return -(rewards - tail_lse)[:-1].sum(0)


class PairTerms(NamedTuple):
    """What every DPO pair loss receives: ``[K, B]`` sequence log-probs of the policy and the reference (best first),
    their log-ratios and f-divergence scores, the completion lengths (``ipo``, ``sigmoid_norm``), the options, the
    ``bco_pair`` reward shift and the chosen NLL (``sft``)."""

    logps: Tensor
    ref_logps: Tensor
    logratios: Tensor
    scores: Tensor
    lengths: Tensor | None
    options: DPOOptions
    bco_mean: Tensor | None
    chosen_nll: Tensor | None

    @property
    def delta(self) -> Tensor:
        """``[B]`` score margin of the best over the worst response."""
        return self.scores[0] - self.scores[-1]


DPO_PAIR_LOSSES: dict[str, Callable[[PairTerms], Tensor]] = {}


def register_dpo_loss(name: str):
    """Decorator: register ``fn(PairTerms) -> [B] per-pair losses`` as ``loss_type=name``."""
    def register(fn: Callable[[PairTerms], Tensor]) -> Callable[[PairTerms], Tensor]:
        DPO_PAIR_LOSSES[name] = fn
        return fn
    return register


def _length_normalized_margin(t: PairTerms) -> Tensor:
    avg = t.scores / t.lengths.clamp(min=1)
    return avg[0] - avg[1]


@register_dpo_loss("sigmoid")
def sigmoid(t: PairTerms) -> Tensor:
    o = t.options
    if t.logps.shape[0] > 2:  # a ranking of K responses: Plackett-Luce
        return plackett_luce_losses(o.beta * t.scores)
    return _cdpo(t.delta, o.beta, o.label_smoothing)


@register_dpo_loss("hinge")
def hinge(t: PairTerms) -> Tensor:
    return torch.relu(1 - t.options.beta * t.delta)


@register_dpo_loss("ipo")
def ipo(t: PairTerms) -> Tensor:
    return (_length_normalized_margin(t) - 1 / (2 * t.options.beta)) ** 2


@register_dpo_loss("exo_pair")
def exo_pair(t: PairTerms) -> Tensor:
    x, eps = t.options.beta * t.delta, t.options.label_smoothing
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


@register_dpo_loss("nca_pair")
def nca_pair(t: PairTerms) -> Tensor:
    beta, c, r = t.options.beta, t.logratios[0], t.logratios[-1]
    return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)


@register_dpo_loss("robust")
def robust(t: PairTerms) -> Tensor:
    x, eps = t.options.beta * t.delta, t.options.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


@register_dpo_loss("bco_pair")
def bco_pair(t: PairTerms) -> Tensor:
    beta, c, r = t.options.beta, t.logratios[0], t.logratios[-1]
    m = 0.0 if t.bco_mean is None else t.bco_mean
    return -F.logsigmoid(beta * c - m) - F.logsigmoid(-(beta * r - m))


@register_dpo_loss("sppo_hard")
def sppo_hard(t: PairTerms) -> Tensor:
    beta, c, r = t.options.beta, t.logratios[0], t.logratios[-1]
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


@register_dpo_loss("aot")
def aot(t: PairTerms) -> Tensor:
    delta = torch.sort(t.logps[0] - t.logps[1], dim=0)[0] - torch.sort(t.ref_logps[0] - t.ref_logps[1], dim=0)[0]
    return _cdpo(delta, t.options.beta, t.options.label_smoothing)


@register_dpo_loss("aot_unpaired")
def aot_unpaired(t: PairTerms) -> Tensor:
    delta = torch.sort(t.logratios[0], dim=0)[0] - torch.sort(t.logratios[-1], dim=0)[0]
    return _cdpo(delta, t.options.beta, t.options.label_smoothing)


@register_dpo_loss("apo_zero")
def apo_zero(t: PairTerms) -> Tensor:
    beta, c, r = t.options.beta, t.logratios[0], t.logratios[-1]
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


@register_dpo_loss("apo_down")
def apo_down(t: PairTerms) -> Tensor:
    beta, c, r = t.options.beta, t.logratios[0], t.logratios[-1]
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


@register_dpo_loss("discopop")
def discopop(t: PairTerms) -> Tensor:
    logits = t.options.beta * t.delta
    modulation = torch.sigmoid(logits / t.options.discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


@register_dpo_loss("sft")
def sft(t: PairTerms) -> Tensor:
    return t.chosen_nll.expand(t.logps.shape[1])


@register_dpo_loss("sigmoid_norm")
def sigmoid_norm(t: PairTerms) -> Tensor:
    return -F.logsigmoid(t.options.beta * _length_normalized_margin(t))


DPO_LOSS_TYPES: tuple[str, ...] = tuple(DPO_PAIR_LOSSES)  # the built-in loss types (TRL 1.16's), in TRL's order


def dpo_loss(
    logps: Tensor,
    ref_logps: Tensor | None,
    options: DPOOptions = DPOOptions(),
    *,
    lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    num_pairs: int | Tensor | None = None,
    log_weights: Tensor | None = None,
    bco_state: RunningMean | None = None,
) -> DPOResult:
    """The DPO loss of ``B`` groups of ``K`` responses: ``sum_t w_t * mean_b(loss_t) + rpo_alpha * chosen_nll``.

    logps, ref_logps: ``[K, B]`` sequence log-prob sums, best first (``ref_logps`` None with ``reference_free``).
    lengths: ``[K, B]`` completion tokens per response, required by ``ipo`` and ``sigmoid_norm`` (which divide each
        score by it; pass ones when the log-probs are already per-token means).
    chosen_nll: scalar mean NLL per token of the best responses (``rpo_nll``), required exactly when ``sft`` is a
        loss type or ``rpo_alpha`` is set.
    num_pairs: global group count (all micro-batches and ranks): each mean becomes ``sum / num_pairs``, so the
        losses of the parts add up to the loss of the whole (``aot`` sorts within a batch and WPO-weighted ``sft``
        is a product of batch sums: those are exact for one batch only). Checked to be >= B when an int.
    log_weights: ``[K, B]`` WPO log-weights (``wpo_log_weights``), required exactly with ``use_weighting``.
    bco_state: ``RunningMean`` for ``bco_pair`` (None: ``m = 0``, TRL 1.x); the updated one is in the result.
    """
    if not isinstance(options, DPOOptions):
        raise TypeError(f"options: expected DPOOptions, got {type(options).__name__}")
    logps = _check_group_tensor("logps", logps, None)
    k, b = logps.shape
    if k != options.num_responses:
        raise ValueError(f"logps: expected {options.num_responses} rows (num_responses), got shape "
                         f"{tuple(logps.shape)}")
    if options.reference_free:
        if ref_logps is not None:
            raise ValueError("ref_logps: expected None with reference_free=True (reference log-probs are taken as 0), "
                             "got a tensor")
        ref_logps = torch.zeros_like(logps)
    elif ref_logps is None:
        raise ValueError("ref_logps: expected a tensor of shape [K, B] (None only with reference_free=True), got None")
    ref_logps = _check_group_tensor("ref_logps", ref_logps, (k, b))
    if options.needs_lengths:
        if lengths is None:
            raise ValueError(f"lengths: required by loss_type {list(options.loss_types)} (ipo and sigmoid_norm divide "
                             f"by the completion lengths), got None")
        lengths = _check_group_tensor("lengths", lengths.to(logps.dtype) if isinstance(lengths, Tensor) else lengths,
                                      (k, b))
    if options.needs_nll != (chosen_nll is not None):
        raise ValueError(f"chosen_nll: expected {'a 0-dim tensor' if options.needs_nll else 'None'} with "
                         f"loss_type {list(options.loss_types)} and rpo_alpha={options.rpo_alpha}, got "
                         f"{'None' if chosen_nll is None else 'a tensor'}")
    if chosen_nll is not None:
        chosen_nll = _check_scalar("chosen_nll", chosen_nll)
    if options.use_weighting != (log_weights is not None):
        raise ValueError(f"log_weights: expected {'a [K, B] tensor' if options.use_weighting else 'None'} with "
                         f"use_weighting={options.use_weighting}, got {'None' if log_weights is None else 'a tensor'}")
    if num_pairs is None:
        if b == 0:
            raise ValueError("logps: expected at least one group (or pass num_pairs), got B = 0")
        denominator = b
    else:
        denominator = check_count("num_pairs", num_pairs, max(b, 1), "at least the pairs in this batch")

    logratios = logps - ref_logps
    scores = f_divergence_scores(logratios, options)
    rewards = options.beta * logratios.detach()
    if bco_state is not None and "bco_pair" in options.loss_types:
        bco_state = bco_state.update(rewards.mean())
    pair_weights = None if log_weights is None else torch.exp(
        _check_group_tensor("log_weights", log_weights, (k, b)).detach().sum(0))
    losses = logps.new_zeros(b)
    terms = PairTerms(logps, ref_logps, logratios, scores, lengths, options,
                      None if bco_state is None else bco_state.mean, chosen_nll)
    for name, weight in zip(options.loss_types, options.weights):
        per_pair = DPO_PAIR_LOSSES[name](terms)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        losses = losses + weight * per_pair
    loss = losses.sum() / denominator
    if options.rpo_alpha is not None:
        loss = loss + options.rpo_alpha * chosen_nll
    return DPOResult(loss, losses, rewards, chosen_nll, bco_state if "bco_pair" in options.loss_types else None)


def rpo_nll(chosen_sums: Tensor, chosen_num_tokens: Tensor, *, num_tokens: int | Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood per token of the best responses: ``-sum(chosen_sums) / sum(chosen_num_tokens)``.

    chosen_sums: ``[B]`` plain sums of the policy's token log-probs over each best response (no LD-DPO weights).
    chosen_num_tokens: ``[B]`` their completion tokens. num_tokens: global token count replacing
    ``sum(chosen_num_tokens)`` under gradient accumulation or data parallelism. TRL's ``sft`` loss:
    ``cross_entropy`` over the chosen completion tokens.
    """
    if not isinstance(chosen_sums, Tensor) or chosen_sums.dim() != 1:
        raise ValueError(f"chosen_sums: expected a tensor of shape [B], got "
                         f"{tuple(chosen_sums.shape) if isinstance(chosen_sums, Tensor) else type(chosen_sums)}")
    if not isinstance(chosen_num_tokens, Tensor) or chosen_num_tokens.shape != chosen_sums.shape:
        got = tuple(chosen_num_tokens.shape) if isinstance(chosen_num_tokens, Tensor) else type(chosen_num_tokens)
        raise ValueError(f"chosen_num_tokens: expected a tensor of shape {tuple(chosen_sums.shape)}, got {got}")
    if num_tokens is None:
        return -chosen_sums.sum() / chosen_num_tokens.sum().clamp(min=1)
    return -chosen_sums.sum() / check_count("num_tokens", num_tokens, 1, "a token count")


def ld_token_weights(mask: Tensor, num_responses: int, ld_alpha: float | None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """LD-DPO token weights ``[K*B, T]`` of the completion ``mask [K*B, T]`` (rows: K groups of B, best first).

    1 for a response's first ``min over its group of the completion lengths`` completion tokens, ``ld_alpha`` past
    them, 0 off the mask (TRL's ``shared_mask + ld_alpha * tail_mask``); ``ld_alpha`` None: the mask itself.
    In ``dtype`` (``ld_alpha`` rounded to it).
    """
    mask = mask.bool()
    if ld_alpha is None:
        return mask.to(dtype)
    position = mask.long().cumsum(dim=1)  # 1-based position among the completion tokens
    shared = mask.sum(dim=1).view(num_responses, -1).min(dim=0).values.repeat(num_responses)
    alpha = torch.tensor(ld_alpha, dtype=dtype, device=mask.device)
    return torch.where(position > shared[:, None], alpha, 1.0) * mask


def wpo_log_weights(aligned_sums: Tensor, lengths: Tensor) -> Tensor:
    """WPO log-weights ``[K, B]``: ``mean over completion tokens of (log p_y - log sum_v p_v^2)``.

    aligned_sums: ``[K, B]`` per-response sums of ``log p_y - (lse(2z) - 2 lse(z))`` over completion tokens;
    lengths: ``[K, B]`` completion tokens (a response without any gets 0). Detached.
    """
    return (aligned_sums / lengths.clamp(min=1)).detach()


def sequence_logps(token_logps: Tensor, mask: Tensor, options: DPOOptions, *,
                   average_log_prob: bool = False) -> Tensor:
    """Sequence log-probs ``[K, B]`` of per-token log-probs ``[K*B, T]`` over the completion ``mask [K*B, T]``.

    Sums (LD-DPO: weighted by ``ld_token_weights``), accumulated in float64 (a 32k-token sum stays exact to fp32);
    ``average_log_prob``: divided by the completion lengths (a response without tokens gets 0). The reference model's
    log-probs, precomputed once per data set, are the same function of its token log-probs.
    """
    weights = ld_token_weights(mask, options.num_responses, options.ld_alpha, token_logps.dtype)
    sums = (token_logps * weights).to(torch.float64).sum(dim=1).to(token_logps.dtype)
    if average_log_prob:
        sums = sums / mask.sum(dim=1).clamp(min=1)
    return sums.view(options.num_responses, -1)


def dpo_sequence_loss(token_logps: Tensor, mask: Tensor, ref_logps: Tensor | None, options: DPOOptions, *,
                      average_log_prob: bool = False, num_pairs: int | Tensor | None = None,
                      num_chosen_tokens: int | Tensor | None = None, token_log_denoms: Tensor | None = None,
                      bco_state: RunningMean | None = None) -> tuple[DPOResult, Tensor]:
    """``dpo_loss`` of per-token log-probs: what the fused op, the trainers and the tests all compute.

    token_logps: ``[K*B, T]`` (K groups of B rows, best first), any value off the completion ``mask [K*B, T]``.
    ref_logps: ``[K, B]`` from ``sequence_logps`` of the reference (None with ``reference_free``).
    average_log_prob: per-token means instead of sums for policy and reference alike (then ``ipo`` and
        ``sigmoid_norm`` take them as they are: lengths 1). num_pairs, num_chosen_tokens: the global normalizers of
        the pair losses and of the chosen NLL (default this batch's). token_log_denoms: ``[K*B, T]`` per-token
        ``log sum_v p_v^2 = lse(2z) - 2 lse(z)``, required with ``use_weighting``. bco_state: see ``dpo_loss``.
    Returns the result and the policy's sequence log-probs ``[K, B]``.
    """
    mask = mask.bool()
    token_logps = token_logps.masked_fill(~mask, 0.0)
    logps = sequence_logps(token_logps, mask, options, average_log_prob=average_log_prob)
    k, b = logps.shape
    counts = mask.sum(dim=1).to(logps.dtype)
    lengths = counts.view(k, b) if not average_log_prob else torch.ones_like(logps)
    nll = None
    if options.needs_nll:
        chosen = token_logps[:b].to(torch.float64).sum(dim=1).to(logps.dtype)
        nll = rpo_nll(chosen, counts[:b], num_tokens=num_chosen_tokens)
    log_weights = None
    if options.use_weighting:
        if token_log_denoms is None:
            raise ValueError("token_log_denoms: required with use_weighting=True (WPO), got None")
        aligned = ((token_logps - token_log_denoms) * mask).detach().sum(dim=1).view(k, b)
        log_weights = wpo_log_weights(aligned, counts.view(k, b))
    result = dpo_loss(logps, ref_logps, options, lengths=lengths, chosen_nll=nll, num_pairs=num_pairs,
                      log_weights=log_weights, bco_state=bco_state)
    return result, logps


def dpo_metrics(result: DPOResult, logps: Tensor) -> dict[str, Tensor]:
    """TRL's DPO metrics for this batch, detached scalars (gather across ranks before logging, as TRL does).

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (best and worst response of each group),
    ``rewards/accuracies`` (fraction of the ``K(K-1)/2`` response pairs per group whose rewards are in the ranking's
    order: TRL's at ``K = 2``), ``logps/chosen``, ``logps/rejected`` (batch means of the best and worst ``logps``);
    ``nll_loss`` with an NLL term; ``rewards/ranking_accuracy`` (fraction of groups whose rewards order them
    exactly) when ``K > 2``.
    """
    rewards, logps = result.rewards, logps.detach()
    k = rewards.shape[0]
    i, j = torch.triu_indices(k, k, offset=1, device=rewards.device)
    ordered = rewards[i] > rewards[j]  # [pairs, B]
    metrics = {
        "rewards/chosen": rewards[0].mean(),
        "rewards/rejected": rewards[-1].mean(),
        "rewards/accuracies": ordered.to(rewards.dtype).mean(),
        "rewards/margins": (rewards[0] - rewards[-1]).mean(),
        "logps/chosen": logps[0].mean(),
        "logps/rejected": logps[-1].mean(),
    }
    if k > 2:
        metrics["rewards/ranking_accuracy"] = ordered.all(dim=0).to(rewards.dtype).mean()
    if result.nll is not None:
        metrics["nll_loss"] = result.nll.detach()
    return metrics


VOCABULARY_METRICS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


def vocabulary_metrics(logit_means: Tensor, entropy: Tensor, correct: Tensor, rank: Tensor,
                       num_responses: int) -> dict[str, Tensor]:
    """TRL's metrics over the vocabulary (``VOCABULARY_METRICS``), from per-token values of the completion tokens.

    All ``[M]``: logit_means, the mean over the vocabulary of each token's logits; entropy; correct, whether its
    arg-max is its target; rank, the rank of its response (0 the best). ``logits/chosen`` and ``logits/rejected``
    are token means over the best and the worst responses, ``entropy`` over every completion token,
    ``mean_token_accuracy`` over the best responses' tokens (TRL: the chosen ones); 0 where there is no token.
    A rank of -1 marks a row to leave out (not a completion token).
    """
    def mean(values: Tensor, where: Tensor) -> Tensor:
        return (values * where).sum() / where.sum().clamp(min=1)

    best, worst = rank == 0, rank == num_responses - 1
    return dict(zip(VOCABULARY_METRICS, (mean(logit_means, best), mean(logit_means, worst),
                                         mean(entropy, rank >= 0),
                                         mean(correct.to(logit_means.dtype), best))))
