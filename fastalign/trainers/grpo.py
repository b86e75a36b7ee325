"""GRPO trainer: prompts and reward functions in, a policy trained with the group-relative policy loss out (TRL's
``GRPOConfig`` names, TRL's ``GRPOTrainer`` semantics, every loss type of ``fastalign.fused_linear_grpo_loss``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import hf
from ..objectives.grpo import TOKEN_COUNT_LOSS_TYPES, GRPOLossConfig
from . import distributed, losses
from .common import as_floats, batch_indices, mean_metrics, require, steps_per_epoch
from .data import IGNORE_INDEX
from .rollout import (SCALE_REWARDS, RewardFn, Samples, SamplingConfig, SamplingTrainer, check_generation_fields,
                      group_advantages, reward_name, reward_scores)

@dataclass
class GRPOConfig(SamplingConfig):
    """GRPO options (TRL's ``GRPOConfig`` names and defaults) on top of
    :class:`~fastalign.trainers.rollout.SamplingConfig`.

    One step: a generation batch of ``per_device_train_batch_size x gradient_accumulation_steps`` completions per
    rank, ``num_generations`` for each of the step's prompts (the global batch must be a multiple of it; a group's
    completions may sit on several ranks: rewards are normalized over all of them), then ``num_iterations``
    optimizer steps on it, each over the same ``gradient_accumulation_steps`` micro-batches (TRL counts each of those
    optimizer steps as a step; here, as in :class:`~fastalign.trainers.PPOConfig`, a step is a generation batch, so
    a checkpoint never falls inside a reused batch). Old log-probs are computed only when ``num_iterations > 1``
    (else the loss is on-policy, as TRL).

    Completions: at most ``max_completion_length`` tokens sampled at ``temperature``, ``top_p``, ``top_k`` (0: off),
    cut after the first EOS; ``mask_truncated_completions``: completions without EOS get no loss (they still count
    in ``num_items_in_batch``, as TRL). Rewards: the sum of the reward functions' scores times ``reward_weights``
    (default all 1; a ``None`` score is skipped), minus the group mean, over ``std + 1e-4`` with ``scale_rewards``
    ``"group"`` / ``"batch"`` (``"none"``: not scaled; ``True`` / ``False`` mean ``"group"`` / ``"none"`` as in
    older TRL). The loss options are those of :class:`~fastalign.objectives.grpo.GRPOLossConfig`; the reference
    model exists only when ``beta != 0``.
    ``padding_free`` (TRL's name): each batch's sequences packed into one row without padding, the model given
    ``position_ids`` and the fused loss the packing (see ``fastalign.hf.packed_hidden_states``: flash-attention-2's
    varlen path, per-sequence ``sdpa``, or a block-diagonal causal mask on ``eager``).
    """

    learning_rate: float = 1e-6
    num_generations: int = 8
    max_prompt_length: int | None = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_weights: list | None = None
    scale_rewards: str | bool = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    use_bias_correction_kl: bool = False
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    padding_free: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        require(self, "scale_rewards", self.scale_rewards in SCALE_REWARDS, f"one of {SCALE_REWARDS} (or a bool)")
        require(self, "num_generations", self.num_generations >= 2, "an int >= 2 (a group needs a baseline)")
        for name in ("num_iterations", "max_completion_length"):
            require(self, name, getattr(self, name) >= 1, "an int >= 1")
        check_generation_fields(self)
        require(self, "reward_weights", self.reward_weights is None or all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.reward_weights),
            "None or a list of numbers")
        try:
            self.loss_config  # checks the loss options
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(self).__name__}.{error}") from None

    @property
    def loss_config(self) -> GRPOLossConfig:
        """The loss options (the fields of the same names)."""
        return GRPOLossConfig(**{f.name: getattr(self, f.name) for f in fields(GRPOLossConfig)})


class GenerationBatch(NamedTuple):
    """This rank's completions of one step; per-token tensors ``[B, R]`` are over the completion (``R`` tokens)."""

    input_ids: Tensor  # [B, Q + R] left-padded prompt, then the completion
    attention_mask: Tensor  # [B, Q + R]
    targets: Tensor  # [B, R] completion tokens, -100 after the first EOS (and all of a masked truncated completion)
    advantages: Tensor  # [B]
    old_logprobs: Tensor | None  # [B, R] policy log-probs at sampling time, with num_iterations > 1 only
    ref_logprobs: Tensor | None  # [B, R] reference log-probs, with beta != 0 only
    num_items_in_batch: Tensor  # completion tokens of the step on all ranks
    micro_batches: list[Tensor]  # the rows of each micro-batch (TRL shuffles the generation batch once)
    metrics: dict[str, float]


class GRPOTrainer(SamplingTrainer):
    """``GRPOTrainer(model, tokenizer, prompts, reward_funcs, config, ref_model=None, eval_dataset=None).train()``.

    prompts: strings or records with ``"prompt"`` (list, JSONL path, ``datasets.Dataset``). reward_funcs: one or a
    list of ``f(prompts, completions) -> list[float | None]`` on the decoded texts, or sequence-classification reward
    models (``nn.Module`` sharing the tokenizer) scored on prompt + completion. ``ref_model``: used only when
    ``beta != 0`` (None: a frozen copy of ``model`` as it is now). ``eval_dataset``: prompts whose mean weighted
    reward (``eval_reward``, one completion per prompt) is logged every ``eval_steps`` and at the end.

    Under ``torchrun`` N ranks x b completions give the gradients of one process x N*b: rewards are gathered before
    normalization and ``num_items_in_batch`` counts every rank's tokens.
    """

    name = "grpo"
    eval_metric = "eval_reward"
    progress_metrics = ("reward", "completions/mean_length", "entropy")
    summed_metrics = ("loss",)

    def __init__(self, model: nn.Module, tokenizer, prompts, reward_funcs: RewardFn | nn.Module | list,
                 config: GRPOConfig | None = None, ref_model: nn.Module | None = None, eval_dataset=None):
        config = config or GRPOConfig()
        super().__init__(model, tokenizer, prompts, config, eval_dataset, config.max_prompt_length,
                         max_new_tokens=config.max_completion_length, temperature=config.temperature,
                         top_p=config.top_p, top_k=config.top_k)
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not self.reward_funcs or not all(callable(f) for f in self.reward_funcs):
            raise TypeError(f"reward_funcs: expected a callable, a reward model or a non-empty list of them, got "
                            f"{reward_funcs!r:.200}")
        for f in self.reward_funcs:
            if isinstance(f, nn.Module):
                f.to(self.device).eval()
        self.reward_func_names = [reward_name(f) for f in self.reward_funcs]
        weights = config.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"GRPOConfig.reward_weights: expected {len(self.reward_funcs)} weights (one per reward "
                             f"function), got {config.reward_weights!r}")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.ref_model = self.ref_engine = None
        if config.beta != 0.0:
            self.setup_reference(ref_model)

    def rewards_per_func(self, prompts: list[str], samples: Samples) -> Tensor:
        """``[B, F]`` scores of every reward function (NaN where one returned None)."""
        return torch.stack([reward_scores(f, prompts, samples.completions, samples.input_ids, samples.attention_mask,
                                          f"reward_funcs[{k}]") for k, f in enumerate(self.reward_funcs)], 1)

    def scores(self, prompts: list[str], samples: Samples) -> Tensor:
        """The weighted reward ``[B]`` (None scores skipped), as in training: what :meth:`evaluate` averages."""
        return (self.rewards_per_func(prompts, samples) * self.reward_weights.to(self.device)).nansum(1)

    @torch.no_grad()
    def rollout(self, indices: list[int]) -> GenerationBatch:
        """Sample a completion of prompt ``i`` for each ``i`` in ``indices`` (this rank's share of the step's
        groups), score it, normalize the rewards over the groups of all ranks, draw the micro-batches, and compute
        the old (``num_iterations > 1``, in those micro-batches) and reference (``beta != 0``) log-probs in
        forward-only passes."""
        c = self.config
        prompts = [self.prompts[i] for i in indices]
        s = self.sample([self.queries[i] for i in indices])
        lengths = s.mask.sum(-1)
        local = torch.cat([self.rewards_per_func(prompts, s), lengths[:, None].float(), s.has_eos[:, None].float()], 1)
        everything = distributed.all_gather_rows(local)  # [world * B, F + 2], rank by rank: the step's batch
        rewards, all_lengths, all_eos = everything[:, :-2], everything[:, -2], everything[:, -1]
        advantages, metrics = group_advantages(rewards, self.reward_weights, c.num_generations, c.scale_rewards)
        mine = slice(distributed.rank() * len(indices), (distributed.rank() + 1) * len(indices))
        for name, column in zip(self.reward_func_names, rewards.T):
            metrics[f"rewards/{name}/mean"] = column.nanmean()
            metrics[f"rewards/{name}/std"] = nanstd(column)
        metrics.update({"completions/mean_length": all_lengths.mean(), "completions/min_length": all_lengths.min(),
                        "completions/max_length": all_lengths.max(), "completions/clipped_ratio": 1 - all_eos.mean()})
        keep = s.mask & s.has_eos[:, None] if c.mask_truncated_completions else s.mask
        targets = s.response.masked_fill(~keep, IGNORE_INDEX)
        micro_batches = torch.randperm(len(indices)).split(c.per_device_train_batch_size)
        old = None
        if c.num_iterations > 1:  # with the entropy, as the loss op computes them (the same bits, see losses)
            old = self.forward_as_trained(functools.partial(self.response_logprobs, return_entropy=True),
                                          micro_batches, s.input_ids, s.attention_mask, targets)[0]
        ref = None
        if self.ref_engine is not None:
            ref = self.ref_engine(self.response_logprobs, s.input_ids, s.attention_mask, targets)
            distributed.reshard(self.ref_engine)
        return GenerationBatch(s.input_ids, s.attention_mask, targets, advantages[mine].to(self.device), old, ref,
                               distributed.global_count(lengths.sum()), micro_batches, as_floats(metrics))

    def compute_loss(self, batch: GenerationBatch, rows: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The GRPO loss of ``rows`` of the batch, as its share of the optimizer step's loss, computed as the policy's
        forward, and its metrics (TRL names, plus ``loss``). dapo/cispo/vespo: token sums over ``num_items_in_batch``
        (all ranks' tokens) times the world size, since DDP and FSDP average the ranks' gradients (TRL divides by
        ``num_items_in_batch / num_processes``; a rank's own tokens may outnumber that quotient, which the op
        refuses as a normalizer); the other loss types: over ``gradient_accumulation_steps``."""
        b = batch
        old, ref = (None if t is None else t[rows] for t in (b.old_logprobs, b.ref_logprobs))
        loss, metrics = self.engine(self.policy_loss, self.config.loss_config, b.input_ids[rows], b.attention_mask[rows], b.targets[rows],
                                    b.advantages[rows], old, ref, b.num_items_in_batch)
        metrics = as_floats(metrics)
        if self.config.loss_type in TOKEN_COUNT_LOSS_TYPES:
            loss = loss * distributed.world_size()
            if "policy_loss" in metrics:  # with an entropy bonus: the policy term, normalized as the loss
                metrics["policy_loss"] *= distributed.world_size()
        else:
            loss = loss / self.config.gradient_accumulation_steps
        return loss, {"loss": float(loss.detach()), **metrics}

    def policy_loss(self, model: nn.Module, loss_config: GRPOLossConfig, input_ids: Tensor, attention_mask: Tensor,
                    targets: Tensor, advantages: Tensor, old_logprobs: Tensor | None, ref_logprobs: Tensor | None,
                    num_items_in_batch: Tensor):
        """Inside the policy's forward: hidden states of the rows and the GRPO loss on them (``loss_config`` built
        outside: a compiled forward cannot trace ``dataclasses.fields``)."""
        hidden, packed, (targets, old_logprobs, ref_logprobs) = self.response_inputs(
            model, input_ids, attention_mask, targets, old_logprobs, ref_logprobs)
        return losses.grpo_loss(hidden, *hf.get_lm_head(model), targets, advantages, loss_config,
                                self.config.loss_backend, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                temperature=self.config.temperature, num_items_in_batch=num_items_in_batch,
                                packed=packed, deterministic=self.config.deterministic)

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro, world = c.per_device_train_batch_size, distributed.world_size()
        local = micro * c.gradient_accumulation_steps
        if local * world % c.num_generations:
            raise ValueError(f"GRPOConfig.num_generations: the step's {local * world} completions "
                             f"(per_device_train_batch_size x gradient_accumulation_steps x {world} process(es)) must "
                             f"be a multiple of num_generations, got {c.num_generations}")
        groups = local * world // c.num_generations
        per_epoch = steps_per_epoch(len(self.prompts), groups, "prompts")
        total = c.total_steps(per_epoch)
        self.begin(total, total * c.num_iterations, local * world, resume_from_checkpoint)
        while self.step < total:
            step_prompts = batch_indices(len(self.prompts), groups, self.step, c.seed)  # the same on every rank
            completions = [i for i in step_prompts for _ in range(c.num_generations)]
            batch = self.rollout(completions[distributed.rank() * local:(distributed.rank() + 1) * local])
            updates = [self.update(batch.micro_batches, lambda rows: self.compute_loss(batch, rows))
                       for _ in range(c.num_iterations)]
            self.end_step({**batch.metrics, **mean_metrics(updates), "epoch": (self.step + 1) / per_epoch})
        self.finish()
        return self.history


def nanstd(x: Tensor) -> Tensor:
    """TRL's ``nanstd``: the unbiased standard deviation of the non-NaN values of ``x [N]``."""
    count = (~x.isnan()).sum()
    return ((x - x.nanmean()) ** 2).nanmean().mul(count / (count - 1)).sqrt()
