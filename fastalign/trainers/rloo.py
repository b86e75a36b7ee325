"""RLOO trainer: prompts and reward functions in, a policy trained with REINFORCE Leave-One-Out out (TRL 1.16's
``RLOOConfig`` names and defaults, ``RLOOTrainer`` semantics: ``fastalign.objectives.rloo``). GRPO's trainer with
RLOO's advantages (the KL penalty in the reward, the leave-one-out baseline) and RLOO's loss (a clipped ratio of
whole sequences)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .. import hf
from ..objectives.rloo import RLOOOptions, rloo_advantages
from . import distributed, losses
from .common import as_floats
from .data import IGNORE_INDEX
from .grpo import GenerationBatch, GRPOTrainer
from .rollout import RewardFn, SamplingConfig, check_group_sampling


@dataclass
class RLOOConfig(SamplingConfig):
    """RLOO options (TRL 1.16's ``RLOOConfig`` names and defaults; those of the loss and the advantages come from
    :class:`~fastalign.objectives.rloo.RLOOOptions`) on top of :class:`~fastalign.trainers.rollout.SamplingConfig`.

    One step, as :class:`~fastalign.trainers.GRPOConfig`'s: a generation batch of ``per_device_train_batch_size x
    gradient_accumulation_steps`` completions per rank, ``num_generations`` for each of the step's prompts (a group
    may span ranks: its baseline sees all of them), then ``num_iterations`` optimizer steps on it. The old
    log-probs are always computed at sampling time (TRL does too: the ratio and the KL need them).

    Completions: at most ``max_completion_length`` tokens at ``temperature``, ``top_p``, ``top_k`` (0: off), cut
    after the first EOS; ``mask_truncated_completions``: completions without EOS get no loss and no KL. Prompts are
    kept whole unless ``max_prompt_length`` is set (fastalign's field; TRL 1.16 has none). Rewards: the reward
    functions' scores times ``reward_weights`` (default all 1; a None score is skipped, a completion with only None
    scores gets advantage 0), clamped to ``reward_clip_range``, minus ``beta`` times the completion's summed
    log-ratio to the reference model; advantages: minus the mean of the group's other completions, then with
    ``normalize_advantages`` scaled to mean 0 and std 1 over the step's batch. Loss: ``epsilon`` / ``epsilon_high``
    clip the sequence ratio. The reference model exists only when ``beta != 0``. ``padding_free``: as GRPO's.
    """

    learning_rate: float = 1e-6
    num_generations: int = RLOOOptions.num_generations
    max_prompt_length: int | None = None
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_weights: list | None = None
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    beta: float = RLOOOptions.beta
    epsilon: float = RLOOOptions.epsilon
    epsilon_high: float | None = RLOOOptions.epsilon_high
    normalize_advantages: bool = RLOOOptions.normalize_advantages
    reward_clip_range: tuple | list | None = RLOOOptions.reward_clip_range
    padding_free: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group_sampling(self)
        if isinstance(self.reward_clip_range, list):  # YAML has no tuples
            self.reward_clip_range = tuple(self.reward_clip_range)
        try:
            self.options  # checks the loss and advantage options
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(self).__name__}.{error}") from None

    @property
    def options(self) -> RLOOOptions:
        """The loss and advantage options (the fields of the same names)."""
        return RLOOOptions(**{f.name: getattr(self, f.name) for f in fields(RLOOOptions)})


class RLOOTrainer(GRPOTrainer):
    """``RLOOTrainer(model, tokenizer, prompts, reward_funcs, config, ref_model=None, eval_dataset=None).train()``.

    The arguments, the sampling, the evaluation (``eval_reward``), checkpoints and exact resume, ``torchrun`` (DDP,
    FSDP2) and the metrics file are :class:`~fastalign.trainers.GRPOTrainer`'s; metrics under TRL's names:
    ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/<func>/mean|std``, ``kl`` (beta != 0),
    ``entropy``, ``clip_ratio/*``, ``completions/*``, ``loss``.
    """

    name = "rloo"

    def __init__(self, model: nn.Module, tokenizer, prompts, reward_funcs: RewardFn | nn.Module | list,
                 config: RLOOConfig | None = None, ref_model: nn.Module | None = None, eval_dataset=None):
        super().__init__(model, tokenizer, prompts, reward_funcs, config or RLOOConfig(), ref_model, eval_dataset)

    def needs_old_logprobs(self) -> bool:
        return True

    def reset_entropy_controller(self) -> None:
        """RLOO has no entropy bonus (TRL 1.16's ``RLOOConfig``), so no adaptive entropy controller."""

    def uses_adaptive_entropy(self) -> bool:
        return False

    def update_entropy_coef(self) -> dict[str, float]:
        return {}

    def advantages(self, rewards_per_func: Tensor, targets: Tensor, old_logprobs: Tensor | None,
                   ref_logprobs: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """RLOO's advantages (:func:`~fastalign.objectives.rloo.rloo_advantages`) with each completion's summed
        ``old - ref`` log-ratio gathered from every rank, and TRL's ``kl`` metric (its mean per completion token)."""
        kl = tokens = None
        if self.config.beta != 0:
            local = [(old_logprobs - ref_logprobs).sum(-1), (targets != IGNORE_INDEX).sum(-1).to(old_logprobs)]
            kl, tokens = distributed.all_gather_rows(torch.stack(local, 1)).unbind(1)
        advantages, metrics = rloo_advantages(rewards_per_func, self.reward_weights, self.config.options, kl=kl)
        if kl is not None:
            metrics["kl"] = kl.sum() / tokens.sum().clamp(min=1.0)
        return advantages, metrics

    def compute_loss(self, batch: GenerationBatch, rows: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The RLOO loss of ``rows`` of the batch (the mean over them, TRL's) over ``gradient_accumulation_steps``,
        computed as the policy's forward, and its metrics (TRL names, plus ``loss``)."""
        b = batch
        loss, metrics = self.engine(self.policy_loss, self.config.options, b.input_ids[rows], b.attention_mask[rows],
                                    b.targets[rows], b.advantages[rows], b.old_logprobs[rows])
        loss = loss / self.config.gradient_accumulation_steps
        return loss, {"loss": float(loss.detach()), **as_floats(metrics)}

    def policy_loss(self, model: nn.Module, options: RLOOOptions, input_ids: Tensor, attention_mask: Tensor,
                    targets: Tensor, advantages: Tensor, old_logprobs: Tensor):
        """Inside the policy's forward: hidden states of the rows and the RLOO loss on them."""
        hidden, packed, (targets, old_logprobs) = self.response_inputs(model, input_ids, attention_mask, targets,
                                                                        old_logprobs)
        return losses.rloo_loss(hidden, *hf.get_lm_head(model), targets, advantages, options,
                                self.config.loss_backend, old_logprobs=old_logprobs,
                                temperature=self.config.temperature, packed=packed,
                                deterministic=self.config.deterministic, transform=hf.logit_transform(model))
