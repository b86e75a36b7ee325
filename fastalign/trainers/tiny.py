"""Tiny models and tokenizers built in code, nothing downloaded: for tests, the demo and ``model: tiny`` in configs."""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
PRINTABLE = tuple(c for c in string.printable if c not in "\r\x0b\x0c")

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
"""The default shape of :func:`tiny_llama` (about 0.1M parameters besides the embeddings)."""


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    pad, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, eos_token=eos, unk_token=unk)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word of ``words`` (others map to ``<unk>``), plus ``<pad> <eos> <unk>``."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tokenizer)


def char_tokenizer(alphabet: tuple[str, ...] = PRINTABLE) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` (default: printable ASCII, 100 tokens with the special ones)."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *alphabet]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer)


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    """The ``LlamaConfig`` of a tiny model for ``tokenizer`` (``TINY_LLAMA`` shape; ``overrides`` are LlamaConfig
    fields, ``vocab_size`` included)."""
    return LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None, **overrides})


def tiny_llama(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaForCausalLM:
    """A randomly initialized causal Llama (:func:`tiny_config`). Initialization follows the current torch seed."""
    return LlamaForCausalLM(tiny_config(tokenizer, **overrides))


def tiny_reward_model(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaForSequenceClassification:
    """A randomly initialized Llama with a scalar score head (``num_labels=1``, read at the last non-padding
    token): a reward model for :class:`~fastalign.trainers.RewardTrainer` (:func:`tiny_config`)."""
    return LlamaForSequenceClassification(tiny_config(tokenizer, **{"num_labels": 1, **overrides}))
