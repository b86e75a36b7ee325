"""DPO trainer: preference pairs in, a policy trained with the fused DPO loss out (TRL's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import hf
from ..objectives.dpo import DPO_LOSS_TYPES, DPOOptions
from . import losses
from .common import (Trainer, TrainingConfig, as_floats, batch_indices, mean_metrics, require, steps_per_epoch)
from .data import collate_pairs, load_preference_data, tokenize_pair


@dataclass
class DPOConfig(TrainingConfig):
    """DPO options (TRL's ``DPOConfig`` names) on top of :class:`TrainingConfig`.

    ``loss_type``: one of ``fastalign.objectives.dpo.DPO_LOSS_TYPES`` (``ipo`` uses per-token mean log-probs, as
    TRL). ``max_length``: prompt + response tokens; ``max_prompt_length``: prompt tokens (the prompt keeps its
    end, the responses their start). Reference log-probs are computed once, before training.
    """

    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False
    max_length: int | None = 1024
    max_prompt_length: int | None = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "loss_type", self.loss_type in DPO_LOSS_TYPES, f"one of {DPO_LOSS_TYPES}")
        for name in ("max_length", "max_prompt_length"):
            require(self, name, getattr(self, name) is None or getattr(self, name) >= 1, "None or an int >= 1")
        require(self, "max_prompt_length", None in (self.max_length, self.max_prompt_length)
                or self.max_prompt_length < self.max_length, f"less than max_length={self.max_length}")
        try:
            self.options  # checks beta, label_smoothing (for this loss_type), rpo_alpha
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(self).__name__}.{error}") from None

    @property
    def options(self) -> DPOOptions:
        return DPOOptions(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                          reference_free=self.reference_free, rpo_alpha=self.rpo_alpha)


class DPOTrainer(Trainer):
    """``DPOTrainer(model, tokenizer, train_dataset, config, ref_model=None, eval_dataset=None).train()``.

    Datasets: records ``{"prompt", "chosen", "rejected"}`` as a list, a JSONL path or a ``datasets.Dataset``.
    ``ref_model`` None: the reference is ``model`` as it is now (its log-probs are computed here, once).
    One step = ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` pairs.
    """

    name = "dpo"
    progress_metrics = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(self, model: nn.Module, tokenizer, train_dataset, config: DPOConfig | None = None,
                 ref_model: nn.Module | None = None, eval_dataset=None):
        config = config or DPOConfig()
        super().__init__(model, tokenizer, config)
        self.average_log_prob = config.loss_type == "ipo"
        self.train_pairs = self.tokenize(train_dataset, "train_dataset")
        if eval_dataset is not None:
            self.eval_dataset = self.tokenize(eval_dataset, "eval_dataset")
        reference = None if config.reference_free else (ref_model or model)
        self.train_ref = self.reference_logps(reference, self.train_pairs)
        self.eval_ref = None if self.eval_dataset is None else self.reference_logps(reference, self.eval_dataset)

    def tokenize(self, dataset, name: str):
        c = self.config
        return [tokenize_pair(self.tokenizer, r, c.max_length, c.max_prompt_length)
                for r in load_preference_data(dataset, name)]

    def batch(self, pairs, ref, indices: list[int]) -> dict:
        """Collated pairs (``input_ids``, ``attention_mask``, ``labels`` ``[2B, T]``) and their reference
        log-probs ``ref_chosen``, ``ref_rejected`` ``[B]`` (None without a reference)."""
        batch = collate_pairs([pairs[i] for i in indices], self.pad_token_id)
        for side in ("chosen", "rejected"):
            batch[f"ref_{side}"] = None if ref is None else ref[side][indices]
        return batch

    @torch.no_grad()
    def reference_logps(self, reference: nn.Module | None, pairs) -> dict[str, torch.Tensor] | None:
        """Sequence log-probs ``{"chosen": [N], "rejected": [N]}`` of the reference model, forward only."""
        if reference is None:
            return None
        was_training = reference.training
        reference.eval()
        size = self.config.per_device_eval_batch_size
        chosen, rejected = [], []
        for start in range(0, len(pairs), size):
            batch = collate_pairs(pairs[start:start + size], self.pad_token_id)
            parts = hf.causal_lm_parts(reference, batch["input_ids"], batch["attention_mask"], batch["labels"])
            logps = losses.sequence_logps(losses.token_logprobs(*parts, self.config.loss_backend), parts.targets,
                                          self.average_log_prob)
            chosen.append(logps[:len(logps) // 2])
            rejected.append(logps[len(logps) // 2:])
        reference.train(was_training)
        return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO loss of one collated batch and its metrics (TRL names, plus ``loss``)."""
        parts = hf.causal_lm_parts(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss, metrics = losses.dpo_loss(*parts, batch["ref_chosen"], batch["ref_rejected"], self.config.options,
                                        self.config.loss_backend, average_log_prob=self.average_log_prob)
        return loss, {"loss": float(loss.detach()), **as_floats(metrics)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole eval dataset, prefixed ``eval_`` (means over pairs)."""
        self.model.eval()
        size, n = self.config.per_device_eval_batch_size, len(self.eval_dataset)
        records, weights = [], []
        for start in range(0, n, size):
            indices = list(range(start, min(start + size, n)))
            records.append(self.compute_loss(self.batch(self.eval_dataset, self.eval_ref, indices))[1])
            weights.append(len(indices) / n)
        self.model.train()
        return {f"eval_{k}": sum(w * r[k] for w, r in zip(weights, records)) for k in records[0]}

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro, accumulation = c.per_device_train_batch_size, c.gradient_accumulation_steps
        per_epoch = steps_per_epoch(len(self.train_pairs), micro * accumulation, "train_dataset")
        total = c.total_steps(per_epoch)
        self.setup_optimizer(total)
        self.begin(total, resume_from_checkpoint)
        self.model.train()
        while self.step < total:
            indices = batch_indices(len(self.train_pairs), micro * accumulation, self.step, c.seed)
            step_metrics, finite = [], True
            for k in range(accumulation):
                batch = self.batch(self.train_pairs, self.train_ref, indices[k * micro:(k + 1) * micro])
                loss, metrics = self.compute_loss(batch)
                finite &= bool(torch.isfinite(loss))
                if finite:
                    (loss / accumulation).backward()
                step_metrics.append(metrics)
            metrics = {**mean_metrics(step_metrics), **self.optimizer_step(finite),
                       "epoch": (self.step + 1) / per_epoch}
            self.end_step(metrics)
        self.finish()
        return self.history
