"""On-policy distillation trainer: the student samples completions, a frozen teacher scores the same tokens, and the
student is trained on the fused generalized JSD between the two (TRL 1.16's ``DistillationTrainer`` names and
semantics, ``fastalign.fused_linear_distill_loss``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import hf
from . import distributed, losses
from .common import as_floats, batch_indices, require, steps_per_epoch
from .rollout import RewardFn, Samples, SamplingConfig, SamplingTrainer, check_generation_fields, reward_scores


@dataclass
class DistillationConfig(SamplingConfig):
    """Distillation options (TRL's ``DistillationConfig`` names and defaults) on top of
    :class:`~fastalign.trainers.rollout.SamplingConfig`.

    One step: ``per_device_train_batch_size x gradient_accumulation_steps`` prompts per rank, one completion each
    sampled from the student (at most ``max_completion_length`` tokens at ``temperature``, ``top_p``, ``top_k``,
    cut after the first EOS, the EOS trained on), the teacher's hidden states of the same tokens, then one optimizer
    step over the micro-batches. The loss: the generalized JSD of ``beta`` (0 forward KL, 1 reverse KL) between the
    student's and the teacher's distributions at ``temperature`` over every completion token, summed over the
    step's completion tokens on all ranks over their count (TRL's ``num_items_in_batch``).
    ``teacher_model_name_or_path``: a transformers model directory to load the teacher from, when no teacher model
    is given to the trainer. The teacher may have another width or depth; it must share the vocabulary.
    ``padding_free``: both models' forwards over the batch packed into one row (``fastalign.hf.packed_hidden_states``).
    """

    learning_rate: float = 1e-6
    beta: float = 1.0
    max_prompt_length: int | None = 512
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    teacher_model_name_or_path: str | None = None
    padding_free: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "beta", 0 <= self.beta <= 1, "a number in [0, 1]")
        check_generation_fields(self)


class DistillationBatch(NamedTuple):
    """This rank's completions of one step and the teacher's view of them."""

    input_ids: Tensor  # [B, Q + R] left-padded prompt, then the completion
    attention_mask: Tensor  # [B, Q + R]
    mask: Tensor  # [B, R] bool: completion tokens (up to and including the first EOS)
    teacher_hidden: Tensor  # [B, R, H_t] the teacher's hidden states predicting the completion tokens
    num_items_in_batch: Tensor  # completion tokens of the step on all ranks
    metrics: dict[str, float]


class DistillationTrainer(SamplingTrainer):
    """``DistillationTrainer(model, tokenizer, prompts, teacher_model=None, config, eval_dataset=None,
    reward_fn=None).train()``.

    ``model``: the student. ``teacher_model``: a causal LM sharing the tokenizer's vocabulary (None: loaded from
    ``config.teacher_model_name_or_path``), frozen (no gradient) and in eval mode. prompts: strings or records with
    ``"prompt"``. ``eval_dataset``: prompts on which ``reward_fn(prompts, completions)`` scores one sampled
    completion each, logged as ``eval_reward`` (both or neither). Logged: ``loss``, TRL's ``entropy`` (the
    student's), ``divergence`` (the mean per-token divergence), the completion lengths. Under ``torchrun`` (DDP)
    each rank holds a whole teacher.
    """

    name = "distill"
    eval_metric = "eval_reward"
    progress_metrics = ("loss", "entropy", "completions/mean_length")
    summed_metrics = ("loss",)

    def __init__(self, model: nn.Module, tokenizer, prompts, teacher_model: nn.Module | None = None,
                 config: DistillationConfig | None = None, eval_dataset=None, reward_fn: RewardFn | None = None):
        config = config or DistillationConfig()
        if (eval_dataset is None) != (reward_fn is None):
            raise ValueError("eval_dataset: needs reward_fn (to score the student's completions), and reward_fn an "
                             "eval_dataset; got only one of them")
        super().__init__(model, tokenizer, prompts, config, eval_dataset, config.max_prompt_length,
                         max_new_tokens=config.max_completion_length, temperature=config.temperature,
                         top_p=config.top_p, top_k=config.top_k)
        if teacher_model is None:
            if config.teacher_model_name_or_path is None:
                raise ValueError("teacher_model: expected a model, or DistillationConfig.teacher_model_name_or_path "
                                 "(a model directory), got neither")
            teacher_model = hf.load_pretrained(config.teacher_model_name_or_path)
        teacher = teacher_model.to(self.device).eval()
        teacher.requires_grad_(False)
        vocab, student_vocab = (hf.get_lm_head(m).weight.shape[0] for m in (teacher, model))
        if vocab != student_vocab:
            raise ValueError(f"teacher_model: expected the student's vocabulary ({student_vocab} tokens), got an "
                             f"lm_head of {vocab}")
        distributed.broadcast_module(teacher)
        self.teacher = teacher
        self.teacher_engine = self.reference_engine(teacher)
        self.reward_fn = reward_fn

    def scores(self, prompts: list[str], samples: Samples) -> Tensor:
        return reward_scores(self.reward_fn, prompts, samples.completions, samples.input_ids,
                             samples.attention_mask, "reward_fn")

    @torch.no_grad()
    def rollout(self, indices: list[int]) -> DistillationBatch:
        """Sample a completion of prompt ``i`` for each ``i`` in ``indices``, and the teacher's hidden states of its
        tokens (a forward-only pass in eval mode)."""
        s = self.sample([self.queries[i] for i in indices])
        self.teacher.eval()
        teacher_hidden = self.teacher_engine(self.response_hidden, s.input_ids, s.attention_mask, s.mask.shape[1])
        distributed.reshard(self.teacher_engine)
        lengths = distributed.all_gather_rows(s.mask.sum(-1, keepdim=True).float())[:, 0]
        metrics = {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                   "completions/max_length": lengths.max()}
        return DistillationBatch(s.input_ids, s.attention_mask, s.mask, teacher_hidden,
                                 distributed.global_count(s.mask.sum()), as_floats(metrics))

    def compute_loss(self, batch: DistillationBatch, rows: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The loss of ``rows`` of the batch as its share of the step's (token sums over every rank's tokens, times
        the world size: DDP averages the ranks' gradients), computed as the student's forward."""
        b = batch
        loss, metrics = self.engine(self.policy_loss, b.input_ids[rows], b.attention_mask[rows], b.mask[rows],
                                    b.teacher_hidden[rows], b.num_items_in_batch)
        loss = loss * distributed.world_size()
        return loss, {"loss": float(loss.detach()), **as_floats(metrics)}

    def policy_loss(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, mask: Tensor,
                    teacher_hidden: Tensor, num_items_in_batch: Tensor):
        """Inside the student's forward: its hidden states of the completion tokens and the divergence."""
        c = self.config
        hidden = self.response_hidden(model, input_ids, attention_mask, mask.shape[1])
        return losses.distill_loss(hidden, *hf.get_lm_head(model), teacher_hidden, *hf.get_lm_head(self.teacher),
                                   mask, c.loss_backend, beta=c.beta, temperature=c.temperature,
                                   num_items_in_batch=num_items_in_batch, transform=hf.logit_transform(model),
                                   teacher_transform=hf.logit_transform(self.teacher))

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro, world = c.per_device_train_batch_size, distributed.world_size()
        local = micro * c.gradient_accumulation_steps
        per_epoch = steps_per_epoch(len(self.prompts), local * world, "prompts")
        total = c.total_steps(per_epoch)
        self.begin(total, total, local * world, resume_from_checkpoint)
        while self.step < total:
            indices = batch_indices(len(self.prompts), local, self.step, c.seed, distributed.rank(), world)
            batch = self.rollout(indices)
            micro_batches = torch.arange(local).split(micro)
            metrics = self.update(micro_batches, lambda rows: self.compute_loss(batch, rows))
            self.end_step({**batch.metrics, **metrics, "epoch": (self.step + 1) / per_epoch})
        self.finish()
        return self.history

