"""GRPO trainer: prompts and reward functions in, a policy trained with the group-relative policy loss out (TRL's
``GRPOConfig`` names, TRL's ``GRPOTrainer`` semantics, every loss type of ``fastalign.fused_linear_grpo_loss``)."""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import hf
from ..objectives.grpo import GRPOLossConfig
from . import distributed, losses
from .common import as_floats, batch_indices, mean_metrics, require, steps_per_epoch
from .data import IGNORE_INDEX
from .rollout import (MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS, RewardFn, Samples, SamplingConfig,
                      SamplingTrainer, check_group_sampling, group_advantages, nanstd, reward_name, reward_scores)

ENTROPY_CONTROLLER_FILE = "entropy_ctrl_state.json"  # TRL's name, in each checkpoint with use_adaptive_entropy

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
    older TRL); with several reward functions ``multi_objective_aggregation="normalize_then_sum"`` (GDPO) normalizes
    each function's rewards within the group first (see ``group_advantages``). The loss options are those of
    :class:`~fastalign.objectives.grpo.GRPOLossConfig`; the reference
    model exists only when ``beta != 0``.
    ``padding_free`` (TRL's name): each batch's sequences packed into one row without padding, the model given
    ``position_ids`` and the fused loss the packing (see ``fastalign.hf.packed_hidden_states``: flash-attention-2's
    varlen path, per-sequence ``sdpa``, or a block-diagonal causal mask on ``eager``).
    ``use_adaptive_entropy`` (Skywork-OR1's controller, as TRL 1.16): ``entropy_coef`` is the initial coefficient;
    after each optimizer step the mean entropy over the tokens the loss acts on (all micro-batches and ranks) moves
    it by ``entropy_coef_delta`` (up when the entropy is at most ``entropy_target``, else down) within
    ``[entropy_coef_min, entropy_coef_max]``, and the bonus applies only while the last step's entropy is at most
    ``entropy_target`` (not on the first step). Its state is saved in checkpoints (``entropy_ctrl_state.json``).
    """

    learning_rate: float = 1e-6
    num_generations: int = 8
    max_prompt_length: int | None = 512
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_weights: list | None = None
    multi_objective_aggregation: str = "sum_then_normalize"
    scale_rewards: str | bool = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    use_bias_correction_kl: bool = True
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
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
        require(self, "multi_objective_aggregation", self.multi_objective_aggregation in MULTI_OBJECTIVE_AGGREGATIONS,
                f"one of {MULTI_OBJECTIVE_AGGREGATIONS}")
        require(self, "use_adaptive_entropy", isinstance(self.use_adaptive_entropy, bool), "a bool")
        for name in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
            value = getattr(self, name)
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            require(self, name, finite, "a finite number")
        require(self, "entropy_coef_delta", self.entropy_coef_delta >= 0, "a number >= 0")
        require(self, "entropy_coef_max", self.entropy_coef_max >= self.entropy_coef_min,
                f"a number >= entropy_coef_min ({self.entropy_coef_min})")
        check_group_sampling(self)
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
            raise ValueError(f"{type(config).__name__}.reward_weights: expected {len(self.reward_funcs)} weights (one "
                             f"per reward function), got {config.reward_weights!r}")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.ref_model = self.ref_engine = None
        if config.beta != 0.0:
            self.setup_reference(ref_model)
        self.reset_entropy_controller()

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
        groups), score it, draw the micro-batches, compute the old (:meth:`needs_old_logprobs`, in those
        micro-batches) and reference (``beta != 0``) log-probs in forward-only passes, and the advantages from the
        rewards of all ranks' groups (:meth:`advantages`)."""
        c = self.config
        prompts = [self.prompts[i] for i in indices]
        s = self.sample([self.queries[i] for i in indices])
        lengths = s.mask.sum(-1)
        local = torch.cat([self.rewards_per_func(prompts, s), lengths[:, None].float(), s.has_eos[:, None].float()], 1)
        everything = distributed.all_gather_rows(local)  # [world * B, F + 2], rank by rank: the step's batch
        rewards, all_lengths, all_eos = everything[:, :-2], everything[:, -2], everything[:, -1]
        keep = s.mask & s.has_eos[:, None] if c.mask_truncated_completions else s.mask
        targets = s.response.masked_fill(~keep, IGNORE_INDEX)
        micro_batches = torch.randperm(len(indices)).split(c.per_device_train_batch_size)
        old = None
        if self.needs_old_logprobs():  # with the entropy, as the loss op computes them (the same bits, see losses)
            old = self.forward_as_trained(functools.partial(self.response_logprobs, return_entropy=True),
                                          micro_batches, s.input_ids, s.attention_mask, targets)[0]
        ref = None
        if self.ref_engine is not None:
            ref = self.ref_engine(self.response_logprobs, s.input_ids, s.attention_mask, targets)
            distributed.reshard(self.ref_engine)
        advantages, metrics = self.advantages(rewards, targets, old, ref)
        mine = slice(distributed.rank() * len(indices), (distributed.rank() + 1) * len(indices))
        for name, column in zip(self.reward_func_names, rewards.T):
            metrics[f"rewards/{name}/mean"] = column.nanmean()
            metrics[f"rewards/{name}/std"] = nanstd(column)
        metrics.update({"completions/mean_length": all_lengths.mean(), "completions/min_length": all_lengths.min(),
                        "completions/max_length": all_lengths.max(), "completions/clipped_ratio": 1 - all_eos.mean()})
        return GenerationBatch(s.input_ids, s.attention_mask, targets, advantages[mine].to(self.device), old, ref,
                               distributed.global_count(lengths.sum()), micro_batches, as_floats(metrics))

    def needs_old_logprobs(self) -> bool:
        """Whether the rollout computes the old log-probs (else the loss is on-policy, as TRL's GRPO)."""
        return self.config.num_iterations > 1

    def advantages(self, rewards_per_func: Tensor, targets: Tensor, old_logprobs: Tensor | None,
                   ref_logprobs: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The advantages ``[world * B]`` of the step's completions from their rewards ``[world * B, F]`` (all
        ranks), and the reward metrics; this rank's ``targets`` and old / reference log-probs ``[B, R]`` (GRPO
        does not use them)."""
        c = self.config
        return group_advantages(rewards_per_func, self.reward_weights, c.num_generations, c.scale_rewards,
                                c.multi_objective_aggregation)

    def compute_loss(self, batch: GenerationBatch, rows: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The GRPO loss of ``rows`` of the batch, as its share of the optimizer step's loss, computed as the policy's
        forward, and its metrics (TRL names, plus ``loss``). dapo/cispo/vespo: token sums over ``num_items_in_batch``
        (all ranks' tokens) times the world size, since DDP and FSDP average the ranks' gradients (TRL divides by
        ``num_items_in_batch / num_processes``; a rank's own tokens may outnumber that quotient, which the op
        refuses as a normalizer); the other loss types: over ``gradient_accumulation_steps``."""
        b, c = batch, self.config
        old, ref = (None if t is None else t[rows] for t in (b.old_logprobs, b.ref_logprobs))
        loss_config = c.loss_config
        if c.use_adaptive_entropy:  # the coefficient of the last step, gated by its entropy (TRL's apply_coef)
            loss_config = replace(loss_config, entropy_coef=self.entropy_coef
                                  if self.last_world_entropy <= c.entropy_target else 0.0)
        loss, metrics = self.engine(self.policy_loss, loss_config, b.input_ids[rows], b.attention_mask[rows],
                                    b.targets[rows], b.advantages[rows], old, ref, b.num_items_in_batch)
        if c.use_adaptive_entropy:
            stats = [metrics.pop(f"entropy/effective_{k}").detach().double().cpu() for k in ("sum", "count")]
            self.entropy_window += torch.stack(stats)
        metrics = as_floats(metrics)
        if c.loss_config.normalizer == "num_items_in_batch":
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
                                packed=packed, deterministic=self.config.deterministic,
                                entropy_stats=self.config.use_adaptive_entropy, transform=hf.logit_transform(model))

    def reset_entropy_controller(self) -> None:
        """The adaptive entropy controller's state, as TRL's: the coefficient, the last step's entropy over all ranks
        and this step's entropy sum and token count."""
        self.entropy_coef = self.config.entropy_coef
        self.last_world_entropy = math.inf
        self.entropy_window = torch.zeros(2, dtype=torch.float64)

    def uses_adaptive_entropy(self) -> bool:
        """Whether the adaptive entropy controller runs (``use_adaptive_entropy``)."""
        return self.config.use_adaptive_entropy

    def update_entropy_coef(self) -> dict[str, float]:
        """TRL 1.16's adaptive entropy control at an optimizer step's end: the step's entropy (summed with its token
        count over the micro-batches and ranks) moves ``entropy_coef`` by ``entropy_coef_delta`` towards more bonus
        when at most ``entropy_target``, less otherwise, clamped to ``[entropy_coef_min, entropy_coef_max]``.
        Returns the ``entropy_coef`` metric (logged whenever an entropy bonus is on, as TRL)."""
        c = self.config
        if c.use_adaptive_entropy:
            total, count = distributed.all_reduce_sum(self.entropy_window).tolist()
            self.last_world_entropy = total / max(count, 1.0)
            if self.last_world_entropy <= c.entropy_target:
                self.entropy_coef = min(self.entropy_coef + c.entropy_coef_delta, c.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - c.entropy_coef_delta, c.entropy_coef_min)
            self.entropy_window = torch.zeros(2, dtype=torch.float64)
        return {"entropy_coef": self.entropy_coef} if c.use_adaptive_entropy or c.entropy_coef != 0 else {}

    def save_checkpoint(self) -> str:
        """The checkpoint of :class:`~fastalign.trainers.common.Trainer`, plus the entropy controller's state."""
        directory = super().save_checkpoint()
        if self.uses_adaptive_entropy() and distributed.is_main():
            with open(os.path.join(directory, ENTROPY_CONTROLLER_FILE), "w") as out:
                json.dump({"entropy_coef": self.entropy_coef, "last_world_entropy": self.last_world_entropy}, out)
        return directory

    def load_checkpoint(self, checkpoint: str | bool) -> dict:
        """Load a checkpoint (:class:`~fastalign.trainers.common.Trainer`) and the entropy controller's state."""
        state = super().load_checkpoint(checkpoint)
        path = os.path.join(self.latest_checkpoint() if checkpoint is True else checkpoint, ENTROPY_CONTROLLER_FILE)
        if self.uses_adaptive_entropy() and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            self.entropy_coef, self.last_world_entropy = saved["entropy_coef"], saved["last_world_entropy"]
        return state

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro, world = c.per_device_train_batch_size, distributed.world_size()
        local = micro * c.gradient_accumulation_steps
        if local * world % c.num_generations:
            raise ValueError(f"{type(c).__name__}.num_generations: expected a divisor of the step's {local * world} "
                             f"completions (per_device_train_batch_size x gradient_accumulation_steps x {world} "
                             f"process(es)), got {c.num_generations}")
        groups = local * world // c.num_generations
        per_epoch = steps_per_epoch(len(self.prompts), groups, "prompts")
        total = c.total_steps(per_epoch)
        self.begin(total, total * c.num_iterations, local * world, resume_from_checkpoint)
        while self.step < total:
            step_prompts = batch_indices(len(self.prompts), groups, self.step, c.seed)  # the same on every rank
            completions = [i for i in step_prompts for _ in range(c.num_generations)]
            batch = self.rollout(completions[distributed.rank() * local:(distributed.rank() + 1) * local])
            updates = [{**self.update(batch.micro_batches, lambda rows: self.compute_loss(batch, rows)),
                        **self.update_entropy_coef()} for _ in range(c.num_iterations)]
            self.end_step({**batch.metrics, **mean_metrics(updates), "epoch": (self.step + 1) / per_epoch})
        self.finish()
        return self.history
