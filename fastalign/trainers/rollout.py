"""Rollouts: what the trainers that sample share (prompts, ``generate``, rewards, response log-probs, the reference
model, evaluation by sampled score), and the per-token math of PPO's (EOS truncation, the KL penalty in the reward,
GAE) and GRPO's (group-relative advantages).

PPO follows TRL's ``PPOTrainer`` (``trl/trainer/ppo_trainer.py``): the score of a response is added to the reward of
its last token, every token's reward carries ``-kl_coef * kl``; ``mask [B, T]`` marks the response tokens (up to
and including the first EOS), and values and rewards are 0 past it, so the episode ends there. GRPO follows TRL's
``GRPOTrainer._generate_and_score_completions``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from .. import hf
from ..objectives.aggregation import nanstd
from ..objectives.ppo import kl_penalty
from . import distributed, losses
from .common import Trainer, TrainingConfig, eval_batches, frozen_copy, require
from .data import IGNORE_INDEX, encode_prompt, load_prompts, pad

RewardFn = Callable[[list[str], list[str]], list[float]]
SCALE_REWARDS = ("group", "batch", "none")


class Samples(NamedTuple):
    """Sampled responses: ``[B, Q + R]`` prompt + response ids and attention mask, ``[B, R]`` response ids (padded
    after the first EOS) and mask (bool, EOS included), ``[B]`` has_eos, and the decoded responses."""

    input_ids: Tensor
    attention_mask: Tensor
    response: Tensor
    mask: Tensor
    has_eos: Tensor
    completions: list[str]


def reward_name(reward_fn) -> str:
    """TRL's name of a reward function in metrics (``rewards/<name>/mean``): a model's name or path (last part), a
    function's ``__name__``, else its class name."""
    if isinstance(reward_fn, nn.Module):
        path = str(getattr(getattr(reward_fn, "config", None), "_name_or_path", "") or "")
        return path.split("/")[-1] or type(reward_fn).__name__
    return getattr(reward_fn, "__name__", type(reward_fn).__name__)


def reward_scores(reward_fn: RewardFn | nn.Module, prompts: list[str], completions: list[str], input_ids: Tensor,
                  attention_mask: Tensor, name: str = "reward_fn") -> Tensor:
    """Scores ``[B]`` (fp32, on ``input_ids.device``) from ``reward_fn(prompts, completions)`` on the texts (a
    ``None`` score, not applicable to that sample, becomes NaN), or from a sequence-classification reward model
    sharing the tokenizer, on the prompt + response ids ``[B, Q + R]``."""
    if isinstance(reward_fn, nn.Module):
        return hf.sequence_rewards(reward_fn, input_ids, attention_mask)
    scores = reward_fn(prompts, completions)
    if len(scores) != len(prompts):
        raise ValueError(f"{name}: returned {len(scores)} scores for {len(prompts)} completions")
    return torch.tensor([float("nan") if s is None else float(s) for s in scores], device=input_ids.device)


@dataclass
class SamplingConfig(TrainingConfig):
    """What PPO's and GRPO's configs add to :class:`TrainingConfig` alike.

    ``deterministic``: the fused ops' deterministic mode (batch-invariant log-probs; None: the ops' default, on
    when ``torch.are_deterministic_algorithms_enabled()`` or ``$FASTALIGN_DETERMINISTIC=1``). The rollout's
    old log-probs are always computed in the first update's micro-batches (same rows, same order, same shapes), so
    that in this mode they equal the first update's log-probs bit for bit: on-policy ``policy/ratio_mean`` is
    exactly 1 and ``policy/clipfrac`` exactly 0. Needs ``loss_backend="fused"`` (the reference loss is not
    batch-invariant), a model whose forward repeats bit for bit on the same batch (no dropout) and no
    ``padding_free`` (the update's forward is packed, the rollout's padded).
    """

    deterministic: bool | None = None


def check_generation_fields(config) -> None:
    """The sampling fields GRPO's, RLOO's and distillation's configs share: ``max_prompt_length``,
    ``max_completion_length``, ``temperature``, ``top_p``, ``top_k``."""
    require(config, "max_completion_length", config.max_completion_length >= 1, "an int >= 1")
    require(config, "max_prompt_length", config.max_prompt_length is None or config.max_prompt_length >= 1,
            "None or an int >= 1")
    require(config, "temperature", config.temperature > 0, "a number > 0")
    require(config, "top_p", 0 < config.top_p <= 1, "a number in (0, 1]")
    require(config, "top_k", config.top_k >= 0, "an int >= 0 (0: no top-k filtering)")


def check_group_sampling(config) -> None:
    """The checks of the fields GRPO's and RLOO's configs share (groups of sampled completions, TRL's names): the
    generation fields, ``num_generations``, ``num_iterations``, ``reward_weights``."""
    require(config, "num_generations", config.num_generations >= 2, "an int >= 2 (a group needs a baseline)")
    require(config, "num_iterations", config.num_iterations >= 1, "an int >= 1")
    check_generation_fields(config)
    require(config, "reward_weights", config.reward_weights is None or all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in config.reward_weights),
        "None or a list of numbers")


class SamplingTrainer(Trainer):
    """The part of PPO and GRPO that samples: prompts (strings or records with ``"prompt"``: list, JSONL path,
    ``datasets.Dataset``) encoded once, responses from ``model.generate`` cut after the first EOS, response
    log-probs and hidden states, the frozen reference model, and ``evaluate()``: the mean of :meth:`scores` of one
    response sampled per ``eval_dataset`` prompt, logged as ``eval_metric``."""

    eval_metric = "eval_score"

    def __init__(self, model: nn.Module, tokenizer, prompts, config: TrainingConfig, eval_dataset,
                 max_prompt_length: int | None, **generation):
        super().__init__(model, tokenizer, config)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer: {self.name.upper()} needs an eos_token to end responses")
        self.prompts = load_prompts(prompts)
        self.queries = [encode_prompt(tokenizer, p, max_prompt_length) for p in self.prompts]
        if eval_dataset is not None:
            self.eval_dataset = load_prompts(eval_dataset, "eval_dataset")
            self.eval_queries = [encode_prompt(tokenizer, p, max_prompt_length) for p in self.eval_dataset]
        from transformers import GenerationConfig

        # a response ends at the tokenizer's EOS or any of the model's own (TRL 1.16's GRPOTrainer.eos_token_ids)
        own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        own = [] if own is None else [own] if isinstance(own, int) else list(own)
        self.eos_token_ids = list(dict.fromkeys([tokenizer.eos_token_id, *own]))
        self.generation_config = GenerationConfig(do_sample=True, pad_token_id=self.pad_token_id,
                                                  eos_token_id=self.eos_token_ids, **generation)

    def setup_reference(self, ref_model: nn.Module | None) -> None:
        """``ref_model`` (None: a frozen copy of the policy as it is now) and its engine for this world
        (:func:`~fastalign.trainers.distributed.wrap_reference`: a whole copy per rank under DDP, sharded as the
        policy under FSDP)."""
        self.ref_model = ref_model.to(self.device).eval() if ref_model is not None else frozen_copy(self.model)
        distributed.broadcast_module(self.ref_model)
        self.ref_engine = self.reference_engine(self.ref_model)

    @torch.no_grad()
    def sample(self, queries: list[list[int]]) -> Samples:
        """Sample a response to each query (prompt ids) with ``model.generate``, cut it after the first EOS (any of
        ``eos_token_ids``)."""
        query, query_mask = (t.to(self.device) for t in pad(queries, self.pad_token_id, left=True))
        self.model.eval()
        sequences = self.policy.generate(input_ids=query, attention_mask=query_mask,
                                         generation_config=self.generation_config,
                                         synced_gpus=distributed.is_synced_generation(self.engine))
        self.model.train()
        response, mask, has_eos = truncate_at_eos(sequences[:, query.shape[1]:], self.eos_token_ids,
                                                  self.pad_token_id)
        return Samples(torch.cat([query, response], 1), torch.cat([query_mask, mask.long()], 1), response, mask,
                       has_eos, self.tokenizer.batch_decode(response, skip_special_tokens=True))

    def scores(self, prompts: list[str], samples: Samples) -> Tensor:
        """The score ``[B]`` of each sampled response that :meth:`evaluate` averages (each trainer defines it)."""
        raise NotImplementedError

    def response_hidden(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, width: int) -> Tensor:
        """Hidden states ``[B, R, H]`` at the positions that predict the ``width`` response tokens (with
        ``padding_free``, of a packed forward)."""
        if not self.config.padding_free:
            return hf.hidden_states(model, input_ids, attention_mask)[:, -width - 1:-1]
        hidden, packed = hf.packed_hidden_states(model, input_ids, attention_mask)
        return packed.unpack(hidden, 0.0)[:, -width - 1:-1]

    def response_inputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
                        *per_token: Tensor | None) -> tuple[Tensor, hf.PackedSequences | None, tuple]:
        """A loss's inputs for the response ``targets [B, R]`` and per-token values ``[B, R]`` (None allowed): the
        hidden states ``[B, R, H]`` and those tensors, or with ``padding_free`` the packed forward's ``[1, N, H]``,
        its packing and the tensors packed ``[1, N]`` (-100 / 0 off the response)."""
        width = targets.shape[1]
        if not self.config.padding_free:
            return self.response_hidden(model, input_ids, attention_mask, width), None, (targets, *per_token)
        hidden, packed = hf.packed_hidden_states(model, input_ids, attention_mask)

        def place(values: Tensor | None, fill: float | int) -> Tensor | None:
            if values is None:
                return None
            full = values.new_full(packed.keep.shape, fill)
            full[:, -width - 1:-1] = values
            return packed.pack(full)

        return hidden, packed, (place(targets, IGNORE_INDEX), *(place(t, 0) for t in per_token))

    def response_logprobs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
                          return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Inside a model's forward (policy or reference engine): its log-probs ``[B, R]`` of the response
        ``targets`` (0 where -100) at the sampling temperature (and the entropy ``[B, R]``)."""
        hidden = self.response_hidden(model, input_ids, attention_mask, targets.shape[1])
        return losses.token_logprobs(hidden, *hf.get_lm_head(model), targets, self.config.loss_backend,
                                     temperature=self.config.temperature, return_entropy=return_entropy,
                                     deterministic=self.config.deterministic, transform=hf.logit_transform(model))

    def forward_as_trained(self, fn, micro_batches: list[Tensor], *tensors: Tensor):
        """``self.engine(fn, *rows of tensors)`` for each micro-batch (row indices, as the first update will take
        them), the outputs (a tensor or a tuple of them, ``[rows, ...]``) put back in row order ``[B, ...]``: the
        same forward as the first update's, so the old log-probs repeat it bit for bit in deterministic mode."""
        outputs = [self.engine(fn, *(t[rows] for t in tensors)) for rows in micro_batches]
        order = torch.cat(micro_batches).argsort().to(tensors[0].device)
        if isinstance(outputs[0], Tensor):
            return torch.cat(outputs)[order]
        return tuple(torch.cat(parts)[order] for parts in zip(*outputs))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean score (``eval_metric``) of responses sampled as in training for the eval prompts (shared by the
        ranks), on a forked random number generator (training draws the same numbers with or without
        evaluation). No gradients: a reward model's scores are read as plain numbers."""
        means, counts = [], []
        with torch.random.fork_rng():
            for rows, count in eval_batches(len(self.eval_dataset), self.config.per_device_eval_batch_size):
                prompts = [self.eval_dataset[i] for i in rows]
                scores = self.scores(prompts, self.sample([self.eval_queries[i] for i in rows]))
                means.append({self.eval_metric: float(scores.mean())})
                counts.append(count)
        return distributed.weighted_average(means, counts)


def truncate_at_eos(responses: Tensor, eos_token_id: int | list[int],
                    pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``responses [B, T]`` with the tokens after each row's first EOS (``eos_token_id``: one id or a list) set to
    ``pad_token_id``; the response mask ``[B, T]`` (bool, EOS included) and ``has_eos [B]`` (bool)."""
    is_eos = torch.isin(responses, torch.as_tensor(eos_token_id, device=responses.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return responses.masked_fill(after_eos, pad_token_id), ~after_eos, is_eos.any(-1)


def rewards_with_kl(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float,
                    kl_estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl`` on every response token plus ``scores [B]`` on the last one;
    and the per-token ``kl [B, T]`` (``kl_estimator`` ``k1``/``k2``/``k3`` of ``logprobs - ref_logprobs``), both 0
    outside ``mask``. Every row needs at least one response token."""
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator).masked_fill(~mask, 0.0)
    rewards = -kl_coef * kl
    last = mask.long().sum(-1, keepdim=True) - 1
    return rewards.scatter_add(-1, last, scores.to(rewards.dtype).unsqueeze(-1)), kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16) over ``[B, T]``.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and ``r`` taken as
    0 outside ``mask`` (the episode ends after the last response token). Returns ``(advantages, returns =
    advantages + values)``, both 0 outside ``mask``.
    """
    values = values.masked_fill(~mask, 0.0)
    rewards = rewards.masked_fill(~mask, 0.0)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages.masked_fill(~mask, 0.0)
    return advantages, (advantages + values).masked_fill(~mask, 0.0)


MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def group_advantages(rewards_per_func: Tensor, reward_weights: Tensor, num_generations: int, scale_rewards: str,
                     aggregation: str = "sum_then_normalize") -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's advantages ``[N]`` from the rewards ``[N, F]`` of ``F`` reward functions for ``N`` completions, the
    ``num_generations`` completions of a prompt consecutive (the whole batch, all ranks; NaN: that function does not
    apply to that completion), as TRL 1.16's ``GRPOTrainer``. ``aggregation`` (TRL's ``multi_objective_aggregation``):
    ``"sum_then_normalize"``: the weighted rewards summed ignoring NaN, minus their group mean, over ``std + 1e-4``
    with ``scale_rewards`` ``"group"`` (the group's std) or ``"batch"`` (the batch's std), not scaled with
    ``"none"``; ``"normalize_then_sum"`` (GDPO, arXiv:2601.05242): each function's rewards normalized within the
    group (``(r - mean) / (std + 1e-4)``), weighted and summed, then normalized over the batch (``scale_rewards``
    not used). Stds unbiased, ignoring NaN. A completion every function skipped is unscorable: left out of the
    baselines, advantage 0. Also returns TRL's reward metrics: ``reward`` and ``reward_std`` (mean and std of the
    weighted rewards over the batch), ``frac_reward_zero_std`` (the scale's std zero)."""
    weights = reward_weights.to(rewards_per_func).unsqueeze(0)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
        groups = rewards.view(-1, num_generations)
        advantages = rewards - groups.nanmean(1).repeat_interleave(num_generations)
        if scale_rewards == "batch":
            std = (nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards[0])).expand_as(rewards)
        else:
            std = nanstd(groups, 1).repeat_interleave(num_generations) if num_generations > 1 else \
                torch.zeros_like(rewards)
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean = grouped.nanmean(1, keepdim=True)
        group_std = nanstd(grouped, 1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
        normalized = ((grouped - mean) / (group_std + 1e-4)).view_as(rewards_per_func)
        rewards = (normalized * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
        std = (nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards[0])).expand_as(rewards)
        advantages = (rewards - rewards.nanmean()) / (std + 1e-4)
    else:
        raise ValueError(f"multi_objective_aggregation: expected one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
                         f"got {aggregation!r}")
    logged = (rewards_per_func * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
    metrics = {"reward": logged.nanmean(), "reward_std": nanstd(logged),
               "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean()}
    return advantages.nan_to_num(nan=0.0), metrics
