"""Data for the trainers: loading records, tokenizing preference pairs and rankings with the prompt masked,
padding."""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100


def load_records(data, name: str) -> list:
    """A list of records from a list, a JSONL file path (one record per line; blank lines only at the end), or a
    ``datasets.Dataset`` (anything with ``to_list``)."""
    if isinstance(data, (str, os.PathLike)):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"{name}: no such file: {data}")
        records, blank = [], None
        with open(data) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    blank = blank or number
                    continue
                if blank:
                    raise ValueError(f"{name}: {data} line {blank} is blank (expected one JSON record per line)")
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{name}: {data} line {number} is not JSON: {error}") from None
        return records
    if isinstance(data, (list, tuple)):
        return list(data)
    if callable(getattr(data, "to_list", None)):
        return data.to_list()
    raise TypeError(f"{name}: expected a list of records, a JSONL path or a datasets.Dataset, "
                    f"got {type(data).__name__}")


def record_name(data, name: str, i: int) -> str:
    """Where record ``i`` of :func:`load_records` came from: ``"<name>: <file> line <n>"`` or ``"<name>: record
    <i>"``."""
    return f"{name}: {data} line {i + 1}" if isinstance(data, (str, os.PathLike)) else f"{name}: record {i}"


def check_nonempty(data, name: str, i: int, field: str, text: str) -> None:
    """A ``ValueError`` naming the record and ``field`` if the preferred response ``text`` is empty (a rejected one
    may be: answering nothing can be the wrong answer)."""
    if not text:
        raise ValueError(f"{record_name(data, name, i)}: {field}: expected a non-empty preferred response, got "
                         f"{text!r}")


def load_preference_data(data, name: str = "train_dataset") -> list[dict[str, str]]:
    """Records ``{"prompt", "chosen", "rejected"}`` of strings (see :func:`load_records`); at least one."""
    records = load_records(data, name)
    if not records:
        raise ValueError(f"{name}: expected at least one record, got none")
    return check_preference_records(records, data, name)


def check_preference_records(records: list, data, name: str) -> list[dict[str, str]]:
    """``records`` (read from ``data``) if each has string fields ``prompt``, ``chosen`` and ``rejected``,
    ``chosen`` non-empty; else a ``ValueError`` naming the record."""
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                   for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{record_name(data, name, i)}: expected string fields 'prompt', 'chosen' and "
                             f"'rejected', got {record!r:.200}")
        check_nonempty(data, name, i, "chosen", record["chosen"])
    return records


def load_ranked_data(data, num_responses: int, name: str = "train_dataset") -> list[dict]:
    """Records ``{"prompt", "completions": [best, ..., worst]}`` with ``num_responses`` string completions each
    (see :func:`load_records`); at least one."""
    records = load_records(data, name)
    if not records:
        raise ValueError(f"{name}: expected at least one record, got none")
    for i, record in enumerate(records):
        completions = record.get("completions") if isinstance(record, dict) else None
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(completions, list)
                and len(completions) == num_responses and all(isinstance(c, str) for c in completions)):
            raise ValueError(f"{record_name(data, name, i)}: expected a string 'prompt' and 'completions', a list "
                             f"of {num_responses} strings (best first), got {record!r:.200}")
        check_nonempty(data, name, i, "completions[0]", completions[0])
    return records


def load_prompts(data, name: str = "prompts") -> list[str]:
    """Prompt strings, from strings or records with a string ``"prompt"`` (see :func:`load_records`)."""
    records = load_records(data, name)
    if not records:
        raise ValueError(f"{name}: expected at least one prompt, got none")
    prompts = [r.get("prompt") if isinstance(r, dict) else r for r in records]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{name}: item {i}: expected a string or a dict with a string 'prompt', "
                             f"got {records[i]!r:.200}")
    return prompts


class PairTokens(NamedTuple):
    """Token ids of one preference pair: the prompt, and each response ending with EOS (unless truncated)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int | None) -> list[int]:
    """Prompt ids with the tokenizer's special tokens (BOS if it adds one), keeping the last ``max_prompt_length``."""
    ids = tokenizer(prompt)["input_ids"]
    return ids[-max_prompt_length:] if max_prompt_length else ids


class RankedTokens(NamedTuple):
    """Token ids of one prompt and its K ranked responses (best first), each ending with EOS (unless truncated)."""

    prompt: list[int]
    responses: list[list[int]]


def tokenize_ranking(tokenizer, prompt: str, completions: list[str], max_length: int | None,
                     max_prompt_length: int | None) -> RankedTokens:
    """Tokenize prompt and responses separately (as TRL). The prompt keeps its last ``max_prompt_length`` tokens
    (at most ``max_length - 1``), then each response is cut so that prompt + response fits ``max_length``."""
    prompt_ids = encode_prompt(tokenizer, prompt, prompt_budget(max_length, max_prompt_length))
    return RankedTokens(prompt_ids, [encode_response(tokenizer, text, len(prompt_ids), max_length)
                                     for text in completions])


def tokenize_pair(tokenizer, record: dict[str, str], max_length: int | None,
                  max_prompt_length: int | None) -> PairTokens:
    """A preference pair tokenized as :func:`tokenize_ranking` tokenizes its two responses."""
    ranked = tokenize_ranking(tokenizer, record["prompt"], [record["chosen"], record["rejected"]], max_length,
                              max_prompt_length)
    return PairTokens(ranked.prompt, *ranked.responses)


def prompt_budget(max_length: int | None, max_prompt_length: int | None) -> int | None:
    """The prompt's token budget: ``max_prompt_length``, at most ``max_length - 1`` (a response token must fit)."""
    return min(max_prompt_length or max_length, max_length - 1) if max_length else max_prompt_length


def encode_response(tokenizer, text: str, prompt_length: int, max_length: int | None) -> list[int]:
    """Response ids without special tokens, then EOS, cut so that ``prompt_length`` + response fits ``max_length``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max(max_length - prompt_length, 0)] if max_length else ids


def pad(sequences: list[list[int]], value: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """``ids [B, T]`` padded with ``value`` (on the left or right) and ``attention_mask [B, T]``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate_ranked(items: list[RankedTokens], pad_token_id: int) -> dict[str, Tensor]:
    """A batch of ``B`` prompts with K ranked responses: ``input_ids``, ``attention_mask``, ``labels`` ``[K*B, T]``,
    the ``B`` best sequences first, ..., the ``B`` worst last; right padding; labels are -100 on prompt and
    padding."""
    sequences, labels = [], []
    for rank in range(len(items[0].responses)):
        for item in items:
            response = item.responses[rank]
            sequences.append(item.prompt + response)
            labels.append([IGNORE_INDEX] * len(item.prompt) + response)
    input_ids, attention_mask = pad(sequences, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": pad(labels, IGNORE_INDEX)[0]}


def collate_pairs(pairs: list[PairTokens], pad_token_id: int) -> dict[str, Tensor]:
    """A DPO batch of ``B`` pairs ``[2B, T]``, the ``B`` chosen sequences first (see :func:`collate_ranked`)."""
    return collate_ranked([RankedTokens(p.prompt, [p.chosen, p.rejected]) for p in pairs], pad_token_id)
