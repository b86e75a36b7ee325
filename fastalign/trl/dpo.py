"""``DPOTrainer``: TRL 1.16's, with the loss through :func:`fastalign.fused_linear_dpo_loss` inside the forward."""
from __future__ import annotations

import trl

from ..functional import fused_linear_dpo_loss
from .head import FusedLoss, gathered_mean, loss_and_outputs


class DPOTrainer(FusedLoss, trl.DPOTrainer):
    """TRL 1.16's ``DPOTrainer`` (same constructor, ``trl.DPOConfig``) whose loss is fastalign's fused DPO op.

    The policy's forward returns the DPO loss and TRL's metrics computed from its last hidden states and lm_head
    (log-probs, ``entropy``, ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy`` and WPO's ``lse(2z)``
    from one pass over the vocabulary, without the logits). The reference log-probs (a reference model, the peft
    adapter disabled, or ``precompute_ref_log_probs``), the data, the callbacks and the checkpoints are TRL's own.
    Every ``DPOConfig`` option is TRL's: ``loss_type`` (lists, ``loss_weights``), ``beta``, ``label_smoothing``,
    ``f_divergence_type``, ``f_alpha_divergence_coef``, ``ld_alpha``, ``use_weighting``, ``discopop_tau``, and
    ``padding_free`` (which TRL 1.16 turns off): the policy's forward then runs packed, one row of the batch's real
    tokens, each sequence attending to itself only (``fastalign.hf.packed_hidden_states``). Metrics are logged
    under TRL's names with TRL's aggregation (sums and counts across processes).

    Args:
        fastalign_options: the fused op's own options (``backend``, ``chunk_size``, ``deterministic``,
            ``check_finite``; see ``fastalign.trl.head.FASTALIGN_OPTIONS``), default None.
        *args, **kwargs: ``trl.DPOTrainer``'s.

    Models that scale or soft-cap their logits get their transform in the op (``fastalign.hf.logit_transform``).
    Refused at construction (``ValueError``): vision-language models, the MoE router auxiliary loss,
    a logit transform the ops cannot reproduce (two scales or soft-caps at once, a non-positive one).
    """

    def __init__(self, *args, **kwargs):
        config = kwargs["args"] if "args" in kwargs else args[1] if len(args) > 1 else None
        # padding_free: TRL 1.16 falls back to padding (with a warning); here the policy runs packed on TRL's padded
        # batches (the collator pads as TRL's; the reference passes stay TRL's, padded)
        packed = bool(getattr(config, "padding_free", False))
        if packed:
            config.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            if packed:
                config.padding_free = True
        self._packed = packed

    def _reference_logps(self, inputs):
        """TRL's reference sequence log-probs ``([B], [B])`` of the chosen and rejected completions."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        # TRL's own reference pass: the reference model, or the policy with its adapter disabled ("ref" adapter)
        return self.compute_ref_log_probs(self.model if self.ref_model is None else self.ref_model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        seq_len = completion_mask.size(1) - 1
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs)
        args = self.args

        def dpo_loss(hidden, targets, weight, bias, cu_seqlens=None, **transform):
            if cu_seqlens is None:  # prompt-learning peft prepends virtual tokens: keep the real tokens' positions
                hidden, targets = hidden[:, -seq_len:], targets[:, -seq_len:]
            return fused_linear_dpo_loss(
                hidden, weight, targets, bias=bias, cu_seqlens=cu_seqlens, ref_chosen_logps=ref_chosen_logps,
                ref_rejected_logps=ref_rejected_logps, beta=self.beta, loss_type=list(self.loss_types),
                loss_weights=list(self.loss_weights), label_smoothing=self.label_smoothing,
                f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                discopop_tau=args.discopop_tau, ld_alpha=self.ld_alpha, use_weighting=self.use_weighting,
                vocab_metrics=True, **transform, **self._fastalign_options)

        out = model(**model_kwargs, labels=labels, fastalign_loss=dpo_loss, fastalign_packed=self._packed)
        self._log_metrics(mode, out, inputs)
        return loss_and_outputs(model, model_kwargs, out.loss, return_outputs)

    def _log_metrics(self, mode: str, out, inputs) -> None:
        """TRL's ``DPOTrainer`` metrics from the op's outputs, aggregated as TRL does across processes."""
        metrics, accelerator = self._metrics[mode], self.accelerator
        chosen_mask, rejected_mask = inputs["completion_mask"][..., 1:].chunk(2, dim=0)
        chosen_tokens, rejected_tokens = chosen_mask.sum(), rejected_mask.sum()
        metrics["entropy"].append(gathered_mean(accelerator, out.metrics["entropy"], chosen_tokens + rejected_tokens))
        if mode == "train":
            num_tokens = accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["logits/chosen"].append(gathered_mean(accelerator, out.metrics["logits/chosen"], chosen_tokens))
        metrics["logits/rejected"].append(gathered_mean(accelerator, out.metrics["logits/rejected"], rejected_tokens))
        metrics["mean_token_accuracy"].append(gathered_mean(accelerator, out.metrics["mean_token_accuracy"],
                                                            chosen_tokens))
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        for name, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                            ("rewards/accuracies", (chosen > rejected).float()), ("rewards/margins", chosen - rejected),
                            ("logps/chosen", out.chosen_logps), ("logps/rejected", out.rejected_logps)):
            metrics[name].append(accelerator.gather(value).mean().item())
