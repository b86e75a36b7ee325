"""``RLOOTrainer``: TRL 1.16's, with the loss through :func:`fastalign.fused_linear_rloo_loss` inside the forward."""
from __future__ import annotations

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

from ..functional import fused_linear_rloo_loss
from .head import FusedLoss, gathered_mean


class RLOOTrainer(FusedLoss, trl.RLOOTrainer):
    """TRL 1.16's ``RLOOTrainer`` (same constructor, ``trl.RLOOConfig``) whose loss is fastalign's fused RLOO op.

    The policy's forward returns the clipped sequence-level loss (``mean_b -min(r A, clip(r) A)``, ``r`` the ratio
    of the completions' summed log-probs to TRL's ``old_logps``) and TRL's metrics from its last hidden states and
    lm_head, without the logits. Generation (HF ``generate``, vLLM), reward functions, the leave-one-out advantages
    with the KL penalty in the reward, the old and reference log-probs, callbacks and checkpoints are TRL's own.
    Loss options: ``epsilon``, ``epsilon_high``, ``temperature`` (and, upstream of the loss and so TRL's:
    ``beta``, ``num_iterations``, ``normalize_advantages``, ``reward_clip_range``, ``mask_truncated_completions``).
    Metrics ``entropy`` and ``clip_ratio/*`` under TRL's names with TRL's aggregation (sums and counts, extremes of
    the gathered values).

    Args:
        fastalign_options: the fused op's own options (``backend``, ``chunk_size``, ``deterministic``,
            ``check_finite``; see ``fastalign.trl.head.FASTALIGN_OPTIONS``), default None.
        *args, **kwargs: ``trl.RLOOTrainer``'s.

    Refused at construction (``ValueError``): as :class:`fastalign.trl.DPOTrainer`.
    """

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], mask], dim=1)
        length = completion_ids.size(1)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-length] = -100

        def rloo_loss(hidden, targets, weight, bias, **transform):
            return fused_linear_rloo_loss(
                hidden[:, -length:], weight, targets[:, -length:], inputs["advantages"],
                old_logprobs=inputs["old_logps"], mask=mask, epsilon=self.epsilon_low,
                epsilon_high=self.epsilon_high, bias=bias, temperature=self.temperature, **transform,
                **self._fastalign_options)

        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fastalign_loss=rloo_loss)
        self._log_metrics(mode, out.metrics, mask)
        return out.loss

    def _log_metrics(self, mode: str, values: dict, mask) -> None:
        """TRL's metrics: the entropy's sum and token count reduced over processes, the per-completion clip
        indicators gathered (their means as sums and counts, their extremes as extremes of the extremes)."""
        metrics, accelerator = self._metrics[mode], self.accelerator
        gather = accelerator.gather
        metrics["entropy"].append(gathered_mean(accelerator, values["entropy"], mask.sum(), gather=gather))
        sequences = mask.size(0)
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            metrics[name].append(gathered_mean(accelerator, values[name], sequences, gather=gather))
        metrics["clip_ratio/low_min"].append(nanmin(gather(values["clip_ratio/low_min"])).item())
        metrics["clip_ratio/high_max"].append(nanmax(gather(values["clip_ratio/high_max"])).item())
