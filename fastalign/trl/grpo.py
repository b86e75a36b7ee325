"""``GRPOTrainer``: TRL 1.16's, with the loss through :func:`fastalign.fused_linear_grpo_loss` inside the forward."""
from __future__ import annotations

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

from ..functional import fused_linear_grpo_loss
from ..objectives.grpo import GRPO_LOSSES, high_entropy_mask
from .head import FusedLoss, gathered_mean


class GRPOTrainer(FusedLoss, trl.GRPOTrainer):
    """TRL 1.16's ``GRPOTrainer`` (same constructor, ``trl.GRPOConfig``) whose loss is fastalign's fused GRPO op.

    The policy's forward returns the loss, the per-token log-probs and entropies and TRL's metrics computed from its
    last hidden states and lm_head, without the logits. Generation (HF ``generate``, vLLM), reward functions,
    advantages, the old / reference / sampling log-probs, callbacks and checkpoints are TRL's own. Every ``GRPOConfig``
    loss option is TRL's (``loss_type``, ``importance_sampling_level``, ``epsilon``, ``epsilon_high``, ``delta``,
    ``beta``, ``use_bias_correction_kl``, ``off_policy_mask_threshold``, ``top_entropy_quantile``, ``entropy_coef``
    and the adaptive entropy controller, vLLM's importance-sampling correction, the tool mask, sapo's and vespo's
    parameters, ``temperature``), with TRL's normalizers over gradient accumulation and processes; metrics are
    logged under TRL's names with TRL's aggregation.

    Args:
        fastalign_options: the fused op's own options (``backend``, ``chunk_size``, ``deterministic``,
            ``check_finite``; see ``fastalign.trl.head.FASTALIGN_OPTIONS``), default None.
        *args, **kwargs: ``trl.GRPOTrainer``'s.

    ``cast_lm_head_to_fp32`` as TRL (the op on fp32 hidden states and lm_head, outside autocast); models that scale
    or soft-cap their logits get their transform in the op. Refused at construction (``ValueError``): as
    :class:`fastalign.trl.DPOTrainer`, and ``top_entropy_quantile < 1`` with several processes (the op takes the
    quantile over its own batch, TRL over every process's).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.top_entropy_quantile < 1 and self.accelerator.num_processes > 1:
            raise ValueError("GRPOTrainer: top_entropy_quantile < 1 with several processes is not supported by "
                             "fastalign.trl (the fused op takes the entropy quantile over the process's batch, TRL "
                             "over every process's); use one process or trl.GRPOTrainer")

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        args = self.args
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        length = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-length] = -100

        # TRL's normalizers. The op divides dapo/cispo/vespo by this batch's completion tokens, the others by nothing
        # over the accumulation steps; its entropy bonus scales with its loss, so its coefficient is rescaled.
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if GRPO_LOSSES[self.loss_type].normalizer == "num_items_in_batch":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / args.steps_per_generation
            policy_scale = loss_scale = (mask.sum().float().clamp(min=1.0) / normalizer).item()
        else:
            policy_scale, loss_scale = 1.0, 1.0 / accumulation
        coef = 0.0
        if self._entropy_bonus_enabled and not (self.use_adaptive_entropy
                                                and self._last_world_entropy > args.entropy_target):
            coef = self.entropy_coef
        use_is_ratio = self.loss_type == "vespo" or (self.use_vllm and self.vllm_importance_sampling_correction)
        off_policy = self.off_policy_mask_threshold is not None

        def grpo_loss(hidden, targets, weight, bias, **transform):
            return fused_linear_grpo_loss(
                hidden[:, -length:], weight, targets[:, -length:], inputs["advantages"],
                old_logprobs=inputs.get("old_per_token_logps"), mask=mask, bias=bias, loss_type=self.loss_type,
                importance_sampling_level=self.importance_sampling_level, epsilon=args.epsilon,
                epsilon_high=self.epsilon_high, delta=args.delta, beta=self.beta,
                ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
                use_bias_correction_kl=args.use_bias_correction_kl,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio") if use_is_ratio else None,
                off_policy_mask_threshold=self.off_policy_mask_threshold,
                sampling_logprobs=inputs.get("sampling_per_token_logps") if off_policy else None,
                top_entropy_quantile=self.top_entropy_quantile, entropy_coef=coef / (accumulation * loss_scale),
                sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
                vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
                vespo_lambda_neg=args.vespo_lambda_neg, max_completion_length=self.max_completion_length,
                temperature=self.temperature, **transform, **self._fastalign_options)

        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fastalign_loss=grpo_loss)
        if self._entropy_bonus_enabled:
            policy_loss = out.metrics.get("policy_loss", out.loss.detach()) * policy_scale
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                self._update_entropy_coef(out.entropy, mask)
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._log_metrics(mode, out.metrics, mask, inputs["advantages"].dim() == 1)
        return out.loss * loss_scale

    def _update_entropy_coef(self, entropy, mask) -> None:
        """TRL's adaptive entropy controller: the window's entropy over the effective mask, then at the optimizer
        step the coefficient moves by ``entropy_coef_delta`` towards ``entropy_target``."""
        args = self.args
        effective = mask.float()
        if self.top_entropy_quantile < 1.0:
            effective = effective * high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
        stats = torch.stack([(entropy * effective).sum(), effective.sum()])
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if self.accelerator.sync_gradients:
            totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None

    def _log_metrics(self, mode: str, values: dict, mask, per_sequence_advantages: bool) -> None:
        """TRL's metrics from the op's per-batch ones: masked means as sums and counts over processes (a count per
        sequence where TRL's tensor is ``[B, 1]``), the per-sequence extremes' extreme over processes."""
        metrics, accelerator = self._metrics[mode], self.accelerator
        tokens, sequences = mask.sum(), mask.size(0)
        ratio_count = sequences if self.importance_sampling_level == "sequence" and per_sequence_advantages else tokens

        def mean(name, count):
            metrics[name].append(gathered_mean(accelerator, values[name], count, gather=accelerator.gather))

        if self.beta != 0.0:
            mean("kl", tokens)
        mean("entropy", tokens)
        if "clip_ratio/low_mean" in values:  # the clipped surrogate's metrics (TRL's)
            for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
                mean(name, ratio_count)
            metrics["clip_ratio/low_min"].append(nanmin(accelerator.gather(values["clip_ratio/low_min"])).item())
            metrics["clip_ratio/high_max"].append(nanmax(accelerator.gather(values["clip_ratio/high_max"])).item())
        elif self.loss_type == "cispo":
            mean("cispo_clip_ratio", ratio_count)
        elif self.loss_type == "vespo":
            mean("vespo/phi_seq_mean", sequences if per_sequence_advantages else tokens)
