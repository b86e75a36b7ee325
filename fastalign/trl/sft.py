"""``SFTTrainer``: TRL 1.16's, with the loss through :func:`fastalign.fused_linear_cross_entropy` inside the
forward."""
from __future__ import annotations

import inspect

import trl

from ..functional import fused_linear_cross_entropy
from .head import FusedLoss, gathered_mean, loss_and_outputs


class SFTTrainer(FusedLoss, trl.SFTTrainer):
    """TRL 1.16's ``SFTTrainer`` (same constructor, ``trl.SFTConfig``) whose loss is fastalign's fused cross-entropy.

    The model's forward returns the loss and TRL's metrics (``entropy``, ``mean_token_accuracy``) computed from its
    last hidden states and lm_head in one pass over the vocabulary, without the logits. ``loss_type`` ``"nll"`` and
    ``"dft"`` and ``label_smoothing_factor`` (nll only, as TRL) run in the fused op, where TRL 1.16 needs an extra
    forward with the full logits for smoothing. The data (``completion_only_loss``, ``assistant_only_loss``,
    ``packing``, ``padding_free``, truncation, chat templates), the collator, callbacks and checkpoints are TRL's
    own; a ``padding_free`` / ``packing`` row runs through fastalign's packed attention (each sequence attending to
    itself only: per-sequence ``sdpa``, flash-attention's varlen or a block-diagonal mask). The loss is the sum over
    ``num_items_in_batch`` as transformers passes it (else the mean over the batch's trained tokens), scaled by the
    process count under ``average_tokens_across_devices``, as TRL. Metrics under TRL's names with TRL's aggregation
    (sums and counts across processes), and ``num_tokens``.

    Args:
        fastalign_options: the fused op's own options (``backend``, ``chunk_size``, ``deterministic``,
            ``check_finite``; see ``fastalign.trl.head.FASTALIGN_OPTIONS``), default None.
        *args, **kwargs: ``trl.SFTTrainer``'s.

    A model that scales or soft-caps its logits gets the same transform in the fused op (``fastalign.trl.head``).
    Refused at construction (``ValueError``): ``compute_loss_func`` (it takes the full logits), sequence parallelism
    (untested here), vision-language models, the MoE router auxiliary loss.
    """

    def __init__(self, *args, fastalign_options: dict | None = None, **kwargs):
        bound = inspect.signature(trl.SFTTrainer.__init__).bind_partial(None, *args, **kwargs).arguments
        if bound.get("compute_loss_func") is not None:
            raise ValueError("SFTTrainer: compute_loss_func is not supported by fastalign.trl (it takes the model's "
                             "full logits, which the fused loss never builds); use loss_type / "
                             "label_smoothing_factor, or trl.SFTTrainer")
        super().__init__(*args, fastalign_options=fastalign_options, **kwargs)
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and parallelism.sp_enabled:
            raise ValueError("SFTTrainer: sequence parallelism (parallelism_config sp_size > 1) is not supported by "
                             "fastalign.trl (under DeepSpeed's Ulysses/ALST the loss is the model's own, reduced "
                             "across ranks); use trl.SFTTrainer")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        inputs["use_cache"] = False
        model_kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        # TRL smooths the nll loss only (its dft loss ignores label_smoothing_factor)
        smoothing = args.label_smoothing_factor if args.loss_type == "nll" else 0.0

        def sft_loss(hidden, targets, weight, bias, **transform):
            out = fused_linear_cross_entropy(hidden, weight, targets, bias, loss_type=args.loss_type,
                                             label_smoothing=smoothing, num_items_in_batch=num_items_in_batch,
                                             **transform, **self._fastalign_options)
            return out, (targets != -100).sum()

        out, count = model(**model_kwargs, labels=inputs["labels"], fastalign_loss=sft_loss)
        loss = out.loss
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages the gradients
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._log_metrics(mode, out.metrics, count, inputs)
        return loss_and_outputs(model, model_kwargs, loss, return_outputs)

    def _log_metrics(self, mode: str, values: dict, count, inputs) -> None:
        """TRL's ``SFTTrainer`` metrics from the op's means over ``count`` trained tokens, aggregated as TRL does."""
        metrics, accelerator = self._metrics[mode], self.accelerator
        for name in ("entropy", "mean_token_accuracy"):
            metrics[name].append(gathered_mean(accelerator, values[name], count))
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:  # padding-free: one packed row, no attention mask
                tokens = inputs["position_ids"].new_tensor(inputs["position_ids"].size(1))
            self._total_train_tokens += accelerator.gather_for_metrics(tokens).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
