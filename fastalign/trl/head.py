"""The fused loss inside a TRL trainer's model forward, and what every ``fastalign.trl`` trainer shares.

TRL 1.16 patches its policy's ``forward`` with a fused lm_head (``trl.trainer.utils.add_fused_lm_head``: per-token
log-probs from the last hidden states, ``model(..., labels=labels, fused_lm_head=True)``; the experimental CPO and
ORPO trainers keep the model's own forward). :func:`add_fused_loss` wraps that forward once more:
``model(..., labels=labels, fastalign_loss=fn)`` runs the backbone and returns ``fn(hidden, targets, weight, bias)``,
a fastalign op on the shifted last hidden states and the lm_head, inside the model's forward: the call goes through
the DDP / FSDP2 / DeepSpeed wrapper like any forward, so their hooks stay armed. Under FSDP2 a sharded lm_head (a
``DTensor``) is gathered with ``full_tensor()``, an autograd op: the op's backward recompute reads the gathered
weight saved by autograd (never an empty shard) and the gradient is reduce-scattered back. Under ZeRO-3 it is
cloned inside TRL's gather context (``maybe_gather_lm_head_ctx``): the same, the clone's gradient flowing to the
partitioned parameter. Without ``fastalign_loss`` the forward is TRL's own (reference log-probs, generation).
"""
from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import ProcessorMixin
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..hf import (LogitTransform, PackedSequences, get_backbone, get_lm_head, logit_transform, packed_hidden_states,
                  packed_row_hidden_states, unwrap_model)
from ..ops.chunking import check_chunk_size
from ..ops.dispatch import BACKENDS

FASTALIGN_OPTIONS = ("backend", "chunk_size", "deterministic", "check_finite")
"""Keys of ``fastalign_options=``: the fused ops' own options (see :func:`fastalign.fused_linear_logprobs`)."""

def check_fastalign_options(options) -> dict:
    """``fastalign_options`` as keyword arguments of the fused ops, checked: a dict with keys in
    ``FASTALIGN_OPTIONS`` (``backend`` one of ``"auto"``, ``"triton"``, ``"torch"``; ``chunk_size`` a positive int
    or None; ``deterministic`` a bool or None; ``check_finite`` a bool), or None (the ops' defaults)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"fastalign_options: expected a dict or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(FASTALIGN_OPTIONS))
    if unknown:
        raise ValueError(f"fastalign_options: expected keys among {FASTALIGN_OPTIONS}, got {unknown}")
    options = dict(options)
    if options.get("backend", "auto") not in BACKENDS:
        raise ValueError(f"fastalign_options['backend']: expected one of {BACKENDS}, got {options['backend']!r}")
    check_chunk_size(options.get("chunk_size"))
    if options.get("deterministic") is not None and not isinstance(options["deterministic"], bool):
        raise TypeError(f"fastalign_options['deterministic']: expected a bool or None, "
                        f"got {type(options['deterministic']).__name__}")
    if not isinstance(options.get("check_finite", True), bool):
        raise TypeError(f"fastalign_options['check_finite']: expected a bool, "
                        f"got {type(options['check_finite']).__name__}")
    return options


def check_supported(trainer, *, logit_transforms: bool = True) -> None:
    """Refuse, at construction, what the fused losses cannot honor inside this TRL trainer (clear errors).
    ``logit_transforms``: whether the trainer passes the model's logit transform to its op (False: refused)."""
    name = type(trainer).__name__
    if isinstance(trainer.processing_class, ProcessorMixin):
        raise ValueError(f"{name}: vision-language models (a processor as processing_class) are not supported by "
                         f"fastalign.trl; use trl.{name}")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(f"{name}: the MoE router auxiliary loss (router_aux_loss_coef != 0) is not supported by "
                         f"fastalign.trl; set router_aux_loss_coef=0.0 or use trl.{name}")
    model = trainer.accelerator.unwrap_model(trainer.model)
    get_lm_head(model)  # refuses an adapted lm_head
    transform = logit_transform(model)  # refuses, naming the config field, a head no fused op can reproduce
    if not logit_transforms and transform != LogitTransform():
        raise ValueError(f"{name}: the model transforms its logits ({transform}); fastalign.trl's {name} does not "
                         f"reproduce TRL's logits/* metrics (the model's own logits, every position) under a "
                         f"transform; use trl.{name}")


class FusedLoss:
    """Mixin before a TRL trainer class: takes ``fastalign_options=`` (checked before anything is built), builds TRL's
    trainer, refuses what the fused ops cannot honor (:func:`check_supported`; ``_logit_transforms = False`` on a
    trainer that refuses logit transforms) and patches the causal LM whose forward TRL patched
    (:func:`add_fused_loss`, with the config's ``cast_lm_head_to_fp32``). The options land in
    ``self._fastalign_options``."""

    _logit_transforms = True

    def __init__(self, *args, fastalign_options: dict | None = None, **kwargs):
        options = check_fastalign_options(fastalign_options)
        super().__init__(*args, **kwargs)
        check_supported(self, logit_transforms=self._logit_transforms)
        self._fastalign_options = options
        add_fused_loss(unwrap_model(self.model), getattr(self.args, "cast_lm_head_to_fp32", False))


def add_fused_loss(model, cast_lm_head_to_fp32: bool = False) -> None:
    """Patch ``model`` (the causal LM, a peft model's base model) so that ``model(..., labels=labels,
    fastalign_loss=fn)`` returns ``fn(hidden [B, T-1, H], targets [B, T-1], weight [V, H], bias [V] | None,
    logit_scale=s, logit_softcap=c)`` (``shift_labels [B, T]``: ``hidden [B, T, H]`` unshifted, as TRL), with the
    model's logit transform (:func:`fastalign.hf.logit_transform`, the config fields TRL's fused head reads). With
    ``fastalign_packed=True`` (and ``input_ids``, ``attention_mask`` keywords) the batch's real tokens run padding-free, packed into one row
    (``fastalign.hf.packed_hidden_states``): ``fn(hidden [1, N, H], targets [1, N], weight, bias,
    cu_seqlens=[B + 1])``, each sequence's last token ignored. A row the collator already packed (TRL's SFT
    ``padding_free``: ``position_ids`` and ``cu_seq_lens_q``, no ``attention_mask``) runs through the same attention
    paths (``fastalign.hf.packed_row_hidden_states``). Under autocast the hidden states and the lm_head are cast to
    the autocast dtype (TRL's fused head computes in it too), with ``cast_lm_head_to_fp32`` (TRL's GRPO option,
    whose trainer has cast the lm_head to fp32) to fp32; the op runs outside autocast."""
    trl_forward = model.forward
    transform = logit_transform(model)._asdict()

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fastalign_loss=None, fastalign_packed=False, **kwargs):
        if fastalign_loss is None:
            return trl_forward(*args, **kwargs)
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        kwargs["use_cache"] = False
        extra = {}
        # The backbone and the head are looked up on each call: FSDP and peft replace them after patching
        if fastalign_packed:  # padding-free: the real tokens in one row, each sequence attending to itself
            attention_mask = kwargs["attention_mask"]
            hidden, packed = packed_hidden_states(self, kwargs["input_ids"], attention_mask)
            targets = packed.pack(F.pad(labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100), (0, 1),
                                        value=-100))
            extra["cu_seqlens"] = packed.cu_seqlens
        else:
            if kwargs.get("attention_mask") is None and "cu_seq_lens_q" in kwargs:  # a row the collator packed
                position_ids = kwargs.pop("position_ids")
                row = PackedSequences(torch.ones_like(position_ids, dtype=torch.bool), position_ids,
                                      kwargs["cu_seq_lens_q"])
                hidden = packed_row_hidden_states(self, kwargs.pop("input_ids"), row, **kwargs)
            else:
                hidden = get_backbone(self)(*args, **kwargs).last_hidden_state
            if shift_labels is None:
                hidden, targets = hidden[:, :-1], labels[:, 1:]
            else:
                targets = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2: gathered for the forward, kept by autograd for the backward
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        elif is_deepspeed_zero3_enabled():  # ZeRO-3: a gathered copy (clone: the gradient flows to the partition)
            with maybe_gather_lm_head_ctx(weight, bias):
                weight, bias = weight.clone(), None if bias is None else bias.clone()
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        if cast_lm_head_to_fp32:
            dtype = torch.float32
        with torch.autocast(device, enabled=False):
            return fastalign_loss(hidden.to(weight.device, dtype), targets.to(weight.device), weight.to(dtype),
                                  None if bias is None else bias.to(dtype), **transform, **extra)

    model.forward = types.MethodType(forward, model)


def loss_and_outputs(model, model_kwargs: dict, loss, return_outputs: bool):
    """What TRL's ``compute_loss`` returns: ``loss``, or with ``return_outputs`` (deprecated in TRL 1.16) also the
    model's plain outputs (logits) from one more forward without gradients, as TRL does."""
    if not return_outputs:
        return loss
    warnings.warn("`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in TRL and "
                  "recomputed with an extra forward pass.", FutureWarning, stacklevel=3)
    with torch.no_grad():
        return loss, model(**model_kwargs)


def gathered_mean(accelerator, mean, count, gather=None) -> float:
    """TRL's sum-and-count aggregation of a local ``mean`` over ``count`` items: the sums and the counts gathered
    across processes (``gather``: ``accelerator.gather_for_metrics`` by default), their ratio, 0 without items."""
    gather = gather or accelerator.gather_for_metrics
    count = torch.as_tensor(count, dtype=torch.float32, device=accelerator.device)
    total = torch.where(count > 0, torch.as_tensor(mean, dtype=torch.float32, device=count.device) * count, 0.0)
    total, count = gather(total).sum(), gather(count).sum()
    return (total / count).item() if count > 0 else 0.0
