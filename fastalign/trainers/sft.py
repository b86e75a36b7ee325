"""SFT trainer: supervised fine-tuning with the fused cross-entropy (TRL 1.16's ``SFTTrainer`` names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .. import hf
from ..objectives.sft import CE_LOSS_TYPES
from . import distributed, losses
from .common import Trainer, TrainingConfig, as_floats, micro_batch_indices, require
from .data import IGNORE_INDEX, load_records, pad


@dataclass
class SFTConfig(TrainingConfig):
    """SFT options (TRL's ``SFTConfig`` names) on top of :class:`TrainingConfig`.

    Datasets hold one kind of record: language modeling ``{"text"}`` (``dataset_text_field``), prompt-completion
    ``{"prompt", "completion"}`` or conversational ``{"messages": [{"role", "content"}, ...]}`` (the tokenizer's
    chat template). ``completion_only_loss`` (None: on for prompt-completion records): train on the completion
    only. ``assistant_only_loss``: train on the assistant turns only, as the chat template marks them
    (``{% generation %}``; a template that marks none is an error). ``max_length``: tokens per sequence, the
    start kept (TRL's ``truncation_mode="keep_start"``). ``packing`` / ``padding_free``: each micro-batch's
    sequences packed into one row without padding (the model gets ``position_ids``; each sequence attends to
    itself only, see ``fastalign.hf.packed_hidden_states``): here ``packing`` packs the micro-batch's sequences
    as they are (TRL also re-bins sequences into ``max_length`` rows). Prompt and completion are tokenized apart and
    joined (TRL tokenizes the joined text and finds the prompt in it: the same ids unless tokens merge across the
    boundary). ``loss_type``: ``"nll"`` or ``"dft"``;
    ``label_smoothing_factor`` (TrainingArguments' name): ``F.cross_entropy``'s smoothing (nll only, as TRL). The
    loss is the sum over the step's trained tokens (every micro-batch and rank) divided by their count, as TRL with
    ``num_items_in_batch``.
    """

    learning_rate: float = 2e-5
    max_length: int | None = 1024
    dataset_text_field: str = "text"
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    packing: bool = False
    padding_free: bool = False
    loss_type: str = "nll"
    label_smoothing_factor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "max_length", self.max_length is None or self.max_length >= 2, "None or an int >= 2")
        require(self, "loss_type", self.loss_type in CE_LOSS_TYPES, f"one of {CE_LOSS_TYPES}")
        require(self, "label_smoothing_factor", 0 <= self.label_smoothing_factor <= 1, "a number in [0, 1]")
        require(self, "label_smoothing_factor", self.loss_type == "nll" or not self.label_smoothing_factor,
                "0 with loss_type='dft' (TRL smooths the nll loss only)")

    @property
    def packed(self) -> bool:
        return self.packing or self.padding_free


class SFTTokens(NamedTuple):
    """One tokenized example: its ids and labels (``IGNORE_INDEX`` where not trained), of one length."""

    input_ids: list[int]
    labels: list[int]


def tokenize_sft(tokenizer, record, config: SFTConfig, index: int, name: str) -> SFTTokens:
    """One record (see :class:`SFTConfig`) as ids and labels, cut to ``max_length``; EOS closes a text or a
    completion (as TRL)."""
    eos = [tokenizer.eos_token_id]
    if not isinstance(record, dict):
        raise ValueError(f"{name}: record {index}: expected a dict, got {record!r:.200}")
    if isinstance(record.get("messages"), list):
        ids, labels = _tokenize_messages(tokenizer, record["messages"], config, index, name)
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        ids = prompt + completion
        masked = config.completion_only_loss is not False
        labels = ([IGNORE_INDEX] * len(prompt) if masked else prompt) + completion
    elif isinstance(record.get(config.dataset_text_field), str):
        ids = tokenizer(record[config.dataset_text_field])["input_ids"] + eos
        labels = ids
    else:
        raise ValueError(f"{name}: record {index}: expected a string {config.dataset_text_field!r}, string 'prompt' "
                         f"and 'completion', or a list 'messages', got {record!r:.200}")
    limit = config.max_length or len(ids)
    return SFTTokens(ids[:limit], labels[:limit])


def _tokenize_messages(tokenizer, messages: list, config: SFTConfig, index: int, name: str):
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{name}: record {index} is conversational ('messages') but the tokenizer has no "
                         f"chat_template")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=config.assistant_only_loss)
    ids = list(out["input_ids"])
    if not config.assistant_only_loss:
        return ids, ids
    marks = list(out["assistant_masks"])
    if not any(marks):
        raise ValueError(f"{name}: record {index}: assistant_only_loss=True needs a chat template that marks the "
                         f"assistant turns with {{% generation %}}, got no assistant token marked")
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, marks)]


def collate_sft(items: list[SFTTokens], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``, right padding (labels ``IGNORE_INDEX`` there)."""
    input_ids, attention_mask = pad([item.input_ids for item in items], pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": pad([item.labels for item in items], IGNORE_INDEX)[0]}


class SFTTrainer(Trainer):
    """``SFTTrainer(model, tokenizer, train_dataset, config, eval_dataset=None).train()``.

    Datasets: records as :class:`SFTConfig` says, as a list, a JSONL path or a ``datasets.Dataset``. One step =
    ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` examples on each rank; the loss
    is the fused cross-entropy (``fastalign.fused_linear_cross_entropy``) summed over the step's trained tokens on
    all ranks over their count. Logged: ``loss``, TRL's ``entropy`` and ``mean_token_accuracy`` (each micro-batch's
    token mean, averaged over the micro-batches).
    """

    name = "sft"
    progress_metrics = ("loss", "mean_token_accuracy")
    summed_metrics = ("loss",)

    def __init__(self, model: nn.Module, tokenizer, train_dataset, config: SFTConfig | None = None,
                 eval_dataset=None):
        config = config or SFTConfig()
        super().__init__(model, tokenizer, config)
        self.train_items = self.tokenize(train_dataset, "train_dataset")
        if eval_dataset is not None:
            self.eval_dataset = self.tokenize(eval_dataset, "eval_dataset")

    def tokenize(self, dataset, name: str) -> list[SFTTokens]:
        records = load_records(dataset, name)
        if not records:
            raise ValueError(f"{name}: expected at least one record, got none")
        return [tokenize_sft(self.tokenizer, r, self.config, i, name) for i, r in enumerate(records)]

    def batch(self, items: list[SFTTokens], indices: list[int]) -> dict:
        return {k: v.to(self.device) for k, v in collate_sft([items[i] for i in indices], self.pad_token_id).items()}

    def compute_loss(self, batch: dict, num_items_in_batch: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one collated batch and its metrics, computed as the policy's forward."""
        loss, metrics = self.engine(self.policy_loss, batch, num_items_in_batch)
        return loss, {"loss": float(loss.detach()), **as_floats(metrics)}

    def policy_loss(self, model: nn.Module, batch: dict, num_items_in_batch):
        """Inside the policy's forward: hidden states of ``batch`` and the cross-entropy on them."""
        c = self.config
        parts, _ = hf.lm_inputs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], c.packed)
        return losses.sft_loss(*parts[:4], c.loss_backend, loss_type=c.loss_type,
                               label_smoothing=c.label_smoothing_factor, num_items_in_batch=num_items_in_batch,
                               transform=parts.transform)

    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over the whole eval dataset (shared by the ranks), prefixed ``eval_``."""
        return self.evaluate_batches(lambda indices: self.compute_loss(self.batch(self.eval_dataset, indices))[1])

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        global_batch, per_epoch, total = self.pair_schedule(len(self.train_items))
        self.begin(total, total, global_batch, resume_from_checkpoint)
        self.model.train()
        while self.step < total:
            batches = [self.batch(self.train_items, indices) for indices in micro_batch_indices(
                len(self.train_items), c.per_device_train_batch_size, c.gradient_accumulation_steps, self.step,
                c.seed)]
            # The step's trained tokens over every micro-batch and rank (over the world size: DDP averages).
            tokens = distributed.global_normalizer(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches))
            metrics = self.update(batches, lambda b: self.compute_loss(b, tokens))
            self.end_step({**metrics, "epoch": (self.step + 1) / per_epoch})
        self.finish()
        return self.history
