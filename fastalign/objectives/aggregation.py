"""Loss aggregation over a token mask, expressed as per-token weights, and masked statistics.

Every aggregation mode is a weighted sum ``loss = (weights * per_token).sum()``: the fused ops need the
weights (each token's gradient scale), not a reduction. Mode names follow verl's ``agg_loss``
(``verl/trainer/ppo/core_algos.py``); ``masked_mean`` / ``masked_var`` / ``masked_whiten`` follow TRL
(``trl/trainer/utils.py``).

Masks are bool or 0/1 float tensors ``[..., T]``: the last dimension is time, each leading index is one
sequence (a ``[B, T]`` mask holds ``B`` sequences, a ``[T]`` mask one).
"""
from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")

Normalizer = int | float | torch.Tensor


def check_loss_agg(loss_agg: str) -> None:
    """Raise ``ValueError`` unless ``loss_agg`` is one of ``LOSS_AGG_MODES``."""
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg: expected one of {LOSS_AGG_MODES}, got {loss_agg!r}")


def _nonzero_or_one(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros replaced by 1: a divisor that turns an empty count into weights of 0, never NaN."""
    return torch.where(x > 0, x, torch.ones_like(x))


def _float_mask(mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None:
        dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return mask.to(dtype)


def local_normalizer(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """The normalizer ``aggregation_weights`` uses for ``mask`` alone (a 0-dim tensor, no device sync).

    ``token-mean``: the number of unmasked tokens. ``seq-mean-*``: the number of sequences with at least one
    unmasked token (fully masked rows, e.g. padding rows, do not count). For gradient accumulation or data
    parallelism, sum this over all micro-batches (and ranks) and pass the total as ``num_tokens`` /
    ``num_sequences``.
    """
    check_loss_agg(loss_agg)
    if loss_agg == "token-mean":
        return (mask != 0).sum()
    return (mask != 0).any(dim=-1).sum()


def _check_normalizer(name: str, value: Normalizer | None, loss_agg: str, applies: bool,
                      mask: torch.Tensor) -> None:
    """A given normalizer applies to ``loss_agg``, and counts at least what ``mask`` itself holds: a normalizer
    over a whole accumulated batch is never smaller than one of its parts' counts."""
    if value is None:
        return
    if not applies:
        raise ValueError(f"{name} does not apply to loss_agg={loss_agg!r}; pass it only for the matching mode")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name}: expected a number or a one-element tensor, got shape {tuple(value.shape)}")
    if torch.compiler.is_compiling():  # the value checks below sync: not in a compiled graph
        return
    if float(value) <= 0:
        raise ValueError(f"{name}: expected a positive number, got {float(value)}")
    own = int(local_normalizer(mask, loss_agg))
    if float(value) < own:
        what = "unmasked tokens" if loss_agg == "token-mean" else "sequences with an unmasked token"
        raise ValueError(f"{name}: expected at least this batch's own count ({own} {what}; pass the count over the "
                         f"whole accumulated batch), got {float(value)}")


def aggregation_weights(
    mask: torch.Tensor,
    loss_agg: str = "token-mean",
    *,
    num_tokens: Normalizer | None = None,
    num_sequences: Normalizer | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token weights ``[..., T]`` such that ``(weights * per_token).sum()`` is the aggregated loss.

    With ``m`` the mask, ``L_b = sum_t m[b, t]`` the length of sequence ``b``:

    - ``token-mean``: ``m / num_tokens`` (the mean over all unmasked tokens; DAPO, Yu et al. 2025, sec. 3.3).
    - ``seq-mean-token-sum``: ``m / num_sequences`` (sum over each sequence, mean over sequences).
    - ``seq-mean-token-mean``: ``m / (L_b * num_sequences)`` (mean per sequence, then over sequences;
      the original GRPO, Shao et al. 2024).

    ``num_tokens`` / ``num_sequences`` default to ``local_normalizer(mask, loss_agg)``. Pass the count over the
    whole accumulated batch (all micro-batches, all ranks) so that summing the micro-batch losses gives the
    loss of the big batch. Under DDP, which averages gradients over ranks, also scale the loss by the world
    size. A fully masked ``mask`` gives all-zero weights. ``dtype`` defaults to the mask's floating dtype, or
    float32 for a bool mask.
    """
    check_loss_agg(loss_agg)
    _check_normalizer("num_tokens", num_tokens, loss_agg, applies=loss_agg == "token-mean", mask=mask)
    _check_normalizer("num_sequences", num_sequences, loss_agg, applies=loss_agg != "token-mean", mask=mask)
    m = _float_mask(mask, dtype)
    if loss_agg == "token-mean":
        denom = num_tokens if num_tokens is not None else _nonzero_or_one(local_normalizer(mask, loss_agg))
        return m / denom
    denom = num_sequences if num_sequences is not None else _nonzero_or_one(local_normalizer(mask, loss_agg))
    if loss_agg == "seq-mean-token-sum":
        return m / denom
    lengths = _nonzero_or_one(m.sum(dim=-1, keepdim=True))
    return m / (lengths * denom)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str = "token-mean",
    *,
    num_tokens: Normalizer | None = None,
    num_sequences: Normalizer | None = None,
) -> torch.Tensor:
    """Scalar ``(aggregation_weights(mask, ...) * per_token).sum()``; ``per_token`` and ``mask`` are ``[..., T]``.

    Masked positions contribute exactly 0 (and get no gradient) even if ``per_token`` is inf or NaN there.
    """
    weights = aggregation_weights(
        mask, loss_agg, num_tokens=num_tokens, num_sequences=num_sequences, dtype=per_token.dtype
    )
    return torch.where(mask != 0, weights * per_token, 0.0).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the unmasked positions (over ``dim``, or all), 0 where nothing is unmasked."""
    m = mask.to(values.dtype)
    total = torch.where(mask != 0, values * m, 0.0)
    if dim is None:
        return total.sum() / _nonzero_or_one(m.sum())
    return total.sum(dim) / _nonzero_or_one(m.sum(dim))


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the unmasked positions (TRL's ``masked_var``); 0-dim tensor.

    With ``unbiased`` (Bessel's correction), raises ``ValueError`` when fewer than 2 positions are unmasked.
    """
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered * centered, mask)
    if unbiased:
        count = float(mask.to(values.dtype).sum())
        if count < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 unmasked values, the mask holds {count}")
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(values - mean) / sqrt(var + eps)`` with the masked mean and unbiased variance (TRL's ``masked_whiten``).

    Same shape as ``values``; with ``shift_mean=False`` the mean is added back (only the scale changes).
    Masked positions are transformed like the others; ignore them downstream.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """TRL's ``nanstd``: the unbiased standard deviation of the non-NaN values (NaN with fewer than two)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), float("nan"))
    std = variance.sqrt()
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.reshape(()))
