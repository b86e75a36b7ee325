"""GRPO and its descendants on per-token log-probs: TRL 1.16's ``GRPOTrainer._compute_loss`` as one function.

Loss types (the ``GRPO_LOSSES`` registry: one function each, ``register_grpo_loss``, aggregations in the
``NORMALIZERS`` table; ``docs/loss-registries.md``), each TRL's, with ``r`` the importance ratio
``exp(log pi - log pi_old)`` per token (``importance_sampling_level="token"``) or ``exp(mean over the sequence of
the log-ratio)`` per sequence (``"sequence"``, GSPO, Zheng et al. 2025, arXiv:2507.18071) and ``A`` the advantage:

========= =================================================================== ===========================================
loss_type per-token loss                                                      aggregation
========= =================================================================== ===========================================
grpo      ``-min(r A, clip(r, 1-eps, 1+eps_high) A)`` (``r`` capped at delta) mean per sequence, then over sequences
bnpo      same                                                                mean over the batch's completion tokens
dr_grpo   same                                                                sum / (B * max_completion_length)
dapo      same                                                                sum / num_items_in_batch
luspo     same                                                                sum per sequence, mean over sequences
cispo     ``-sg(min(r, eps_high)) A log pi`` (CISPO, MiniMax-M1 2025)        sum / num_items_in_batch
sapo      ``-sigmoid(tau (r - 1)) 4 / tau A``, tau by the sign of A (SAPO)   mean per sequence, then over sequences
vespo     ``-sg(phi(W)) A log pi``, phi the gamma weight of the sequence IS  sum / num_items_in_batch
========= =================================================================== ===========================================

``delta`` caps ``r`` before the clip's min (two-sided clipping, INTELLECT-2). With ``beta != 0`` the k3 estimate
``exp(ref - logp) - (ref - logp) - 1`` (times ``r``, undetached, with ``use_bias_correction_kl``) is added per token
after the masks. The off-policy mask (DeepSeek-V3.2) drops sequences with ``A < 0`` whose mean
``sampling_logprobs - logp`` exceeds ``off_policy_mask_threshold``; ``top_entropy_quantile < 1`` keeps only the
tokens whose entropy is at least the batch's ``1 - top_entropy_quantile`` quantile; ``importance_sampling_ratio``
(rollout-engine correction) multiplies the loss after those masks and before the KL term, except for vespo, where
its log enters the gamma weight. ``entropy_coef`` subtracts ``entropy_coef *`` the mean entropy over the same
effective mask, for every loss type. The off-policy mask treats NaN ``sampling_logprobs`` (tokens the rollout engine
could not score) as no evidence (``nan_to_num``), as TRL.

This is the loss of ONE process without gradient accumulation: TRL's division by the accumulation steps (and its
``num_items_in_batch / num_processes``) stays the caller's. Deviations from TRL (all listed in
``docs/trl-semantics.md``) concern positions TRL itself masks out: the IS ratio's log enters vespo's weight summed
over completion tokens only (TRL's ratio is 1 elsewhere, so the values agree).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VESPO_LOG_CLAMP = (math.log(1e-8), 20.0)  # TRL's clamps of vespo's log weights


def _finite(name: str, value, *, low: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name}: expected a number {'>' if strict else '>='} {low}, got {value!r}")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Options of the GRPO loss with TRL's ``GRPOConfig`` names and defaults (``epsilon_high`` None: ``epsilon``;
    for cispo it is the absolute cap of the ratio, as in TRL). ``max_completion_length`` is dr_grpo's constant
    normalizer (required there)."""

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in GRPO_LOSSES:
            raise ValueError(f"loss_type: expected one of {tuple(GRPO_LOSSES)}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level: expected one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        _finite("epsilon", self.epsilon, low=0.0)
        if self.epsilon_high is not None:
            _finite("epsilon_high", self.epsilon_high, low=0.0)
        if self.delta is not None:
            _finite("delta", self.delta, low=1.0, strict=True)  # a cap below 1 flips the clip (TRL: > 1 + epsilon)
        _finite("beta", self.beta, low=0.0)
        for name in ("entropy_coef", "vespo_k_pos", "vespo_k_neg"):
            _finite(name, getattr(self, name))
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            _finite(name, getattr(self, name), low=0.0, strict=True)
        if self.off_policy_mask_threshold is not None:
            _finite("off_policy_mask_threshold", self.off_policy_mask_threshold, low=0.0)  # TRL: a positive value
        _finite("top_entropy_quantile", self.top_entropy_quantile, low=0.0)
        if self.top_entropy_quantile > 1:
            raise ValueError(f"top_entropy_quantile: expected a number in [0, 1], got {self.top_entropy_quantile!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl: expected a bool, got {self.use_bias_correction_kl!r}")
        if self.normalizer == "max_completion_length" and self.max_completion_length is None:
            raise ValueError(f"max_completion_length: required for loss_type={self.loss_type!r} (its constant "
                             f"normalizer), got None")
        if self.max_completion_length is not None and (
                isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int)
                or self.max_completion_length < 1):
            raise ValueError(f"max_completion_length: expected a positive int or None, "
                             f"got {self.max_completion_length!r}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def normalizer(self) -> str:
        """The loss type's aggregation, a key of ``NORMALIZERS``."""
        return GRPO_LOSSES[self.loss_type].normalizer

    @property
    def uses_entropy(self) -> bool:
        """Whether the loss (not only the metrics) depends on the entropy."""
        return self.entropy_coef != 0 or self.top_entropy_quantile < 1

    @property
    def coupling(self) -> str:
        """What one token's gradient depends on: ``"token"`` (its own inputs only), ``"sequence"`` (its whole
        sequence's log-probs: sequence ratios, vespo's weight, the off-policy mask) or ``"batch"`` (every
        token's entropy: the top-entropy quantile)."""
        if self.top_entropy_quantile < 1:
            return "batch"
        if (self.importance_sampling_level == "sequence" or GRPO_LOSSES[self.loss_type].sequence_coupled
                or self.off_policy_mask_threshold is not None):
            return "sequence"
        return "token"


class GRPOResult(NamedTuple):
    """Output of ``grpo_loss``: the scalar loss (differentiable w.r.t. ``logprobs`` and ``entropy``) and TRL's
    metrics (detached 0-d tensors)."""

    loss: Tensor
    metrics: dict[str, Tensor]


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """TRL's ``get_high_entropy_mask`` for one process: bool ``[B, T]``, the masked tokens whose entropy is at least
    the ``quantile`` of the masked entropies (``torch.quantile``'s linear interpolation); all False without any.
    Without a data-dependent shape (compilable): the masked entropies sort first, the others (inf) after them."""
    mask = mask.bool()
    values = entropy.detach()
    count = mask.sum()
    ordered = torch.where(mask, values.float(), float("inf")).reshape(-1).sort().values  # in float32, as TRL
    rank = torch.tensor(quantile, dtype=torch.float32, device=values.device) * (count - 1).clamp(min=0)
    below, above = (ordered.index_select(0, r.long().view(1)) for r in (rank, rank.ceil()))
    threshold = torch.lerp(below, above, rank - rank.floor())
    return (values * mask >= threshold) & mask & (count > 0)


def off_policy_mask(advantages: Tensor, logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """TRL's ``get_off_policy_mask`` (DeepSeek-V3.2 off-policy sequence masking): keep a sequence (``[B, 1]``, or
    ``[B, T]`` with per-token advantages) when ``A >= 0`` or its mean ``sampling_logprobs - logprobs`` over the
    completion tokens is at most ``threshold``. Detached, in ``mask``'s float dtype."""
    kl = torch.nan_to_num(sampling_logprobs - logprobs.detach(), nan=0.0)  # tokens the engine could not score
    seq_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (seq_kl <= threshold)).to(mask.dtype)


def vespo_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, importance_sampling_ratio: Tensor | None,
                  config: GRPOLossConfig) -> Tensor:
    """TRL's ``get_gamma_weights``: ``phi(W) = exp(lambda + k log W - lambda W)`` of the sequence importance weight
    ``W = exp(sum of the clamped token log-ratios (+ the IS ratio's log))``, ``(k, lambda)`` by the sign of ``A``;
    detached ``[B, 1]`` (``[B, T]`` with per-token advantages), non-finite values set to 0."""
    low, high = VESPO_LOG_CLAMP
    with torch.no_grad():
        seq_log_ratio = (log_ratio.clamp(-20.0, 20.0) * mask).sum(dim=-1, keepdim=True)
        if importance_sampling_ratio is not None:
            log_is = importance_sampling_ratio.log().clamp(low, high)
            if log_is.shape[-1] != 1:
                log_is = log_is * mask
            seq_log_ratio = seq_log_ratio + log_is.sum(dim=-1, keepdim=True)
        log_w = seq_log_ratio.clamp(low, high)
        nonneg = advantages >= 0
        k = torch.where(nonneg, log_w.new_tensor(config.vespo_k_pos), log_w.new_tensor(config.vespo_k_neg))
        lam = torch.where(nonneg, log_w.new_tensor(config.vespo_lambda_pos),
                          log_w.new_tensor(config.vespo_lambda_neg)).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's ``global_masked_mean`` for one process: one value per sequence (``[B, 1]``) averages over sequences,
    per-token values over the completion tokens."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _sequence_means(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's ``masked_seq_mean``: ``[B]`` per-sequence means (NaN for a sequence without completion tokens)."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.squeeze(-1)
    return (x * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(x: Tensor, largest: bool) -> Tensor:
    """TRL's ``nanmin`` / ``nanmax``: NaN when every value is NaN (without a data-dependent shape: compilable)."""
    if x.numel() == 0:
        return x.new_tensor(float("nan"))
    nan = torch.isnan(x)
    filled = torch.where(nan, float("-inf") if largest else float("inf"), x)
    return torch.where(nan.all(), float("nan"), filled.max() if largest else filled.min())


# ------------------------------------------------------------------------------------ the registry of loss types
class PolicyTerms(NamedTuple):
    """What every GRPO loss function receives. ``[B, T]`` tensors; ``coef_1`` (and the advantages) ``[B, 1]`` or
    ``[B, T]``."""

    logprobs: Tensor  # log pi, differentiable
    log_ratio: Tensor  # log pi - log pi_old per token, differentiable
    coef_1: Tensor  # the importance ratio at config.importance_sampling_level, differentiable
    advantages: Tensor
    mask: Tensor  # float completion mask
    importance_sampling_ratio: Tensor | None  # the rollout engine's correction, or None
    config: GRPOLossConfig


class PolicyLoss(NamedTuple):
    """What a loss function returns: its per-token loss (before the masks, the IS correction and the KL term) and
    its own metrics (TRL's names, detached)."""

    per_token: Tensor
    metrics: dict[str, Tensor]


@dataclass(frozen=True)
class GRPOLossType:
    """A registered loss type: its function, its aggregation (a key of ``NORMALIZERS``), whether its per-token loss
    depends on the whole sequence (the engine then keeps sequences whole) and whether the rollout engine's IS ratio
    multiplies it (vespo takes the ratio into its weight instead)."""

    fn: Callable[[PolicyTerms], PolicyLoss]
    normalizer: str
    sequence_coupled: bool = False
    takes_is_ratio: bool = True


class BatchTotals(NamedTuple):
    """The counts the aggregations divide by, of the whole batch: its sequences, its completion tokens and those of
    each sequence at hand (``[B]``; a part of a batch, e.g. the engine's chunk of sequences, passes its whole
    batch's, so that the parts' gradients are the whole's)."""

    sequences: int
    tokens: Tensor
    sequence_tokens: Tensor

    @classmethod
    def of(cls, m: Tensor) -> BatchTotals:
        """Those of the float mask ``m [B, T]`` itself."""
        return cls(m.shape[0], m.sum(), m.sum(-1))


def _normalize_by_items(x: Tensor, totals: BatchTotals, config: GRPOLossConfig, num_items_in_batch) -> Tensor:
    count = totals.tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch,
                                                                              dtype=totals.tokens.dtype)
    return x.sum() / count.clamp(min=1.0)


# Each takes the masked per-token loss ``[B, T]``, the batch's counts (``BatchTotals``), the options and
# num_items_in_batch: TRL's aggregations.
NORMALIZERS: dict[str, Callable[..., Tensor]] = {
    "sequence_mean": lambda x, n, config, items: (x.sum(-1) / n.sequence_tokens.clamp(min=1.0)).sum() / n.sequences,
    "token_mean": lambda x, n, config, items: x.sum() / n.tokens.clamp(min=1.0),  # bnpo
    "max_completion_length": lambda x, n, config, items: x.sum() / (n.sequences * config.max_completion_length),
    "num_items_in_batch": _normalize_by_items,  # dapo, cispo, vespo
    "sequence_sum": lambda x, n, config, items: x.sum(-1).sum() / n.sequences,  # luspo
}
GRPO_LOSSES: dict[str, GRPOLossType] = {}


def register_grpo_loss(name: str, *, normalizer: str, sequence_coupled: bool = False, takes_is_ratio: bool = True):
    """Decorator: register ``fn(PolicyTerms) -> PolicyLoss`` as ``loss_type=name`` (see ``docs/grpo-loss-types.md``)."""
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer: expected one of {tuple(NORMALIZERS)}, got {normalizer!r}")

    def register(fn: Callable[[PolicyTerms], PolicyLoss]) -> Callable[[PolicyTerms], PolicyLoss]:
        GRPO_LOSSES[name] = GRPOLossType(fn, normalizer, sequence_coupled, takes_is_ratio)
        return fn
    return register


def clip_metrics(coef_1: Tensor, advantages: Tensor, m: Tensor, config: GRPOLossConfig) -> dict[str, Tensor]:
    """TRL's ``clip_ratio/*`` metrics of the clipped surrogate."""
    with torch.no_grad():
        low = ((coef_1 < 1 - config.epsilon) & (advantages < 0)).to(m.dtype)
        high = ((coef_1 > 1 + config.eps_high) & (advantages > 0)).to(m.dtype)
        return {"clip_ratio/low_mean": _masked_mean(low, m),
                "clip_ratio/low_min": _nan_extreme(_sequence_means(low, m), largest=False),
                "clip_ratio/high_mean": _masked_mean(high, m),
                "clip_ratio/high_max": _nan_extreme(_sequence_means(high, m), largest=True),
                "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), m)}


def clipped_surrogate(t: PolicyTerms) -> PolicyLoss:
    """``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)`` with ``r`` capped at ``delta`` first (two-sided clipping)."""
    c = t.config
    coef_2 = torch.clamp(t.coef_1, 1 - c.epsilon, 1 + c.eps_high)
    coef_1 = t.coef_1 if c.delta is None else torch.clamp(t.coef_1, max=c.delta)
    per_token = -torch.minimum(coef_1 * t.advantages, coef_2 * t.advantages)
    return PolicyLoss(per_token, clip_metrics(coef_1, t.advantages, t.mask, c))


def cispo(t: PolicyTerms) -> PolicyLoss:
    """``-sg(min(r, eps_high)) A log pi`` (CISPO, MiniMax-M1 2025: ``epsilon_high`` is the ratio's absolute cap)."""
    cap = t.config.eps_high
    with torch.no_grad():
        clipped = _masked_mean(((t.coef_1 > cap) & (t.advantages > 0)).to(t.mask.dtype), t.mask)
    return PolicyLoss(-torch.clamp(t.coef_1, max=cap).detach() * t.advantages * t.logprobs,
                      {"cispo_clip_ratio": clipped})


def sapo(t: PolicyTerms) -> PolicyLoss:
    """``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau`` by the sign of ``A`` (SAPO's soft gate)."""
    c, adv = t.config, t.advantages
    tau = torch.where(adv > 0, adv.new_tensor(c.sapo_temperature_pos), adv.new_tensor(c.sapo_temperature_neg))
    return PolicyLoss(-torch.sigmoid(tau * (t.coef_1 - 1)) * 4 / tau * adv, {})


def vespo(t: PolicyTerms) -> PolicyLoss:
    """``-sg(phi(W)) A log pi``, ``phi`` the gamma weight of the sequence IS weight (``vespo_weights``)."""
    phi = vespo_weights(t.advantages, t.log_ratio, t.mask, t.importance_sampling_ratio, t.config)
    return PolicyLoss(-phi * t.advantages * t.logprobs, {"vespo/phi_seq_mean": _masked_mean(phi, t.mask)})


for _name, _normalizer in (("grpo", "sequence_mean"), ("bnpo", "token_mean"), ("dr_grpo", "max_completion_length"),
                           ("dapo", "num_items_in_batch"), ("luspo", "sequence_sum")):
    register_grpo_loss(_name, normalizer=_normalizer)(clipped_surrogate)
register_grpo_loss("cispo", normalizer="num_items_in_batch")(cispo)
register_grpo_loss("sapo", normalizer="sequence_mean")(sapo)
register_grpo_loss("vespo", normalizer="num_items_in_batch", sequence_coupled=True, takes_is_ratio=False)(vespo)
GRPO_LOSS_TYPES = tuple(GRPO_LOSSES)  # the built-in loss types (TRL 1.16's), in registration order


def grpo_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor, config: GRPOLossConfig = GRPOLossConfig(), *,
              old_logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
              importance_sampling_ratio: Tensor | None = None, sampling_logprobs: Tensor | None = None,
              num_items_in_batch: Tensor | float | None = None, totals: BatchTotals | None = None) -> GRPOResult:
    """The GRPO-family loss of a batch and TRL's metrics.

    Args:
        logprobs: ``[B, T]`` per-token log-probs of the completions (differentiable).
        advantages: ``[B]`` (one per sequence) or ``[B, T]`` (per token).
        mask: ``[B, T]`` completion tokens (bool or 0/1).
        config: the options (``GRPOLossConfig``).
        old_logprobs: ``[B, T]`` log-probs at sampling time; None: on-policy (``logprobs`` detached, ratio 1).
        ref_logprobs: ``[B, T]`` reference log-probs, required when ``beta != 0``.
        entropy: ``[B, T]`` per-token entropy; required with ``entropy_coef != 0`` or ``top_entropy_quantile < 1``,
            and logged as the ``entropy`` metric when given.
        importance_sampling_ratio: ``[B, T]`` or ``[B, 1]`` rollout-engine correction (TIS/MIS).
        sampling_logprobs: ``[B, T]`` the rollout engine's log-probs for the off-policy mask (default
            ``old_logprobs``).
        num_items_in_batch: completion tokens of the whole accumulated batch (dapo, cispo, vespo; default this
            batch's).
        totals: when these are whole sequences of a larger batch (without the top-entropy quantile, which needs
            them all): that batch's counts, and those sequences' (``BatchTotals``); default ``mask``'s own. Parts of a
            per-token loss may hold a sequence in part: ``sequence_tokens`` counts it whole.

    Returns:
        ``GRPOResult(loss, metrics)``; metrics under TRL's names: ``kl`` (beta != 0), ``entropy`` (entropy given),
        ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``,
        ``clip_ratio/region_mean`` (clipped loss types), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
        ``policy_loss`` (with an entropy bonus).
    """
    m = mask.to(logprobs.dtype)
    adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).to(logprobs.dtype)
    if config.uses_entropy and entropy is None:
        raise ValueError("entropy: required with entropy_coef != 0 or top_entropy_quantile < 1, got None")
    if config.beta != 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs: required when beta != 0 (beta={config.beta}), got None")
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    entropy_mask = None
    if config.top_entropy_quantile < 1:
        entropy_mask = high_entropy_mask(entropy, mask, 1 - config.top_entropy_quantile).to(m.dtype)
    policy_mask = None
    if config.off_policy_mask_threshold is not None:
        policy_mask = off_policy_mask(adv, logprobs, old if sampling_logprobs is None else sampling_logprobs, m,
                                      config.off_policy_mask_threshold)

    log_ratio = logprobs - old
    if config.importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)

    kl = None
    if config.beta != 0:
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        if config.use_bias_correction_kl:
            kl = kl * coef_1

    kind = GRPO_LOSSES[config.loss_type]
    per_token, metrics = kind.fn(PolicyTerms(logprobs, log_ratio, coef_1, adv, m, importance_sampling_ratio, config))
    if policy_mask is not None:
        per_token = per_token * policy_mask
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if importance_sampling_ratio is not None and kind.takes_is_ratio:
        per_token = per_token * importance_sampling_ratio
    if kl is not None:
        per_token = per_token + config.beta * kl
    totals = BatchTotals.of(m) if totals is None else totals
    loss = NORMALIZERS[kind.normalizer](per_token * m, totals, config, num_items_in_batch)

    metrics = dict(metrics)
    if config.entropy_coef != 0:
        effective = m if entropy_mask is None else m * entropy_mask
        count = totals.tokens if entropy_mask is None else effective.sum()
        entropy_loss = (entropy * effective).sum() / count.clamp(min=1.0)
        metrics["policy_loss"] = loss.detach()
        loss = loss - config.entropy_coef * entropy_loss

    with torch.no_grad():
        if kl is not None:
            metrics["kl"] = _masked_mean(kl, m)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, m)
    return GRPOResult(loss, {k: v.detach() for k, v in metrics.items()})
