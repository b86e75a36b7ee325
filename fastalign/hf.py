"""Hugging Face glue: the last hidden states and the lm_head of a ``transformers`` causal LM, without the logits.

Works with any decoder-only ``PreTrainedModel`` whose lm_head is a plain linear map of the backbone's last hidden
state (Llama, Qwen2, Mistral, GPT-2, tied embeddings or not), and with a ``peft`` model wrapping one (LoRA on the
backbone; the lm_head itself must not be adapted). The backbone is called directly, so the lm_head's forward
never runs. A model that transforms its logits after the lm_head (Gemma 2/3's soft-capping, Cohere's, Granite's,
Falcon-H1's scales: :func:`logit_transform`) gives the fused ops the same transform (``logit_scale``,
``logit_softcap``); one whose transform fastalign cannot reproduce is refused.

A :class:`ValueHead` (``[H] -> 1``) attaches to a causal LM as its ``value_head`` submodule (it moves, trains and
checkpoints with it); :func:`save_pretrained` / :func:`load_pretrained` write and read it next to the model.

Padding-free forwards (:func:`packed_hidden_states`): a padded batch's real tokens packed into one row with
``position_ids`` restarting at 0 per sequence; no attention crosses a sequence boundary, through flash-attention's
varlen path (``attn_implementation="flash_attention_2"``/``"flash_attention_3"``, given ``cu_seqlens``), on
``sdpa`` one causal ``scaled_dot_product_attention`` per sequence (:func:`segment_attention`, swapped in for the
packed forward only), and on ``eager`` (or ``sdpa`` with gradient checkpointing, whose backward recomputes the
layers with the model's own attention) a 4D block-diagonal causal mask (``[1, 1, N, N]``: O(N^2) memory).
"""
from __future__ import annotations

import glob
import math
import os
from typing import NamedTuple

import contextlib

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AttentionInterface

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"

SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
"""Config fields of a multiplier of the logits after the lm_head, before any soft-capping (the order TRL 1.16's
``DistillationTrainer`` reads them in): Cohere's ``logit_scale``, Muse's ``output_multiplier``, Falcon-H1's
``lm_head_multiplier``, and ``logits_scaling``, a divisor (Granite, MiniCPM3) except on HyperCLOVA X (a
multiplier)."""
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")
"""Config fields of a soft-cap ``c * tanh(z / c)`` of the (scaled) logits: Gemma 2/3/4's, RecurrentGemma's."""
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)  # model types whose ``logits_scaling`` multiplies the logits


class LMHead(NamedTuple):
    """The lm_head of a causal LM: ``weight [V, H]`` (the embedding matrix when tied) and ``bias [V]`` or None."""

    weight: Tensor
    bias: Tensor | None


class LogitTransform(NamedTuple):
    """What a causal LM does to its lm_head's output before the softmax: ``softcap(scale * z)`` (the fused ops'
    ``logit_scale`` and ``logit_softcap``; ``op(..., **transform._asdict())``)."""

    logit_scale: float = 1.0
    logit_softcap: float | None = None


class CausalLMParts(NamedTuple):
    """What a fused op needs for next-token log-probs, shifted as in training: position ``t`` predicts ``t + 1``.

    hidden ``[B, T-1, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[B, T-1]`` (-100 where ignored), and
    the model's logit transform (pass ``**parts.transform._asdict()`` to the op).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    transform: LogitTransform = LogitTransform()

    @property
    def lm_problem(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """``(hidden, weight, bias, targets)``: the first four arguments of a fused op."""
        return self.hidden, self.weight, self.bias, self.targets


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` wrapper (``PeftModel`` and subclasses)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` causal LM inside ``model`` (the peft base model, whose layers carry the adapters)."""
    return model.get_base_model() if is_peft_model(model) else model


def model_device(model: nn.Module):
    """The device of ``model``'s parameters (the first one's)."""
    return next(model.parameters()).device


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns the last hidden states (``model.model`` for Llama, ``.transformer`` for GPT-2)."""
    causal_lm = unwrap_model(model)
    backbone = getattr(causal_lm, "base_model", None)
    if backbone is None or backbone is causal_lm:
        raise TypeError(f"model: expected a transformers causal LM with a backbone (base_model_prefix), "
                        f"got {type(causal_lm).__name__}")
    return backbone


def gradient_checkpointing_on(model: nn.Module) -> bool:
    """Whether the model recomputes its layers in the backward."""
    causal_lm = unwrap_model(model)
    if hasattr(causal_lm, "activation_checkpointing_disable"):  # newer transformers
        return bool(causal_lm.is_activation_checkpointing)
    return bool(causal_lm.is_gradient_checkpointing)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn gradient checkpointing on (:func:`enable_gradient_checkpointing`'s defaults) or off, if it is not."""
    causal_lm = unwrap_model(model)
    on = gradient_checkpointing_on(model)
    disable = getattr(causal_lm, "activation_checkpointing_disable", None) or causal_lm.gradient_checkpointing_disable
    if enabled and not on:
        enable_gradient_checkpointing(model)
    elif on and not enabled:
        disable()


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict | None = None) -> None:
    """Checkpoint every decoder layer of ``model``'s backbone (``transformers``' gradient checkpointing): the layers'
    activations are recomputed in the backward instead of kept. ``kwargs`` go to ``torch.utils.checkpoint``
    (default ``{"use_reentrant": False}``, as TRL sets it; works under DDP, FSDP2 and with peft adapters). Only the
    backbone is checkpointed: the fused losses read its last hidden states, outside the checkpointed layers."""
    causal_lm = unwrap_model(model)
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(causal_lm, "activation_checkpointing_enable"):  # newer transformers (the other name is deprecated)
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Reentrant checkpoints need an input that requires grad, and a peft model's embeddings are frozen (newer
    # transformers registers this hook itself).
    if is_peft_model(model) and getattr(causal_lm, "_require_grads_hook", None) is None:
        causal_lm.enable_input_require_grads()


def logit_transform(model: nn.Module) -> LogitTransform:
    """The transform ``model`` applies to its lm_head's output, from its (text) config: a scale (``SCALE_FIELDS``)
    then a soft-cap (``SOFTCAP_FIELDS``), as the models and TRL 1.16 apply them. Raises a ValueError naming the
    config field when fastalign cannot reproduce it: two scales or two soft-caps at once, or a value that is not
    a positive finite number."""
    causal_lm = unwrap_model(model)
    config = getattr(causal_lm, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    name = type(causal_lm).__name__

    def field(names: tuple[str, ...], neutral) -> tuple[str, float] | None:
        found = [(n, getattr(config, n)) for n in names if getattr(config, n, None) not in (None, neutral)]
        for n, value in found:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"model: {name}'s config.{n}: expected a positive finite number, got {value!r} "
                                 f"(a logit transform the fused ops cannot reproduce)")
        if len(found) > 1:
            raise ValueError(f"model: {name} sets both config.{found[0][0]}={found[0][1]} and "
                             f"config.{found[1][0]}={found[1][1]}: which transforms its logits first is unknown, "
                             f"so the fused ops cannot reproduce its head")
        return found[0] if found else None

    scale, softcap = field(SCALE_FIELDS, 1), field(SOFTCAP_FIELDS, None)
    logit_scale = 1.0
    if scale is not None:
        logit_scale = float(scale[1])
        if scale[0] == "logits_scaling" and getattr(config, "model_type", None) not in _MULTIPLYING_LOGITS_SCALING:
            logit_scale = 1.0 / logit_scale
    return LogitTransform(logit_scale, None if softcap is None else float(softcap[1]))


def get_lm_head(model: nn.Module) -> LMHead:
    """The lm_head weight ``[V, H]`` and bias of ``model`` (shared with the input embeddings when tied). The model's
    logit transform, if any, is :func:`logit_transform`'s."""
    causal_lm = unwrap_model(model)
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise TypeError(f"model: {type(causal_lm).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "base_layer"):
        raise ValueError("model: the lm_head is wrapped by a peft adapter; leave lm_head out of the adapter's "
                         "target_modules (the fused ops take a plain weight)")
    if not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        raise TypeError(f"model: expected a linear lm_head with a [V, H] weight, got {type(head).__name__}")
    return LMHead(head.weight, getattr(head, "bias", None))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``[B, T]`` positions counting real tokens only, so left-padded rows start at 0 as in generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden states ``[B, T, H]`` (after the final norm) of ``input_ids [B, T]``; the lm_head is not called.

    With an ``attention_mask`` the positions count real tokens only (left or right padding both work).
    """
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    out = get_backbone(model)(input_ids=input_ids, use_cache=False, **kwargs)
    return out.last_hidden_state


class PackedSequences(NamedTuple):
    """The real tokens of a padded ``[B, T]`` batch (any padding side) packed into one row of N, sequence by
    sequence: ``position_ids [1, N]`` restart at 0, ``cu_seqlens`` int32 ``[B + 1]`` (flash-attention's offsets)."""

    keep: Tensor  # [B, T] bool, the real tokens
    position_ids: Tensor  # [1, N] int64
    cu_seqlens: Tensor  # [B + 1] int32

    @classmethod
    def of(cls, attention_mask: Tensor) -> PackedSequences:
        keep = attention_mask.bool()
        cu = torch.nn.functional.pad(keep.sum(-1).cumsum(0), (1, 0)).int()
        return cls(keep, position_ids_from_mask(keep)[keep].unsqueeze(0), cu)

    def pack(self, values: Tensor) -> Tensor:
        """``values [B, T, ...]`` as ``[1, N, ...]``."""
        return values[self.keep].unsqueeze(0)

    def unpack(self, packed: Tensor, fill: float | int) -> Tensor:
        """``packed [1, N, ...]`` back to ``[B, T, ...]``, ``fill`` at padding (differentiable)."""
        rows = packed[0]
        return rows.new_full((*self.keep.shape, *rows.shape[1:]), fill).index_put((self.keep,), rows)


SEGMENT_ATTENTION = "fastalign_segments"


def segment_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *,
                      cu_seq_lens_q: Tensor, dropout: float = 0.0, scaling: float | None = None, **_) -> tuple:
    """A transformers attention function for one packed row: each sequence of ``cu_seq_lens_q`` attends causally to
    itself only, one ``scaled_dot_product_attention`` call per sequence (cost: the sum of the squared lengths).
    ``query [1, heads, N, d]``, ``key``/``value`` ``[1, kv_heads, N, d]`` -> ``([1, N, heads, d], None)``."""
    bounds = cu_seq_lens_q.tolist()
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling, is_causal=True,
        enable_gqa=query.shape[1] != key.shape[1]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def packed_attention(model: nn.Module, packed: PackedSequences, dtype: torch.dtype) -> tuple[str | None, dict]:
    """How the packed forward keeps each sequence to itself: the attention implementation to swap in for it (None:
    the model's) and the backbone's extra arguments: flash-attention's varlen ``cu_seq_lens_*`` and ``max_length_*``
    (also for :func:`segment_attention` on ``sdpa``), or a 4D block-diagonal causal mask ``[1, 1, N, N]`` (bool for
    ``sdpa`` under gradient checkpointing; additive, ``dtype``'s minimum where masked, for ``eager``)."""
    implementation = getattr(unwrap_model(model).config, "_attn_implementation", None) or "eager"
    flash = implementation.startswith("flash_attention") or implementation.endswith("flash-attn2")
    if not flash and implementation not in ("sdpa", "eager"):
        raise ValueError(f"model: padding-free batches take attn_implementation 'flash_attention_2' (or _3), 'sdpa' "
                         f"or 'eager', got {implementation!r}")
    if flash or implementation == "sdpa" and not gradient_checkpointing_on(model):
        longest = int((packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).max())
        return None if flash else SEGMENT_ATTENTION, dict(
            cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens, max_length_q=longest,
            max_length_k=longest)
    n = packed.position_ids.shape[1]
    device = packed.position_ids.device
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    index = torch.arange(n, device=device)
    allowed = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])  # [query, key]
    if implementation == "sdpa":
        return None, dict(attention_mask=allowed[None, None])
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return None, dict(attention_mask=additive[None, None])


@contextlib.contextmanager
def attention_implementation(model: nn.Module, implementation: str | None):
    """Run the model's attention with ``implementation`` inside the block (None: unchanged)."""
    config = unwrap_model(model).config
    previous = config._attn_implementation
    if implementation is not None:
        config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor
                         ) -> tuple[Tensor, PackedSequences]:
    """Last hidden states ``[1, N, H]`` of the real tokens of ``input_ids [B, T]`` packed into one row (see
    :class:`PackedSequences`), each sequence attending to itself only: the same states as :func:`hidden_states` of
    the padded batch at its real tokens."""
    packed = PackedSequences.of(attention_mask)
    return packed_row_hidden_states(model, packed.pack(input_ids), packed), packed


def packed_row_hidden_states(model: nn.Module, input_ids: Tensor, packed: PackedSequences, **kwargs) -> Tensor:
    """Last hidden states ``[1, N, H]`` of ``input_ids [1, N]``, sequences already packed into one row as ``packed``
    says (its ``position_ids`` and ``cu_seqlens``), each sequence attending to itself only (:func:`packed_attention`);
    ``kwargs`` go to the backbone (the attention arguments are :func:`packed_attention`'s)."""
    embeddings = get_backbone(model).get_input_embeddings().weight
    dtype = torch.get_autocast_dtype(embeddings.device.type) if torch.is_autocast_enabled(
        embeddings.device.type) else embeddings.dtype
    implementation, attention = packed_attention(model, packed, dtype)
    with attention_implementation(model, implementation):
        out = get_backbone(model)(input_ids=input_ids, **{**kwargs, "position_ids": packed.position_ids,
                                                          "use_cache": False, **attention})
    return out.last_hidden_state


def shifted_labels(input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                   ignore_index: int = -100) -> Tensor:
    """Targets ``[B, T-1]``: ``labels[:, 1:]`` (default ``input_ids`` with padding set to ``ignore_index``)."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    return labels[:, 1:]


def causal_lm_parts(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    labels: Tensor | None = None, ignore_index: int = -100) -> CausalLMParts:
    """Hidden states of positions ``0..T-2`` and the targets ``1..T-1``, with the lm_head: the inputs of the fused
    ops for a causal LM's loss on ``input_ids [B, T]`` (``labels [B, T]`` as for ``model(..., labels=labels)``)."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, :-1]
    weight, bias = get_lm_head(model)
    return CausalLMParts(hidden, weight, bias, shifted_labels(input_ids, attention_mask, labels, ignore_index),
                         logit_transform(model))


def packed_causal_lm_parts(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                          ignore_index: int = -100) -> tuple[CausalLMParts, PackedSequences]:
    """:func:`causal_lm_parts` padding-free: hidden states ``[1, N, H]`` of every real token and targets ``[1, N]``
    (the next token of the same sequence; ``ignore_index`` at each sequence's last token), and the packing."""
    hidden, packed = packed_hidden_states(model, input_ids, attention_mask)
    targets = torch.nn.functional.pad(shifted_labels(input_ids, attention_mask, labels, ignore_index), (0, 1),
                                      value=ignore_index)
    weight, bias = get_lm_head(model)
    return CausalLMParts(hidden, weight, bias, packed.pack(targets), logit_transform(model)), packed


def lm_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None,
              padding_free: bool) -> tuple[CausalLMParts, PackedSequences | None]:
    """The fused ops' inputs for a causal LM's loss on ``input_ids [B, T]``: :func:`causal_lm_parts` and None, or
    with ``padding_free`` :func:`packed_causal_lm_parts` and its packing."""
    if padding_free:
        return packed_causal_lm_parts(model, input_ids, attention_mask, labels)
    return causal_lm_parts(model, input_ids, attention_mask, labels), None


def sequence_rewards(reward_model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Rewards ``[B]`` (fp32) of a sequence-classification reward model (``num_labels=1``; it reads its score at
    each row's last non-padding token) on ``input_ids [B, T]``, positions counting real tokens only."""
    out = reward_model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits.reshape(input_ids.shape[0], -1)[:, 0].float()


# --- value head ------------------------------------------------------------------------------------------------

class ValueHead(nn.Module):
    """A linear value head ``hidden [..., H] -> values [...]`` (``weight [1, H]``, ``bias [1]``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # TRL's layer_init for the critic's output layer: small weights, zero bias.
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    @property
    def weight(self) -> Tensor:
        return self.summary.weight

    @property
    def bias(self) -> Tensor:
        return self.summary.bias

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(hidden.to(self.weight.dtype)).squeeze(-1)


def get_value_head(model: nn.Module) -> ValueHead | None:
    """The value head attached to ``model``, or None."""
    return getattr(unwrap_model(model), "value_head", None)


def attach_value_head(model: nn.Module, directory: str | None = None) -> ValueHead:
    """Attach a value head to ``model`` as ``value_head`` (new, or loaded from a :func:`save_pretrained` directory).

    The head goes on the causal LM (inside a peft wrapper), on the lm_head's device and dtype; an attached head is
    returned as is unless ``directory`` is given.
    """
    causal_lm = unwrap_model(model)
    head = get_value_head(model)
    if head is None:
        weight = get_lm_head(model).weight
        head = ValueHead(weight.shape[1]).to(device=weight.device, dtype=weight.dtype)
        causal_lm.value_head = head
    if directory is not None:
        path = os.path.join(directory, VALUE_HEAD_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"directory: no {VALUE_HEAD_FILE} in {directory}")
        head.load_state_dict(load_file(path, device=str(head.weight.device)))
    return head


def save_pretrained(model: nn.Module, directory: str, tokenizer=None, state_dict: dict[str, Tensor] | None = None
                    ) -> None:
    """``model.save_pretrained(directory)`` (the adapters only for peft), the tokenizer, and the value head in
    ``value_head.safetensors``; the model files stay a plain ``transformers`` checkpoint. ``state_dict``: the
    model's whole state to write instead of its own (gathered from the ranks of a sharded model)."""
    state = model.state_dict() if state_dict is None else state_dict
    head = {}
    for key, value in state.items():  # "value_head.summary.weight", or under peft's "base_model.model."
        _, found, name = ("." + key).partition(".value_head.")
        if found:
            head[name] = value
    if head and not is_peft_model(model):
        state = {k: v for k, v in state.items() if not k.startswith("value_head.")}
    model.save_pretrained(directory, state_dict=state)
    if head:
        save_file({k: v.detach().contiguous() for k, v in head.items()}, os.path.join(directory, VALUE_HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_pretrained(directory: str, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(directory, **kwargs)`` with its value head attached, if saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if os.path.exists(os.path.join(directory, VALUE_HEAD_FILE)):
        attach_value_head(model, directory)
    return model


def load_weights(model: nn.Module, directory: str) -> None:
    """Load in place the weights :func:`save_pretrained` wrote (resuming a run): the adapters of a peft model or
    every weight of a plain one, and the value head. Raises if a weight is missing (tied ones excepted)."""
    device = str(model_device(model))
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(os.path.join(directory, ADAPTER_FILE), device=device))
        unexpected = result.unexpected_keys
    else:
        files = [f for f in glob.glob(os.path.join(directory, "*.safetensors"))
                 if os.path.basename(f) != VALUE_HEAD_FILE]
        if not files:
            raise FileNotFoundError(f"directory: no model *.safetensors in {directory}")
        state = {}
        for f in files:
            state.update(load_file(f, device=device))
        result = unwrap_model(model).load_state_dict(state, strict=False)
        loaded = {t.data_ptr() for name, t in unwrap_model(model).state_dict().items() if name in state}
        params = dict(unwrap_model(model).named_parameters(remove_duplicate=False))
        missing = [k for k in result.missing_keys if not k.startswith("value_head.")
                   and not (k in params and params[k].data_ptr() in loaded)]
        if missing:
            raise ValueError(f"directory: {directory} lacks weights {missing}")
        unexpected = result.unexpected_keys
    if unexpected:
        raise ValueError(f"directory: {directory} holds weights the model does not have: {unexpected}")
    if get_value_head(model) is not None:
        attach_value_head(model, directory)
