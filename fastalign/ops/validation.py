"""Input validation shared by every fused op: each error names the argument, what was expected and what was given."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class LinearInputs(NamedTuple):
    """The lm_head problem flattened to rows: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]``, ``targets [N]``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor  # int64
    lead_shape: torch.Size  # the leading shape of hidden / targets, to restore per-token outputs


def require_tensor(name: str, value, *, dtypes=None, dim: int | None = None) -> Tensor:
    """``value`` as a tensor of one of ``dtypes`` and ``dim`` dimensions, or a TypeError / ValueError."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(value.shape)}")
    return value


def require_same_device(reference: Tensor, **tensors: Tensor | None) -> None:
    """Every given tensor on ``reference``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} (the device of hidden), got {t.device}")


def require_shape(name: str, value: Tensor, shape: tuple[int, ...], what: str) -> None:
    """``value.shape == shape``, or a ValueError saying ``what`` fixes the expectation."""
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} ({what}), got {tuple(value.shape)}")


def require_finite(name: str, value: Tensor | None) -> None:
    """No NaN or inf in ``value`` (pass ``check_finite=False`` to an op to skip this check)."""
    # A finite sum proves every element finite (NaN and inf propagate) and is much cheaper than isfinite().all();
    # only a sum that overflowed or met a NaN/inf falls through to the exact count. Skipped under torch.compile
    # (a data-dependent branch): compiled calls take the values as they are.
    if value is None or torch.compiler.is_compiling() or bool(torch.isfinite(value.sum())):
        return
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries "
                         f"(pass check_finite=False to skip this check)")


def check_temperature(temperature) -> float:
    """A positive finite temperature, as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    return float(temperature)


def check_lm_head_dtypes(hidden: Tensor, weight: Tensor, bias: Tensor | None, *, prefix: str = "") -> None:
    """``weight`` of ``hidden``'s dtype, or fp32 with fp16/bf16 ``hidden`` (an fp32 lm_head, TRL's
    ``cast_lm_head_to_fp32``: products in fp32, each input's gradient in its own dtype); ``bias`` of the weight's
    dtype. ``prefix``: of the argument names (``"ref_"``)."""
    mixed = weight.dtype == torch.float32 and hidden.dtype in (torch.float16, torch.bfloat16)
    if weight.dtype != hidden.dtype and not mixed:
        raise TypeError(f"{prefix}weight: expected dtype {hidden.dtype} (the dtype of {prefix}hidden; or "
                        f"torch.float32 with 16-bit {prefix}hidden), got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{prefix}bias: expected dtype {weight.dtype} (the dtype of {prefix}weight), got {bias.dtype}")


def check_num_items(value, own: int):
    """A completion-token count over the whole accumulated batch: a number or one-element tensor >= this batch's."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        count = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        count = float(value)
    else:
        raise TypeError(f"num_items_in_batch: expected a number or a one-element tensor, got {type(value).__name__}")
    if not count >= max(own, 1):
        raise ValueError(f"num_items_in_batch: expected at least this batch's own completion tokens ({max(own, 1)}; "
                         f"pass the count over the whole accumulated batch), got {count}")
    return value.reshape(()) if isinstance(value, Tensor) else count


def check_logit_transform(logit_scale, logit_softcap, prefix: str = "") -> tuple[float, float | None]:
    """A positive finite ``logit_scale`` and a positive finite ``logit_softcap`` or None, as floats (``prefix``: of
    the arguments' names, e.g. ``"teacher_"``)."""
    for name, value in (("logit_scale", logit_scale), ("logit_softcap", logit_softcap)):
        if value is None and name == "logit_softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            none = " or None" if name == "logit_softcap" else ""
            raise ValueError(f"{prefix}{name}: expected a positive finite number{none}, got {value!r}")
    return float(logit_scale), None if logit_softcap is None else float(logit_softcap)


def validate_linear_inputs(hidden, weight, targets, bias=None, *, ignore_index: int = -100,
                           check_finite: bool = True, vocab_size: int | None = None) -> LinearInputs:
    """Check the lm_head inputs of an op and flatten them to rows.

    ``hidden [..., H]`` float, ``weight [V, H]`` and ``bias [V]`` of hidden's dtype (or fp32 with 16-bit
    ``hidden``: ``check_lm_head_dtypes``), ``targets [...]`` integer in
    ``[0, vocab_size)`` or ``ignore_index``, all on one device, at least one row. ``vocab_size``: the global
    vocabulary when ``weight`` is one shard of it (vocab parallel), default V; the shard's ``weight`` and ``bias``
    are then not checked for NaN/inf here: the group checks every rank's together (``VocabShard.of``).
    """
    hidden = require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    weight = require_tensor("weight", weight, dim=2)
    targets = require_tensor("targets", targets)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., H], got a 0-D tensor")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype not in INT_DTYPES:
        raise TypeError(f"targets: expected an integer tensor (int64), got {targets.dtype}")
    vocab, width = weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden: expected last dimension H={width} (weight is [V={vocab}, H={width}]), "
                         f"got shape {tuple(hidden.shape)}")
    if width == 0 or vocab == 0:
        raise ValueError(f"weight: expected a non-empty [V, H] matrix, got shape {tuple(weight.shape)}")
    require_shape("targets", targets, hidden.shape[:-1], f"the leading dimensions of hidden {tuple(hidden.shape)}")
    if bias is not None:
        bias = require_tensor("bias", bias, dim=1)
        require_shape("bias", bias, (vocab,), "one entry per row of weight")
    check_lm_head_dtypes(hidden, weight, bias)
    require_same_device(hidden, weight=weight, targets=targets, bias=bias)
    if targets.numel() == 0:
        raise ValueError(f"hidden: expected at least one token, got an empty batch of shape {tuple(hidden.shape)}")
    targets = targets.reshape(-1).long()
    ids = vocab if vocab_size is None else vocab_size
    if torch.compiler.is_compiling():  # no data-dependent check in a compiled graph
        return LinearInputs(hidden.reshape(-1, width), weight, bias, targets, hidden.shape[:-1])
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= ids))
    if bool(out_of_range.any()):
        first = int(targets[out_of_range][0])
        raise ValueError(f"targets: expected ids in [0, {ids}) or ignore_index={ignore_index}, "
                         f"got {int(out_of_range.sum())} out of range (e.g. {first})")
    if check_finite:
        require_finite("hidden", hidden)
        if vocab_size is None:
            require_finite("weight", weight)
            require_finite("bias", bias)
    return LinearInputs(hidden.reshape(-1, width), weight, bias, targets, hidden.shape[:-1])


def validate_token_tensor(name: str, value, shape: torch.Size, device: torch.device, *, check_finite: bool = True,
                          dtypes=FLOAT_DTYPES) -> Tensor:
    """A per-token tensor of ``shape`` (the shape of ``targets``) on ``device``."""
    value = require_tensor(name, value, dtypes=dtypes)
    require_shape(name, value, tuple(shape), "the shape of targets")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of hidden), got {value.device}")
    if check_finite and value.is_floating_point():
        require_finite(name, value)
    return value


LOGPROB_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.05}
"""How far above 0 a given log-prob may be (rounding), by its dtype: a half-precision log-prob formed as ``z - lse``
from logits of magnitude ~10-20 can round up to a few hundredths above 0; an fp32 one to ~1e-5."""


def require_bool(name: str, value) -> bool:
    """A bool option (a string such as ``'yes'`` or a 0/1 int is refused, not taken as its truth value)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def require_logprobs(name: str, value: Tensor | None, tokens_per_value: int = 1) -> None:
    """No value above 0 beyond rounding (``LOGPROB_TOLERANCE`` of its dtype, times ``tokens_per_value`` for a sum
    over that many tokens): a log-prob is ``<= 0``. Not checked under torch.compile (a data-dependent branch)."""
    if value is None or torch.compiler.is_compiling():
        return
    tolerance = LOGPROB_TOLERANCE[value.dtype] * max(tokens_per_value, 1)
    if bool((value > tolerance).any()):
        raise ValueError(f"{name}: expected log-probs <= 0 (up to {tolerance:g} of rounding), got "
                         f"{int((value > tolerance).sum())} positive value(s) (e.g. {float(value.max()):g})")


def masked_token_tensor(name: str, value, mask: Tensor, *, check_finite: bool = True, fill: float = 0.0,
                        logprobs: bool = False) -> Tensor:
    """A per-token float tensor shaped like ``mask`` (the completion mask, bool, on hidden's device) with every
    position outside ``mask`` set to ``fill``: values there (0, -100, -inf, NaN ...) never reach a loss, a metric or
    a gradient. ``check_finite`` and ``logprobs`` (``require_logprobs``) look at the positions inside ``mask``."""
    value = validate_token_tensor(name, value, mask.shape, mask.device, check_finite=False)
    value = torch.where(mask, value, fill)
    if check_finite:
        require_finite(name, value)
    if logprobs:
        require_logprobs(name, value)
    return value


def validate_token_mask(name: str, value, shape: torch.Size, device: torch.device) -> Tensor:
    """A bool ``[...]`` mask from a bool, integer or float 0/1 tensor of ``shape`` on ``device``.

    Fractional values are refused rather than rounded: a 0.5 is not a token weight here (per-token weights would
    change every loss type's normalizer), and treating it as True would silently double its token's weight.
    """
    value = validate_token_tensor(name, value, shape, device, check_finite=False,
                                  dtypes=(torch.bool, *FLOAT_DTYPES, *INT_DTYPES))
    if value.dtype == torch.bool or torch.compiler.is_compiling():  # compiled: values not checked (a sync)
        return value if value.dtype == torch.bool else value != 0
    bad = (value != 0) & (value != 1)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected a bool or 0/1 mask, got {int(bad.sum())} other value(s) "
                         f"(e.g. {value[bad].reshape(-1)[0].item()}); fractional token weights are not supported")
    return value != 0
