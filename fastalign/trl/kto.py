"""``KTOTrainer``: TRL 1.16's, with the loss through :func:`fastalign.fused_linear_kto_loss` inside the forward."""
from __future__ import annotations

import torch
import trl

from ..functional import fused_linear_kto_loss, fused_linear_logprobs
from .head import FusedLoss, loss_and_outputs


class KTOTrainer(FusedLoss, trl.KTOTrainer):
    """TRL 1.16's ``KTOTrainer`` (same constructor, ``trl.KTOConfig``) whose loss is fastalign's fused KTO op.

    The policy's forward returns the KTO loss from its last hidden states and lm_head, without the logits; the batch
    KL estimate (TRL's no-grad passes on the mismatched pairs), the reference log-probs (a reference model, the peft
    adapter disabled, or ``precompute_ref_log_probs``), the data, callbacks and checkpoints are TRL's own. Options:
    ``loss_type`` (``kto``, ``apo_zero_unpaired``), ``beta``, ``desirable_weight``, ``undesirable_weight``. Metrics
    under TRL's names and aggregation; the ``entropy`` metric takes one more forward-only pass over the vocabulary
    (the KTO op does not return it yet), ``logits/*`` (the mean transformed logit, as TRL's fused head) come from
    the op's own pass (``vocab_metrics``). Models that scale or soft-cap their logits get their transform.

    Args:
        fastalign_options: the fused op's own options (``backend``, ``chunk_size``, ``deterministic``,
            ``check_finite``), default None.
        *args, **kwargs: ``trl.KTOTrainer``'s.

    Refused at construction (``ValueError``): as :class:`fastalign.trl.DPOTrainer`.
    """

    def _reference(self, batch):
        """TRL's reference completion log-probs ``[B]`` and KL-pair log-probs (None without the KL term)."""
        if self.precompute_ref_logps:
            return batch["ref_logps"], batch["ref_KL_logps"] if self.calculate_KL else None
        return self.compute_ref_log_probs(self.model if self.ref_model is None else self.ref_model, batch)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        labels = torch.as_tensor(batch["label"], dtype=torch.bool, device=device)
        ref_logps, ref_kl_logps = self._reference(batch)
        if self.calculate_KL:
            kl = (self._compute_kl_logps(model, batch) - ref_kl_logps).mean().detach()
            kl = self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)
        else:
            kl = torch.zeros(1, device=device)
        model_kwargs = {k: v for k, v in batch.items() if k not in {
            "completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
            "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}}
        model_kwargs["use_cache"] = False
        completion_labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        seq_len = batch["input_ids"].size(1) - 1
        options = self._fastalign_options

        def kto_loss(hidden, targets, weight, bias, **transform):
            # Prompt-learning peft prepends virtual tokens: keep the positions of the real tokens
            hidden, targets = hidden[:, -seq_len:], targets[:, -seq_len:]
            out = fused_linear_kto_loss(hidden, weight, targets, labels, ref_logps=ref_logps,
                                        kl=kl if self.loss_type == "kto" else None, bias=bias, beta=self.beta,
                                        desirable_weight=self.desirable_weight,
                                        undesirable_weight=self.undesirable_weight, loss_type=self.loss_type,
                                        vocab_metrics=True, **transform, **options)
            with torch.no_grad():
                _, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                                   **transform, **options)
            return out, entropy

        out, entropy = model(**model_kwargs, labels=completion_labels, fastalign_loss=kto_loss)
        self._log_metrics(mode, batch, labels, kl, out, entropy)
        return loss_and_outputs(model, model_kwargs, out.loss, return_outputs)

    def _log_metrics(self, mode, batch, labels, kl, out, entropy) -> None:
        """TRL's ``KTOTrainer`` metrics, aggregated as TRL does across processes."""
        metrics, gather = self._metrics[mode], self.accelerator.gather_for_metrics
        metrics["kl"].append(kl.item())
        mask = batch["completion_mask"][:, 1:].bool()
        tokens = gather(mask.sum()).sum()
        metrics["entropy"].append((gather(entropy[mask].sum()).sum() / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(batch["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        means = {}
        for side, rows in (("chosen", labels), ("rejected", ~labels)):
            side_tokens = gather(out.metrics[f"count/{side}_tokens"].float()).sum().item()
            if side_tokens > 0:
                logits = gather(out.metrics[f"logits/{side}_sum"].float()).sum().item()
                metrics[f"logits/{side}"].append(logits / side_tokens)
            count = gather(rows.sum()).sum().item()
            if count > 0:
                means[side] = gather(out.rewards[rows].nansum()).nansum().item() / count
                metrics[f"rewards/{side}"].append(means[side])
                metrics[f"logps/{side}"].append(gather(out.logps[rows].nansum()).nansum().item() / count)
        if len(means) == 2:
            metrics["rewards/margins"].append(means["chosen"] - means["rejected"])
