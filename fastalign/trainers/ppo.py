"""PPO trainer: prompts and a reward in, a policy with a shared-backbone value head out (TRL's names)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import hf
from ..objectives.aggregation import masked_whiten
from ..objectives.ppo import KL_ESTIMATORS, PPOLossConfig
from . import distributed, losses
from .common import as_floats, batch_indices, mean_metrics, require, steps_per_epoch
from .data import IGNORE_INDEX
from .rollout import RewardFn, Samples, SamplingConfig, SamplingTrainer, gae, reward_scores, rewards_with_kl


@dataclass
class PPOConfig(SamplingConfig):
    """PPO options (TRL's ``PPOConfig`` names) on top of :class:`~fastalign.trainers.rollout.SamplingConfig`.

    One step: a rollout of ``per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches``
    prompts, then ``num_ppo_epochs`` passes over it in ``num_mini_batches`` optimizer steps. Responses: at most
    ``response_length`` tokens sampled at ``temperature`` (plain sampling, as TRL), cut after the first EOS;
    ``missing_eos_penalty`` is subtracted from the score of a response without EOS. Rewards: the score on the last
    token, ``-kl_coef * kl`` (``kl_estimator``) on every token; GAE with ``gamma``, ``lam``; whitened advantages.
    ``max_prompt_length``: prompts keep their last tokens. With several processes, each rank rolls out its share
    of the prompts; whitening and the loss's token mean are over all ranks' tokens.
    ``padding_free`` (TRL's name): each batch's sequences packed into one row without padding, the model given
    ``position_ids`` and the fused loss the packing (see ``fastalign.hf.packed_hidden_states``: flash-attention-2's
    varlen path, per-sequence ``sdpa``, or a block-diagonal causal mask on ``eager``).
    """

    learning_rate: float = 3e-6
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    response_length: int = 53
    temperature: float = 0.7
    missing_eos_penalty: float | None = None
    max_prompt_length: int | None = 512
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    padding_free: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_ppo_epochs", "num_mini_batches", "response_length"):
            require(self, name, getattr(self, name) >= 1, "an int >= 1")
        require(self, "max_prompt_length", self.max_prompt_length is None or self.max_prompt_length >= 1,
                "None or an int >= 1")
        require(self, "temperature", self.temperature > 0, "a number > 0")
        require(self, "kl_estimator", self.kl_estimator in KL_ESTIMATORS, f"one of {KL_ESTIMATORS}")
        for name in ("gamma", "lam"):
            require(self, name, 0 <= getattr(self, name) <= 1, "a number in [0, 1]")
        for name in ("kl_coef", "cliprange", "cliprange_value", "vf_coef"):
            require(self, name, getattr(self, name) >= 0, "a number >= 0")

    @property
    def loss_config(self) -> PPOLossConfig:
        """The loss options: the fields of the same names but the KL ones (the KL penalty is in the rewards, not in
        the loss)."""
        return PPOLossConfig(**{f.name: getattr(self, f.name) for f in fields(PPOLossConfig)
                                if hasattr(self, f.name) and f.name not in ("kl_coef", "kl_estimator")})


class Rollout(NamedTuple):
    """One batch of experience; per-token tensors ``[B, R]`` are over the response (``R`` tokens)."""

    input_ids: Tensor  # [B, Q + R] left-padded prompt, then the response
    attention_mask: Tensor  # [B, Q + R]
    targets: Tensor  # [B, R] response tokens, -100 after the first EOS
    mask: Tensor  # [B, R] bool, response tokens up to and including the first EOS
    logprobs: Tensor  # [B, R] policy log-probs at sampling time
    values: Tensor  # [B, R]
    advantages: Tensor  # [B, R] whitened
    returns: Tensor  # [B, R]
    order: Tensor  # [B] the rows' order in the first epoch (its micro-batches computed logprobs and values)
    metrics: dict[str, float]


class PPOTrainer(SamplingTrainer):
    """``PPOTrainer(model, tokenizer, prompts, reward_fn, config, ref_model=None).train()``.

    prompts: strings or records with ``"prompt"`` (list, JSONL path, ``datasets.Dataset``). reward_fn:
    ``reward_fn(prompts, completions) -> list[float]`` on the decoded texts, or a sequence-classification reward
    model (an ``nn.Module`` sharing the tokenizer) scored on prompt + response. A value head is attached to
    ``model`` (shared backbone) unless it has one. ``ref_model`` None: a frozen copy of ``model`` as it is now
    (forward only: a whole copy on every rank under DDP, sharded as the policy under FSDP).
    ``eval_dataset``: prompts whose mean sampled score is logged every ``eval_steps`` and at the end.
    """

    name = "ppo"
    eval_metric = "eval_objective/scores"
    progress_metrics = ("objective/scores", "objective/kl", "policy/clipfrac")
    summed_metrics = ("loss/policy", "loss/value", "loss/total")

    def __init__(self, model: nn.Module, tokenizer, prompts, reward_fn: RewardFn | nn.Module,
                 config: PPOConfig | None = None, ref_model: nn.Module | None = None, eval_dataset=None):
        config = config or PPOConfig()
        super().__init__(model, tokenizer, prompts, config, eval_dataset, config.max_prompt_length,
                         max_new_tokens=config.response_length, temperature=config.temperature, top_k=0, top_p=1.0)
        self.reward_fn = reward_fn
        self.value_head = hf.attach_value_head(model)
        self.setup_reference(ref_model)

    def scores(self, prompts: list[str], samples: Samples) -> Tensor:
        """Scores ``[B]`` from the reward function (texts) or the reward model (token ids), minus
        ``missing_eos_penalty`` for a response without EOS."""
        scores = reward_scores(self.reward_fn, prompts, samples.completions, samples.input_ids,
                               samples.attention_mask)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~samples.has_eos).float()
        return scores

    def whiten(self, values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
        """``masked_whiten`` of ``values [B, R]`` with the statistics of every rank's rows (the global batch)."""
        everything = masked_whiten(distributed.all_gather_rows(values),
                                   distributed.all_gather_rows(mask.to(values.dtype)), shift_mean)
        rows = distributed.rank() * values.shape[0]
        return everything[rows:rows + values.shape[0], :values.shape[1]]

    @torch.no_grad()
    def rollout(self, indices: list[int]) -> Rollout:
        """Sample, draw the first epoch's row order, then log-probs and values (in that epoch's micro-batches) and
        reference log-probs in forward-only passes, rewards, GAE."""
        c = self.config
        s = self.sample([self.queries[i] for i in indices])
        scores = self.scores([self.prompts[i] for i in indices], s)
        mask = s.mask
        targets = s.response.masked_fill(~mask, IGNORE_INDEX)
        order = torch.randperm(len(indices))
        logprobs, entropy, values = self.forward_as_trained(self.policy_outputs, order.split(
            c.per_device_train_batch_size), s.input_ids, s.attention_mask, targets)
        values = values.masked_fill(~mask, 0.0)
        ref_logprobs = self.ref_engine(self.response_logprobs, s.input_ids, s.attention_mask, targets)
        distributed.reshard(self.ref_engine)
        rewards, kl = rewards_with_kl(scores, logprobs, ref_logprobs, mask, c.kl_coef, c.kl_estimator)
        if c.whiten_rewards:
            rewards = self.whiten(rewards, mask, shift_mean=False).masked_fill(~mask, 0.0)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        advantages = self.whiten(advantages, mask).masked_fill(~mask, 0.0)
        non_score = (-c.kl_coef * kl).sum(-1)
        metrics = {"objective/scores": scores.mean(), "objective/kl": kl.sum(-1).mean(),
                   "objective/entropy": entropy.sum(-1).mean(), "objective/non_score_reward": non_score.mean(),
                   "objective/rlhf_reward": (scores + non_score).mean(), "val/num_eos_tokens": s.has_eos.sum(),
                   "completions/mean_length": mask.sum(-1).float().mean()}
        return Rollout(s.input_ids, s.attention_mask, targets, mask, logprobs, values, advantages, returns, order,
                       as_floats(metrics))

    def policy_outputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                       targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inside the policy's forward: log-probs, entropy and values ``[B, R]`` of the response ``targets``."""
        hidden = self.response_hidden(model, input_ids, attention_mask, targets.shape[1])
        logprobs, entropy = losses.token_logprobs(hidden, *hf.get_lm_head(model), targets, self.config.loss_backend,
                                                  temperature=self.config.temperature, return_entropy=True,
                                                  deterministic=self.config.deterministic,
                                                  transform=hf.logit_transform(model))
        return logprobs, entropy, hf.get_value_head(model)(hidden).float()

    def compute_loss(self, rollout: Rollout, rows: Tensor,
                     num_tokens: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """PPO loss of ``rows`` of the rollout (token sums over ``num_tokens``, default their token count: the
        mean) and its metrics (TRL names), computed as the policy's forward. ``num_tokens`` counts every rank's
        tokens: the loss and its ``summed_metrics`` are then multiplied by the world size, since DDP and FSDP average
        the ranks' gradients (a rank's own tokens may outnumber ``num_tokens / world_size``, which the op refuses as
        a normalizer)."""
        r = rollout
        loss, metrics = self.engine(self.policy_loss, self.config.loss_config, r.input_ids[rows], r.attention_mask[rows], r.targets[rows],
                                    r.logprobs[rows], r.advantages[rows], r.values[rows], r.returns[rows], num_tokens)
        metrics = as_floats(metrics)
        metrics["policy/entropy_avg"] = metrics.pop("objective/entropy")  # TRL's name for the update's entropy
        if num_tokens is not None:
            world = distributed.world_size()
            loss = loss * world
            metrics.update({k: metrics[k] * world for k in self.summed_metrics})
        return loss, metrics

    def policy_loss(self, model: nn.Module, loss_config: PPOLossConfig, input_ids: Tensor, attention_mask: Tensor,
                    targets: Tensor, old_logprobs: Tensor, advantages: Tensor, old_values: Tensor, returns: Tensor,
                    num_tokens):
        """Inside the policy's forward: hidden states of the rows and the PPO loss on them (``loss_config`` built
        outside: a compiled forward cannot trace ``dataclasses.fields``)."""
        hidden, packed, tokens = self.response_inputs(model, input_ids, attention_mask, targets, old_logprobs,
                                                      advantages, old_values, returns)
        return losses.ppo_loss(hidden, *hf.get_lm_head(model), *tokens[:3], hf.get_value_head(model), *tokens[3:],
                               loss_config, self.config.loss_backend, temperature=self.config.temperature,
                               num_tokens=num_tokens, packed=packed,
                               deterministic=self.config.deterministic, transform=hf.logit_transform(model))

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run the training loop; returns the logged records (also in ``output_dir/metrics.jsonl``)."""
        c = self.config
        micro = c.per_device_train_batch_size
        mini = micro * c.gradient_accumulation_steps
        batch, world = mini * c.num_mini_batches, distributed.world_size()
        per_epoch = steps_per_epoch(len(self.prompts), batch * world, "prompts")
        total = c.total_steps(per_epoch)
        self.begin(total, total * c.num_ppo_epochs * c.num_mini_batches, batch * world, resume_from_checkpoint)
        while self.step < total:
            rollout = self.rollout(batch_indices(len(self.prompts), batch, self.step, c.seed, distributed.rank(),
                                                 world))
            updates = []
            for epoch in range(c.num_ppo_epochs):
                for mini_rows in (rollout.order if epoch == 0 else torch.randperm(batch)).split(mini):
                    # The mini-batch's tokens on all ranks: each micro-batch's loss is its share of the mini-batch's
                    # token mean (times the world size, see compute_loss).
                    num_tokens = distributed.global_count(rollout.mask[mini_rows].sum())
                    updates.append(self.update(mini_rows.split(micro),
                                               lambda rows: self.compute_loss(rollout, rows, num_tokens)))
            self.end_step({**rollout.metrics, **mean_metrics(updates), "episode": (self.step + 1) * batch * world,
                           "epoch": (self.step + 1) / per_epoch})
        self.finish()
        return self.history
