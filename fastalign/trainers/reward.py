"""Reward-model trainer: preference pairs in, a sequence-classification reward model trained with the Bradley-Terry
loss out (TRL's ``RewardTrainer`` names), ready for ``PPOTrainer(reward_fn=...)`` and ``GRPOTrainer(reward_funcs=...)``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .. import hf
from ..objectives.reward import bradley_terry_loss, reward_metrics
from . import distributed
from .common import Trainer, TrainingConfig, as_floats, batch_indices, mean_metrics, micro_batch_indices, require
from .data import RankedTokens, collate_ranked, load_preference_data, tokenize_ranking


@dataclass
class RewardConfig(TrainingConfig):
    """Reward-model options (TRL's ``RewardConfig`` names) on top of :class:`TrainingConfig`.

    ``max_length``: pairs whose prompt + chosen or prompt + rejected has more tokens are dropped, as TRL filters
    them (None: keep all). ``center_rewards_coefficient``: weight of the ``mean((r_chosen + r_rejected)^2)`` term
    that keeps rewards centered on 0 (None: no term). ``loss_backend`` plays no part (a score head has no
    vocabulary).
    """

    learning_rate: float = 1e-4
    max_length: int | None = 1024
    center_rewards_coefficient: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "max_length", self.max_length is None or self.max_length >= 1, "None or an int >= 1")
        require(self, "center_rewards_coefficient",
                self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
                "None or a number >= 0")


class RewardPair(NamedTuple):
    """One tokenized preference pair (responses: chosen, rejected, each ending with EOS) and its margin."""

    tokens: RankedTokens
    margin: float


class RewardTrainer(Trainer):
    """``RewardTrainer(model, tokenizer, train_dataset, config, eval_dataset=None).train()``.

    ``model``: a sequence-classification model with ``num_labels=1`` (``AutoModelForSequenceClassification``, e.g.
    :func:`~fastalign.trainers.tiny.tiny_reward_model`; a peft model wrapping one), its score read at the last
    non-padding token. Datasets: records ``{"prompt", "chosen", "rejected"}`` with an optional number
    ``"margin"`` (list, JSONL path or ``datasets.Dataset``). Each sequence is the prompt's tokens, then the
    response's and EOS, tokenized separately, which is exactly what PPO's and GRPO's rollouts feed a reward model
    (TRL tokenizes ``prompt + response + eos`` as one text). Loss per pair: ``-logsigmoid(r_chosen - r_rejected -
    margin)`` (+ the centering term), the mean over a step's pairs on all ranks. Metrics (TRL's names):
    ``loss``, ``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``, ``num_tokens`` (tokens
    trained on so far, all ranks).
    """

    name = "reward"
    progress_metrics = ("loss", "accuracy", "margin")
    summed_metrics = ("loss",)

    def __init__(self, model: nn.Module, tokenizer, train_dataset, config: RewardConfig | None = None,
                 eval_dataset=None):
        config = config or RewardConfig()
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != 1:
            raise ValueError(f"model: expected a sequence-classification model with num_labels=1 (one reward per "
                             f"sequence), got {type(hf.unwrap_model(model)).__name__} with num_labels={labels}")
        super().__init__(model, tokenizer, config)
        hf.unwrap_model(model).config.pad_token_id = self.pad_token_id  # where the score head reads
        self.train_pairs = self.tokenize(train_dataset, "train_dataset")
        if eval_dataset is not None:
            self.eval_dataset = self.tokenize(eval_dataset, "eval_dataset")

    def tokenize(self, dataset, name: str) -> list[RewardPair]:
        """Each record's tokens and margin, pairs longer than ``max_length`` dropped (with a warning)."""
        pairs, max_length = [], self.config.max_length
        for i, record in enumerate(load_preference_data(dataset, name)):
            margin = record.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                raise ValueError(f"{name}: record {i}: 'margin': expected a number, got {margin!r:.100}")
            tokens = tokenize_ranking(self.tokenizer, record["prompt"], [record["chosen"], record["rejected"]],
                                      None, None)
            if max_length is None or max(len(tokens.prompt) + len(r) for r in tokens.responses) <= max_length:
                pairs.append(RewardPair(tokens, float(margin)))
        dropped = i + 1 - len(pairs)
        if not pairs:
            raise ValueError(f"{name}: every pair has more than max_length={max_length} tokens")
        if dropped:
            warnings.warn(f"{name}: {dropped} pair(s) longer than max_length={max_length} tokens dropped")
        return pairs

    def batch(self, pairs: list[RewardPair], indices: list[int]) -> dict:
        """``input_ids``, ``attention_mask`` ``[2B, T]`` (the chosen sequences first, right padding) and ``margin``
        ``[B]``."""
        batch = collate_ranked([pairs[i].tokens for i in indices], self.pad_token_id)
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(
            self.device), "margin": torch.tensor([pairs[i].margin for i in indices], device=self.device)}

    def compute_loss(self, batch: dict, num_pairs: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The Bradley-Terry loss of one batch (``num_pairs``: its divisor, default the batch's pairs) and its
        metrics, computed as the model's forward."""
        loss, metrics = self.engine(self.reward_loss, batch, num_pairs)
        return loss, {"loss": float(loss.detach()), **as_floats(metrics)}

    def reward_loss(self, model: nn.Module, batch: dict, num_pairs: int | None):
        """Inside the model's forward: the rewards of the batch's sequences and the loss on them."""
        chosen, rejected = hf.sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
        loss = bradley_terry_loss(chosen, rejected, batch["margin"], self.config.center_rewards_coefficient,
                                  num_pairs)
        return loss, reward_metrics(chosen.detach(), rejected.detach())

    def step_tokens(self, step: int) -> int:
        """The tokens (chosen and rejected sequences) of ``step`` on all ranks, known without communication."""
        c, world = self.config, distributed.world_size()
        size = c.per_device_train_batch_size * c.gradient_accumulation_steps
        return sum(len(p.tokens.prompt) * 2 + sum(map(len, p.tokens.responses))
                   for rank in range(world)
                   for p in (self.train_pairs[i] for i in batch_indices(len(self.train_pairs), size, step, c.seed,
                                                                         rank, world)))

    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole eval dataset (shared by the ranks), prefixed ``eval_`` (means over pairs)."""
        return self.evaluate_batches(lambda indices: self.compute_loss(self.batch(self.eval_dataset, indices))[1])

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro, accumulation = c.per_device_train_batch_size, c.gradient_accumulation_steps
        global_batch, per_epoch, total = self.pair_schedule(len(self.train_pairs))
        self.begin(total, total, global_batch, resume_from_checkpoint)
        num_tokens = sum(self.step_tokens(step) for step in range(self.step))
        self.model.train()
        while self.step < total:
            step_metrics, finite = [], True
            for k, indices in enumerate(micro_batch_indices(len(self.train_pairs), micro, accumulation, self.step,
                                                            c.seed)):
                with distributed.gradient_sync(self.engine, k == accumulation - 1):
                    # each micro-batch's loss is its share of the step's mean over all ranks' pairs
                    loss, metrics = self.compute_loss(self.batch(self.train_pairs, indices), micro * accumulation)
                    self.backward(loss)  # even if not finite: the ranks' gradient reductions must match
                finite &= bool(torch.isfinite(loss))
                step_metrics.append(metrics)
            num_tokens += self.step_tokens(self.step)
            metrics = {**mean_metrics(step_metrics, self.summed_metrics), **self.optimizer_step(finite),
                       "num_tokens": float(num_tokens), "epoch": (self.step + 1) / per_epoch}
            self.end_step(metrics)
        self.finish()
        return self.history
