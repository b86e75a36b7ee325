"""``CPOTrainer`` and ``ORPOTrainer``: TRL 1.16's experimental ones, with the loss through fastalign's fused ops
(:func:`fastalign.fused_linear_cpo_loss`, :func:`fastalign.fused_linear_orpo_loss`) inside the forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.experimental import cpo, orpo

from ..functional import fused_linear_cpo_loss, fused_linear_orpo_loss
from .head import FusedLoss


class _FusedPairs(FusedLoss):
    """``get_batch_loss_metrics`` of TRL's experimental reference-free pair trainers through a fused op: chosen and
    rejected sequences concatenated as TRL does, the op on every position's hidden state (TRL's ``logits/*`` are the
    mean logit over every position and the vocabulary: ``h . mean_v w_v + mean_v b_v``, exact, without the logits).
    A subclass gives ``_logit_positions`` (the positions TRL's ``logits/*`` average over: ``None`` all of them,
    ``-1`` all but the last), ``_padding_value`` and ``_fused_loss(hidden [2B, T, H], weight, targets [2B, T], bias,
    input_ids, attention_mask)``, the op's ``DPOLossOutput`` (chosen rows first)."""

    _logit_transforms = False  # TRL's logits/* are the model's own logits at every position

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_encoder_decoder:
            raise ValueError(f"{type(self).__name__}: encoder-decoder models are not supported by fastalign.trl")

    def _extra_metrics(self, out) -> dict:
        return {}

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        batch = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self._padding_value,
                                         device=self.accelerator.device)
        input_ids, attention_mask = batch["concatenated_input_ids"], batch["concatenated_attention_mask"]
        rows = input_ids.size(0) // 2
        # Every position's hidden state (the last one predicts nothing): TRL's logits/* average over all of them
        targets = F.pad(batch["concatenated_labels"][:, 1:], (0, 1), value=-100)

        def pair_loss(hidden, targets, weight, bias, **transform):  # refused unless neutral
            out = self._fused_loss(hidden, weight, targets, bias, input_ids, attention_mask)
            with torch.no_grad():
                mean_logits = hidden[:, :self._logit_positions] @ weight.mean(0)
                mean_logits = mean_logits + (0.0 if bias is None else bias.mean())
            return out, mean_logits[:rows].mean(), mean_logits[rows:].mean()

        out, chosen_logits, rejected_logits = model(input_ids, attention_mask=attention_mask, use_cache=False,
                                                    shift_labels=targets, fastalign_loss=pair_loss)
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected,
                   "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": chosen - rejected,
                   "logps/rejected": out.rejected_logps, "logps/chosen": out.chosen_logps,
                   "logits/rejected": rejected_logits, "logits/chosen": chosen_logits,
                   "nll_loss": out.metrics["nll_loss"], **self._extra_metrics(out)}
        prefix = "eval_" if train_eval == "eval" else ""
        return out.loss, {f"{prefix}{k}": gather(v).mean().item() for k, v in metrics.items()}


class CPOTrainer(_FusedPairs, cpo.CPOTrainer):
    """TRL 1.16's ``trl.experimental.cpo.CPOTrainer`` (same constructor, its ``CPOConfig``) whose loss is fastalign's
    fused CPO op: ``loss_type`` (``sigmoid``, ``hinge``, ``ipo``, ``simpo``), ``beta``, ``label_smoothing``,
    ``simpo_gamma``, ``cpo_alpha``, ``alpha`` (AlphaPO); TRL's metrics. ``fastalign_options`` as in
    :class:`fastalign.trl.DPOTrainer`; refused: as there, and encoder-decoder models."""

    _logit_positions = None

    @property
    def _padding_value(self):
        return self.pad_token_id

    def _fused_loss(self, hidden, weight, targets, bias, input_ids, attention_mask):
        args = self.args
        return fused_linear_cpo_loss(hidden, weight, targets, bias=bias, beta=self.beta, loss_type=self.loss_type,
                                     label_smoothing=self.label_smoothing, simpo_gamma=args.simpo_gamma,
                                     cpo_alpha=self.cpo_alpha, alpha=self.alpha, **self._fastalign_options)


class ORPOTrainer(_FusedPairs, orpo.ORPOTrainer):
    """TRL 1.16's ``trl.experimental.orpo.ORPOTrainer`` (same constructor, its ``ORPOConfig``) whose loss is
    fastalign's fused ORPO op (``beta``; the NLL over the chosen prompt and response, as TRL); TRL's metrics, with
    ``log_odds_ratio`` and ``log_odds_chosen``. ``fastalign_options`` and refusals as :class:`CPOTrainer`."""

    _logit_positions = -1

    @property
    def _padding_value(self):
        return self.padding_value

    def _fused_loss(self, hidden, weight, targets, bias, input_ids, attention_mask):
        rows = input_ids.size(0) // 2
        # TRL's NLL: every attended token of the chosen sequences, prompt included
        nll_targets = F.pad(input_ids[:rows, 1:].masked_fill(attention_mask[:rows, 1:] == 0, -100), (0, 1),
                            value=-100)
        return fused_linear_orpo_loss(hidden, weight, targets, bias=bias, beta=self.beta, nll_targets=nll_targets,
                                      **self._fastalign_options)

    def _extra_metrics(self, out) -> dict:
        return {"log_odds_ratio": out.metrics["log_odds_ratio"], "log_odds_chosen": out.metrics["log_odds_chosen"]}
